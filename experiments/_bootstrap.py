"""Shared start of the experiment probes: quiet compressai's import warning, find featcodec.

A copy of ``benchmarks/_bootstrap.py``; ROOT is the repository root (this folder's parent).

Each script does ``from _bootstrap import ROOT`` before importing featcodec (Python puts the
script's folder first on sys.path, so this works from any working directory).
"""

import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")  # raised while importing compressai

ROOT = Path(__file__).resolve().parent.parent

try:
    import featcodec  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
