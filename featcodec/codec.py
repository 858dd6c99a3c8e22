"""The Python API: images -> bitstream on the client, bitstream -> predictions on the server.

>>> codec = Codec.load("efficientnet_lite0", "stage3")
>>> data = codec.encode(["photo.jpg"], rate=3)
>>> [result.top(1) for result in codec.decode(data)]

Encoding and decoding run one image at a time so that a given image always
gives the same bytes and the same reconstructed tensor, whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from PIL import Image

from . import bitstream
from .backbones import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    SplitModel,
    SplitPoint,
    backbone_by_id,
    get_backbone,
    load_split_model,
)
from .bitstream import BitstreamError, ParsedRecord, Record
from .images import load_image, preprocess
from .errors import FeatcodecError
from .ladder import Ladder, find_ladder, find_ladder_by_tag, load_ladder

ImageSource = Union[str, Path, bytes, Image.Image]


@lru_cache(maxsize=1)
def imagenet_synsets() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet-1k classes in label order as (WNID, name) pairs (first synonym)."""
    text = (Path(__file__).parent / "imagenet_synsets.txt").read_text()
    pairs = (line.split(" ", 1) for line in text.splitlines() if line.strip())
    return tuple((wnid, words.split(",")[0].strip()) for wnid, words in pairs)


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order."""
    return tuple(name for _, name in imagenet_synsets())


@dataclass
class DecodedImage:
    """One decoded record: the rebuilt split tensor and the tail's prediction."""

    index: int
    record: Record
    bytes: int  # record bytes, plus the preamble in front of it if any (they sum to the stream size)
    features: torch.Tensor  # (C, H, W) reconstructed split tensor
    logits: torch.Tensor  # (num_classes,)

    def top(self, k: int = 5) -> list[dict]:
        """The k most probable classes as ``{"label", "name", "prob"}`` dicts."""
        probs = self.logits.softmax(-1)
        values, labels = probs.topk(min(k, probs.numel()))
        names = imagenet_class_names()
        return [
            {"label": int(label), "name": names[label] if label < len(names) else str(int(label)), "prob": float(value)}
            for value, label in zip(values, labels)
        ]


class Codec:
    """A split backbone plus its rate ladder of bottleneck units."""

    def __init__(self, spec: BackboneSpec, split: SplitPoint, model: SplitModel, ladder: Ladder):
        if (ladder.backbone, ladder.split) != (spec.name, split.name):
            raise BitstreamError(
                f"weights are for {ladder.backbone}/{ladder.split}, not {spec.name}/{split.name}"
            )
        self.spec = spec
        self.split = split
        self.model = model
        self.ladder = ladder

    @classmethod
    def load(
        cls,
        backbone: str = DEFAULT_BACKBONE,
        split: str | None = None,
        *,
        weights: str | Path | None = None,
        ladder: Ladder | None = None,
        backbone_weights: str | None = None,
        random_init: bool = False,
    ) -> "Codec":
        """Build the codec for ``backbone``/``split`` with the shipped ladder, ``weights`` or ``ladder``
        (without ``split``, the split ``weights`` or ``ladder`` was trained for, else the default)."""
        spec = get_backbone(backbone)
        if ladder is None and weights is not None:
            ladder = load_ladder(weights)
        trained_for = ladder.split if ladder is not None and ladder.backbone == spec.name else None
        point = spec.split(split or trained_for or spec.default_split)  # another backbone's: refused below
        if ladder is None:
            ladder = load_ladder(find_ladder(spec.name, point.name))
        model = load_split_model(spec.name, point.name, backbone_weights, random_init)
        return cls(spec, point, model, ladder)

    @property
    def num_rates(self) -> int:
        """Number of whole rates: the ladder's rungs, or the variable-rate BU's anchors (0..max_rate)."""
        return self.ladder.max_rate + 1

    def check_rate(self, rate: float) -> float:
        """``rate`` as a record carries it (a multiple of 1/256); FeatcodecError if this codec has no such rate."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate != rate:
            raise FeatcodecError(f"rate must be a number, got {rate!r}")
        rate = bitstream.quantize_rate(rate) if 0 <= rate <= bitstream.MAX_RATE else float(rate)
        self.ladder.rung(rate)
        return rate

    def preprocess(self, image: ImageSource) -> tuple[torch.Tensor, tuple[int, int]]:
        """The backbone input tensor (3, H, W) and the original (width, height)."""
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return preprocess(image, self.spec.preprocessing), image.size

    @torch.no_grad()
    def encode_tensor(self, x: torch.Tensor, rate: float, image_size: tuple[int, int]) -> Record:
        """Code one preprocessed input (3, H, W) at ``rate`` into a record."""
        split_tensor = self.model.head(x.unsqueeze(0))
        return self.encode_split_tensor(split_tensor, rate, image_size)

    @torch.no_grad()
    def encode_split_tensor(self, split_tensor: torch.Tensor, rate: float, image_size: tuple[int, int]) -> Record:
        """Code one split tensor (1, C, H, W) at ``rate`` (a rung, or any real rate of a variable-rate
        ladder, rounded to 1/256 as the record carries it) into a record."""
        rate = self.check_rate(rate)
        return self.make_record(self.ladder.rung(rate).compress(split_tensor), rate, image_size)

    def make_record(self, coded: dict, rate: float, image_size: tuple[int, int]) -> Record:
        """The record of one image from ``compress`` (or ``compress_latent``) output at ``rate``."""
        return Record(
            backbone_id=self.spec.id,
            split_id=self.split.id,
            rate=rate,
            weights_tag=self.ladder.weights_tag,
            image_size=tuple(image_size),
            latent_shape=tuple(coded["shape"]),
            strings=tuple(strings[0] for strings in coded["strings"]),
        )

    def encode(self, images: Sequence[ImageSource], rate: float = 0) -> bytes:
        """Encode images into one stream with one record per image."""
        rate = self.check_rate(rate)  # fail fast on a bad rate
        records = []
        for image in images:
            x, size = self.preprocess(image)
            records.append(self.encode_tensor(x, rate, size))
        return bitstream.write_stream(records)

    @torch.no_grad()
    def encode_within(self, images: Sequence[ImageSource], max_bytes: int) -> tuple[bytes, list[float]]:
        """Encode each image at the highest rate whose record fits in ``max_bytes``: the highest rung of
        a ladder; for a variable-rate ladder, a bisection over every rate a record can carry (steps of
        1/256), which finds the highest one as long as bytes grow with rate.

        The budget counts one record (header, payload and CRC); the stream's
        4-byte preamble is shared by all records and not counted. Returns the
        stream and the rate chosen per image; FeatcodecError if rate 0 does not fit.
        """
        records = []
        for number, image in enumerate(images):
            x, size = self.preprocess(image)
            split_tensor = self.model.head(x.unsqueeze(0))
            record, lowest = self._highest_fitting(split_tensor, size, max_bytes)
            if record is None:
                raise FeatcodecError(
                    f"image {number}: even rate 0 needs {lowest} bytes per record, over --max-bytes {max_bytes}"
                )
            records.append(record)
        return bitstream.write_stream(records), [record.rate for record in records]

    def _highest_fitting(self, split_tensor: torch.Tensor, size: tuple[int, int], max_bytes: int):
        """(the record at the highest rate that fits ``max_bytes`` or None, the record bytes at rate 0)."""

        def coded(step: int) -> tuple[Record, int]:
            record = self.encode_split_tensor(split_tensor, step / scale, size)
            return record, len(bitstream.encode_record(record))

        scale = bitstream.RATE_SCALE if self.ladder.is_variable else 1
        top = self.ladder.max_rate * scale
        if not self.ladder.is_variable:
            for step in range(top, -1, -1):
                record, length = coded(step)
                if length <= max_bytes:
                    return record, None
            return None, length
        best, length = coded(top)
        if length <= max_bytes:
            return best, None
        best, lowest = coded(0)
        if lowest > max_bytes:
            return None, lowest
        fits, over = 0, top
        while over - fits > 1:
            middle = (fits + over) // 2
            record, length = coded(middle)
            if length <= max_bytes:
                fits, best = middle, record
            else:
                over = middle
        return best, None

    def check_record(self, record: Record) -> None:
        """Refuse a record that this codec cannot decode, with the reason."""
        if record.backbone_id != self.spec.id or record.split_id != self.split.id:
            raise BitstreamError(
                f"record is for backbone id {record.backbone_id} split id {record.split_id}, "
                f"this codec is {self.spec.name}/{self.split.name}"
            )
        if record.weights_tag != self.ladder.weights_tag:
            raise BitstreamError(
                f"stream was made with other weights (tag {record.weights_tag.hex()}, "
                f"these weights are {self.ladder.weights_tag.hex()})"
            )
        unit = self.ladder.rung(record.rate)
        if tuple(record.latent_shape) != unit.latent_shape():
            raise BitstreamError(
                f"record latent shape {record.latent_shape} does not match the model's {unit.latent_shape()}"
            )
        if len(record.strings) not in unit.PAYLOAD_STRING_COUNTS:
            expected = " or ".join(str(count) for count in unit.PAYLOAD_STRING_COUNTS)
            raise BitstreamError(f"record has {len(record.strings)} payload strings, expected {expected}")

    @torch.no_grad()
    def decode_split_tensor(self, record: Record) -> torch.Tensor:
        """Rebuild the split tensor (1, C, H, W) of one record."""
        self.check_record(record)
        strings = [[s] for s in record.strings]
        return self.ladder.rung(record.rate).decompress(strings, record.latent_shape)["x_hat"]

    @torch.no_grad()
    def decode(self, data: bytes) -> list[DecodedImage]:
        """Decode every record of a stream into features and predictions."""
        return [self.decode_parsed(index, parsed, bytes_) for index, (parsed, bytes_) in enumerate(_with_sizes(data))]

    @torch.no_grad()
    def decode_parsed(self, index: int, parsed: ParsedRecord, size: int) -> DecodedImage:
        """Decode one parsed record."""
        features = self.decode_split_tensor(parsed.record)
        logits = self.model.tail(features)[0]
        return DecodedImage(index, parsed.record, size, features[0], logits)


def _with_sizes(data: bytes) -> list[tuple[ParsedRecord, int]]:
    """Parsed records with their byte share: the record plus any preamble right before it."""
    parsed = bitstream.parse_stream(data)
    result, previous_end = [], 0
    for item in parsed:
        result.append((item, item.offset + item.size - previous_end))
        previous_end = item.offset + item.size
    return result


def decode(
    data: bytes,
    *,
    weights: str | Path | None = None,
    backbone_weights: str | None = None,
    random_init: bool = False,
) -> list[DecodedImage]:
    """Decode any stream: the codec for each record is chosen from its header."""
    return list(
        iter_decode(data, weights=weights, backbone_weights=backbone_weights, random_init=random_init)
    )


def iter_decode(
    data: bytes,
    *,
    weights: str | Path | None = None,
    backbone_weights: str | None = None,
    random_init: bool = False,
) -> Iterator[DecodedImage]:
    """Decode a stream record by record, so memory holds one rebuilt tensor at a time.

    The whole stream is parsed and checked before the first record is decoded.
    Without ``weights``, each record's shipped ladder is the one whose weights
    tag it carries (featcodec's own or the ``huffman-bu`` anchor).
    """
    codecs: dict[tuple[int, int, bytes], Codec] = {}
    for index, (parsed, size) in enumerate(_with_sizes(data)):
        record = parsed.record
        key = (record.backbone_id, record.split_id, record.weights_tag if weights is None else b"")
        if key not in codecs:
            spec = backbone_by_id(record.backbone_id)
            point = spec.split_by_id(record.split_id)
            path = weights or find_ladder_by_tag(spec.name, point.name, record.weights_tag)
            codecs[key] = Codec.load(
                spec.name, point.name, weights=path, backbone_weights=backbone_weights, random_init=random_init
            )
        yield codecs[key].decode_parsed(index, parsed, size)
