"""The frozen numeric tables of backbone and split ids written into every bitstream record.

Never renumber or reuse an id: streams already written would decode with the
wrong model. Add new entries only. This module imports nothing heavy.
"""

from __future__ import annotations

# backbone name -> id (0 < id < 0x80)
BACKBONE_IDS: dict[str, int] = {
    "efficientnet_lite0": 1,
    "resnet50": 2,
    "resnet18": 3,
    "mobilenet_v3_large": 4,
    "efficientnet_lite1": 5,
    "efficientnet_lite2": 6,
}


def _resnet_splits(blocks: tuple[int, ...], channels: tuple[int, ...]) -> dict[str, tuple[int, tuple[int, int, int]]]:
    """ResNet splits: ``layerS`` (id S, S = 1..3) after a whole stage, and ``layerS.B`` (id 16*S + B)
    after block B of stage S (S = 1..4). Both are fixed by this formula, which must never change."""
    sides = (56, 28, 14, 7)
    splits = {f"layer{s}": (s, (channels[s - 1], sides[s - 1], sides[s - 1])) for s in (1, 2, 3)}
    for stage, count in enumerate(blocks, 1):
        for block in range(count):
            splits[f"layer{stage}.{block}"] = (16 * stage + block, (channels[stage - 1], sides[stage - 1], sides[stage - 1]))
    return splits


# backbone name -> split name -> (split id, split tensor (C, H, W) at the model's input size)
SPLITS: dict[str, dict[str, tuple[int, tuple[int, int, int]]]] = {
    "efficientnet_lite0": {
        "stage2": (2, (40, 28, 28)),
        "stage3": (3, (80, 14, 14)),
        "stage5": (5, (192, 7, 7)),
    },
    "resnet50": _resnet_splits((3, 4, 6, 3), (256, 512, 1024, 2048)),
    "resnet18": _resnet_splits((2, 2, 2, 2), (64, 128, 256, 512)),
    # after torchvision's mobilenet_v3_large.features[K]: id K
    "mobilenet_v3_large": {
        "features.3": (3, (24, 56, 56)),
        "features.6": (6, (40, 28, 28)),
        "features.12": (12, (112, 14, 14)),
    },
    # at the models' own input sizes, 240 and 260
    "efficientnet_lite1": {
        "stage2": (2, (40, 30, 30)),
        "stage3": (3, (80, 15, 15)),
        "stage5": (5, (192, 8, 8)),
    },
    "efficientnet_lite2": {
        "stage2": (2, (48, 33, 33)),
        "stage3": (3, (88, 17, 17)),
        "stage5": (5, (208, 9, 9)),
    },
}


def names_for(backbone_id: int, split_id: int) -> tuple[str, str]:
    """Backbone and split names for a record's ids, or ``"id N"`` where unknown."""
    backbone = next((name for name, i in BACKBONE_IDS.items() if i == backbone_id), None)
    if backbone is None:
        return f"id {backbone_id}", f"id {split_id}"
    split = next((name for name, (i, _) in SPLITS[backbone].items() if i == split_id), f"id {split_id}")
    return backbone, split
