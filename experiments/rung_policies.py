"""Per-image choice of rung: a byte budget (``--max-bytes``) against a split-tensor error threshold.

Every image of a labelled folder is coded at every rung of a ladder (as ``featcodec eval --sweep``
does). Then two rules pick one rung per image, both of which an encoder can apply alone:

* budget B: the highest rung whose record fits in B bytes (``featcodec encode --max-bytes B``);
* error threshold t: the lowest rung whose rebuilt split tensor has a mean squared error of at
  most t (the client holds the BU decoder, so it can measure this; the top rung if none does).

For each rule the script prints the mean stream bytes and top-1, and beside the threshold rule
the top-1 of the line through the ladder's rungs at the same mean bytes (linear in log bytes):
a positive difference would mean the rule beats one rung for all images.

A third rule needs a round trip: the server decodes rung k and, when the tail's top softmax
probability is below p, asks the client for rung j as well (both streams count). For each mean
budget the script prints the best k, j and p, chosen on the measured images themselves, so the
figure is an upper bound for that rule. As run for the notes of issue 3:

    python experiments/rung_policies.py --data ../shared/data/val --split stage3 --budgets 196,496
    python experiments/rung_policies.py --data ../shared/data/val --split stage5 --budgets 146 --mean-budgets 150
"""

from __future__ import annotations

import argparse

from _bootstrap import ROOT  # noqa: F401 (quiets compressai's warning, finds featcodec)

import numpy as np
import torch

from featcodec.codec import Codec
from featcodec.evaluate import labelled_images, max_bytes_point, reference_set, run_rung


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="labels.csv folder or ImageFolder of WNIDs")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--weights", help="ladder file (default: the shipped one)")
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument("--budgets", default="196,496", help="record budgets in bytes, comma-separated")
    parser.add_argument("--thresholds", type=int, default=40,
                        help="error thresholds: this many quantiles (2nd to 98th percentile) of the per-image errors")
    parser.add_argument("--mean-budgets", default="200,500",
                        help="mean stream bytes per image for the server-request rule, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    codec = Codec.load("efficientnet_lite0", args.split, weights=args.weights)
    items = labelled_images(args.data)[: args.limit]
    reference, sizes, _ = reference_set(codec, items)
    runs = [run_rung(codec, rate, sizes, reference, None) for rate in range(codec.num_rates)]
    labels = reference.labels.numpy()
    stream = np.array([run.stream_bytes for run in runs], dtype=float)  # (rungs, images)
    correct = np.array([(run.logits.argmax(-1).numpy() == labels) for run in runs])
    errors = np.array([run.squared_errors for run in runs])
    line_bytes, line_top1 = np.log(stream.mean(1)), 100 * correct.mean(1)
    print(f"{codec.spec.name}/{args.split}, {len(items)} images")
    budgets = [int(part) for part in args.budgets.split(",")]
    for run in runs:
        over = ", ".join(f"{sum(size > budget for size in run.record_bytes)} over {budget} B" for budget in budgets)
        print(f"rate {run.rate:2d}: {stream[run.rate].mean():8.1f} B  top-1 {line_top1[run.rate]:6.2f} %  "
              f"largest stream {int(stream[run.rate].max())} B  records {over}")
    for budget in budgets:
        point, choice = max_bytes_point(runs, budget, reference)
        print(f"budget {budget} B: {point.bytes_per_image:8.1f} B  top-1 {100 * point.top1:6.2f} %  "
              f"largest stream {choice['largest_stream']} B  images per rung {choice['rungs']}")
    images = np.arange(len(items))
    for threshold in np.quantile(errors.ravel(), np.linspace(0.02, 0.98, args.thresholds)):
        chosen = np.full(len(items), len(runs) - 1)
        for rate in reversed(range(len(runs))):
            chosen[errors[rate] <= threshold] = rate  # ends at the lowest rung within the threshold
        mean_bytes = stream[chosen, images].mean()
        top1 = 100 * correct[chosen, images].mean()
        on_line = np.interp(np.log(mean_bytes), line_bytes, line_top1)
        print(f"error <= {threshold:8.4f}: {mean_bytes:8.1f} B  top-1 {top1:6.2f} %  line {on_line:6.2f} %  "
              f"difference {top1 - on_line:+6.2f}")
    confidence = np.array([torch.softmax(run.logits, -1).amax(-1).numpy() for run in runs])
    for budget in [float(part) for part in args.mean_budgets.split(",")]:
        best = best_server_request(stream, correct, confidence, budget)
        if best is None:
            print(f"server request, mean <= {budget:g} B: no rung fits")
            continue
        top1, mean_bytes, first, second, below, asked = best
        on_line = np.interp(np.log(mean_bytes), line_bytes, line_top1)
        print(f"server request, mean <= {budget:g} B: {mean_bytes:8.1f} B  top-1 {top1:6.2f} %  line {on_line:6.2f} %  "
              f"difference {top1 - on_line:+6.2f}  (rate {first}, then rate {second} when p < {below:.3f}: "
              f"{100 * asked:.1f} % of images)")


def best_server_request(stream: np.ndarray, correct: np.ndarray, confidence: np.ndarray, budget: float):
    """The best (top-1 %, mean bytes, k, j, p, share asked) of the rule "rung k, and rung j as well
    when the tail's top probability at rung k is below p" within ``budget`` mean bytes (arrays are
    (rungs, images)); None if not even the lowest rung fits."""
    best = None
    rungs = len(stream)
    for first in range(rungs):
        for second in range(first + 1, rungs):
            for below in np.linspace(0.0, 1.0, 201):
                asked = confidence[first] < below
                mean_bytes = (stream[first] + asked * stream[second]).mean()
                if mean_bytes > budget:
                    break  # a higher p asks more often
                top1 = 100 * np.where(asked, correct[second], correct[first]).mean()
                if best is None or top1 > best[0]:
                    best = (top1, mean_bytes, first, second, below, asked.mean())
    return best


if __name__ == "__main__":
    main()
