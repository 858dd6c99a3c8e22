"""The backbone registry: specs, split points, preprocessing, and the frozen head/tail model.

Each backbone has a frozen numeric id and each split point a frozen numeric id;
both go into every bitstream record, so they must never be renumbered. A
backbone is cut into ``head`` (client) and ``tail`` (server) so that
``tail(head(x))`` equals the full model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import FeatcodecError
from ..ids import SPLITS


class BackboneError(FeatcodecError):
    """Unknown backbone or split, or weights that cannot be loaded."""


@dataclass(frozen=True)
class SplitPoint:
    """A named cut with its frozen id and the split tensor's (C, H, W) at the model's input size."""

    name: str
    id: int
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side, centre-crop, scale to [0, 1], then (x - mean) / std."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything the codec needs to know about one backbone."""

    name: str
    id: int
    splits: dict[str, SplitPoint]
    default_split: str
    preprocessing: Preprocessing
    build: Callable[[str | None, bool], nn.Module] = field(repr=False)
    cut: Callable[[nn.Module, str], tuple[nn.Module, nn.Module]] = field(repr=False)
    weights_hint: str = ""  # where the default ImageNet weights come from, for `featcodec models`

    def split(self, name: str) -> SplitPoint:
        """The split point called ``name``; BackboneError if there is none."""
        if name not in self.splits:
            known = ", ".join(self.splits)
            raise BackboneError(f"unknown split '{name}' for backbone {self.name} (known: {known})")
        return self.splits[name]

    def split_by_id(self, split_id: int) -> SplitPoint:
        """The split point whose frozen id is ``split_id``."""
        for point in self.splits.values():
            if point.id == split_id:
                return point
        raise BackboneError(f"unknown split id {split_id} for backbone {self.name}")


BACKBONES: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; ids must be unique and below 0x80."""
    if spec.name in BACKBONES:
        raise ValueError(f"backbone {spec.name} registered twice")
    if any(b.id == spec.id for b in BACKBONES.values()) or not 0 <= spec.id < 0x80:
        raise ValueError(f"backbone id {spec.id} is taken or out of range")
    BACKBONES[spec.name] = spec
    return spec


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called ``name``."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone '{name}' (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def backbone_by_id(backbone_id: int) -> BackboneSpec:
    """The registered backbone whose frozen id is ``backbone_id``."""
    for spec in BACKBONES.values():
        if spec.id == backbone_id:
            return spec
    raise BackboneError(f"unknown backbone id {backbone_id}")


class SplitModel(nn.Module):
    """A frozen backbone cut in two: ``head`` on the client, ``tail`` on the server."""

    def __init__(self, head: nn.Module, tail: nn.Module):
        super().__init__()
        self.head = head
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))


def load_split_model(
    backbone: str, split: str, weights: str | None = None, random_init: bool = False
) -> SplitModel:
    """Build ``backbone`` with its weights, cut it at ``split``, freeze it, set eval mode."""
    spec = get_backbone(backbone)
    spec.split(split)
    model = spec.build(weights, random_init)
    head, tail = spec.cut(model, split)
    split_model = SplitModel(head, tail).eval()
    for param in split_model.parameters():
        param.requires_grad_(False)
    return split_model


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a plain tensor .pth with the safe unpickler."""
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise BackboneError(f"cannot read backbone weights {path}: {str(exc).splitlines()[0]}") from None
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler refuses anything but tensors
        raise BackboneError(f"cannot read backbone weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise BackboneError(f"backbone weights {path} do not hold a state dict")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``model`` with every tensor of ``state`` loaded (strict); BackboneError naming ``what`` if they do not fit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"weights do not fit {what}: {str(exc).splitlines()[0]}") from None
    return model


def split_points(backbone: str) -> dict[str, SplitPoint]:
    """The split points of ``backbone`` from the frozen id table."""
    return {name: SplitPoint(name, split_id, shape) for name, (split_id, shape) in SPLITS[backbone].items()}
