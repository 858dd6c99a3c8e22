"""Can a rung's encoder reach the latent search's point on a few images? And does that carry over?

``latent_probe.py`` showed that a rung's decoder, fed latents searched per image through the tail,
gives far more top-1 at fewer bytes than the rung's own one-pass encoder. This probe asks whether
the encoder could produce such latents at all: it trains the encoder side of a hyperprior rung
(g_a and h_a; the decoder side and the coding tables stay fixed) on a small fixed set of training
images, full batch, with the search's objective (bits + lambda * KL(uncompressed logits ||
tail(decoded)), the decoder fed the rounded latent), and measures every ``--report`` steps, with
real streams decoded by the codec:

- the fitted images themselves (``fit``: top-1 agreement with the uncompressed model, since
  training images carry no labels here), and
- a held-out set of val images (``held``: agreement and top-1).

``--bits noise`` takes the rate of the training pass (additive uniform noise, as ``featcodec
train``), ``--bits rounded`` that of the rounded values (the rounding passed straight through,
as the search). ``--extra N`` puts N of the refiner's residual blocks (width 128, initialised to the
identity) before g_a. As run for the notes of issue 3 (docs/experiments.md):

    python experiments/encoder_fit_probe.py --bits noise --steps 200
    python experiments/encoder_fit_probe.py --bits noise --steps 200 --extra 2
    python experiments/encoder_fit_probe.py --bits rounded --steps 200
    python experiments/encoder_fit_probe.py --split stage5 --bits noise --steps 200 --fit-every N  # N = 30, 10, 3
"""

from __future__ import annotations

import argparse
import json
import time

from _bootstrap import ROOT  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch
import torch.nn as nn
import torch.nn.functional as F
from compressai.ops import quantize_ste

from featcodec.bottleneck import HyperpriorBottleneckUnit, ResidualBlock
from featcodec.codec import Codec
from featcodec.evaluate import labelled_images, reference_set
from featcodec.train import list_images
from latent_probe import code_and_decode, rounded_bits


def image_set(codec: Codec, items: list) -> dict:
    """Split tensors, uncompressed logits and top-1, labels and sizes of ``items`` (path, label)."""
    reference, sizes, _ = reference_set(codec, items)
    return {"x": torch.cat(reference.split_tensors), "logits": reference.logits, "rank1": reference.rank1,
            "labels": reference.labels, "sizes": sizes}


@torch.no_grad()
def measure(codec: Codec, rate: int, encoder: nn.Module, images: dict, labelled: bool) -> dict:
    """Mean stream bytes, agreement with the uncompressed model (and top-1) through real streams."""
    total, agree, correct = 0, 0, 0
    for index, split_tensor in enumerate(images["x"]):
        size, label, _ = code_and_decode(codec, rate, encoder(split_tensor.unsqueeze(0)), tuple(images["sizes"][index]))
        total += size
        agree += label == int(images["rank1"][index])
        correct += label == int(images["labels"][index])
    count = len(images["x"])
    result = {"bytes_per_image": round(total / count, 1), "agreement": round(100 * agree / count, 2)}
    if labelled:
        result["top1"] = round(100 * correct / count, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-data", default="../shared/data/train", help="images to fit (no labels used)")
    parser.add_argument("--val-data", default="../shared/data/val", help="labelled held-out images")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--rate", type=int, default=3, help="a hyperprior rung")
    parser.add_argument("--fit-every", type=int, default=30, help="every Nth training image is fitted")
    parser.add_argument("--held-every", type=int, default=20, help="every Nth val image is held out")
    parser.add_argument("--lambda", dest="lam", type=float, default=300.0)
    parser.add_argument("--bits", choices=("noise", "rounded"), default="noise")
    parser.add_argument("--extra", type=int, default=0, help="identity-initialised residual blocks before g_a")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--report", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    codec = Codec.load(split=args.split)
    unit = codec.ladder.rung(args.rate).float().eval()
    if not isinstance(unit, HyperpriorBottleneckUnit):
        raise SystemExit(f"rate {args.rate} is not a hyperprior rung")
    for parameter in unit.parameters():
        parameter.requires_grad_(False)
    fit = image_set(codec, [(path, 0) for path in list_images(args.train_data)[:: args.fit_every]])
    held = image_set(codec, labelled_images(args.val_data)[:: args.held_every])
    unit.g_a = nn.Sequential(*[ResidualBlock(fit["x"].shape[1], 128) for _ in range(args.extra)], unit.g_a)
    trained = [*unit.g_a.parameters(), *unit.h_a.parameters()]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=args.lr)
    teacher = F.log_softmax(fit["logits"], -1)
    entropy_models = (unit.entropy_bottleneck, unit.gaussian_conditional)
    started = time.perf_counter()

    def report(step: int) -> None:
        line = {"step": step, "bits": args.bits, "extra": args.extra, "lambda": args.lam, "lr": args.lr,
                "fit": measure(codec, args.rate, unit.g_a, fit, False),
                "held": measure(codec, args.rate, unit.g_a, held, True),
                "fit_images": len(fit["x"]), "held_images": len(held["x"]),
                "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(line), flush=True)

    report(0)
    for step in range(1, args.steps + 1):
        if args.bits == "noise":
            for module in entropy_models:
                module.train()  # additive noise, as in training
            output = unit(fit["x"], rounded_decoder_input=True)
            for module in entropy_models:
                module.eval()
            rebuilt, bits = output["x_hat"], output["bits"]
        else:
            latent = unit.g_a(fit["x"])
            rebuilt = unit._synthesize(quantize_ste(latent - unit.latent_means) + unit.latent_means)
            bits = rounded_bits(unit, latent)
        error = F.kl_div(F.log_softmax(codec.model.tail(rebuilt), -1), teacher, log_target=True,
                         reduction="none").sum(-1)
        loss = (bits + args.lam * error).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.report == 0 or step == args.steps:
            report(step)


if __name__ == "__main__":
    main()
