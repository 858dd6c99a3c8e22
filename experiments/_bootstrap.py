"""Shared start of the experiment scripts: runs benchmarks/_bootstrap.py, which finds featcodec (installed or
in this checkout) and quiets compressai's import warning.

Each script does ``from _bootstrap import ROOT`` before importing featcodec (Python puts the script's
folder first on sys.path, so this works from any working directory).
"""

import runpy
from pathlib import Path

ROOT = runpy.run_path(str(Path(__file__).resolve().parent.parent / "benchmarks" / "_bootstrap.py"))["ROOT"]
