"""Rebuild bitstreams/: encode the shipped test photo at every rung of every shipped ladder.

Run after a ladder changes (its weights tag changes, so old streams no longer decode):

    python scripts/make_conformance.py            # then: featcodec verify bitstreams
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featcodec import conformance

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bitstreams")
    parser.add_argument("--photo", type=Path, default=ROOT / "examples" / "coffee.jpg")
    parser.add_argument("--weights", type=Path, default=ROOT / "weights", help="folder of <backbone>/<split>.safetensors")
    args = parser.parse_args()
    ladders = sorted(args.weights.glob("*/*.safetensors"))
    if not ladders:
        print(f"no ladders under {args.weights}", file=sys.stderr)
        return 2
    for stale in args.out.glob("*.fcb"):
        stale.unlink()
    manifest = conformance.build(args.out, args.photo, ladders)
    for entry in manifest["streams"]:
        print(f"{entry['stream']}: {entry['bytes']} bytes, top-5 {entry['top5']}")
    print(f"wrote {len(manifest['streams'])} streams and {conformance.MANIFEST} to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
