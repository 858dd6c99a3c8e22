"""Generalization of a rate ladder: bytes and top-1 agreement with the uncompressed model, per rung,
on the photos its BUs trained on, the fixed tune set and pool photos kept out (issue 29).

Sets (featcodec.holdout): *train* = the training folder less the tune set, *tune* = the 400 images
of the training folder whose path hashes lowest, *pool* = the 500 pool photos kept out of training,
*val* (with --val) a labelled reference. ``--limit N`` takes N images of each set by the same hash
rule. Each image's head runs once; every rung codes the cached split tensor into a real one-record
stream, decodes it and runs the tail, as ``featcodec eval`` does (bytes = the whole stream).
``--diagnose K`` adds, for rung K: split-tensor statistics per set, reconstruction MSE per channel,
bytes, agreement by the uncompressed model's confidence and by pool source, and the classes that
fail most. Data goes to stdout (markdown, or JSON with --json), progress to stderr.

    .venv/bin/python benchmarks/generalization.py --split stage3 --rates all --limit 400
    .venv/bin/python benchmarks/generalization.py --split stage5 --rates all --limit 400 \\
        --val ../shared/data/val --diagnose 3
    .venv/bin/python benchmarks/generalization.py --weights new.safetensors --split stage3 \\
        --rates 0,3 --tune-held-out --trained-on "1600 train/ images (tune held out)" --json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from _bootstrap import ROOT  # quiets compressai's import warning, finds featcodec

import torch

from featcodec.codec import Codec, imagenet_class_names
from featcodec.errors import FeatcodecError
from featcodec.evaluate import labelled_images, reference_set, run_rung
from featcodec.holdout import POOL_HELD_OUT, TUNE_COUNT, split_held_out
from featcodec.metrics import accuracy, summarise
from featcodec.train import list_images

DATA = ROOT.parent / "shared" / "data"
CONFIDENCE_BINS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.01)  # the uncompressed model's top-1 probability


class KeepDecoded(Codec):
    """A codec that keeps every split tensor it decodes, so run_rung's pass also feeds the diagnosis."""

    def __init__(self, codec: Codec):
        super().__init__(codec.spec, codec.split, codec.model, codec.ladder)
        self.kept: list[torch.Tensor] = []

    def decode_split_tensor(self, record):
        self.kept.append(super().decode_split_tensor(record))
        return self.kept[-1]


def progress_for(name: str):
    def report(stage: str, done: int, total: int) -> None:
        if done == total or done % 200 == 0:
            print(f"  {name}: {stage} {done}/{total}", file=sys.stderr, flush=True)
    return report


def image_sets(args) -> dict[str, tuple[list[tuple[Path, int]], Path]]:
    """Each set's (path, label) items (label -1 where unknown) and the folder its hash rule uses."""
    try:
        train_labels = dict(labelled_images(args.train_data))
    except FeatcodecError:
        train_labels = {}
    tune, rest = split_held_out(list_images(args.train_data), args.train_data, TUNE_COUNT)
    pool = split_held_out(list_images(args.pool_data), args.pool_data, POOL_HELD_OUT)[0]
    sets = {
        "train": ([(p, train_labels.get(p, -1)) for p in rest], args.train_data),
        "tune": ([(p, train_labels.get(p, -1)) for p in tune], args.train_data),
        "pool": ([(p, -1) for p in pool], args.pool_data),
    }
    if args.val:
        sets["val"] = (labelled_images(args.val), args.val)
    if args.limit:
        for name, (items, root) in sets.items():
            keep = set(split_held_out([p for p, _ in items], root, args.limit)[0])
            sets[name] = ([item for item in items if item[0] in keep], root)
    return sets


def training_record(codec: Codec) -> str:
    """What the ladder metadata says each rung's last training run used."""
    groups: dict[str, list[int]] = {}
    for rung, info in enumerate(codec.ladder.rung_info):
        record = info.get("training") or codec.ladder.extra.get("training") or {}
        groups.setdefault(record.get("data", "no training record"), []).append(rung)
    return "; ".join(f"rungs {','.join(map(str, rungs))}: {data}" for data, rungs in groups.items())


def labelled_top1(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    known = labels >= 0
    return accuracy(logits[known], labels[known])[0] if known.any() else None


def tensor_stats(x: torch.Tensor, train: torch.Tensor) -> dict:
    """Split-tensor statistics of ``x`` (N, C, H, W), and how far they are from the train set's."""
    per_channel = x.transpose(0, 1).flatten(1)
    train_channel = train.transpose(0, 1).flatten(1)
    mean, std = per_channel.mean(1), per_channel.std(1)
    t_mean, t_std = train_channel.mean(1), train_channel.std(1)
    low, high = train_channel.min(1).values[:, None], train_channel.max(1).values[:, None]
    per_image = x.flatten(1)
    return {
        "mean_abs_channel_mean": mean.abs().mean().item(),
        "mean_channel_std": std.mean().item(),
        "mean_square": x.pow(2).mean().item(),
        "zero_fraction": (x == 0).float().mean().item(),
        "dynamic_range": (per_image.max(1).values - per_image.min(1).values).mean().item(),
        "shift_vs_train": ((mean - t_mean).abs() / t_std).mean().item(),  # channel means, in train stds
        "std_ratio_vs_train": (std / t_std).mean().item(),
        "outside_train_range": ((per_channel < low) | (per_channel > high)).float().mean().item(),
    }


def diagnose(name, reference, items, root, run, decoded, train_x, train_err) -> dict:
    """Where one set's agreement at one rung is lost (see the module docstring)."""
    x = torch.cat(reference.split_tensors)
    err = (decoded - x).pow(2).transpose(0, 1).flatten(1).mean(1)  # per-channel MSE
    variance = (train_x.transpose(0, 1).flatten(1).var(1)) if train_x is not None else x.transpose(0, 1).flatten(1).var(1)
    agree = run.logits.argmax(-1) == reference.rank1
    confidence = reference.logits.softmax(-1).max(-1).values
    bins = []
    for low, high in zip(CONFIDENCE_BINS, CONFIDENCE_BINS[1:]):
        inside = (confidence >= low) & (confidence < high)
        bins.append({"range": [low, min(high, 1.0)], "images": int(inside.sum()),
                     "agreement": agree[inside].float().mean().item() if inside.any() else None})
    names = imagenet_class_names()
    keys = reference.labels if name == "val" else reference.rank1  # true class on val, else predicted
    totals, failed = Counter(keys.tolist()), Counter(keys[~agree].tolist())
    top = sorted(failed.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    sources = Counter(p.relative_to(root).parts[0] for p, _ in items) if name == "pool" else {}
    by_source = {s: agree[[p.relative_to(root).parts[0] == s for p, _ in items]].float().mean().item()
                 for s in sorted(sources)}
    bytes_sorted = sorted(run.stream_bytes)
    order = err.argsort(descending=True)[:5]
    ratio = (err / train_err).argsort(descending=True)[:5] if train_err is not None else order
    return {
        "stats": tensor_stats(x, train_x if train_x is not None else x),
        "mse": err.mean().item(),
        "mse_over_train_variance": (err.sum() / variance.sum()).item(),
        "top_channels_by_mse": [[int(c), err[c].item()] for c in order],
        "top_channels_by_mse_ratio_to_train": [[int(c), (err[c] / train_err[c]).item()] for c in ratio]
        if train_err is not None else [],
        "bytes": {"mean": sum(bytes_sorted) / len(bytes_sorted), "median": bytes_sorted[len(bytes_sorted) // 2],
                  "p90": bytes_sorted[int(0.9 * (len(bytes_sorted) - 1))]},
        "agreement": agree.float().mean().item(),
        "kl": torch.nn.functional.kl_div(run.logits.log_softmax(-1), reference.logits.log_softmax(-1),
                                         log_target=True, reduction="batchmean").item(),  # KL(uncompressed || coded)
        "mean_confidence": confidence.mean().item(),
        "agreement_by_confidence": bins,
        "agreement_by_source": {s: [sources[s], v] for s, v in by_source.items()},
        "classes_by": "true label" if name == "val" else "uncompressed prediction",
        "top_failing_classes": [[c, names[c] if 0 <= c < len(names) else str(c), n, totals[c]] for c, n in top],
        "_err": err,
    }


def measure(args) -> dict:
    codec = Codec.load(args.backbone, args.split, weights=args.weights)
    keep = KeepDecoded(codec)
    rates = list(range(codec.num_rates)) if args.rates == "all" else [int(r) for r in args.rates.split(",")]
    for rate in rates + args.diagnose:
        codec.ladder.rung(rate)
    rates = sorted(set(rates) | set(args.diagnose))
    sets = image_sets(args)
    result = {
        "backbone": codec.spec.name, "split": codec.split.name,
        "weights": str(codec.ladder.path), "trained_on": args.trained_on or training_record(codec),
        "tune_held_out": args.tune_held_out, "sets": {}, "rates": [], "diagnosis": {},
    }
    references = {}
    for name, (items, root) in sets.items():
        reference, sizes, _ = reference_set(codec, items, progress_for(name))
        references[name] = (reference, sizes)
        result["sets"][name] = {"folder": str(root), "images": len(items),
                                "uncompressed_top1": labelled_top1(reference.logits, reference.labels)}
    for rate in rates:
        row, diag = {"rate": rate}, {}
        for name, (reference, sizes) in references.items():
            keep.kept = []
            run = run_rung(keep, rate, sizes, reference, progress_for(name))
            point = summarise("featcodec", f"rate {rate}", rate, reference, logits=run.logits,
                              total_bytes=sum(run.stream_bytes), payload_bytes=sum(run.payload_bytes),
                              squared_error=sum(run.squared_errors), encode_s=0.0, decode_s=0.0)
            row[name] = {"bytes_per_image": point.bytes_per_image, "agreement": point.agreement,
                         "mse": point.mse, "top1": labelled_top1(run.logits, reference.labels)}
            if rate in args.diagnose:
                train = diag.get("train")
                train_x = torch.cat(references["train"][0].split_tensors) if train else None
                items, root = sets[name]
                diag[name] = diagnose(name, reference, items, root, run, torch.cat(keep.kept), train_x,
                                      train["_err"] if train else None)
        result["rates"].append(row)
        if diag:  # agreement if each set had the train set's mix of uncompressed confidence
            mix = [b["images"] / len(sets["train"][0]) for b in diag["train"]["agreement_by_confidence"]]
            for d in diag.values():
                bins = d["agreement_by_confidence"]
                d["agreement_at_train_confidence_mix"] = None if any(
                    w and b["agreement"] is None for w, b in zip(mix, bins)) else sum(
                    w * b["agreement"] for w, b in zip(mix, bins) if w)
            result["diagnosis"][str(rate)] = {n: {k: v for k, v in d.items() if k != "_err"} for n, d in diag.items()}
    return result


def pct(value) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def print_tables(result: dict) -> None:
    sets = result["sets"]
    print(f"## {result['backbone']}/{result['split']}  ({result['weights']})\n")
    print(f"trained on: {result['trained_on']}")
    print("sets: " + ", ".join(f"{n} {s['images']} images of {s['folder']}" for n, s in sets.items()))
    print("uncompressed top-1 on the labelled images: " + ", ".join(
        f"{n} {pct(s['uncompressed_top1'])} %" for n, s in sets.items() if s["uncompressed_top1"] is not None))
    if not result["tune_held_out"]:
        print("NOTE: the tune set is not declared held out (--tune-held-out): if these BUs trained on it, "
              "the tune column is NOT a held-out measure; the clean held-out columns are pool (and val).")
    val = "val" in sets
    print("\n| rate | B train | B tune | B pool | agr train % | agr tune % | agr pool % | gap train-tune "
          "| gap train-pool |" + (" B val | val top-1 % | agr val % |" if val else ""))
    print("|---:" * (9 + 3 * val) + "|")
    for row in result["rates"]:
        cells = [str(row["rate"])] + [f"{row[n]['bytes_per_image']:.1f}" for n in ("train", "tune", "pool")]
        cells += [pct(row[n]["agreement"]) for n in ("train", "tune", "pool")]
        cells += [f"{100 * (row['train']['agreement'] - row[n]['agreement']):+.2f}" for n in ("tune", "pool")]
        if val:
            cells += [f"{row['val']['bytes_per_image']:.1f}", pct(row["val"]["top1"]), pct(row["val"]["agreement"])]
        print("| " + " | ".join(cells) + " |")
    for rate, diag in result["diagnosis"].items():
        print(f"\n### diagnosis, rate {rate}\n")
        print("| set | mean B | median B | MSE | MSE / train var | shift vs train | std ratio | mean sq "
              "| zeros % | range | outside train range % | uncompressed conf | KL |")
        print("|---" + "|---:" * 12 + "|")
        for name, d in diag.items():
            s = d["stats"]
            print(f"| {name} | {d['bytes']['mean']:.1f} | {d['bytes']['median']} | {d['mse']:.4f} "
                  f"| {d['mse_over_train_variance']:.4f} | {s['shift_vs_train']:.3f} | {s['std_ratio_vs_train']:.3f} "
                  f"| {s['mean_square']:.3f} | {100 * s['zero_fraction']:.2f} | {s['dynamic_range']:.2f} "
                  f"| {100 * s['outside_train_range']:.3f} | {d['mean_confidence']:.3f} | {d['kl']:.3f} |")
        labels = [f"conf {b['range'][0]:.1f}-{b['range'][1]:.1f}" for b in next(iter(diag.values()))["agreement_by_confidence"]]
        print("\nagreement % (images) by the uncompressed model's top-1 probability; last column: the set's "
              "agreement reweighted to the train set's mix of these bins:\n")
        print("| set | " + " | ".join(labels) + " | agr % | at train mix |\n|---" + "|---:" * (len(labels) + 2) + "|")
        for name, d in diag.items():
            print(f"| {name} | " + " | ".join(f"{pct(b['agreement'])} ({b['images']})"
                                             for b in d["agreement_by_confidence"])
                  + f" | {pct(d['agreement'])}"
                  + f" | {pct(d['agreement_at_train_confidence_mix'])} |")
        for name, d in diag.items():
            print(f"\n{name}: top channels by MSE " + ", ".join(f"{c}: {v:.1f}" for c, v in d["top_channels_by_mse"]))
            if d["top_channels_by_mse_ratio_to_train"]:
                print(f"{name}: top channels by MSE / train MSE " + ", ".join(
                    f"{c}: {v:.2f}" for c, v in d["top_channels_by_mse_ratio_to_train"]))
            if d["agreement_by_source"]:
                print(f"{name}: agreement by source " + ", ".join(
                    f"{s} {pct(v)} % ({n})" for s, (n, v) in d["agreement_by_source"].items()))
            print(f"{name}: classes failing most (by {d['classes_by']}; failed/images): " + ", ".join(
                f"{c} {label} {n}/{total}" for c, label, n, total in d["top_failing_classes"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--split", default="stage3")
    parser.add_argument("--weights", help="ladder file (default: the shipped one)")
    parser.add_argument("--rates", default="all", help="'all' or comma-separated rungs")
    parser.add_argument("--train-data", type=Path, default=DATA / "train", help="the BU's training folder")
    parser.add_argument("--pool-data", type=Path, default=DATA / "pool", help="the pool folder")
    parser.add_argument("--val", type=Path, help="a labelled folder to report as a reference column")
    parser.add_argument("--trained-on", help="what the BUs trained on (default: the ladder's training record)")
    parser.add_argument("--tune-held-out", action="store_true", help="the BUs never trained on the tune set")
    parser.add_argument("--limit", type=int, help="at most N images per set (chosen by the holdout hash)")
    parser.add_argument("--diagnose", default="", help="comma-separated rungs to diagnose")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    args = parser.parse_args(argv)
    args.diagnose = [int(r) for r in args.diagnose.split(",") if r]
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = measure(args)
    except FeatcodecError as error:
        print(f"generalization: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
