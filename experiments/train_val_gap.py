"""Does a shipped ladder fit its training images better than unseen ones? Agreement on both.

For N images drawn (fixed seed) from a training folder and N from a validation folder, each
rung codes the centre crop's split tensor and the tail classifies the reconstruction; the
script prints the top-1 agreement with the uncompressed model and the mean payload bytes,
per rung and folder. No labels are needed. A large train-over-val gap means the rung
overfits its 2000 training images (more augmented views or data would help); no gap means
the BU itself is the limit. As run for the notes of issue 3:

    python experiments/train_val_gap.py --split stage3 --rates 1,3,5 --images 300

(N = 300 gives a standard error of about 2.5 points on each agreement figure.)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from _bootstrap import ROOT  # quiets compressai's import warning, finds featcodec

import torch

from holdout_probe import holdout_set, measure

from featcodec.codec import Codec
from featcodec.errors import FeatcodecError
from featcodec.train import list_images

DATA = ROOT.parent / "shared" / "data"


def sample_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` image files under ``folder`` (recursive), shuffled with ``seed`` from sorted order."""
    files = list_images(folder)
    random.Random(seed).shuffle(files)
    return files[:count]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--weights", help="ladder file (default: the shipped one)")
    parser.add_argument("--rates", default="1,3,5", help="comma-separated rung indexes")
    parser.add_argument("--images", type=int, default=300, help="images per folder")
    parser.add_argument("--train", type=Path, default=DATA / "train")
    parser.add_argument("--val", type=Path, default=DATA / "val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rates = [int(rate) for rate in args.rates.split(",")]
        codec = Codec.load(args.backbone, args.split, weights=args.weights)
        units = {rate: codec.ladder.rung(rate) for rate in rates}  # a bad index fails here, before any work
        for name, folder in (("train", args.train), ("val", args.val)):
            files = sample_images(folder, args.images, args.seed)
            split_tensors, reference = holdout_set(codec.model, args.backbone, files)
            for rate, unit in units.items():
                payload, agree = measure(unit, codec.model, split_tensors, reference)
                print(f"{args.split} {name:5s} rate {rate}: agreement {agree:6.2f} %  payload {payload:7.1f} B"
                      f"  ({len(files)} images)", flush=True)
    except (FeatcodecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
