"""Per-image CPU latency of each codec stage at batch 1.

Stages: head, BU encoder (g_a), entropy coding, entropy decoding, BU decoder
(g_s), tail. Each repeat runs the whole pipeline once on one preprocessed
image, timing every stage with time.perf_counter. The warmup repeats are
discarded. The script reports the median and p90 of each stage, and the BU
overhead (g_a + entropy coding) as a ratio of head time, from the medians.

    python benchmarks/latency.py                      # efficientnet_lite0/stage3, rate 3
    python benchmarks/latency.py --split all --threads 1 --json

With no trained ladder shipped (weights/<backbone>/<split>.safetensors), an
untrained ladder is used and the output says so. Its g_a and g_s have the
real architecture, but entropy-coding times and payload sizes are not those
of a trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

from _bootstrap import ROOT  # quiets compressai's import warning, finds featcodec

import torch

from featcodec.backbones import get_backbone
from featcodec.codec import Codec
from featcodec.complexity import default_ladder
from featcodec.errors import FeatcodecError
from featcodec.ladder import LadderError, find_ladder

# For a hyperprior rung, entropy coding and decoding include its hyper networks h_a and h_s;
# for a variable-rate BU, "BU decoder" includes its inverse gain.
STAGES = (
    ("head", "head"),
    ("g_a", "BU encoder (g_a)"),
    ("entropy_coding", "entropy coding"),
    ("entropy_decoding", "entropy decoding"),
    ("g_s", "BU decoder (g_s)"),
    ("tail", "tail"),
)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile, q in [0, 1]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def note(message: str) -> None:
    print(message, file=sys.stderr)


def build_codec(backbone: str, split: str, rate: int, weights: Path | None) -> tuple[Codec, bool]:
    """The codec for backbone/split, and whether its ladder is an untrained stand-in."""
    if weights is None:
        try:
            weights = find_ladder(backbone, split)
        except LadderError:
            weights = None
    if weights is not None:
        return Codec.load(backbone, split, weights=weights), False
    ladder = default_ladder(backbone, split, rungs=rate + 1)  # enough rungs to reach --rate
    note(
        f"no trained ladder shipped for {backbone}/{split}: using an UNTRAINED ladder "
        f"(random BU weights, {ladder.config.latent_channels} latent channels); entropy-coding times "
        f"and payload sizes are not those of a trained model"
    )
    return Codec.load(backbone, split, ladder=ladder), True


@torch.no_grad()
def bench_split(codec: Codec, x: torch.Tensor, rate: int, repeats: int, warmup: int) -> dict:
    """Time every stage on one image (batch 1); milliseconds per image."""
    model, unit = codec.model, codec.ladder.rung(rate)
    times: dict[str, list[float]] = {key: [] for key, _ in STAGES}
    clock = time.perf_counter
    for index in range(warmup + repeats):
        t0 = clock()
        split_tensor = model.head(x)
        t1 = clock()
        y = unit.g_a(split_tensor)
        t2 = clock()
        coded = unit.compress_latent(y)
        t3 = clock()
        y_hat = unit.decompress_latent(coded["strings"], coded["shape"])
        t4 = clock()
        x_hat = unit.synthesize(y_hat)  # a variable-rate BU: its inverse gain, then g_s
        t5 = clock()
        model.tail(x_hat)
        t6 = clock()
        if index < warmup:
            continue
        stamps = (t0, t1, t2, t3, t4, t5, t6)
        for (key, _), start, end in zip(STAGES, stamps, stamps[1:]):
            times[key].append((end - start) * 1000.0)
    stages = {
        key: {"median_ms": statistics.median(values), "p90_ms": percentile(values, 0.9)}
        for key, values in times.items()
    }
    head = stages["head"]["median_ms"]
    overhead = stages["g_a"]["median_ms"] + stages["entropy_coding"]["median_ms"]
    return {
        "split_tensor": list(split_tensor.shape[1:]),
        "latent": list(y.shape[1:]),
        "payload_bytes": sum(len(s) for strings in coded["strings"] for s in strings),
        "stages": stages,
        "bu_overhead_ratio": overhead / head if head > 0 else None,
    }


def print_table(result: dict) -> None:
    ladder = "UNTRAINED (random init)" if result["untrained"] else result["weights"]
    print(
        f"{result['backbone']}/{result['split']}  rate {result['rate']}  "
        f"split tensor {'x'.join(map(str, result['split_tensor']))}  "
        f"latent {'x'.join(map(str, result['latent']))}  payload {result['payload_bytes']} B"
    )
    print(f"ladder: {ladder}")
    print(f"{'stage':<20} {'median ms':>10} {'p90 ms':>10}")
    for key, label in STAGES:
        stage = result["stages"][key]
        print(f"{label:<20} {stage['median_ms']:>10.3f} {stage['p90_ms']:>10.3f}")
    ratio = result["bu_overhead_ratio"]
    shown = f"{ratio:.3f}" if ratio is not None else "n/a"
    print(f"BU overhead (g_a + entropy coding) / head, medians: {shown}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (default: %(default)s)")
    parser.add_argument("--split", default="stage3", help="split name, or 'all' for every split (default: %(default)s)")
    parser.add_argument("--rate", type=int, default=3, help="rung of the rate ladder (default: %(default)s)")
    parser.add_argument(
        "--weights", type=Path, default=None,
        help="ladder .safetensors (default: the shipped ladder, else an untrained one)",
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="discarded warmup repeats (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--image", type=Path, default=ROOT / "examples" / "coffee.jpg", help="input image (default: examples/coffee.jpg)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be 0 or more")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.rate < 0:
        parser.error("--rate must be 0 or more")
    if args.split == "all" and args.weights is not None:
        parser.error("--weights holds the ladder of one split: it cannot be used with --split all")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        spec = get_backbone(args.backbone)
        splits = list(spec.splits) if args.split == "all" else [spec.split(args.split).name]
        results = []
        x = None
        for split in splits:
            codec, untrained = build_codec(spec.name, split, args.rate, args.weights)
            codec.ladder.rung(args.rate)  # fail fast on a bad rate index
            if x is None:
                x = codec.preprocess(args.image)[0].unsqueeze(0)
            result = {
                "backbone": spec.name,
                "split": split,
                "rate": args.rate,
                "weights": None if untrained else str(codec.ladder.path),
                "untrained": untrained,
            }
            result.update(bench_split(codec, x, args.rate, args.repeats, args.warmup))
            results.append(result)
            if not args.json:
                print_table(result)
                print()
    except FeatcodecError as exc:
        note(f"error: {exc}")
        return 2
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_model()}
    if args.json:
        payload = {
            **env,
            "device": "cpu",
            "batch": 1,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "image": str(args.image),
            "results": results,
        }
        print(json.dumps(payload, indent=2))
    else:
        print(
            f"torch {env['torch']}, {env['threads']} thread(s), CPU: {env['cpu']}; "
            f"batch 1, {args.repeats} repeats after {args.warmup} warmup, image {args.image}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
