"""Backbone registry: frozen pretrained models, their preprocessing and split points.

Each backbone has a frozen numeric id and each split point a frozen numeric id
(``featcodec/ids.py``); both go into every bitstream record, so they must never be
renumbered. A backbone is cut into ``head`` (client) and ``tail`` (server) so that
``tail(head(x))`` equals the full model's logits.
"""

from .registry import (
    BACKBONES,
    BackboneError,
    BackboneSpec,
    Preprocessing,
    SplitModel,
    SplitPoint,
    backbone_by_id,
    get_backbone,
    load_split_model,
    load_tensor_file,
    register,
    split_points,
)
from .efficientnet_lite import rename_lite_state_dict
from . import torchvision_models  # noqa: F401 (registers resnet50, resnet18, mobilenet_v3_large)

DEFAULT_BACKBONE = "efficientnet_lite0"

__all__ = [
    "BACKBONES", "BackboneError", "BackboneSpec", "DEFAULT_BACKBONE", "Preprocessing", "SplitModel", "SplitPoint",
    "backbone_by_id", "get_backbone", "load_split_model", "load_tensor_file", "register", "rename_lite_state_dict",
    "split_points",
]
