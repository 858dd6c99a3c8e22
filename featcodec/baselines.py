"""Baseline coders that ``featcodec eval --baselines`` measures on the same images in the same run.

``jpeg``
    The model input before normalisation (the resized, centre-cropped RGB
    image, uint8) is coded with Pillow's JPEG encoder (``optimize=True``,
    default 4:2:0 chroma subsampling) at each of ``JPEG_QUALITIES``; the server
    decodes it, normalises it the backbone's way and runs the whole model
    (head then tail). The bytes are the JPEG file.
``quant8-zlib``
    The split tensor (C, H, W), each channel quantised uniformly to 8 bits
    between its minimum and maximum (both sent as float16), then the blob
    ``<HHH`` shape, C float16 minima, C float16 maxima, C*H*W uint8 codes
    (channel-major) compressed with zlib level 9. The server dequantises and
    runs the tail.
``huffman-bu``
    The seed paper's style of BU (:class:`~featcodec.bottleneck.HuffmanBottleneckUnit`),
    trained with ``featcodec train --entropy huffman`` and shipped as its own
    ladder (``<split>-huffman-bu.safetensors``). Each rung codes the split tensor
    into a normal featcodec record, so its bytes are the Huffman payload plus the
    same header; :mod:`featcodec.evaluate` measures it like featcodec's own rungs.
``fp16-zlib``
    The split tensor as little-endian float16 values (channel-major),
    compressed with zlib level 9. The shape is not sent: the receiver knows it
    from the split point, as featcodec's decoder does from its record ids.

Baselines have no framing header of their own, so their payload bytes equal
their bytes. Encode and decode times cover the coding only, not the model.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .backbones import Preprocessing, SplitModel
from .errors import FeatcodecError
from .images import ImageError, load_image, normalise
from .metrics import PointResult, Reference, summarise

JPEG_QUALITIES = (5, 10, 20, 30, 50, 75, 95)
ZLIB_LEVEL = 9
BASELINE_GROUPS = {"jpeg": ("jpeg",), "quant8": ("quant8-zlib", "fp16-zlib"), "huffman-bu": ("huffman-bu",)}
METHODS = ("jpeg", "quant8-zlib", "fp16-zlib", "huffman-bu")
SPLIT_TENSOR_METHODS = ("quant8-zlib", "fp16-zlib")
BATCH = 32  # images per head/tail call when running decoded inputs through the model

_SHAPE = struct.Struct("<HHH")
_FP16_MAX = float(np.finfo(np.float16).max)

Progress = Callable[[str, int, int], None]


def expand_baselines(names: Iterable[str]) -> list[str]:
    """Method names for baseline group names (``jpeg``, ``quant8``) or method names, in order, once each."""
    if isinstance(names, str):
        names = [names]
    methods: list[str] = []
    for name in names:
        group = BASELINE_GROUPS.get(name, (name,) if name in METHODS else None)
        if group is None:
            raise FeatcodecError(f"unknown baseline '{name}' (known: {', '.join(BASELINE_GROUPS)}, none)")
        methods += [method for method in group if method not in methods]
    return methods


def parse_baselines(text: str) -> list[str]:
    """Method names for a comma-separated ``--baselines`` value; ``none`` means no baseline."""
    names = [name.strip().lower() for name in text.split(",")]
    if not all(names):
        raise FeatcodecError(f"--baselines must be comma-separated names, got '{text}'")
    if "none" in names:
        if len(names) > 1:
            raise FeatcodecError("--baselines: 'none' cannot be combined with other baselines")
        return []
    return expand_baselines(names)


# -- the coders --------------------------------------------------------------


def jpeg_encode(crop: Image.Image, quality: int) -> bytes:
    """JPEG file of an RGB image at ``quality`` (1-95), as the ``jpeg`` baseline sends it."""
    if not 1 <= quality <= 95:
        raise FeatcodecError(f"JPEG quality must be in 1..95, got {quality}")
    buffer = io.BytesIO()
    crop.convert("RGB").save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def jpeg_decode(data: bytes, prep: Preprocessing) -> torch.Tensor:
    """The model input (3, H, W) that the server gets from a ``jpeg`` baseline file."""
    return normalise(load_image(data, name="<jpeg baseline>"), prep)


def _channels(split_tensor: torch.Tensor) -> tuple[tuple[int, int, int], torch.Tensor]:
    if split_tensor.dim() != 4 or split_tensor.shape[0] != 1:
        raise FeatcodecError(f"expected one split tensor (1, C, H, W), got shape {tuple(split_tensor.shape)}")
    _, channels, height, width = split_tensor.shape
    if max(channels, height, width) > 0xFFFF:
        raise FeatcodecError(f"split tensor shape {tuple(split_tensor.shape)} too large for the baseline header")
    values = split_tensor.detach().to("cpu", torch.float32).reshape(channels, height * width)
    if not torch.isfinite(values).all() or values.abs().max().item() > _FP16_MAX:
        raise FeatcodecError("split tensor has values outside the float16 range")
    return (channels, height, width), values


def quant8_encode(split_tensor: torch.Tensor) -> bytes:
    """The ``quant8-zlib`` blob of one split tensor (1, C, H, W)."""
    shape, values = _channels(split_tensor)
    low16, high16 = values.amin(1).to(torch.float16), values.amax(1).to(torch.float16)
    low, span = low16.float()[:, None], (high16.float() - low16.float())[:, None]
    scaled = torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1.0) * 255, 0.0)
    codes = scaled.round().clamp(0, 255).to(torch.uint8)
    blob = _SHAPE.pack(*shape) + low16.numpy().astype("<f2").tobytes() + high16.numpy().astype("<f2").tobytes()
    return zlib.compress(blob + codes.numpy().tobytes(), ZLIB_LEVEL)


def _inflate(data: bytes, what: str) -> bytes:
    try:
        return zlib.decompress(data)
    except zlib.error:
        raise FeatcodecError(f"{what}: not a valid zlib stream") from None


def quant8_decode(data: bytes) -> torch.Tensor:
    """The split tensor (1, C, H, W) rebuilt from a ``quant8-zlib`` blob."""
    blob = _inflate(data, "quant8-zlib")
    if len(blob) < _SHAPE.size:
        raise FeatcodecError("quant8-zlib: blob too short for its header")
    channels, height, width = _SHAPE.unpack_from(blob)
    end_of_ranges = _SHAPE.size + 4 * channels
    if len(blob) != end_of_ranges + channels * height * width:
        raise FeatcodecError("quant8-zlib: blob size does not match its shape")
    ranges = np.frombuffer(blob, "<f2", 2 * channels, _SHAPE.size).astype(np.float32)
    low, high = torch.from_numpy(ranges[:channels].copy()), torch.from_numpy(ranges[channels:].copy())
    codes = torch.from_numpy(np.frombuffer(blob, np.uint8, offset=end_of_ranges).copy()).float()
    values = low[:, None] + codes.reshape(channels, height * width) * ((high - low) / 255)[:, None]
    return values.reshape(1, channels, height, width)


def fp16_encode(split_tensor: torch.Tensor) -> bytes:
    """The ``fp16-zlib`` blob of one split tensor (1, C, H, W)."""
    _, values = _channels(split_tensor)
    return zlib.compress(values.to(torch.float16).numpy().astype("<f2").tobytes(), ZLIB_LEVEL)


def fp16_decode(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """The split tensor (1, C, H, W) rebuilt from an ``fp16-zlib`` blob of a (C, H, W) tensor."""
    blob = _inflate(data, "fp16-zlib")
    count = int(np.prod(shape))
    if len(blob) != 2 * count:
        raise FeatcodecError(f"fp16-zlib: blob holds {len(blob) // 2} values, expected {count}")
    values = np.frombuffer(blob, "<f2").astype(np.float32)
    return torch.from_numpy(values).reshape(1, *shape)


# -- measuring them ------------------------------------------------------------


def run_batched(function: Callable[[torch.Tensor], torch.Tensor], tensors: list[torch.Tensor]) -> torch.Tensor:
    """``function`` (a head or tail) over the concatenation of ``tensors`` (each (1, ...)), BATCH at a time."""
    return torch.cat([function(torch.cat(tensors[start : start + BATCH])) for start in range(0, len(tensors), BATCH)])


def _squared_error(decoded: torch.Tensor, reference: Reference) -> float:
    return sum(
        torch.mean((decoded[i : i + 1] - original) ** 2).item() for i, original in enumerate(reference.split_tensors)
    )


@torch.no_grad()
def split_tensor_points(
    methods: Sequence[str], model: SplitModel, reference: Reference, progress: Progress | None = None
) -> list[PointResult]:
    """One point for each of ``quant8-zlib`` / ``fp16-zlib`` in ``methods``: code every split tensor, run the tail."""
    coders = {
        "quant8-zlib": ("8-bit per channel", quant8_encode, lambda data, shape: quant8_decode(data)),
        "fp16-zlib": ("float16", fp16_encode, fp16_decode),
    }
    points = []
    for method in methods:
        setting, encode, decode = coders[method]
        total_bytes, encode_s, decode_s, decoded = 0, 0.0, 0.0, []
        for done, tensor in enumerate(reference.split_tensors, 1):
            start = time.perf_counter()
            data = encode(tensor)
            middle = time.perf_counter()
            decoded.append(decode(data, tuple(tensor.shape[1:])))
            decode_s += time.perf_counter() - middle
            encode_s += middle - start
            total_bytes += len(data)
            if progress:
                progress(method, done, len(reference.split_tensors))
        decoded_t = torch.cat(decoded)
        points.append(
            summarise(
                method, setting, None, reference,
                logits=run_batched(model.tail, decoded),
                total_bytes=total_bytes,
                payload_bytes=total_bytes,
                squared_error=_squared_error(decoded_t, reference),
                encode_s=encode_s,
                decode_s=decode_s,
            )
        )
    return points


def jpeg_encode_all(crop: Image.Image, qualities: Sequence[int] = JPEG_QUALITIES) -> list[tuple[bytes, float]]:
    """(JPEG file, encode seconds) of one model-input crop at each quality."""
    files = []
    for quality in qualities:
        start = time.perf_counter()
        data = jpeg_encode(crop, quality)
        files.append((data, time.perf_counter() - start))
    return files


@torch.no_grad()
def jpeg_points(
    files: list[list[tuple[bytes, float]]],
    model: SplitModel,
    prep: Preprocessing,
    reference: Reference,
    qualities: Sequence[int] = JPEG_QUALITIES,
    progress: Progress | None = None,
) -> list[PointResult]:
    """One ``jpeg`` point per quality from ``files[image][quality index]`` as made by :func:`jpeg_encode_all`.

    The split tensor's mse is measured by running the head on the decoded image.
    """
    if len(files) != len(reference.split_tensors) or any(len(per_image) != len(qualities) for per_image in files):
        raise FeatcodecError("jpeg baseline: need one file per image and quality")
    points = []
    for index, quality in enumerate(qualities):
        total_bytes, encode_s, decode_s, inputs = 0, 0.0, 0.0, []
        for done, per_image in enumerate(files, 1):
            data, seconds = per_image[index]
            start = time.perf_counter()
            try:
                inputs.append(jpeg_decode(data, prep).unsqueeze(0))
            except ImageError as exc:
                raise FeatcodecError(f"jpeg baseline at quality {quality}: {exc}") from None
            decode_s += time.perf_counter() - start
            encode_s += seconds
            total_bytes += len(data)
            if progress:
                progress(f"jpeg q{quality}", done, len(files))
        split_tensors = run_batched(model.head, inputs)
        points.append(
            summarise(
                "jpeg", f"quality {quality}", None, reference,
                logits=run_batched(model.tail, list(split_tensors.split(1))),
                total_bytes=total_bytes,
                payload_bytes=total_bytes,
                squared_error=_squared_error(split_tensors, reference),
                encode_s=encode_s,
                decode_s=decode_s,
            )
        )
    return points
