"""Every registered backbone and split: split tensor shape, and the compute on each side of the cut.

MACs come from torch's flop counter (``featcodec.complexity.count_macs``) on one
image at the backbone's input size; they do not depend on the weights, so the
backbones are built with random weights (torchvision's cannot be fetched offline).
The client share is head MACs / (head + tail) MACs, without the BU.

    python benchmarks/backbones.py              # markdown table on stdout
    python benchmarks/backbones.py --json
"""

from __future__ import annotations

import argparse
import json

import _bootstrap  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch

from featcodec.backbones import BACKBONES
from featcodec.complexity import count_macs, parameter_count


def measure() -> list[dict]:
    """One row per (backbone, split) in registry order."""
    rows = []
    for name, spec in BACKBONES.items():
        torch.manual_seed(0)
        model = spec.build(None, True).eval()
        size = spec.preprocessing.crop
        image = torch.randn(1, 3, size, size)
        for split, point in spec.splits.items():
            head, tail = spec.cut(model, split)
            with torch.no_grad():
                split_tensor = head(image)
                head_macs = count_macs(lambda: head(image))
                tail_macs = count_macs(lambda: tail(split_tensor))
            rows.append({
                "backbone": name, "split": split, "split_id": point.id, "input": size,
                "shape": list(point.shape), "values": int(split_tensor.numel()),
                "head_params": parameter_count(head), "tail_params": parameter_count(tail),
                "head_macs": head_macs, "tail_macs": tail_macs,
                "client_share": head_macs / (head_macs + tail_macs),
            })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args()
    rows = measure()
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| backbone | split (id) | input | split tensor (C, H, W) | head MMACs | tail MMACs | client share |")
    print("|---|---|---:|---|---:|---:|---:|")
    for row in rows:
        shape = "×".join(map(str, row["shape"]))
        print(f"| {row['backbone']} | {row['split']} ({row['split_id']}) | {row['input']} | {shape} | "
              f"{row['head_macs'] / 1e6:,.0f} | {row['tail_macs'] / 1e6:,.0f} | {100 * row['client_share']:.1f} % |")


if __name__ == "__main__":
    main()
