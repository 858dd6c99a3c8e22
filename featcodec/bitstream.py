"""Bitstream v1 framing: the only module that knows the byte layout.

A stream is a 4-byte preamble (magic ``0x89 'F'`` + major + minor version)
followed by one or more records, one per image. See ``docs/bitstream.md``
for the byte-by-byte description. Reading checks every length against the
bytes actually present, and every record carries a CRC-32 over the preamble
and the record, so any single-byte corruption is refused.

This module imports nothing heavy: ``featcodec info`` uses it alone.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .errors import FeatcodecError

MAGIC = b"\x89F"
MAJOR_VERSION = 1
MINOR_VERSION = 2  # 1.2: the rate may carry a fraction byte (1.0 and 1.1: a one-byte rung index)
PREAMBLE = MAGIC + bytes([MAJOR_VERSION, MINOR_VERSION])

WEIGHTS_TAG_BYTES = 8
CRC_BYTES = 4

# Hard limits that a reader enforces before allocating anything.
MAX_ID = 0x7F  # ids stay below 0x80 so a preamble byte (0x89) marks a new stream
RATE_SCALE = 256  # 1.2 records carry round(rate * RATE_SCALE): rates are multiples of 1/256
RATE_FRACTION_FLAG = 0x80  # set in the rate byte when a fraction byte follows
MAX_RATE = 0x7F + (RATE_SCALE - 1) / RATE_SCALE
MAX_IMAGE_SIDE = 1 << 16
MAX_LATENT_SIDE = 1024
MAX_STRINGS = 4
MAX_VARINT_BYTES = 4  # values < 2**28


class BitstreamError(FeatcodecError):
    """A stream that is not valid featcodec v1 data; the message is one line."""


@dataclass(frozen=True)
class Record:
    """One image's record: header fields and its entropy-coded payload strings."""

    backbone_id: int
    split_id: int
    rate: float  # a rung index, or any multiple of 1/256 for a variable-rate BU
    weights_tag: bytes
    image_size: tuple[int, int]  # (width, height) of the original image
    latent_shape: tuple[int, int]  # (height, width) of the coded latent
    strings: tuple[bytes, ...]

    @property
    def payload_bytes(self) -> int:
        """Bytes of entropy-coded payload, without any framing."""
        return sum(len(s) for s in self.strings)


@dataclass(frozen=True)
class ParsedRecord:
    """A record read from a stream, with its offset and encoded size."""

    record: Record
    offset: int
    size: int  # bytes of this record, header + payload + CRC (preamble excluded)
    version: str  # "major.minor" of the preamble in force for this record


def _put_varint(out: bytearray, value: int) -> None:
    if value < 0 or value >= 1 << (7 * MAX_VARINT_BYTES):
        raise BitstreamError(f"value {value} does not fit a {MAX_VARINT_BYTES}-byte varint")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise BitstreamError(f"{name} {value} is outside {low}..{high}")


def quantize_rate(rate: float) -> float:
    """The rate a record can carry: ``rate`` rounded to the nearest multiple of 1/256."""
    if not 0 <= rate <= MAX_RATE:
        raise BitstreamError(f"rate {rate:g} is outside 0..{MAX_RATE:g}")
    return round(rate * RATE_SCALE) / RATE_SCALE


def format_rate(rate: float) -> int | float:
    """A rate for output: an int for a whole rate (a rung index), else the float."""
    return int(rate) if float(rate).is_integer() else float(rate)


def encode_record(record: Record) -> bytes:
    """Serialise one record (without the stream preamble)."""
    _check_range("backbone id", record.backbone_id, 0, MAX_ID)
    _check_range("split id", record.split_id, 0, MAX_ID)
    if not 0 <= record.rate <= MAX_RATE or quantize_rate(record.rate) != record.rate:
        raise BitstreamError(f"rate {record.rate} is not a multiple of 1/{RATE_SCALE} in 0..{MAX_RATE:g}")
    if len(record.weights_tag) != WEIGHTS_TAG_BYTES:
        raise BitstreamError(f"weights tag must be {WEIGHTS_TAG_BYTES} bytes")
    _check_range("number of strings", len(record.strings), 1, MAX_STRINGS)
    whole, fraction = divmod(round(record.rate * RATE_SCALE), RATE_SCALE)
    out = bytearray([record.backbone_id, record.split_id, whole | (RATE_FRACTION_FLAG if fraction else 0)])
    if fraction:
        out.append(fraction)
    out += record.weights_tag
    for side in record.image_size:
        _check_range("image side", side, 1, MAX_IMAGE_SIDE)
        _put_varint(out, side)
    for side in record.latent_shape:
        _check_range("latent side", side, 1, MAX_LATENT_SIDE)
        _put_varint(out, side)
    out.append(len(record.strings))
    for string in record.strings:
        _put_varint(out, len(string))
        out += string
    crc = zlib.crc32(PREAMBLE + bytes(out))
    out += crc.to_bytes(CRC_BYTES, "big")
    return bytes(out)


def write_stream(records: list[Record]) -> bytes:
    """Serialise records into one stream: the preamble, then each record."""
    if not records:
        raise BitstreamError("a stream needs at least one record")
    return PREAMBLE + b"".join(encode_record(r) for r in records)


class _Reader:
    """Bounds-checked cursor over a byte buffer."""

    def __init__(self, data: bytes, pos: int):
        self.data = data
        self.pos = pos

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining():
            raise BitstreamError(
                f"truncated stream: {what} needs {count} bytes at offset {self.pos}, "
                f"only {self.remaining()} left"
            )
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]


    def varint(self, what: str) -> int:
        value = 0
        for index in range(MAX_VARINT_BYTES):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * index)
            if not byte & 0x80:
                return value
        raise BitstreamError(f"corrupt stream: {what} at offset {self.pos} is an overlong varint")


def _read_preamble(reader: _Reader) -> bytes:
    start = reader.pos
    magic = reader.take(len(MAGIC), "magic")
    if magic != MAGIC:
        raise BitstreamError(f"not a featcodec stream (bad magic at offset {start})")
    major = reader.u8("major version")
    minor = reader.u8("minor version")
    if major != MAJOR_VERSION or minor > MINOR_VERSION:
        raise BitstreamError(
            f"unsupported bitstream version {major}.{minor} "
            f"(this featcodec reads {MAJOR_VERSION}.0 to {MAJOR_VERSION}.{MINOR_VERSION})"
        )
    return magic + bytes([major, minor])


def _read_record(reader: _Reader, preamble: bytes) -> ParsedRecord:
    start = reader.pos
    backbone_id = reader.u8("backbone id")
    split_id = reader.u8("split id")
    rate = float(reader.u8("rate"))
    if preamble[len(MAGIC) + 1] >= 2 and rate >= RATE_FRACTION_FLAG:
        fraction = reader.u8("rate fraction")
        if not fraction:
            raise BitstreamError(f"corrupt stream: a zero rate fraction at offset {start}")
        rate = rate - RATE_FRACTION_FLAG + fraction / RATE_SCALE
    if backbone_id > MAX_ID or split_id > MAX_ID:
        raise BitstreamError(f"corrupt stream: invalid backbone/split id at offset {start}")
    weights_tag = reader.take(WEIGHTS_TAG_BYTES, "weights tag")
    width = reader.varint("image width")
    height = reader.varint("image height")
    latent_h = reader.varint("latent height")
    latent_w = reader.varint("latent width")
    for name, side, high in (
        ("image width", width, MAX_IMAGE_SIDE),
        ("image height", height, MAX_IMAGE_SIDE),
        ("latent height", latent_h, MAX_LATENT_SIDE),
        ("latent width", latent_w, MAX_LATENT_SIDE),
    ):
        if not 1 <= side <= high:
            raise BitstreamError(f"corrupt stream: {name} {side} at offset {start} is out of range")
    n_strings = reader.u8("string count")
    if not 1 <= n_strings <= MAX_STRINGS:
        raise BitstreamError(f"corrupt stream: {n_strings} payload strings at offset {start}")
    strings = []
    for index in range(n_strings):
        length = reader.varint(f"length of string {index}")
        strings.append(reader.take(length, f"payload string {index}"))
    body_end = reader.pos
    stored_crc = int.from_bytes(reader.take(CRC_BYTES, "CRC-32"), "big")
    if zlib.crc32(preamble + reader.data[start:body_end]) != stored_crc:
        raise BitstreamError(f"corrupt stream: CRC-32 mismatch in the record at offset {start}")
    record = Record(
        backbone_id=backbone_id,
        split_id=split_id,
        rate=rate,
        weights_tag=weights_tag,
        image_size=(width, height),
        latent_shape=(latent_h, latent_w),
        strings=tuple(strings),
    )
    version = f"{preamble[len(MAGIC)]}.{preamble[len(MAGIC) + 1]}"
    return ParsedRecord(record=record, offset=start, size=reader.pos - start, version=version)


def parse_stream(data: bytes) -> list[ParsedRecord]:
    """Parse a whole stream, validating every byte; raise BitstreamError on any fault.

    Concatenated streams (``cat a.fcb b.fcb``) parse as one stream: a preamble
    may appear wherever a record could start.
    """
    if not data:
        raise BitstreamError("empty stream")
    reader = _Reader(bytes(data), 0)
    preamble = _read_preamble(reader)
    parsed: list[ParsedRecord] = []
    while reader.remaining():
        if reader.data[reader.pos] == MAGIC[0]:
            preamble = _read_preamble(reader)
            continue
        parsed.append(_read_record(reader, preamble))
    if not parsed:
        raise BitstreamError("stream holds no records")
    return parsed


def read_stream(data: bytes) -> list[Record]:
    """Parse a stream into its records (CompressAI-style strings + shapes)."""
    return [p.record for p in parse_stream(data)]
