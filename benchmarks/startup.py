"""Start-up cost of one-image CLI calls against `python -c "import torch"`, each in a fresh process.

A shell pipeline pays a new process per call, so what counts is how much an `encode` of one
image and a `decode` of one record add to the bare import of torch. The three commands run
back to back in each round; the script prints per-round seconds and the medians.

    python benchmarks/startup.py                  # stage3, rate 3, examples/coffee.jpg, 5 rounds
    python benchmarks/startup.py --split stage5 --rounds 3
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bootstrap import ROOT


def wall(command: list[str]) -> float:
    """Seconds one command takes, from process start to exit (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--rate", default="3")
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "coffee.jpg")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    featcodec = [sys.executable, "-m", "featcodec"]
    with tempfile.TemporaryDirectory() as tmp:
        stream = str(Path(tmp) / "one.fcb")
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "encode": featcodec + ["encode", str(args.image), "--split", args.split, "--rate", args.rate, "-o", stream],
            "decode": featcodec + ["decode", stream, "--json"],
        }
        wall(commands["encode"])  # warm the file cache (and write the stream decode reads)
        times: dict[str, list[float]] = {name: [] for name in commands}
        for round_ in range(args.rounds):
            for name, command in commands.items():
                times[name].append(wall(command))
            print(f"round {round_ + 1}: " + ", ".join(f"{name} {times[name][-1]:.2f} s" for name in commands),
                  file=sys.stderr)
    torch_s = statistics.median(times["import torch"])
    print(f"efficientnet_lite0/{args.split} rate {args.rate}, {args.image.name}, median of {args.rounds} rounds:")
    print(f"  python -c 'import torch'  {torch_s:.2f} s")
    for name in ("encode", "decode"):
        median = statistics.median(times[name])
        print(f"  featcodec {name:<6}          {median:.2f} s  (import torch + {median - torch_s:.2f} s)")


if __name__ == "__main__":
    main()
