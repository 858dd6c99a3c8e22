"""Fuzz the decoder: N generated streams through parse_stream and the full codec.decode path.

Each case starts from valid streams made by ``Codec.encode`` (one record,
two records, another split, and two streams concatenated) and is one of:

* ``flip``: 1 to 4 bits flipped or bytes overwritten;
* ``insert``: 1 to 4 runs of 1 to 8 random bytes inserted;
* ``delete``: 1 to 4 runs of 1 to 8 bytes deleted;
* ``truncate``: cut anywhere, or on a record boundary;
* ``splice``: the start of one stream, then a piece of another;
* ``random``: random bytes, bare or after a valid preamble;
* ``crafted``: 1 to 3 records with a valid CRC whose fields are plausible or
  slightly off, and whose payload is real or random.

A case passes when it is refused with a one-line ``FeatcodecError`` (counted
by message category), or when it decodes to exactly what the records it still
holds decode to in the original streams. Any other exception, a multi-line
message or a wrong decode is a failure; the script then exits 1. A case that
runs longer than ``--watchdog`` seconds dumps the stack and exits 1.

    python benchmarks/fuzz_decode.py                    # 10000 cases, tiny untrained ladders
    python benchmarks/fuzz_decode.py --cases 500 --seed 3 --weights weights/
"""

from __future__ import annotations

import argparse
import faulthandler
import random
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

from _bootstrap import ROOT  # quiets compressai's import warning, finds featcodec
EXAMPLES = ROOT / "examples"

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from featcodec import bitstream
from featcodec.codec import Codec, decode
from featcodec.errors import FeatcodecError
from featcodec.ladder import WEIGHTS_ENV, LadderError, load_ladder

FAMILIES = ("flip", "insert", "delete", "truncate", "splice", "random", "crafted")
BACKBONE = "efficientnet_lite0"

# message category -> substrings of FeatcodecError messages, first match wins
CATEGORIES = (
    ("empty", ("empty stream", "holds no records")),
    ("magic", ("not a featcodec stream",)),
    ("version", ("unsupported bitstream version",)),
    ("truncated", ("truncated stream",)),
    ("crc", ("CRC-32 mismatch",)),
    ("corrupt header", ("corrupt stream",)),
    ("unknown id", ("unknown backbone id", "unknown split id", "record is for backbone id")),
    ("weights", ("other weights", "weights are for", "no trained ladder", "weights file not found")),
    ("rate", ("rate index",)),
    ("latent shape", ("latent shape",)),
    ("strings", ("payload strings, expected",)),
)


def category(message: str) -> str:
    for name, needles in CATEGORIES:
        if any(needle in message for needle in needles):
            return name
    return "other"


def make_tiny_ladder(split: str, path: Path, lambdas=(0.5, 4.0), seed: int = 0) -> Path:
    """An untrained ladder with CDF tables (the same as the test suite's)."""
    from featcodec.backbones import get_backbone
    from featcodec.bottleneck import BottleneckConfig
    from featcodec.ladder import save_ladder, untrained_ladder

    channels, height, width = get_backbone(BACKBONE).split(split).shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=8, hidden_channels=16)
    save_ladder(untrained_ladder(BACKBONE, split, config, list(lambdas), seed=seed), path)
    return path


def setup(weights: Path | None, workdir: Path) -> tuple[dict[str, bytes], Path | None, str]:
    """The valid streams, the weights= argument for decode(), and a description of the weights."""
    import os

    coffee, chelsea = EXAMPLES / "coffee.jpg", EXAMPLES / "chelsea.jpg"
    if weights is None:
        for split in ("stage2", "stage3", "stage5"):
            make_tiny_ladder(split, workdir / BACKBONE / f"{split}.safetensors")
        weights, described = workdir, "tiny untrained ladders (built in a temp folder)"
    else:
        described = str(weights)
    if weights.is_dir():
        os.environ[WEIGHTS_ENV] = str(weights)  # decode() finds each split's ladder there
        main = Codec.load(BACKBONE, "stage3")
        try:
            other = Codec.load(BACKBONE, "stage5")
        except LadderError:
            other = None
        decode_weights = None
    else:
        ladder = load_ladder(weights)
        main, other, decode_weights = Codec.load(ladder.backbone, ladder.split, ladder=ladder), None, weights
    top = main.num_rates - 1
    streams = {"one": main.encode([coffee], rate=min(1, top)), "multi": main.encode([coffee, chelsea], rate=0)}
    if other is not None:
        streams["other split"] = other.encode([chelsea], rate=other.num_rates - 1)
        streams["concat"] = streams["one"] + streams["other split"]
    else:
        streams["concat"] = streams["one"] + streams["multi"]
    return streams, decode_weights, described


def boundaries(data: bytes) -> list[int]:
    points = {0, len(bitstream.PREAMBLE), len(data)}
    for item in bitstream.parse_stream(data):
        points |= {item.offset, item.offset + item.size}
    return sorted(points)


def cut(rng: random.Random, data: bytes) -> int:
    return rng.choice(boundaries(data)) if rng.random() < 0.5 else rng.randint(0, len(data))


def random_bytes(rng: random.Random, count: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(count))


def crafted(rng: random.Random, tag: bytes, payloads: list[bytes]) -> bytes:
    """1 to 3 records with valid CRCs; each field is the expected value, or (1 time in 12) another."""

    def maybe(valid, other):
        return other() if rng.randrange(12) == 0 else valid

    records = []
    for _ in range(rng.randint(1, 3)):
        payload = rng.choice(payloads) if rng.random() < 0.5 else random_bytes(rng, rng.randint(0, 400))
        records.append(
            bitstream.Record(
                backbone_id=maybe(1, lambda: rng.randint(0, bitstream.MAX_ID)),
                split_id=maybe(3, lambda: rng.choice([0, 2, 5, rng.randint(0, bitstream.MAX_ID)])),
                rate=maybe(rng.randint(0, 1), lambda: rng.randint(0, 255)),
                weights_tag=maybe(tag, lambda: random_bytes(rng, 8)),
                image_size=(rng.randint(1, bitstream.MAX_IMAGE_SIDE), rng.randint(1, bitstream.MAX_IMAGE_SIDE)),
                latent_shape=maybe((7, 7), lambda: (rng.randint(1, 1024), rng.randint(1, 1024))),
                strings=maybe(
                    (payload,), lambda: tuple(random_bytes(rng, rng.randint(0, 40)) for _ in range(rng.randint(1, 4)))
                ),
            )
        )
    return bitstream.write_stream(records)


def make_case(family: str, rng: random.Random, streams: dict[str, bytes], tag: bytes, payloads: list[bytes]) -> bytes:
    names = sorted(streams)
    data = bytearray(streams[rng.choice(names)])
    if family in ("flip", "insert", "delete"):
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(data) + (family == "insert"))
            if family == "flip" and rng.random() < 0.5:
                data[position] ^= 1 << rng.randrange(8)
            elif family == "flip":
                data[position] = rng.choice([0x00, 0x7F, 0x80, 0x89, 0xFF, rng.getrandbits(8)])
            elif family == "insert":
                data[position:position] = random_bytes(rng, rng.randint(1, 8))
            elif len(data) > 1:
                del data[position : position + rng.randint(1, 8)]
        return bytes(data)
    if family == "truncate":
        return bytes(data[: cut(rng, bytes(data))])
    if family == "splice":
        other = streams[rng.choice(names)]
        start, end = cut(rng, other), rng.choice([len(other), cut(rng, other)])
        return bytes(data[: cut(rng, bytes(data))]) + other[start : max(start, end)]
    if family == "random":
        prefix = rng.choice([b"", bitstream.PREAMBLE, bitstream.PREAMBLE + bytes([1, 3])])
        return prefix + random_bytes(rng, rng.randint(0, 300))
    return crafted(rng, tag, payloads)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, NaN included."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def attempt(stage: str, call):
    """(value, None) when ``call()`` returns, else (None, (outcome, detail)) for how it was refused."""
    try:
        return call(), None
    except FeatcodecError as exc:
        message = str(exc)
        if not message or "\n" in message:
            return None, ("FAILED", f"multi-line or empty message {message!r}")
        return None, ("rejected", f"{stage}: " + category(message))
    except Exception as exc:  # noqa: BLE001
        return None, ("FAILED", f"{stage} raised {type(exc).__name__}: {exc}")


def run_case(data: bytes, family: str, decode_weights, reference: dict) -> tuple[str, str]:
    """(outcome, detail): outcome is 'decoded', 'rejected' or 'FAILED'."""
    parsed, refused = attempt("parse", lambda: bitstream.parse_stream(data))
    if refused:
        return refused
    if bitstream.read_stream(data) != [p.record for p in parsed]:
        return "FAILED", "read_stream disagrees with parse_stream"
    results, refused = attempt("decode", lambda: decode(data, weights=decode_weights))
    if refused:
        return refused
    if [r.record for r in results] != [p.record for p in parsed]:
        return "FAILED", "decoded records differ from the parsed ones"
    for result in results:
        key = bitstream.encode_record(result.record)
        if key in reference:
            features, logits = reference[key]
            if not (same(result.features, features) and same(result.logits, logits)):
                return "FAILED", "a record decodes differently than in its original stream"
        elif family != "crafted":
            return "FAILED", "a record found in no original stream passed its CRC"
    return "decoded", "original records" if family != "crafted" else "crafted records"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10000, help="number of generated cases (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="case i uses random.Random(f'{seed}:{i}')")
    parser.add_argument(
        "--weights", type=Path, help="a ladder .safetensors file, or a weights folder (<backbone>/<split>.safetensors); "
        "default: tiny untrained ladders built in a temp folder",
    )
    parser.add_argument("--watchdog", type=float, default=120.0, help="seconds one case may take before the run aborts")
    args = parser.parse_args(argv)
    out = Console(highlight=False)
    err = Console(stderr=True, highlight=False)

    with tempfile.TemporaryDirectory(prefix="featcodec-fuzz-") as workdir:
        streams, decode_weights, described = setup(args.weights, Path(workdir))
        reference = {}
        for data in streams.values():
            for result in decode(data, weights=decode_weights):
                reference[bitstream.encode_record(result.record)] = (result.features, result.logits)
        first = bitstream.read_stream(streams["multi"])
        tag, payloads = first[0].weights_tag, [r.strings[0] for r in first]

        outcomes: Counter = Counter()
        by_family: dict[str, Counter] = {f: Counter() for f in FAMILIES}
        failures: list[str] = []
        started = time.perf_counter()
        with Progress(
            TextColumn("fuzzing"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=err,
        ) as progress:
            task = progress.add_task("cases", total=args.cases, failed=0)
            for index in range(args.cases):
                family = FAMILIES[index % len(FAMILIES)]
                rng = random.Random(f"{args.seed}:{index}")
                data = make_case(family, rng, streams, tag, payloads)
                faulthandler.dump_traceback_later(args.watchdog, exit=True)
                try:
                    outcome, detail = run_case(data, family, decode_weights, reference)
                finally:
                    faulthandler.cancel_dump_traceback_later()
                outcomes[(outcome, detail if outcome != "FAILED" else detail.split(":")[0])] += 1
                by_family[family][outcome] += 1
                if outcome == "FAILED":
                    failures.append(f"case {index} ({family}, {len(data)} bytes, crc32 {zlib.crc32(data):08x}): {detail}")
                progress.update(task, advance=1, failed=len(failures))
        elapsed = time.perf_counter() - started

    out.print(f"featcodec decoder fuzzing: {args.cases} cases, seed {args.seed}, weights: {described}", markup=False)
    table = Table(title="outcomes")
    table.add_column("outcome")
    table.add_column("detail")
    table.add_column("cases", justify="right")
    table.add_column("share", justify="right")
    order = {"decoded": 0, "rejected": 1, "FAILED": 2}
    for (outcome, detail), count in sorted(outcomes.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        table.add_row(outcome, detail, str(count), f"{100 * count / max(1, args.cases):.1f}%")
    out.print(table)

    families = Table(title="per mutation family")
    for column in ("family", "decoded", "rejected", "failed"):
        families.add_column(column, justify="left" if column == "family" else "right")
    for family, counts in by_family.items():
        families.add_row(family, str(counts["decoded"]), str(counts["rejected"]), str(counts["FAILED"]))
    out.print(families)

    out.print(
        f"{args.cases} cases in {elapsed:.1f} s ({args.cases / elapsed:.0f} cases/s), "
        f"{sum(by_family[f]['decoded'] for f in FAMILIES)} decoded, {len(failures)} failed",
        markup=False,
    )
    for line in failures[:20]:
        out.print("FAILED " + line, markup=False)
    if len(failures) > 20:
        out.print(f"... and {len(failures) - 20} more", markup=False)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
