"""Join two ladders of one backbone/split into one: the lower ladder's rungs, then the upper's.

    python scripts/join_ladders.py LOWER.safetensors UPPER.safetensors -o OUT.safetensors

The upper rungs may use BUs of another size (for example a stride-1 latent for higher rates);
both ladders must use the same entropy coder. OUT is written atomically.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")  # raised while importing compressai

from featcodec.errors import FeatcodecError
from featcodec.ladder import join_ladders, load_ladder, save_ladder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lower")
    parser.add_argument("upper")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args(argv)
    try:
        ladder = join_ladders(load_ladder(args.lower), load_ladder(args.upper))
        save_ladder(ladder, args.out)
    except FeatcodecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(ladder.rungs)}-rung ladder to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
