"""Rate against accuracy, measured with the codec itself on a labelled image folder.

Each image is coded alone, as a one-record stream, so ``bytes_per_image``
is the whole stream a client would send for it, preamble and header included.
The head runs once per image and its output is reused for every rung and for
the split-tensor baselines (see :mod:`featcodec.baselines`).
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import bitstream
from .baselines import (
    JPEG_QUALITIES,
    SPLIT_TENSOR_METHODS,
    expand_baselines,
    jpeg_encode_all,
    jpeg_points,
    run_batched,
    split_tensor_points,
)
from .codec import Codec, imagenet_synsets
from .errors import FeatcodecError
from .ladder import HUFFMAN_VARIANT, Ladder, find_ladder, load_ladder
from .images import crop_image, load_image, normalise
from .metrics import PointResult, Reference, accuracy, bd_rate, summarise

POINT_FIELDS = (
    "method", "setting", "rate", "bytes_per_image", "payload_bytes_per_image", "bpp",
    "top1", "top5", "agreement", "mse", "encode_ms", "decode_ms",
)


def labelled_images(root: str | Path) -> list[tuple[Path, int]]:
    """(image path, label) pairs from ``labels.csv`` (file,label) or an ImageFolder tree of WNID folders."""
    root = Path(root)
    if not root.is_dir():
        raise FeatcodecError(f"data folder not found: {root}")
    labels_file = root / "labels.csv"
    if labels_file.is_file():
        with labels_file.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
                raise FeatcodecError(f"{labels_file}: needs the columns 'file' and 'label'")
            try:
                items = [(root / row["file"], int(row["label"])) for row in reader]
            except ValueError:
                raise FeatcodecError(f"{labels_file}: labels must be integers") from None
    else:
        index = {wnid: label for label, (wnid, _) in enumerate(imagenet_synsets())}
        items = [
            (path, index[folder.name])
            for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name in index)
            for path in sorted(folder.iterdir())
            if path.is_file()
        ]
    if not items:
        raise FeatcodecError(f"no labelled images under {root} (expected labels.csv or WNID sub-folders)")
    return items


@torch.no_grad()
def evaluate(
    codec: Codec,
    items: list[tuple[Path, int]],
    rates: list[float],
    progress: Callable[[str, int, int], None] | None = None,
    baselines: Sequence[str] = (),
    huffman_ladder: Ladder | None = None,
    max_bytes: Sequence[int] = (),
) -> dict:
    """Evaluate ``rates`` of ``codec`` and the ``baselines`` (group or method names) on ``items``.

    Each budget of ``max_bytes`` adds a ``featcodec-max-bytes`` point: every image at the highest
    rung whose record fits the budget, as ``featcodec encode --max-bytes`` picks it (``rates`` must
    then be every rung); ``result["max_bytes"]`` says how many images took each rung.

    The ``huffman-bu`` baseline runs every rung of ``huffman_ladder``, by default the
    shipped ``<split>-huffman-bu`` ladder of the codec's backbone and split.

    Returns the uncompressed accuracy, one point per rate and baseline setting
    (the fields of :class:`~featcodec.metrics.PointResult`), and the BD-rate of
    the featcodec curve against each baseline method (None where undefined).
    """
    methods = expand_baselines(baselines)
    if not items:
        raise FeatcodecError("no images to evaluate")
    for rate in rates:
        codec.ladder.rung(rate)
    if max_bytes and list(rates) != codec.ladder.sweep_rates():
        raise FeatcodecError("--max-bytes picks a rate per image: evaluate every rate (--sweep)")
    anchor = _huffman_codec(codec, huffman_ladder) if "huffman-bu" in methods else None
    prep = codec.spec.preprocessing
    reference, sizes, jpeg_files = reference_set(codec, items, progress, JPEG_QUALITIES if "jpeg" in methods else ())
    top1, top5 = accuracy(reference.logits, reference.labels)
    points, runs = [], []  # runs: every rung's per-image figures, kept only for --max-bytes
    for rate in rates:
        run = run_rung(codec, rate, sizes, reference, progress)
        points.append(_rung_point(run, reference))
        if max_bytes:
            runs.append(run)
            if len(runs) == 1:  # refuse an impossible budget before coding the other rungs
                check_max_bytes(run, max_bytes, f"{codec.spec.name}/{codec.split.name}")
    capped = [max_bytes_point(runs, budget, reference) for budget in max_bytes]
    points += [point for point, _ in capped]
    if "jpeg" in methods:
        points += jpeg_points(jpeg_files, codec.model, prep, reference, JPEG_QUALITIES, progress)
    points += split_tensor_points([m for m in methods if m in SPLIT_TENSOR_METHODS], codec.model, reference, progress)
    if anchor is not None:
        points += [
            _rung_point(run_rung(anchor, rate, sizes, reference, progress, "huffman-bu"), reference, "huffman-bu")
            for rate in range(anchor.num_rates)
        ]
    featcodec_curve = _curve(points, "featcodec")
    return {
        "backbone": codec.spec.name,
        "split": codec.split.name,
        "images": len(items),
        "uncompressed": {"top1": top1, "top5": top5},
        "points": [asdict(point) for point in points],
        "bd_rate": {method: bd_rate(_curve(points, method), featcodec_curve) for method in methods},
        **({"max_bytes": [choice for _, choice in capped]} if capped else {}),
    }


@torch.no_grad()
def reference_set(
    codec: Codec,
    items: list[tuple[Path, int]],
    progress: Callable[[str, int, int], None] | None = None,
    jpeg_qualities: Sequence[int] = (),
) -> tuple[Reference, list[tuple[int, int]], list]:
    """The head once per image: the :class:`Reference` (split tensors, labels, the uncompressed
    logits), each original image's size, and per image the JPEG files of the crop the model sees
    at ``jpeg_qualities`` (an empty list when none are given)."""
    prep = codec.spec.preprocessing
    split_tensors, sizes, labels, jpeg_files = [], [], [], []
    for done, (path, label) in enumerate(items, 1):
        image = load_image(path)
        crop = crop_image(image, prep)
        split_tensors.append(codec.model.head(normalise(crop, prep).unsqueeze(0)))
        sizes.append(image.size)
        labels.append(label)
        if jpeg_qualities:
            jpeg_files.append(jpeg_encode_all(crop, jpeg_qualities))
        if progress:
            progress("head", done, len(items))
    logits = run_batched(codec.model.tail, split_tensors)
    return Reference(split_tensors, torch.tensor(labels), logits, prep.crop * prep.crop), sizes, jpeg_files


def _huffman_codec(codec: Codec, ladder: Ladder | None) -> Codec:
    """A codec for the ``huffman-bu`` ladder that shares ``codec``'s backbone."""
    spec, split = codec.spec, codec.split
    ladder = ladder or load_ladder(find_ladder(spec.name, split.name, HUFFMAN_VARIANT))
    if ladder.config.entropy != "huffman":
        raise FeatcodecError(f"{ladder.path or 'the huffman-bu ladder'} is not a huffman ladder "
                             f"(its BU uses the {ladder.config.entropy} entropy coder)")
    return Codec(spec, split, codec.model, ladder)


def _curve(points: list[PointResult], method: str) -> list[tuple[float, float]]:
    return [(p.bytes_per_image, p.top1) for p in points if p.method == method]


@dataclass
class RungRun:
    """Every image coded at one rung, alone as a one-record stream: per-image figures and the tail's logits."""

    rate: int
    stream_bytes: list[int]  # the whole one-record stream, preamble included
    payload_bytes: list[int]
    squared_errors: list[float]  # the split tensor's mean squared error
    encode_s: list[float]
    decode_s: list[float]
    logits: torch.Tensor  # (images, classes), the tail on the decoded tensors

    @property
    def record_bytes(self) -> list[int]:
        """Bytes of each image's record, as ``encode --max-bytes`` counts them (the preamble left out)."""
        return [size - len(bitstream.PREAMBLE) for size in self.stream_bytes]


def run_rung(
    codec: Codec,
    rate: float,
    sizes: list[tuple[int, int]],
    reference: Reference,
    progress: Callable[[str, int, int], None] | None,
    method: str = "featcodec",
) -> RungRun:
    """Code every image at rung ``rate`` of ``codec``'s ladder (featcodec's own, or the huffman-bu anchor's)."""
    run = RungRun(rate, [], [], [], [], [], torch.empty(0))
    decoded_tensors = []
    for done, (tensor, size) in enumerate(zip(reference.split_tensors, sizes), 1):
        start = time.perf_counter()
        record = codec.encode_split_tensor(tensor, rate, size)
        stream = bitstream.write_stream([record])
        middle = time.perf_counter()
        decoded = codec.decode_split_tensor(bitstream.read_stream(stream)[0])
        run.decode_s.append(time.perf_counter() - middle)
        run.encode_s.append(middle - start)
        run.stream_bytes.append(len(stream))
        run.payload_bytes.append(record.payload_bytes)
        run.squared_errors.append(torch.mean((decoded - tensor) ** 2).item())
        decoded_tensors.append(decoded)
        if progress:
            progress(f"{'' if method == 'featcodec' else method + ' '}rate {rate}", done, len(sizes))
    run.logits = run_batched(codec.model.tail, decoded_tensors)
    return run


def _rung_point(run: RungRun, reference: Reference, method: str = "featcodec") -> PointResult:
    """The point of one rung, from its per-image figures."""
    return summarise(
        method, f"rate {run.rate}", run.rate, reference,
        logits=run.logits,
        total_bytes=sum(run.stream_bytes),
        payload_bytes=sum(run.payload_bytes),
        squared_error=sum(run.squared_errors),
        encode_s=sum(run.encode_s),
        decode_s=sum(run.decode_s),
    )


def check_max_bytes(lowest: RungRun, budgets: Sequence[int], ladder: str = "") -> None:
    """FeatcodecError if some image's record exceeds a budget even at the lowest rung (of ``ladder``)."""
    for budget in budgets:
        over = [size for size in lowest.record_bytes if size > budget]
        if over:
            raise FeatcodecError(
                f"--max-bytes {budget}: {len(over)} of {len(lowest.record_bytes)} images need more even at rate "
                f"{lowest.rate}{' of ' + ladder if ladder else ''} (the largest record is {max(over)} bytes)"
            )


def max_bytes_point(runs: Sequence[RungRun], budget: int, reference: Reference) -> tuple[PointResult, dict]:
    """Accuracy when each image takes the highest rung whose record fits in ``budget`` bytes, as
    ``featcodec encode --max-bytes`` chooses (``runs`` holds every rung, in rate order).

    Returns the point (method ``featcodec-max-bytes``; encode time counts every rung tried, from
    the top down, as the encoder tries them) and ``{"max_bytes", "rungs" (images per rung),
    "largest_stream"}``.
    """
    check_max_bytes(runs[0], [budget])
    records = {run.rate: run.record_bytes for run in runs}  # computed once per rung, not per image
    count = len(reference.labels)
    chosen = [max(rate for rate, sizes in records.items() if sizes[i] <= budget) for i in range(count)]
    by_rate = {run.rate: run for run in runs}
    picked = [by_rate[rate] for rate in chosen]
    tried = [[run for run in runs if run.rate >= rate] for rate in chosen]
    streams = [run.stream_bytes[i] for i, run in enumerate(picked)]
    point = summarise(
        "featcodec-max-bytes", f"max {budget} B", None, reference,
        logits=torch.stack([run.logits[i] for i, run in enumerate(picked)]),
        total_bytes=sum(streams),
        payload_bytes=sum(run.payload_bytes[i] for i, run in enumerate(picked)),
        squared_error=sum(run.squared_errors[i] for i, run in enumerate(picked)),
        encode_s=sum(run.encode_s[i] for i, runs_tried in enumerate(tried) for run in runs_tried),
        decode_s=sum(run.decode_s[i] for i, run in enumerate(picked)),
    )
    histogram = [chosen.count(run.rate) for run in runs]
    return point, {"max_bytes": budget, "rates": [run.rate for run in runs], "rungs": histogram,
                   "largest_stream": max(streams)}


def points_csv(*results: dict) -> bytes:
    """The points of :func:`evaluate` results as CSV (UTF-8, one row per point; the rate is empty
    except for the rungs of featcodec and huffman-bu)."""
    fields = ("backbone", "split") + POINT_FIELDS
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for result in results:
        for point in result["points"]:
            row = {key: "" if point.get(key) is None else point.get(key) for key in POINT_FIELDS}
            writer.writerow({"backbone": result["backbone"], "split": result["split"], **row})
    return text.getvalue().encode()


def plot_png(result: dict) -> bytes:
    """PNG of top-1 against bytes per image (log axis), one curve per method, uncompressed top-1 as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    for method in methods:
        curve = sorted((p["bytes_per_image"], 100 * p["top1"]) for p in result["points"] if p["method"] == method)
        axes.plot([b for b, _ in curve], [a for _, a in curve], "o-", label=method, markersize=4)
    axes.axhline(100 * result["uncompressed"]["top1"], color="grey", linestyle="--", label="uncompressed")
    axes.set_xscale("log")
    axes.set_xlabel("bytes per image")
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_title(f"{result['backbone']}/{result['split']} on {result['images']} images")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
