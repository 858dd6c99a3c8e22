"""How many bits would a context model save on a rung's latent? A probe, not a codec feature.

A hyperprior rung codes each value of its latent y with a Gaussian whose scale ``h_s`` predicts
from the side latent z. This script keeps the rung as it is (same y, same symbols, so the same
accuracy) and trains only small conv nets that correct each scale from values already decoded:
y's channels split into ``--slices`` groups coded one after another (channel context), and with
``--checkerboard`` each group in two halves, the second seeing the first (spatial context). The
nets train on the rung's symbols of a feature cache (the file ``featcodec train`` keeps in its
``--cache-dir``), and the script prints the mean bits of y per image on the centre crops of a
labelled (or any) image folder, with the rung's own scales and with the corrected ones (and the
bits of z, which the probe leaves as they are). As run for
the notes of issue 3 (the cache of ``featcodec train --views 8 --mixup 1 --distortion kd`` on
../shared/data/train):

    python experiments/context_probe.py --cache CACHE --data ../shared/data/val --rate 2 --checkerboard
"""

from __future__ import annotations

import argparse
import json
import math

from _bootstrap import ROOT  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch
import torch.nn as nn
from safetensors.torch import load_file

from holdout_probe import holdout_set

from featcodec.backbones import load_split_model
from featcodec.bottleneck import HyperpriorBottleneckUnit
from featcodec.ladder import find_ladder, load_ladder
from featcodec.train import list_images

LOWEST_SCALE = 0.11  # CompressAI's lower bound on a Gaussian scale


class ScaleContext(nn.Module):
    """Per (group, half): a 3-layer conv net from the decoded context to log-scale corrections.

    The last layer starts at zero, so an untrained probe gives the rung's own scales."""

    def __init__(self, channels: int, slices: int, checkerboard: bool, width: int):
        super().__init__()
        self.slices, self.halves = slices, 2 if checkerboard else 1
        self.group = channels // slices
        self.nets = nn.ModuleDict()
        for index in range(slices):
            for half in range(self.halves):
                if index == 0 and half == 0:
                    continue  # the first group's first half has no context: the rung's scales
                inputs = self.group * index + self.group * half + self.group
                net = nn.Sequential(nn.Conv2d(inputs, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, self.group, 3, padding=1))
                nn.init.zeros_(net[-1].weight)
                nn.init.zeros_(net[-1].bias)
                self.nets[f"{index}_{half}"] = net

    def forward(self, symbols: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
        """Log-scale corrections for every value, each computed from values decoded before it."""
        height, width = symbols.shape[-2:]
        first = ((torch.arange(height)[:, None] + torch.arange(width)[None]) % 2 == 0).to(symbols)
        if self.halves == 1:
            first = torch.ones_like(first)
        correction = torch.zeros_like(symbols)
        for index in range(self.slices):
            group = slice(self.group * index, self.group * (index + 1))
            for half in range(self.halves):
                name = f"{index}_{half}"
                if name not in self.nets:
                    continue
                context = [symbols[:, : self.group * index]]
                if half:
                    context.append(symbols[:, group] * first)
                context.append(log_scales[:, group])
                where = (1 - first) if half else first
                correction[:, group] += self.nets[name](torch.cat(context, 1)) * where
        return correction


@torch.no_grad()
def symbols_and_scales(unit: HyperpriorBottleneckUnit, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rung's coded symbols of y (around its means), the scales its hyperprior gives them, and
    the bits of the side latent z per image (its entropy model's likelihoods)."""
    out_symbols, out_scales, out_side_bits = [], [], []
    for start in range(0, len(features), 500):
        y = unit.g_a(features[start:start + 500].float())
        z_hat, z_likelihoods = unit.entropy_bottleneck(unit.h_a(torch.abs(y - unit.latent_means)))  # eval: rounded
        out_side_bits.append(-torch.log2(z_likelihoods).sum((1, 2, 3)))
        out_scales.append(unit.h_s(z_hat)[..., : y.shape[-2], : y.shape[-1]].clamp_min(LOWEST_SCALE))
        out_symbols.append(torch.round(y - unit.latent_means))
    return torch.cat(out_symbols), torch.cat(out_scales), torch.cat(out_side_bits)


def bits_per_image(unit, symbols, scales, correction) -> torch.Tensor:
    """Bits of y per image under Gaussians of the corrected scales (CompressAI's likelihood)."""
    likelihood = unit.gaussian_conditional._likelihood(symbols, (scales * correction.exp()).clamp_min(LOWEST_SCALE))
    return -torch.log2(likelihood.clamp_min(1e-9)).sum((1, 2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="feature cache file of featcodec train (training views)")
    parser.add_argument("--data", required=True, help="images to measure on (centre crops)")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--weights", help="ladder file (default: the shipped one)")
    parser.add_argument("--rate", type=int, required=True, help="a hyperprior rung")
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--checkerboard", action="store_true")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    backbone = "efficientnet_lite0"
    unit = load_ladder(args.weights or find_ladder(backbone, args.split)).rung(args.rate).float().eval()
    if not isinstance(unit, HyperpriorBottleneckUnit):
        raise SystemExit(f"rate {args.rate} is not a hyperprior rung")
    train_symbols, train_scales, _ = symbols_and_scales(unit, load_file(args.cache)["features"])
    features, _ = holdout_set(load_split_model(backbone, args.split), backbone, list_images(args.data))
    symbols, scales, side_bits = symbols_and_scales(unit, features)
    probe = ScaleContext(unit.config.latent_channels, args.slices, args.checkerboard, args.width)
    optimizer = torch.optim.Adam(probe.parameters(), lr=args.lr)
    for step in range(args.steps):
        batch = torch.randint(len(train_symbols), (64,))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        correction = probe(train_symbols[batch], train_scales[batch].log())
        loss = bits_per_image(unit, train_symbols[batch], train_scales[batch], correction).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        own = bits_per_image(unit, symbols, scales, torch.zeros_like(symbols)).mean().item()
        corrected = bits_per_image(unit, symbols, scales, probe(symbols, scales.log())).mean().item()
    print(json.dumps({
        "rate": args.rate, "slices": args.slices, "checkerboard": args.checkerboard, "width": args.width,
        "steps": args.steps, "images": len(symbols), "probe_parameters": sum(p.numel() for p in probe.parameters()),
        "y_bits_own_scales": round(own, 1), "y_bits_with_context": round(corrected, 1),
        "saved_percent": round(100 * (1 - corrected / own), 2), "z_bits": round(side_bits.mean().item(), 1),
    }))


if __name__ == "__main__":
    main()
