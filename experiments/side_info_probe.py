"""Where a variable-rate BU's bytes go at each whole rate: z (the hyperprior's side latent) against y.

Estimates bits from the entropy models' likelihoods (as training counts them) on the first N
images of a folder, centre crops; the record header (24 B) and the stream preamble (4 B) come on
top. Written for issue 29's question whether the side information or the framing explains the
weak low rates of the shipped stage3 and stage5 BUs:

    python experiments/side_info_probe.py --data ../shared/data/train --split stage3 --limit 48
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _bootstrap import ROOT  # noqa: F401

import torch

from featcodec.bottleneck import bits_per_image
from featcodec.codec import Codec
from featcodec.train import list_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--limit", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = Codec.load("efficientnet_lite0", args.split)
    if not codec.ladder.is_variable:
        parser.error(f"the shipped {args.split} ladder is not a variable-rate BU")
    unit = codec.ladder.rungs[0]
    files = list_images(args.data)[: args.limit]
    images = torch.stack([codec.preprocess(path)[0] for path in files])
    print(f"efficientnet_lite0/{args.split}, {len(files)} images of {args.data}: estimated bytes per image")
    with torch.no_grad():
        split_tensors = codec.model.head(images)
        for rate in range(int(unit.max_rate) + 1):
            out = unit(split_tensors, rate=float(rate))
            z_bytes = bits_per_image(out["likelihoods"]["z"]).mean().item() / 8
            y_bytes = bits_per_image(out["likelihoods"]["y"]).mean().item() / 8
            print(f"rate {rate}: z {z_bytes:6.1f}  y {y_bytes:7.1f}  z share {z_bytes / (z_bytes + y_bytes):5.1%}")


if __name__ == "__main__":
    main()
