"""The frozen numeric tables of backbone and split ids written into every bitstream record.

Never renumber or reuse an id: streams already written would decode with the
wrong model. Add new entries only. This module imports nothing heavy.
"""

from __future__ import annotations

# backbone name -> id (0 < id < 0x80)
BACKBONE_IDS: dict[str, int] = {
    "efficientnet_lite0": 1,
}

# backbone name -> split name -> (split id, split tensor (C, H, W) at the model's input size)
SPLITS: dict[str, dict[str, tuple[int, tuple[int, int, int]]]] = {
    "efficientnet_lite0": {
        "stage2": (2, (40, 28, 28)),
        "stage3": (3, (80, 14, 14)),
        "stage5": (5, (192, 7, 7)),
    },
}


def names_for(backbone_id: int, split_id: int) -> tuple[str, str]:
    """Backbone and split names for a record's ids, or ``"id N"`` where unknown."""
    backbone = next((name for name, i in BACKBONE_IDS.items() if i == backbone_id), None)
    if backbone is None:
        return f"id {backbone_id}", f"id {split_id}"
    split = next((name for name, (i, _) in SPLITS[backbone].items() if i == split_id), f"id {split_id}")
    return backbone, split
