"""How much top-1 could a better encoder buy from a rung's decoder? A per-image latent search, a probe.

A hyperprior rung's encoder maps each split tensor to a latent y in one pass (amortised). This
script keeps the rung's decoder side as it is (h_s, g_s, the refiner, the coding tables) and
searches y per image instead: Adam on ``bits(y) + lambda * D``, starting from the encoder's own
y, with z following y through h_a as the encoder makes it, the rounding passed straight through
and the bits those of the rounded values under the rung's entropy models. ``--distortion`` picks D:

``kd`` (default)
    KL(uncompressed logits || tail(g_s(round(y)))), through the frozen tail;
``mse``
    the mean squared error of the rebuilt split tensor against the head's;
``own``
    the mean squared error against the rung's own rebuilt tensor (stay near what it codes, spend
    fewer bits).

Each searched latent is then coded into an ordinary featcodec stream and decoded by the codec (so
bytes are whole streams, as ``featcodec eval`` counts them, and top-1 is that of the decoded
stream).

With ``kd`` the search runs the frozen tail and needs the uncompressed model's logits, that is,
the whole model on the client: a client that has them already knows the class. So this is not a
way to code; it shows what the rung's decoder gives when fed better latents (at least: the search
is short), and so separates the encoder's limits from the decoder's. ``mse`` and ``own`` need only the head and the BU
decoder, which a client could run. ``top1_noisy`` is the top-1 of the same decoded tensors with
Gaussian noise added (0.3 of their standard deviation) before the tail, beside that of the
uncompressed split tensors under the same noise: a searched latent whose gain were adversarial, a
fragile pattern that only fools the tail, would lose it there. As run for the notes of issue 3:

    python experiments/latent_probe.py --data ../shared/data/val --split stage3 --rate 3 --lambdas 0,300,1000
    python experiments/latent_probe.py --data ../shared/data/val --rate 3 --every 5 --lambdas 0,300
    python experiments/latent_probe.py --data ../shared/data/val --rate 3 --every 5 --lr 0.02 \
        --distortion mse --lambdas 0,300,30000
    python experiments/latent_probe.py --data ../shared/data/val --rate 3 --every 5 --lr 0.02 \
        --distortion own --lambdas 300,3000
"""

from __future__ import annotations

import argparse
import json
import time

from _bootstrap import ROOT  # noqa: F401 (quiets compressai's warning, finds featcodec)

import torch
import torch.nn.functional as F
from compressai.ops import quantize_ste

from featcodec import bitstream
from featcodec.bottleneck import HyperpriorBottleneckUnit
from featcodec.codec import Codec
from featcodec.evaluate import labelled_images, reference_set
from featcodec.metrics import accuracy

BATCH = 50
NOISE = 0.3  # noisy_top1's noise, relative to the tensors' standard deviation


def rounded_bits(unit: HyperpriorBottleneckUnit, y: torch.Tensor) -> torch.Tensor:
    """Bits per image of y and of the z the encoder derives from it, at their rounded values (the
    rounding passed straight through), under the rung's own entropy models."""
    means = unit.latent_means
    side_medians = unit.entropy_bottleneck._get_medians().reshape(1, -1, 1, 1)
    z = unit.h_a(torch.abs(y - means))
    z_hat = quantize_ste(z - side_medians) + side_medians
    y_hat = quantize_ste(y - means) + means
    scales = unit.h_s(z_hat)[..., : y.shape[-2], : y.shape[-1]]
    conditional, side = unit.gaussian_conditional, unit.entropy_bottleneck
    y_likelihood = conditional.likelihood_lower_bound(conditional._likelihood(y_hat, scales, means))
    # the EntropyBottleneck's likelihood takes (channels, 1, values)
    flat = z_hat.permute(1, 0, 2, 3).reshape(z.shape[1], 1, -1)
    z_likelihood = side.likelihood_lower_bound(side._likelihood(flat)[0])
    z_likelihood = z_likelihood.reshape(z.shape[1], z.shape[0], *z.shape[2:]).permute(1, 0, 2, 3)
    return -torch.log2(y_likelihood).sum((1, 2, 3)) - torch.log2(z_likelihood).sum((1, 2, 3))


def search_latents(unit, tail, split_tensors: torch.Tensor, teacher_logits: torch.Tensor, lam: float,
                   steps: int, lr: float, distortion: str = "kd") -> torch.Tensor:
    """Per-image latents y minimising bits + lam * D (``distortion``, see above), from the encoder's y."""
    means = unit.latent_means
    with torch.no_grad():
        start = unit.g_a(split_tensors)
        target = None  # kd
        if distortion == "mse":
            target = split_tensors
        elif distortion == "own":
            target = unit._synthesize(unit.gaussian_conditional.quantize(start, "dequantize", means))
    y = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([y], lr=lr)
    teacher = F.log_softmax(teacher_logits, -1)
    for _ in range(steps):
        rebuilt = unit._synthesize(quantize_ste(y - means) + means)
        if target is None:
            error = F.kl_div(F.log_softmax(tail(rebuilt), -1), teacher, log_target=True, reduction="none").sum(-1)
        else:
            error = ((rebuilt - target) ** 2).mean((1, 2, 3))
        loss = (rounded_bits(unit, y) + lam * error).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return y.detach()


@torch.no_grad()
def code_and_decode(codec: Codec, rate: int, latents: torch.Tensor,
                    size: tuple[int, int]) -> tuple[int, int, torch.Tensor]:
    """(stream bytes, top-1 label, rebuilt split tensor) of one image whose latent is ``latents``
    (1, C, h, w), through an ordinary one-record stream and the codec's decoder."""
    record = codec.make_record(codec.ladder.rung(rate).compress_latent(latents), rate, size)
    stream = bitstream.write_stream([record])
    decoded = codec.decode(stream)[0]
    return len(stream), int(decoded.logits.argmax()), decoded.features


@torch.no_grad()
def noisy_top1(tail, split_tensors: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of the tail on ``split_tensors`` plus Gaussian noise of 0.3 times their standard deviation
    (fixed seed): latents that only fooled the tail (adversarial-like) would lose their gain here."""
    generator = torch.Generator().manual_seed(1)
    noisy = split_tensors + NOISE * split_tensors.std() * torch.randn(split_tensors.shape, generator=generator)
    predictions = torch.cat([tail(noisy[i : i + BATCH]).argmax(-1) for i in range(0, len(noisy), BATCH)])
    return 100 * (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labels.csv folder or ImageFolder of WNIDs")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--weights", help="ladder file (default: the shipped one)")
    parser.add_argument("--rate", type=int, default=3, help="a hyperprior rung")
    parser.add_argument("--lambdas", default="300,1000", help="comma-separated; 0 for the rung as it codes")
    parser.add_argument("--distortion", choices=("kd", "mse", "own"), default="kd")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--every", type=int, default=1, help="every Nth image only")
    args = parser.parse_args()
    torch.manual_seed(0)
    codec = Codec.load(split=args.split, weights=args.weights)
    unit = codec.ladder.rung(args.rate).float().eval()
    if not isinstance(unit, HyperpriorBottleneckUnit):
        raise SystemExit(f"rate {args.rate} is not a hyperprior rung")
    for parameter in unit.parameters():
        parameter.requires_grad_(False)
    items = labelled_images(args.data)[:: args.every]
    reference, sizes, _ = reference_set(codec, items)
    split_tensors = torch.cat(reference.split_tensors)
    teacher_top1 = reference.rank1
    uncompressed_top1, _ = accuracy(reference.logits, reference.labels)
    uncompressed_top1_noisy = noisy_top1(codec.model.tail, split_tensors, reference.labels)
    for lam in [float(value) for value in args.lambdas.split(",")]:
        started = time.perf_counter()
        total_bytes, correct, agree, rebuilt = 0, 0, 0, []
        for start in range(0, len(items), BATCH):
            batch = slice(start, start + BATCH)
            if lam > 0:
                latents = search_latents(unit, codec.model.tail, split_tensors[batch], reference.logits[batch], lam,
                                         args.steps, args.lr, args.distortion)
            else:
                with torch.no_grad():
                    latents = unit.g_a(split_tensors[batch])
            for offset, latent in enumerate(latents):
                index = start + offset
                size, label, features = code_and_decode(codec, args.rate, latent.unsqueeze(0), tuple(sizes[index]))
                rebuilt.append(features)
                total_bytes += size
                correct += label == int(reference.labels[index])
                agree += label == int(teacher_top1[index])
        count = len(items)
        print(json.dumps({
            "rate": args.rate, "distortion": args.distortion, "lambda": lam, "steps": args.steps if lam > 0 else 0, "images": count,
            "bytes_per_image": round(total_bytes / count, 1), "top1": round(100 * correct / count, 2),
            "agreement": round(100 * agree / count, 2), "uncompressed_top1": round(100 * uncompressed_top1, 2),
            "top1_noisy": round(noisy_top1(codec.model.tail, torch.stack(rebuilt), reference.labels), 2),
            "uncompressed_top1_noisy": round(uncompressed_top1_noisy, 2),
            "seconds": round(time.perf_counter() - started, 1),
        }), flush=True)


if __name__ == "__main__":
    main()
