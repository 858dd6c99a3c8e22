"""Probe a BU recipe without touching val: train one rung on 6/7 of a training folder, measure on the rest.

Every 7th image (sorted order, index % 7 == 0) is held out. The rung trains from the feature
cache of the other images (``--views``, ``--mixup``), then is measured on the held-out images'
centre crops: bytes per image of the entropy-coded payload and top-1 agreement with the
uncompressed model (no labels needed). Examples, as run for the notes of issue 3:

    # one stride-2 rung from scratch: 300 mse steps, then 800 mse+kd steps
    python experiments/holdout_probe.py --data ../shared/data/train --steps 800
    python experiments/holdout_probe.py --data ../shared/data/train --steps 800 --bu '{"stride": 1}'
    python experiments/holdout_probe.py --data ../shared/data/train --steps 800 --bu '{"layers": 3}'
    python experiments/holdout_probe.py --data ../shared/data/train --steps 800 --hyperprior
    # fine-tune rung 3 of the shipped ladder, plain views against mixed views
    python experiments/holdout_probe.py --data ../shared/data/train --init-rung 3 --steps 600 --lr 3e-4
    python experiments/holdout_probe.py --data ../shared/data/train --init-rung 3 --steps 600 --lr 3e-4 --mixup 1

(A rung started from the shipped ladder has seen the held-out images in its first training,
so compare such runs with each other, not with runs from scratch.)

``--hyperprior`` trains a BU with a scale hyperprior (``featcodec train --entropy hyperprior``)
from scratch. Bytes are always those of the real entropy coding (both strings of a hyperprior rung).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import _bootstrap  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch

from featcodec import train as training
from featcodec.backbones import get_backbone, load_split_model
from featcodec.bottleneck import BottleneckConfig, make_unit
from featcodec.images import load_image, preprocess
from featcodec.ladder import find_ladder, load_ladder

HOLD_EVERY = 7
REPORT_EVERY = 200


@torch.no_grad()
def holdout_set(model, backbone: str, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split tensors of the held-out centre crops and the uncompressed model's top-1 for each."""
    prep = get_backbone(backbone).preprocessing
    features = torch.cat([model.head(preprocess(load_image(path), prep).unsqueeze(0)) for path in files])
    return features, model.tail(features).argmax(-1)


@torch.no_grad()
def measure(unit, model, features: torch.Tensor, teacher_top1: torch.Tensor) -> tuple[float, float]:
    """(payload bytes per image, top-1 agreement %) of ``unit`` on the held-out split tensors.

    Codes with the unit's CDF tables as they are: after training, call build_coding_tables() first."""
    unit.eval()
    total_bytes, agree = 0, 0
    for start in range(0, len(features), 50):
        batch = features[start : start + 50]
        coded = unit.compress(batch)
        total_bytes += sum(len(s) for strings in coded["strings"] for s in strings)
        rebuilt = unit.decompress(coded["strings"], coded["shape"])["x_hat"]
        agree += (model.tail(rebuilt).argmax(-1) == teacher_top1[start : start + 50]).sum().item()
    unit.train()
    return total_bytes / len(features), 100 * agree / len(features)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training image folder (recursive)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--bu", default="{}", help="JSON changes to the default BU config, e.g. '{\"stride\": 1}'")
    parser.add_argument("--hyperprior", action="store_true", help="a BU with a scale hyperprior, from scratch")
    parser.add_argument("--init-rung", type=int, help="start from this rung of the shipped ladder (no pre-training)")
    parser.add_argument("--lambda", dest="lam", type=float, default=200.0)
    parser.add_argument("--kd-weight", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--pretrain-lambda", type=float, default=3000.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--mixup", type=float, default=0.0)
    parser.add_argument("--cache-dir", type=Path, default=Path(".featcodec-cache"))
    args = parser.parse_args()
    if args.hyperprior and args.init_rung is not None:
        parser.error("--hyperprior trains from scratch; leave out --init-rung")

    files = training.list_images(args.data)
    held = [path for index, path in enumerate(files) if index % HOLD_EVERY == 0]
    fit = [path for index, path in enumerate(files) if index % HOLD_EVERY != 0]
    model = load_split_model(args.backbone, args.split).eval()
    hold_features, hold_top1 = holdout_set(model, args.backbone, held)
    config = training.TrainConfig(args.backbone, args.split, [args.lam], distortion="mse+kd", steps=args.steps,
                                  learning_rate=args.lr, views=args.views, kd_weight=args.kd_weight, mixup=args.mixup)
    cache = training.load_or_build_cache(config, model, fit, args.cache_dir, "cpu")
    features, logits = cache["features"], cache["logits"]
    channels, height, width = features.shape[1:]

    entropy = {"entropy": "hyperprior"} if args.hyperprior else {}
    torch.manual_seed(0)
    if args.init_rung is not None:
        unit = load_ladder(find_ladder(args.backbone, args.split)).rung(args.init_rung)
        phases = [("train", args.steps, "mse+kd", args.lam)]
    else:
        bu = replace(BottleneckConfig(in_channels=channels, out_size=(height, width)), **json.loads(args.bu), **entropy)
        unit = make_unit(bu)
        phases = [("pretrain", args.pretrain_steps, "mse", args.pretrain_lambda), ("train", args.steps, "mse+kd", args.lam)]
    print(f"{len(fit)} images to fit ({len(features)} views), {len(held)} held out; BU {unit.config.to_dict()}")
    if args.init_rung is not None:
        unit.build_coding_tables()
        print("start: bytes %.1f, agreement %.2f %%" % measure(unit, model, hold_features, hold_top1), flush=True)
    started = time.time()
    for phase, steps, kind, lam in phases:
        phase_config = replace(config, distortion=kind, steps=steps, lambdas=[lam])
        opt, aux_opt = training._optimizers(unit, phase_config)
        offset = 0 if phase == "pretrain" else 10**6
        for step in range(steps):
            generator = torch.Generator().manual_seed(step + offset)
            index = torch.randint(len(features), (32,), generator=generator)
            stats = training._train_step(unit, opt, aux_opt, features[index].float(), logits[index].float(), lam,
                                         training._learning_rate(phase_config, step), kind, model.tail, phase_config)
            if phase == "train" and ((step + 1) % REPORT_EVERY == 0 or step + 1 == steps):
                unit.build_coding_tables()
                held_bytes, agreement = measure(unit, model, hold_features, hold_top1)
                print(f"step {step + 1}: train bits {stats['bits']:.0f}, kd {stats.get('kd', 0):.2f}; held out: "
                      f"{held_bytes:.1f} B payload, agreement {agreement:.2f} % ({time.time() - started:.0f} s)",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
