"""torchvision backbones: ResNet-50, ResNet-18 and MobileNetV3-Large.

By default their ImageNet weights come through torchvision's weights API (downloaded
once into torch's hub cache, then read from there). ``--backbone-weights PATH``
loads a local .safetensors file or a torchvision state dict (``torch.load`` with
``weights_only=True``). Without either, the error says what to do; a random model
is only built on an explicit ``random_init`` (``--random-init``, for tests).

A model is cut by listing its modules in execution order, each with a name
(``layer3.4`` is block 4 of ``layer3``; ``features.6`` is ``features[6]``): the
head runs the modules up to and including the split's, the tail runs the rest.
"""

from __future__ import annotations

import socket
from typing import Callable

from torch import nn

from ..ids import BACKBONE_IDS
from .registry import (
    BackboneError, BackboneSpec, Preprocessing, load_strict, load_tensor_file, register, split_points,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 30

# name -> (torchvision weights enum, its DEFAULT weights' resize size, default split)
_MODELS = {
    "resnet50": ("ResNet50_Weights", 232, "layer3"),
    "resnet18": ("ResNet18_Weights", 256, "layer3"),
    "mobilenet_v3_large": ("MobileNet_V3_Large_Weights", 232, "features.6"),
}


def default_weights(name: str):
    """torchvision's DEFAULT weights entry for ``name`` (no download)."""
    import torchvision.models

    return getattr(torchvision.models, _MODELS[name][0]).DEFAULT


def _fetch_state_dict(name: str) -> dict:
    """The DEFAULT ImageNet weights from torch's hub cache, downloading them if needed."""
    import torch.hub

    weights = default_weights(name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(
            weights.url, map_location="cpu", progress=True, check_hash=True, weights_only=True
        )
    except Exception as exc:  # URLError, timeouts, hash mismatch, a broken cache file
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackboneError(
            f"cannot get the {name} ImageNet weights ({weights.url}: {reason}); connect to the internet once "
            f"(torch caches them in {torch.hub.get_dir()}/checkpoints), or pass --backbone-weights PATH with a "
            f".safetensors file or a torchvision state dict (.pth)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _build(name: str) -> Callable[[str | None, bool], nn.Module]:
    def build(weights: str | None, random_init: bool) -> nn.Module:
        import torchvision.models

        model = getattr(torchvision.models, name)(weights=None)
        if random_init:
            return model
        state = load_tensor_file(weights) if weights else _fetch_state_dict(name)
        return load_strict(model, state, f"torchvision's {name}")

    return build


def _resnet_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = [(n, getattr(model, n)) for n in ("conv1", "bn1", "relu", "maxpool")]
    for stage in range(1, 5):
        layer = getattr(model, f"layer{stage}")
        modules += [(f"layer{stage}.{index}", block) for index, block in enumerate(layer)]
    return modules + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("fc", model.fc)]


def _mobilenet_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modules = [(f"features.{index}", layer) for index, layer in enumerate(model.features)]
    return modules + [("avgpool", model.avgpool), ("flatten", nn.Flatten(1)), ("classifier", model.classifier)]


def _split_position(modules: list[tuple[str, nn.Module]], split: str) -> int:
    names = [name for name, _ in modules]
    if split in names:
        return names.index(split)
    in_stage = [index for index, name in enumerate(names) if name.startswith(split + ".")]
    if in_stage:  # a whole stage, "layerS", ends with its last block
        return in_stage[-1]
    raise BackboneError(f"no block {split} in this model")


def _cut(list_modules: Callable[[nn.Module], list[tuple[str, nn.Module]]]):
    def cut(model: nn.Module, split: str) -> tuple[nn.Module, nn.Module]:
        modules = list_modules(model)
        position = _split_position(modules, split)
        return (
            nn.Sequential(*(module for _, module in modules[: position + 1])),
            nn.Sequential(*(module for _, module in modules[position + 1 :])),
        )

    return cut


for _name, (_enum, _resize, _default_split) in _MODELS.items():
    register(
        BackboneSpec(
            name=_name,
            id=BACKBONE_IDS[_name],
            splits=split_points(_name),
            default_split=_default_split,
            preprocessing=Preprocessing(resize=_resize, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
            build=_build(_name),
            cut=_cut(_mobilenet_modules if _name.startswith("mobilenet") else _resnet_modules),
            weights_hint=f"torchvision's {_enum}.DEFAULT, downloaded once into torch's hub cache",
        )
    )
