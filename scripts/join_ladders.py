"""Join ladders of one backbone/split into one, lowest rate first; each may give only some rungs.

    python scripts/join_ladders.py LOWER.safetensors UPPER.safetensors -o OUT.safetensors
    python scripts/join_ladders.py hyper.safetensors:0-3 low.safetensors:5 top.safetensors -o OUT.safetensors

``PATH:RUNGS`` takes the rungs RUNGS of that ladder (``0-3``, ``5``, ``0,2,4``), in that order.
The ladders may use BUs of other sizes (for example a stride-1 latent for higher rates) and
learned entropy models of either kind (factorized, hyperprior); Huffman rungs join only Huffman
rungs. Rungs after the first ladder record that ladder's training run. OUT is written atomically.
``--float16`` stores the conv weights in float16 (about half the file); measure OUT afterwards
(``featcodec eval --record``), since its rungs then code with the rounded weights.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")  # raised while importing compressai

from featcodec.errors import FeatcodecError
from featcodec.ladder import join_ladders, load_ladder, save_ladder, select_rungs, store_weights_as

RUNGS = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_part(part: str) -> tuple[str, list[int] | None]:
    """``PATH`` or ``PATH:RUNGS`` -> (path, rung indexes or None for all)."""
    path, _, spec = part.rpartition(":")
    if not path or not RUNGS.match(spec):
        return part, None
    indexes: list[int] = []
    for item in spec.split(","):
        first, _, last = item.partition("-")
        if last and int(last) < int(first):
            raise FeatcodecError(f"bad rung range '{item}' in '{part}'")
        indexes += list(range(int(first), int(last or first) + 1))
    return path, indexes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ladders", nargs="+", metavar="LADDER[:RUNGS]")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--float16", action="store_true", help="store the conv weights in float16")
    args = parser.parse_args(argv)
    try:
        ladder = None
        for part in args.ladders:
            path, indexes = parse_part(part)
            piece = load_ladder(path)
            piece = piece if indexes is None else select_rungs(piece, indexes)
            ladder = piece if ladder is None else join_ladders(ladder, piece)
        if args.float16:
            store_weights_as(ladder, "float16")
        save_ladder(ladder, args.out)
    except FeatcodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(ladder.rungs)}-rung ladder to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
