"""Training recipes: one TOML file holds everything a weights file is trained from.

    featcodec train --recipe recipes/stage5.toml            # run from the repository root

A recipe names the backbone and split, the training settings (``[train]``: the fields of
:class:`~featcodec.train.TrainConfig`), the BU's sizes (``[bu]``: fields of
:class:`~featcodec.bottleneck.BottleneckConfig`), and the data: one ``[[data]]`` table per
folder, with ``hold_out`` images kept out by a hash of their path (:mod:`featcodec.holdout`:
400 of ``train/`` are the tune set) and ``repeat`` to weight a folder. Folders are relative to
``data_root`` (the recipe's, or ``--data-root``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import FeatcodecError
from .holdout import split_held_out

TOP_KEYS = {"backbone", "split", "out", "data_root", "train", "bu", "data"}
DATA_KEYS = {"path", "hold_out", "repeat"}
BU_KEYS = {"latent_channels", "hidden_channels", "stride", "layers", "gdn", "entropy", "quant_step", "refine_blocks",
           "end_kernel", "hyper_channels"}


class RecipeError(FeatcodecError):
    """A recipe file that cannot be read or names something unknown."""


@dataclass
class Recipe:
    """A loaded recipe: what ``featcodec train --recipe`` runs."""

    path: Path
    backbone: str
    split: str
    train: dict  # TrainConfig fields other than backbone and split
    bu: dict  # BottleneckConfig fields other than the split tensor's shape
    files: list[Path]  # the training images, each folder's repeated as it says
    data: list[dict]  # per folder: path, images used, held out, repeat
    out: Path | None
    sha256: str

    def describe_data(self) -> str:
        """One line: the folders, with their image counts, hold-outs and repeats."""
        parts = []
        for entry in self.data:
            part = f"{entry['images']} of {entry['path']}"
            if entry["held_out"]:
                part += f" ({entry['held_out']} held out)"
            if entry["repeat"] > 1:
                part += f" x{entry['repeat']}"
            parts.append(part)
        return " + ".join(parts)


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: not a valid TOML recipe ({exc})") from None


def _check_keys(path: Path, where: str, table, allowed: set[str]) -> None:
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: {where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) in {where}: {', '.join(unknown)}")


def load_recipe(path: str | Path, data_root: str | Path | None = None) -> Recipe:
    """Read and check a recipe, and list its training images (``data_root`` overrides the recipe's)."""
    from .train import TrainConfig, list_images

    path = Path(path)
    raw = _read_toml(path)
    _check_keys(path, "the recipe", raw, TOP_KEYS)
    train_keys = {f.name for f in fields(TrainConfig)} - {"backbone", "split"}
    _check_keys(path, "[train]", raw.get("train", {}), train_keys)
    _check_keys(path, "[bu]", raw.get("bu", {}), BU_KEYS)
    for key in ("backbone", "split"):
        if not isinstance(raw.get(key), str):
            raise RecipeError(f"{path}: '{key}' must be given as a string")
    folders = raw.get("data")
    if not isinstance(folders, list) or not folders:
        raise RecipeError(f"{path}: give at least one [[data]] folder")
    root = Path(data_root if data_root is not None else raw.get("data_root", "."))
    files, data = [], []
    for entry in folders:
        _check_keys(path, "[[data]]", entry, DATA_KEYS)
        hold_out, repeat = entry.get("hold_out", 0), entry.get("repeat", 1)
        if not isinstance(entry.get("path"), str) or not isinstance(hold_out, int) or hold_out < 0 \
                or not isinstance(repeat, int) or repeat < 1:
            raise RecipeError(f"{path}: a [[data]] folder needs a path, hold_out >= 0 and repeat >= 1: {entry}")
        folder = root / entry["path"]
        _, kept = split_held_out(list_images(folder), folder, hold_out)
        files += kept * repeat
        data.append({"path": entry["path"], "images": len(kept), "held_out": hold_out, "repeat": repeat})
    out = raw.get("out")
    return Recipe(
        path=path, backbone=raw["backbone"], split=raw["split"], train=dict(raw.get("train", {})),
        bu=dict(raw.get("bu", {})), files=files, data=data, out=Path(out) if out else None,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
