"""Rate against accuracy, measured with the codec itself on a labelled image folder.

Each image is coded alone, as a one-record stream, so ``bytes_per_image``
is the whole stream a client would send for it, preamble and header included.
The head runs once per image and its output is reused for every rung.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import bitstream
from .codec import Codec, imagenet_synsets
from .errors import FeatcodecError
from .images import load_image


@dataclass
class RungResult:
    """Measured figures of one rung over the evaluated images (accuracies are fractions)."""

    rate: int
    bytes_per_image: float
    payload_bytes_per_image: float
    bpp: float
    top1: float
    top5: float
    agreement: float
    mse: float
    encode_ms: float
    decode_ms: float


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


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top5 = logits.topk(5, dim=-1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(-1).float().mean().item()


@torch.no_grad()
def evaluate(
    codec: Codec,
    items: list[tuple[Path, int]],
    rates: list[int],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Evaluate ``rates`` of ``codec`` on ``items``: uncompressed accuracy plus one RungResult per rate."""
    for rate in rates:
        codec.ladder.rung(rate)
    split_tensors, sizes, labels = [], [], []
    for done, (path, label) in enumerate(items, 1):
        x, size = codec.preprocess(load_image(path))
        split_tensors.append(codec.model.head(x.unsqueeze(0)))
        sizes.append(size)
        labels.append(label)
        if progress:
            progress("head", done, len(items))
    labels_t = torch.tensor(labels)
    reference = torch.cat([codec.model.tail(t) for t in split_tensors])
    top1, top5 = _accuracy(reference, labels_t)
    reference_rank1 = reference.argmax(-1)
    crop = codec.spec.preprocessing.crop
    results = []
    for rate in rates:
        unit = codec.ladder.rung(rate)
        total_bytes = payload = 0
        encode_s = decode_s = 0.0
        logits, squared_error = [], 0.0
        for done, (tensor, size) in enumerate(zip(split_tensors, sizes), 1):
            start = time.perf_counter()
            record = codec.encode_split_tensor(tensor, rate, size)
            stream = bitstream.write_stream([record])
            middle = time.perf_counter()
            decoded = codec.decode_split_tensor(bitstream.read_stream(stream)[0])
            decode_s += time.perf_counter() - middle
            encode_s += middle - start
            total_bytes += len(stream)
            payload += record.payload_bytes
            squared_error += torch.mean((decoded - tensor) ** 2).item()
            logits.append(codec.model.tail(decoded))
            if progress:
                progress(f"rate {rate}", done, len(items))
        logits_t = torch.cat(logits)
        rung_top1, rung_top5 = _accuracy(logits_t, labels_t)
        count = len(items)
        results.append(
            RungResult(
                rate=rate,
                bytes_per_image=total_bytes / count,
                payload_bytes_per_image=payload / count,
                bpp=8 * total_bytes / count / (crop * crop),
                top1=rung_top1,
                top5=rung_top5,
                agreement=(logits_t.argmax(-1) == reference_rank1).float().mean().item(),
                mse=squared_error / count,
                encode_ms=1000 * encode_s / count,
                decode_ms=1000 * decode_s / count,
            )
        )
    return {
        "backbone": codec.spec.name,
        "split": codec.split.name,
        "images": len(items),
        "uncompressed": {"top1": top1, "top5": top5},
        "points": [{"method": "featcodec", "setting": f"rate {r.rate}", **asdict(r)} for r in results],
    }
