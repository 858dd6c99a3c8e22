"""BD-rate of one `featcodec eval --csv` curve against another (for example a new ladder against the one it replaces).

    python benchmarks/bd_rate.py docs/results/stage5-ladder.csv docs/results/stage5.csv   # the ladder stage5 replaced

Reads the featcodec rows (not the baselines) of each CSV and prints, for top-1 and for agreement
with the uncompressed model, the percent change in bytes the TEST curve needs at equal accuracy
over the range both curves share (negative: fewer bytes), as `featcodec eval` computes it
against its baselines (log bytes interpolated in accuracy with PCHIP).
"""

import argparse
import csv
from pathlib import Path

from _bootstrap import ROOT  # noqa: F401

from featcodec.metrics import bd_rate


def curve(path: Path, column: str) -> list[tuple[float, float]]:
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["method"] == "featcodec"]
    return [(float(row["bytes_per_image"]), 100 * float(row[column])) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("anchor", type=Path, help="the eval CSV to compare against")
    parser.add_argument("test", type=Path, help="the eval CSV of the curve measured")
    args = parser.parse_args()
    for column in ("top1", "agreement"):
        anchor, test = curve(args.anchor, column), curve(args.test, column)
        low = max(min(a for _, a in anchor), min(a for _, a in test))
        high = min(max(a for _, a in anchor), max(a for _, a in test))
        value = bd_rate(anchor, test)
        shown = "undefined (no shared range)" if value is None else f"{value:+.1f} %"
        print(f"{column}: BD-rate {shown} over {low:.2f}..{high:.2f} % "
              f"(anchor {min(b for b, _ in anchor):.1f}-{max(b for b, _ in anchor):.1f} B, "
              f"test {min(b for b, _ in test):.1f}-{max(b for b, _ in test):.1f} B)")


if __name__ == "__main__":
    main()
