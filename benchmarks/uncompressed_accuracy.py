"""Top-1 of the uncompressed backbones (no BU) on a labelled folder: checks weights and preprocessing.

    python benchmarks/uncompressed_accuracy.py --data ../shared/data/val --limit 300 \\
        efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import _bootstrap  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch

from featcodec.backbones import get_backbone, load_split_model
from featcodec.evaluate import labelled_images
from featcodec.images import load_image, preprocess

BATCH = 25


@torch.no_grad()
def top1(backbone: str, items: list[tuple[Path, int]]) -> float:
    """Fraction of ``items`` whose label is the backbone's top-1 class."""
    spec = get_backbone(backbone)
    model = load_split_model(backbone, spec.default_split)
    correct = 0
    for start in range(0, len(items), BATCH):
        batch = items[start : start + BATCH]
        inputs = torch.stack([preprocess(load_image(path), spec.preprocessing) for path, _ in batch])
        predicted = model(inputs).argmax(-1).tolist()
        correct += sum(p == label for p, (_, label) in zip(predicted, batch))
    return correct / len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backbones", nargs="+")
    parser.add_argument("--data", type=Path, required=True, help="labels.csv folder or ImageFolder of WNIDs")
    parser.add_argument("--limit", type=int, default=None, help="use the first N images only")
    args = parser.parse_args()
    items = labelled_images(args.data)[: args.limit]
    for backbone in args.backbones:
        print(f"{backbone}: top-1 {100 * top1(backbone, items):.2f} % on {len(items)} images")


if __name__ == "__main__":
    main()
