"""Fixed held-out images: the same ones on every machine and in every run, chosen by a hash of their path.

Recipes, data mixes, sizes, lambdas and step counts are chosen on a *tune* set of photos that no
BU trains on: the 400 images of the training folder (``../shared/data/train``, ImageNet-like,
1000 classes) whose SHA-256 of their path below the folder ranks lowest. ``val/`` is only
measured to report what ships. The same rule keeps some photos of any other folder (the pool)
out of training, to measure agreement on photos like the training ones but unseen.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

TUNE_COUNT = 400  # images of the training folder kept out as the tune set
POOL_HELD_OUT = 500  # photos of another training folder kept out, to measure the gap there


def _rank(path: Path, root: Path) -> str:
    return hashlib.sha256(path.relative_to(root).as_posix().encode()).hexdigest()


def split_held_out(files: list[Path], root: str | Path, count: int) -> tuple[list[Path], list[Path]]:
    """(held out, the rest) of ``files`` under ``root``: the ``count`` files whose path below ``root``
    hashes lowest are held out; both lists keep the order of ``files``."""
    root = Path(root)
    if count <= 0:
        return [], list(files)
    held = set(sorted(files, key=lambda path: _rank(path, root))[:count])
    return [p for p in files if p in held], [p for p in files if p not in held]
