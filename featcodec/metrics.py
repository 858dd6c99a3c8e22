"""Figures shared by every method that ``featcodec eval`` measures, and the Bjøntegaard delta rate.

Accuracies are fractions in [0, 1]. A "curve" is a list of (bytes per image, top-1)
points of one method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import FeatcodecError


@dataclass
class Reference:
    """What every method is compared with: the head's outputs, the labels and the uncompressed logits."""

    split_tensors: list[torch.Tensor]  # one (1, C, H, W) tensor per image
    labels: torch.Tensor  # (N,)
    logits: torch.Tensor  # (N, classes) of tail(head(x)), nothing compressed
    pixels: int  # model input pixels per image (crop * crop), the bpp denominator

    @property
    def rank1(self) -> torch.Tensor:
        """The uncompressed model's top-1 class per image."""
        return self.logits.argmax(-1)


@dataclass
class PointResult:
    """Measured figures of one setting of one method, averaged over the evaluated images."""

    method: str
    setting: str
    rate: int | None  # the ladder rung for featcodec points, None for baselines
    bytes_per_image: float
    payload_bytes_per_image: float
    bpp: float
    top1: float
    top5: float
    agreement: float  # fraction of images whose top-1 class equals the uncompressed model's
    mse: float  # mean over images of the split tensor's mean squared error
    encode_ms: float
    decode_ms: float


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of ``logits`` (N, classes) against ``labels`` (N,)."""
    top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return (top5[:, 0] == labels).float().mean().item(), (top5 == labels[:, None]).any(-1).float().mean().item()


def summarise(
    method: str,
    setting: str,
    rate: int | None,
    reference: Reference,
    *,
    logits: torch.Tensor,
    total_bytes: int,
    payload_bytes: int,
    squared_error: float,
    encode_s: float,
    decode_s: float,
) -> PointResult:
    """Turn the totals over all images of one setting into a PointResult (per-image means)."""
    count = len(reference.labels)
    top1, top5 = accuracy(logits, reference.labels)
    return PointResult(
        method=method,
        setting=setting,
        rate=rate,
        bytes_per_image=total_bytes / count,
        payload_bytes_per_image=payload_bytes / count,
        bpp=8 * total_bytes / count / reference.pixels,
        top1=top1,
        top5=top5,
        agreement=(logits.argmax(-1) == reference.rank1).float().mean().item(),
        mse=squared_error / count,
        encode_ms=1000 * encode_s / count,
        decode_ms=1000 * decode_s / count,
    )


def _curve(points: Sequence[Sequence[float]], which: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        array = np.asarray([(float(b), float(a)) for b, a in points], dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise FeatcodecError(f"bd_rate: the {which} curve must be (bytes, top1) pairs") from None
    if not np.isfinite(array).all() or (array[:, 0] <= 0).any():
        raise FeatcodecError(f"bd_rate: the {which} curve needs finite top-1 values and positive byte counts")
    return array[:, 1], np.log(array[:, 0])


def bd_rate(anchor_points: Sequence[Sequence[float]], test_points: Sequence[Sequence[float]]) -> float | None:
    """Bjøntegaard delta rate of ``test_points`` against ``anchor_points``, in percent.

    Each argument is a curve of (bytes per image, top-1) pairs. log(bytes) is
    interpolated in top-1 through each curve's points with a piecewise cubic
    Hermite (PCHIP) interpolant, the modern form of Bjøntegaard's measure (one
    cubic least-squares fit over a whole ladder is pulled by points far
    outside the shared range and can even reverse the sign), both are
    integrated over the top-1 range the two curves share, and the mean
    difference is turned into the percent change in bytes that the test curve
    needs at equal top-1: -20.0 means 20% fewer bytes than the anchor. Points
    of equal top-1 are merged (mean log bytes).

    An anchor that is a single operating point (``quant8-zlib``, ``fp16-zlib``)
    has no range to integrate over; then the result is the percent change in
    bytes at the anchor's top-1, with log(bytes) of the test curve linearly
    interpolated in top-1, or None when that top-1 lies outside the test curve.

    Returns None when it is undefined: the test curve has fewer than 2 distinct
    top-1 values, the shared top-1 range is empty (or a single value), or the
    result is not finite. FeatcodecError on non-finite values or byte counts <= 0.
    """
    anchor_top1, anchor_log_bytes = _curve(anchor_points, "anchor")
    if len(np.unique(anchor_top1)) == 1 and len(anchor_top1) >= 1:
        return _rate_change_at(float(anchor_top1.mean()), float(anchor_log_bytes.mean()), test_points)
    from scipy.interpolate import PchipInterpolator

    fits = []
    for which, points in (("anchor", anchor_points), ("test", test_points)):
        top1, log_bytes = _curve(points, which)
        distinct = np.unique(top1)
        if len(distinct) < 2:
            return None
        merged = np.array([log_bytes[top1 == value].mean() for value in distinct])
        fits.append((distinct, PchipInterpolator(distinct, merged)))
    low = max(top1.min() for top1, _ in fits)
    high = min(top1.max() for top1, _ in fits)
    if not high > low:
        return None
    anchor_integral, test_integral = (float(fit.integrate(low, high)) for _, fit in fits)
    mean_log_ratio = (test_integral - anchor_integral) / (high - low)
    with np.errstate(over="ignore"):
        result = float((np.exp(mean_log_ratio) - 1) * 100)
    return result if math.isfinite(result) else None


def _rate_change_at(top1: float, log_bytes: float, test_points) -> float | None:
    test_top1, test_log_bytes = _curve(test_points, "test")
    order = np.argsort(test_top1, kind="stable")
    test_top1, test_log_bytes = test_top1[order], test_log_bytes[order]
    if len(np.unique(test_top1)) < 2 or not test_top1[0] <= top1 <= test_top1[-1]:
        return None
    with np.errstate(over="ignore"):
        result = float((np.exp(np.interp(top1, test_top1, test_log_bytes) - log_bytes) - 1) * 100)
    return result if math.isfinite(result) else None

