"""Conformance streams: one committed stream per shipped ladder and rung, and the check that they still hold.

``bitstreams/manifest.json`` records, per stream, the SHA-256 of the stream
file, of the decoded quantized latent, and of the rebuilt split tensor, and
the decoded top-5 labels. What is exact where:

- The stream bytes, the latent symbols and the top-5 labels are exact
  everywhere: entropy decoding is integer arithmetic over the CDF tables
  stored in the weights file (a hyperprior rung also picks each symbol's
  table by a float64 convolution of the side latent; see bottleneck.py).
- The rebuilt split tensor is float32 output of convolutions: within
  ``FEATURES_ATOL`` of the manifest's probe values on any machine, and
  bit-exact only where torch picks the same kernels (same torch build, CPU
  capability and thread count, which the manifest records, and in practice the
  same CPU model, which it cannot).
- Re-encoding the photo gives the committed bytes where the head's floats are
  bit-exact too; elsewhere a rounding could in principle flip one latent symbol.

A stream passes when its bytes, latent symbols and top-5 are exact and its tensor
is within tolerance; tensor and re-encode exactness are reported. ``strict``
also requires both to be exact, for a pinned platform.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bitstream
from .errors import FeatcodecError
from .fileio import atomic_write_bytes

MANIFEST = "manifest.json"
FEATURES_ATOL = 1e-4  # allowed max abs difference of the rebuilt tensor on another platform


def platform_fingerprint() -> dict:
    """What float bit-exactness depends on: the torch version, the CPU kernels it dispatches to and the
    thread count (oneDNN picks its convolution algorithm by it: 1 and 2 threads differ in the last bits)."""
    return {
        "torch": torch.__version__.split("+")[0],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return _sha256(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())


def _probe(tensor: torch.Tensor, count: int = 64) -> list[float]:
    """``count`` evenly spaced values of a tensor: what a check off the manifest's platform compares."""
    flat = tensor.detach().to(torch.float32).flatten()
    index = torch.linspace(0, flat.numel() - 1, count).round().long()
    return [round(v, 6) for v in flat[index].tolist()]


def _decode_details(codec, data: bytes) -> dict:
    """Latent, rebuilt tensor and top-5 of a one-record stream."""
    (parsed,) = bitstream.parse_stream(data)
    record = parsed.record
    codec.check_record(record)
    unit = codec.ladder.rung(record.rate)
    with torch.no_grad():
        latent = unit.decompress_latent([[s] for s in record.strings], record.latent_shape)
        (decoded,) = codec.decode(data)
    return {
        "rate": record.rate,
        "latent": latent,
        "features": decoded.features,
        "top5": [entry["label"] for entry in decoded.top(5)],
    }


def conformance_rates(codec) -> list[float]:
    """The rates a ladder's streams are made at: every rung, and for a variable-rate BU also the
    half-way rate between each pair of whole rates (so fractional rate headers are covered)."""
    rates: list[float] = list(range(codec.num_rates))
    if codec.ladder.is_variable:
        rates += [rate + 0.5 for rate in range(codec.num_rates - 1)]
    return rates


def build(out_dir: Path, photo: Path, ladders: list[Path]) -> dict:
    """Encode ``photo`` at every rate of :func:`conformance_rates` of every ladder into ``out_dir`` and
    write the manifest."""
    from .codec import Codec
    from .ladder import read_ladder_metadata

    out_dir = Path(out_dir)
    entries = []
    for ladder_path in ladders:
        meta = read_ladder_metadata(ladder_path)
        codec = Codec.load(meta["backbone"], meta["split"], weights=ladder_path)
        for rate in conformance_rates(codec):
            data = codec.encode([photo], rate=rate)
            details = _decode_details(codec, data)
            name = f"{codec.spec.name}-{Path(ladder_path).stem}-r{rate}.fcb"  # the stem names the variant
            atomic_write_bytes(out_dir / name, data)
            entries.append({
                "stream": name,
                "backbone": codec.spec.name,
                "split": codec.split.name,
                "ladder": Path(ladder_path).name,
                "rate": rate,
                "bytes": len(data),
                "sha256": _sha256(data),
                "latent_sha256": _tensor_sha256(details["latent"]),
                "features_sha256": _tensor_sha256(details["features"]),
                "features_probe": _probe(details["features"]),
                "top5": details["top5"],
            })
    manifest = {
        "photo": Path(photo).name,
        "photo_sha256": _sha256(Path(photo).read_bytes()),
        "platform": platform_fingerprint(),
        "streams": entries,
    }
    atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


@dataclass
class Check:
    """The outcome of verifying one conformance stream."""

    stream: str
    stream_ok: bool  # file bytes match the manifest's SHA-256
    latent_ok: bool  # decoded latent symbols bit-exact
    top5_ok: bool
    features_exact: bool  # rebuilt tensor bit-exact
    features_close: bool  # its probe values within FEATURES_ATOL of the manifest's
    reencode_ok: bool | None  # re-encoding the photo gives the same bytes; None when the photo is not at hand
    same_platform: bool = False  # the manifest's torch build, CPU capability and thread count
    error: str = ""
    strict: bool = False  # also require the bit-exact tensor and re-encode

    @property
    def passed(self) -> bool:
        """Exact stream, latent and labels and a tensor within tolerance; strict: also exact tensor and re-encode."""
        decoded = not self.error and self.stream_ok and self.latent_ok and self.top5_ok and self.features_close
        return decoded and (not self.strict or (self.features_exact and self.reencode_ok is True))


def verify(
    directory: Path, photo: Path | None = None, weights: Path | None = None, strict: bool = False
) -> tuple[list[Check], bool]:
    """Check every stream of the manifest in ``directory``; returns the checks and whether this is the
    manifest's platform (torch build, CPU capability, threads). ``strict``: see :class:`Check`.

    ``photo`` defaults to the manifest's photo name looked up beside the manifest and in ``examples/``.
    """
    from .codec import Codec

    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FeatcodecError(f"{manifest_path}: no conformance manifest here")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["streams"]
    except (ValueError, KeyError, TypeError):
        raise FeatcodecError(f"{manifest_path}: not a featcodec conformance manifest") from None
    same_platform = manifest.get("platform") == platform_fingerprint()
    photo = photo or _find_photo(directory, manifest)
    if strict and photo is None:
        raise FeatcodecError(f"--strict re-encodes the manifest's photo {manifest.get('photo')!r}: give it with --photo")
    codecs: dict[tuple[str, str, Path | None], Codec] = {}
    checks = []
    for entry in entries:
        name = entry["stream"]
        try:
            data = (directory / name).read_bytes()
        except OSError as exc:
            checks.append(_failed(name, False, f"cannot read ({exc.strerror})", strict))
            continue
        try:
            key = (entry["backbone"], entry["split"], weights or _shipped_ladder(entry, data))
            if key not in codecs:
                codecs[key] = Codec.load(key[0], key[1], weights=key[2])
            codec = codecs[key]
            details = _decode_details(codec, data)
        except FeatcodecError as exc:
            checks.append(_failed(name, _sha256(data) == entry["sha256"], str(exc), strict))
            continue
        exact = _tensor_sha256(details["features"]) == entry["features_sha256"]
        reencoded = None
        if photo is not None:
            reencoded = codec.encode([photo], rate=entry["rate"]) == data
        checks.append(Check(
            stream=name,
            stream_ok=_sha256(data) == entry["sha256"],
            latent_ok=_tensor_sha256(details["latent"]) == entry["latent_sha256"],
            top5_ok=details["top5"] == entry["top5"],
            features_exact=exact,
            features_close=exact or _close_to_reference(details, entry),
            reencode_ok=reencoded,
            same_platform=same_platform,
            strict=strict,
        ))
    return checks, same_platform


def _shipped_ladder(entry: dict, data: bytes) -> Path | None:
    """The shipped ladder (featcodec's own or huffman-bu) whose weights tag the stream carries, if any."""
    from .ladder import find_ladder_by_tag

    (parsed,) = bitstream.parse_stream(data)
    return find_ladder_by_tag(entry["backbone"], entry["split"], parsed.record.weights_tag)


def _failed(name: str, stream_ok: bool, error: str, strict: bool) -> Check:
    """The check of a stream that could not be read or decoded."""
    return Check(
        stream=name, stream_ok=stream_ok, latent_ok=False, top5_ok=False, features_exact=False,
        features_close=False, reencode_ok=None, error=error, strict=strict,
    )


def _close_to_reference(details: dict, entry: dict) -> bool:
    """The rebuilt tensor's probe values are within FEATURES_ATOL of the manifest's."""
    probe = torch.tensor(_probe(details["features"]))
    expected = torch.tensor(entry.get("features_probe", []), dtype=torch.float32)
    return probe.shape == expected.shape and torch.allclose(probe, expected, atol=FEATURES_ATOL, rtol=0)


def _find_photo(directory: Path, manifest: dict) -> Path | None:
    name = manifest.get("photo")
    if not name:
        return None
    for candidate in (directory / name, directory.parent / "examples" / name):
        if candidate.is_file() and _sha256(candidate.read_bytes()) == manifest.get("photo_sha256"):
            return candidate
    return None
