import io
import math
import shutil
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COFFEE, ESPRESSO
from featcodec.baselines import (
    JPEG_QUALITIES,
    fp16_decode,
    fp16_encode,
    parse_baselines,
    quant8_decode,
    quant8_encode,
)
from featcodec.errors import FeatcodecError
from featcodec.evaluate import evaluate, labelled_images
from featcodec.metrics import bd_rate

ANCHOR = [(1000.0, 0.50), (1800.0, 0.61), (4000.0, 0.70), (9000.0, 0.74), (20000.0, 0.76)]


def test_bd_rate_known_answers():
    assert bd_rate(ANCHOR, ANCHOR) == pytest.approx(0.0, abs=1e-9)
    assert bd_rate(ANCHOR, [(0.8 * b, a) for b, a in ANCHOR]) == pytest.approx(-20.0, abs=1e-9)
    assert bd_rate(ANCHOR[:2], [(1.5 * b, a) for b, a in ANCHOR[:2]]) == pytest.approx(50.0, abs=1e-9)
    # bytes = exp(10 * top1) for the anchor, exp(10 * (top1 - 0.01)) for the test, sampled at other top-1 values
    anchor = [(math.exp(10 * a), a) for a in (0.2, 0.35, 0.5, 0.6, 0.7)]
    test = [(math.exp(10 * (a - 0.01)), a) for a in (0.25, 0.4, 0.55, 0.8)]
    assert bd_rate(anchor, test) == pytest.approx(100 * (math.exp(-0.1) - 1), abs=1e-6)


def test_bd_rate_follows_the_curves_where_they_overlap():
    """A ladder that needs fewer bytes at every top-1 has a negative BD-rate, however far its rungs
    reach outside the shared range (a single cubic fit over these two stage3 ladders said +32 %)."""
    old = [(127.1, 0.0177), (183.8, 0.4338), (314.3, 0.6908), (554.5, 0.7438), (713.3, 0.7515), (745.5, 0.7600),
           (1244.2, 0.7885), (2138.7, 0.7977)]
    new = [(103.5, 0.2392), (206.4, 0.5946), (420.1, 0.7292), (635.2, 0.7585), (745.5, 0.7600), (1244.2, 0.7885),
           (2138.7, 0.7977)]
    assert bd_rate(old, new) < -5
    assert bd_rate(new, old) > 5
    # a repeated top-1 value is merged rather than refused
    assert bd_rate(ANCHOR + [(1000.0, 0.50)], ANCHOR) == pytest.approx(0.0, abs=1e-9)


def test_bd_rate_undefined_and_bad_input():
    assert bd_rate(ANCHOR, [(500.0, 0.6)]) is None  # one point
    assert bd_rate(ANCHOR, [(500.0, 0.6), (900.0, 0.6)]) is None  # one distinct top-1
    assert bd_rate(ANCHOR, [(500.0, 0.80), (900.0, 0.90)]) is None  # no overlap
    assert bd_rate([], ANCHOR) is None
    with pytest.raises(FeatcodecError, match="positive byte counts"):
        bd_rate(ANCHOR, [(0.0, 0.5), (10.0, 0.6)])
    with pytest.raises(FeatcodecError, match="finite"):
        bd_rate(ANCHOR, [(float("nan"), 0.5), (10.0, 0.6)])
    with pytest.raises(FeatcodecError, match="pairs"):
        bd_rate(ANCHOR, [(1.0, 0.5, 3.0)])


def test_bd_rate_against_a_single_point_anchor():
    test = [(100.0, 0.5), (200.0, 0.7), (400.0, 0.8)]
    # at top-1 0.6 the test curve needs sqrt(100 * 200) bytes (log-linear interpolation)
    assert bd_rate([(1000.0, 0.6)], test) == pytest.approx(100 * (200**0.5 * 100**0.5 / 1000 - 1))
    assert bd_rate([(400.0, 0.8)], test) == pytest.approx(0.0)
    assert bd_rate([(400.0, 0.9)], test) is None  # the anchor is more accurate than any test point


def test_parse_baselines():
    assert parse_baselines("none") == []
    assert parse_baselines("jpeg") == ["jpeg"]
    assert parse_baselines("quant8, JPEG,quant8") == ["quant8-zlib", "fp16-zlib", "jpeg"]
    for bad, message in [("bogus", "unknown baseline 'bogus'"), ("none,jpeg", "cannot be combined"), ("jpeg,", "comma")]:
        with pytest.raises(FeatcodecError, match=message):
            parse_baselines(bad)


def _quant8_reference(x: np.ndarray) -> bytes:
    """An independent numpy quant8-zlib encoder for a (C, H, W) float32 array."""
    channels, height, width = x.shape
    flat = x.reshape(channels, -1)
    low = flat.min(1).astype(np.float16)
    high = flat.max(1).astype(np.float16)
    lo, span = low.astype(np.float32)[:, None], (high.astype(np.float32) - low.astype(np.float32))[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(span > 0, (flat - lo) / span * np.float32(255), 0)
    codes = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    header = np.array([channels, height, width], "<u2").tobytes()
    return zlib.compress(header + low.astype("<f2").tobytes() + high.astype("<f2").tobytes() + codes.tobytes(), 9)


def test_quant8_and_fp16_round_trip():
    torch.manual_seed(0)
    x = torch.randn(1, 6, 5, 7) * torch.arange(1, 7).view(1, 6, 1, 1)
    x[0, 2] = 3.25  # a constant channel
    data = quant8_encode(x)
    assert data == _quant8_reference(x[0].numpy())
    rebuilt = quant8_decode(data)
    assert rebuilt.shape == x.shape and torch.all(rebuilt[0, 2] == 3.25)
    step = (x.amax((0, 2, 3)) - x.amin((0, 2, 3))) / 255
    assert torch.all((rebuilt - x).abs() <= step.view(1, 6, 1, 1) * 0.5 + 0.02)  # half a step plus fp16 range rounding
    half = fp16_decode(fp16_encode(x), (6, 5, 7))
    assert torch.equal(half, x.half().float())
    with pytest.raises(FeatcodecError, match="zlib"):
        quant8_decode(b"not zlib")
    with pytest.raises(FeatcodecError, match="expected 180"):
        fp16_decode(fp16_encode(x), (6, 5, 6))
    with pytest.raises(FeatcodecError, match="float16 range"):
        fp16_encode(x * 1e6)


def test_baseline_bytes_match_independent_computation(codec, tmp_path):
    """One image: every baseline point's byte count equals a direct computation with Pillow, numpy and zlib."""
    (tmp_path / "labels.csv").write_text(f"file,label\ncoffee.jpg,{ESPRESSO}\n")
    shutil.copy(COFFEE, tmp_path / "coffee.jpg")
    result = evaluate(codec, labelled_images(tmp_path), [0], baselines=["jpeg", "quant8"])
    points = {(p["method"], p["setting"]): p for p in result["points"]}
    assert set(points) == {("featcodec", "rate 0"), ("quant8-zlib", "8-bit per channel"), ("fp16-zlib", "float16")} | {
        ("jpeg", f"quality {q}") for q in JPEG_QUALITIES
    }

    import torchvision.transforms.functional as TF

    image = Image.open(COFFEE).convert("RGB")
    crop = TF.center_crop(TF.resize(image, 256, interpolation=TF.InterpolationMode.BILINEAR), 224)
    assert crop.size == (224, 224)
    for quality in JPEG_QUALITIES:
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=quality, optimize=True)
        point = points[("jpeg", f"quality {quality}")]
        assert point["bytes_per_image"] == point["payload_bytes_per_image"] == len(buffer.getvalue())
        assert point["bpp"] == pytest.approx(8 * len(buffer.getvalue()) / 224**2)
        assert point["rate"] is None and math.isfinite(point["mse"]) and point["mse"] > 0

    with torch.no_grad():
        x, _ = codec.preprocess(COFFEE)
        split = codec.model.head(x.unsqueeze(0))[0].numpy()
    quant8_bytes = len(_quant8_reference(split))
    fp16_bytes = len(zlib.compress(split.astype("<f2").tobytes(), 9))
    assert points[("quant8-zlib", "8-bit per channel")]["bytes_per_image"] == quant8_bytes
    assert points[("fp16-zlib", "float16")]["bytes_per_image"] == fp16_bytes
    assert points[("fp16-zlib", "float16")]["agreement"] == 1.0
    assert points[("fp16-zlib", "float16")]["mse"] < points[("quant8-zlib", "8-bit per channel")]["mse"]
    # one point per baseline method: no BD-rate; featcodec has one rate here, so none at all
    assert result["bd_rate"] == {"jpeg": None, "quant8-zlib": None, "fp16-zlib": None}
