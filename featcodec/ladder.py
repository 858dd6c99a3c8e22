"""Rate ladders on disk: every rung's BU (CDF tables included) in one .safetensors file.

Tensor keys are ``rung{k}.<state-dict key>``. The safetensors header metadata
holds one JSON string under ``featcodec``: backbone, split, BU config and, per
rung, its lambda and any measured bytes per image and top-1. A rung whose BU is
sized differently from the ladder's (a joined ladder, see :func:`join_ladders`)
carries its own ``bu`` entry; such files are format 2, so older readers refuse
them cleanly. The first 8 bytes of the file's SHA-256 is the *weights tag* that
every bitstream record carries.

A ladder may store the weights of its BUs' convolutions in float16 (metadata
``weights_dtype``, see :func:`store_weights_as`), which halves the file; they load
into float32 modules, and the entropy models and CDF tables are kept exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from torch import nn

from .bottleneck import BottleneckConfig, make_unit
from .errors import FeatcodecError
from .fileio import atomic_write_bytes

METADATA_KEY = "featcodec"
LADDER_FORMAT = 1
MIXED_LADDER_FORMAT = 2  # some rung has a BU config of its own
WEIGHTS_ENV = "FEATCODEC_WEIGHTS"
WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # how conv weights are stored
_TRANSFORMS = ("g_a", "g_s", "g_r", "h_a", "h_s")  # the BU's conv stacks (g_r: refiner); entropy models stay float32


class LadderError(FeatcodecError):
    """A weights file that is missing, unreadable, or not a featcodec ladder."""


@dataclass
class Ladder:
    """The BUs of one (backbone, split), rung 0 = lowest rate."""

    backbone: str
    split: str
    config: BottleneckConfig  # the ladder's BU config; a rung may differ in size (rungs[k].config)
    rungs: list[nn.Module]  # BUs of the kind each rung's config.entropy says
    rung_info: list[dict]  # per rung: lambda, and optional measured figures
    extra: dict = field(default_factory=dict)  # other metadata (training details)
    weights_tag: bytes = b""
    path: Path | None = None

    @property
    def is_variable(self) -> bool:
        """True for one variable-rate BU (gain units) that serves every real rate in 0..max_rate."""
        return len(self.rungs) == 1 and bool(self.rungs[0].config.rates)

    @property
    def max_rate(self) -> int:
        """The highest rate: the top rung's index, or the variable-rate BU's top anchor."""
        return self.rungs[0].config.rates - 1 if self.is_variable else len(self.rungs) - 1

    def rung(self, rate: float) -> nn.Module:
        """What codes at ``rate``: rung ``rate`` of a ladder, or the variable-rate BU at that rate (any
        real number in range); LadderError if out of range, or fractional for a ladder of rungs."""
        if not 0 <= rate <= self.max_rate:
            what = f"takes rates 0..{self.max_rate}" if self.is_variable else f"has rungs 0..{self.max_rate}"
            raise LadderError(f"rate {rate:g} is out of range: the {self.backbone}/{self.split} ladder {what}")
        if self.is_variable:
            return self.rungs[0].at_rate(rate)
        if not float(rate).is_integer():
            raise LadderError(
                f"rate {rate:g} is not a rung: the {self.backbone}/{self.split} ladder has rungs 0..{self.max_rate} "
                f"(fractional rates need a variable-rate ladder)"
            )
        return self.rungs[int(rate)]

    def sweep_rates(self, step: float = 0.25) -> list[float]:
        """The rates an ``eval --sweep`` measures: every rung, or for a variable-rate BU every ``step``."""
        if not self.is_variable:
            return list(range(len(self.rungs)))
        count = int(round(self.max_rate / step))
        return [round(i * step, 6) for i in range(count + 1)]

    def is_mixed(self) -> bool:
        """True if some rung's BU is sized differently from ``config``."""
        return any(unit.config != self.config for unit in self.rungs)

    def metadata(self) -> dict:
        """The JSON metadata stored in the file header."""
        rungs = [
            {**info, **({"bu": unit.config.to_dict()} if unit.config != self.config else {})}
            for info, unit in zip(self.rung_info, self.rungs)
        ]
        return {
            "format": MIXED_LADDER_FORMAT if self.is_mixed() else LADDER_FORMAT,
            "backbone": self.backbone,
            "split": self.split,
            "bu": self.config.to_dict(),
            "rungs": rungs,
            **self.extra,
        }


def conv_weight_keys(unit: nn.Module) -> set[str]:
    """State-dict keys of the weights and biases of the convolutions in ``unit``'s conv stacks."""
    keys = set()
    for name, module in unit.named_modules():
        if name.split(".")[0] in _TRANSFORMS and isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            keys.update(f"{name}.{param}" for param, _ in module.named_parameters(recurse=False))
    return keys


def store_weights_as(ladder: Ladder, dtype: str) -> None:
    """Make ``save_ladder`` store the conv weights of every rung as ``dtype`` ('float32' or 'float16').

    With float16 the weights in memory are rounded to float16 values now (and again at each
    save), so the ladder codes and measures the same before and after a save and load: measure
    (``eval --record``) after converting, not before.
    """
    _torch_dtype(dtype)
    ladder.extra["weights_dtype"] = dtype
    _round_conv_weights(ladder)


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``weights_dtype`` name; LadderError for an unknown one."""
    if name not in WEIGHTS_DTYPES:
        raise LadderError(f"unknown weights dtype {name!r}: use one of {', '.join(WEIGHTS_DTYPES)}")
    return WEIGHTS_DTYPES[name]


def _storage_dtype(ladder: Ladder) -> torch.dtype:
    return _torch_dtype(ladder.extra.get("weights_dtype", "float32"))


def _round_conv_weights(ladder: Ladder) -> None:
    storage = _storage_dtype(ladder)
    if storage == torch.float32:
        return
    with torch.no_grad():
        for unit in ladder.rungs:
            state = unit.state_dict(keep_vars=True)
            for key in conv_weight_keys(unit):
                state[key].copy_(state[key].to(storage))


def save_ladder(ladder: Ladder, path: Path) -> bytes:
    """Write the ladder atomically; returns its new weights tag. Rungs must have CDF tables.

    Conv weights are stored as the ladder's ``weights_dtype`` says (see :func:`store_weights_as`);
    for float16 the ladder's own weights are rounded in memory too, so they match the file.
    """
    from safetensors.torch import save

    for index, unit in enumerate(ladder.rungs):
        if not unit.has_coding_tables():
            raise LadderError(f"rung {index} has no coding tables: call build_coding_tables() first")
    storage = _storage_dtype(ladder)
    _round_conv_weights(ladder)
    tensors = {}
    for index, unit in enumerate(ladder.rungs):
        convs = conv_weight_keys(unit)
        for key, tensor in unit.state_dict().items():
            tensor = tensor.detach().cpu()
            tensors[f"rung{index}.{key}"] = (tensor.to(storage) if key in convs else tensor).contiguous()
    data = save(tensors, metadata={METADATA_KEY: json.dumps(ladder.metadata(), sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    ladder.path = Path(path)
    ladder.weights_tag = weights_tag(data)
    return ladder.weights_tag


def weights_tag(data: bytes) -> bytes:
    """First 8 bytes of SHA-256 over the weights file's bytes."""
    return hashlib.sha256(data).digest()[:8]


def read_ladder_metadata(path: Path) -> dict:
    """The featcodec metadata JSON from a safetensors header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[METADATA_KEY])
    except Exception as exc:  # safetensors raises its own SafetensorError
        kind = "no '%s' metadata" % METADATA_KEY if isinstance(exc, KeyError) else "unreadable header"
        raise LadderError(f"{path}: not a featcodec ladder ({kind})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (LADDER_FORMAT, MIXED_LADDER_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise LadderError(f"{path}: unsupported ladder format {found!r}")
    return meta


def load_ladder(path: str | Path) -> Ladder:
    """Load a ladder from a .safetensors file (never pickle); LadderError on any fault."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise LadderError(f"weights file not found: {path}")
    meta = read_ladder_metadata(path)
    data = path.read_bytes()
    try:
        tensors = load(data)
    except Exception as exc:
        raise LadderError(f"{path}: cannot read tensors ({str(exc).splitlines()[0]})") from None
    try:
        config = BottleneckConfig.from_dict(meta["bu"])
        rung_info = [dict(info) for info in meta["rungs"]]
        rung_configs = [BottleneckConfig.from_dict(info.pop("bu")) if "bu" in info else config for info in rung_info]
        backbone, split = meta["backbone"], meta["split"]
        _torch_dtype(meta.get("weights_dtype", "float32"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise LadderError(f"{path}: incomplete ladder metadata ({exc})") from None
    except FeatcodecError as exc:
        raise LadderError(f"{path}: {exc}") from None
    for index, rung_config in enumerate(rung_configs):
        problem = _mismatch(config, rung_config)
        if problem:
            raise LadderError(f"{path}: rung {index} {problem}")
    rungs = []
    for index, rung_config in enumerate(rung_configs):
        prefix = f"rung{index}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        unit = make_unit(rung_config)
        try:
            unit.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError) as exc:
            raise LadderError(f"{path}: rung {index} does not fit its config ({str(exc).splitlines()[0]})") from None
        if not unit.has_coding_tables():
            raise LadderError(f"{path}: rung {index} lacks valid coding tables")
        rungs.append(unit.eval())
    if not rungs:
        raise LadderError(f"{path}: the ladder has no rungs")
    known = {"format", "backbone", "split", "bu", "rungs"}
    return Ladder(
        backbone=backbone,
        split=split,
        config=config,
        rungs=rungs,
        rung_info=rung_info,
        extra={k: v for k, v in meta.items() if k not in known},
        weights_tag=weights_tag(data),
        path=path,
    )


def _mismatch(config: BottleneckConfig, other: BottleneckConfig) -> str:
    """Why ``other`` cannot sit in a ladder of ``config`` ('' if it can): the same split tensor, and
    learned entropy models (factorized or hyperprior, which may mix) or Huffman codes throughout."""
    if (other.entropy == "huffman") != (config.entropy == "huffman"):
        return f"uses the {other.entropy} entropy coder, the ladder {config.entropy}"
    if (other.in_channels, tuple(other.out_size)) != (config.in_channels, tuple(config.out_size)):
        return f"codes split tensors of {other.in_channels}x{other.out_size}, the ladder {config.in_channels}x{config.out_size}"
    return ""


def join_ladders(lower: Ladder, upper: Ladder) -> Ladder:
    """One ladder: the rungs of ``lower``, then those of ``upper`` (e.g. wider BUs for higher rates).

    Both must cut the same backbone at the same split; their BU sizes may differ, and so may
    their learned entropy models (factorized or hyperprior), but Huffman rungs join only Huffman
    rungs. The upper rungs keep their lambda and steps and record their training run (a rung
    that carries its own record, joined into ``upper`` earlier, keeps that one). The
    joined ladder stores float16 conv weights only if both do.
    """
    if (lower.backbone, lower.split) != (upper.backbone, upper.split):
        raise LadderError(
            f"cannot join a {lower.backbone}/{lower.split} ladder with a {upper.backbone}/{upper.split} one"
        )
    for unit in upper.rungs:
        problem = _mismatch(lower.config, unit.config)
        if problem:
            raise LadderError(f"cannot join: the upper ladder {problem}")
    training = upper.extra.get("training")
    upper_info = [{**({"training": training} if training else {}), **info} for info in upper.rung_info]
    extra = dict(lower.extra)
    if upper.extra.get("weights_dtype", "float32") != lower.extra.get("weights_dtype", "float32"):
        extra.pop("weights_dtype", None)  # float32 unless both store float16: never round silently
    return Ladder(lower.backbone, lower.split, lower.config, lower.rungs + upper.rungs,
                  lower.rung_info + upper_info, extra)


def select_rungs(ladder: Ladder, indexes: list[int]) -> Ladder:
    """A ladder of the rungs ``indexes`` of ``ladder``, in that order (LadderError for a bad index).

    Its BU config is that of the first selected rung, so rungs that share one config make a
    plain (not mixed) ladder, which ``--init-from`` accepts. Its ``training`` record is the
    first selected rung's own (a rung joined from another run carries that run's), and every
    other rung keeps the record of the run that trained it.
    """
    units = [ladder.rung(index) for index in indexes]
    if not units:
        raise LadderError("no rungs selected")
    base_training = ladder.extra.get("training")
    infos = []
    for index in indexes:
        info = dict(ladder.rung_info[index])
        if "training" not in info and base_training is not None:
            info["training"] = base_training
        infos.append(info)
    extra = dict(ladder.extra)
    if "training" in infos[0]:
        extra["training"] = infos[0]["training"]
        infos = [{k: v for k, v in info.items() if not (k == "training" and v == extra["training"])} for info in infos]
    return Ladder(ladder.backbone, ladder.split, units[0].config, units, infos, extra)


def weights_dirs() -> list[Path]:
    """Where ladders are looked up: $FEATCODEC_WEIGHTS, the installed package, the source tree."""
    dirs = []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]))
    package = Path(__file__).resolve().parent
    dirs += [package / "_weights", package.parent / "weights"]
    return dirs


HUFFMAN_VARIANT = "huffman-bu"


def find_ladder(backbone: str, split: str, variant: str | None = None) -> Path:
    """Path of the shipped ladder ``<backbone>/<split>[-<variant>].safetensors``; LadderError if none.

    ``variant`` is None for featcodec's own ladder, ``"huffman-bu"`` for the Huffman anchor.
    """
    name = f"{split}-{variant}" if variant else split
    for directory in weights_dirs():
        candidate = directory / backbone / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    how = "featcodec train --entropy huffman" if variant == HUFFMAN_VARIANT else "featcodec train"
    kind = f"{variant} ladder" if variant else "ladder"
    raise LadderError(f"no trained {kind} for {backbone}/{split}: train one with '{how}' or pass --weights PATH")


def find_ladder_by_tag(backbone: str, split: str, tag: bytes) -> Path | None:
    """The shipped ladder of ``backbone``/``split`` (any variant) whose weights tag is ``tag``, if any."""
    for directory in weights_dirs():
        for name in (split, f"{split}-{HUFFMAN_VARIANT}"):
            candidate = directory / backbone / f"{name}.safetensors"
            if candidate.is_file() and _file_tag(candidate) == tag:
                return candidate
    return None


def _file_tag(path: Path) -> bytes:
    """The weights tag of a file, hashed once per version of it (decode and verify ask per stream)."""
    stat = path.stat()
    return _tag_of_version(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _tag_of_version(path: str, size: int, mtime_ns: int) -> bytes:
    return weights_tag(Path(path).read_bytes())


def untrained_ladder(backbone: str, split: str, config: BottleneckConfig, lambdas: list[float], seed: int = 0) -> Ladder:
    """A ladder of freshly initialised BUs with coding tables built (for tests and as a training start)."""
    torch.manual_seed(seed)
    rungs = []
    for _ in lambdas:
        unit = make_unit(config).eval()
        unit.build_coding_tables()
        rungs.append(unit)
    return Ladder(backbone, split, config, rungs, [{"lambda": lam} for lam in lambdas])
