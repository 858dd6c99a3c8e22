"""Decode the records of several requests together: the work of one `featcodec serve` batch.

Each record is checked (``Codec.check_record``) and entropy-decoded on its own by
its rung's ``decompress_latent``, as ``Codec.decode`` does. The BU decoder
(``g_s`` and the refiner) then runs once per (codec, rung), or once per codec for
a variable-rate BU whatever the records' rates, and the tail once per codec, on
batches of at most ``chunk`` records. A request with a bad record gets
that record's error; the other requests of the batch are not touched.

This module knows nothing about HTTP: ``featcodec.serve`` calls
:func:`decode_requests` from its decoding threads (one batch each; the codecs are shared).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Union

import torch

from .backbones import DEFAULT_BACKBONE, SplitModel, backbone_by_id, get_backbone, load_split_model
from .backbones.folding import fold_batch_norms
from .bitstream import ParsedRecord, Record
from .codec import Codec, DecodedImage
from .ladder import LadderError, find_ladder, find_ladder_by_tag, load_ladder

# The BU decoders and tails run on at most this many records at a time. The server's decoding
# threads run torch on one thread each, and there the tails of the shipped splits, as the server
# runs them (`server_tail`), cost about least per image at 16 (where torch's CPU convolutions take
# oneDNN's path for 1x1 kernels too): stage3's 9.9 ms an image at batch 1, 7.0 at 8, 6.5 at 16,
# 7.2 at 24; stage2's and stage5's 3-12 % less again at 24 (`python benchmarks/serve_load.py
# --tail-batches [--split S]`; docs/serve.md).
COMPUTE_CHUNK = 16
# The server's tails fold their batch norms into the convolutions (`fold_batch_norms`) and keep their
# weights, and take their batches, in channels_last: 9-42 % less time per image than the tail as
# `Codec.decode` runs it at every batch size and split measured (same command); logits move by about 1e-5.
TAIL_LAYOUT = torch.channels_last

Answer = Union[list, bytes, Exception]  # JSON rows, safetensors bytes, or why the request was refused


def log(message: str) -> None:
    """A server-side message: one line on stderr."""
    sys.stderr.write(f"featcodec serve: {message}\n")
    sys.stderr.flush()


class CodecCache:
    """The codecs a server keeps loaded, chosen per record as ``featcodec decode`` chooses them.

    Without ``weights`` a record goes to the shipped ladder whose weights tag it
    carries (else the split's default ladder, which then refuses it with decode's
    message); with ``weights`` every record goes to that ladder. One backbone model
    per (backbone, split) is shared by its ladders.
    """

    def __init__(self, weights: str | Path | None = None, backbone_weights: str | None = None,
                 random_init: bool = False):
        self.weights = weights
        self.backbone_weights = backbone_weights
        self.random_init = random_init
        self.codecs: dict[tuple[str, str, str], Codec] = {}
        self.models: dict[tuple[str, str], SplitModel] = {}
        self._lock = threading.Lock()  # decoding threads may ask for a codec not loaded yet at the same time

    def preload(self, backbone: str = DEFAULT_BACKBONE) -> list[Codec]:
        """Load ``weights``, or every shipped ladder of ``backbone`` (default: the default backbone)."""
        if self.weights is not None:
            ladder = load_ladder(self.weights)
            spec = get_backbone(ladder.backbone)
            return [self._codec(spec, spec.split(ladder.split), Path(self.weights), ladder)]
        spec = get_backbone(backbone)
        loaded = []
        for name in spec.splits:
            try:
                path = find_ladder(spec.name, name)
            except LadderError:
                continue
            loaded.append(self._codec(spec, spec.split(name), path))
        return loaded

    def for_record(self, record: Record) -> Codec:
        """The codec that decodes ``record`` (loaded on first use)."""
        spec = backbone_by_id(record.backbone_id)
        point = spec.split_by_id(record.split_id)
        path = self.weights or find_ladder_by_tag(spec.name, point.name, record.weights_tag)
        return self._codec(spec, point, Path(path or find_ladder(spec.name, point.name)))

    def _codec(self, spec, point, path: Path, ladder=None) -> Codec:
        key = (spec.name, point.name, _resolved(str(path)))
        with self._lock:
            return self.codecs.get(key) or self._load(key, spec, point, path, ladder)

    def _load(self, key, spec, point, path: Path, ladder=None) -> Codec:
        started = time.perf_counter()
        ladder = ladder or load_ladder(path)
        codec = Codec(spec, point, None, ladder)  # refuses a ladder of another split before loading a model
        if (spec.name, point.name) not in self.models:
            model = load_split_model(spec.name, point.name, self.backbone_weights, self.random_init)
            model.tail = server_tail(model.tail)
            self.models[spec.name, point.name] = model
        codec.model = self.models[spec.name, point.name]
        self.codecs[key] = codec
        rates = f"rates 0..{codec.ladder.max_rate}" if codec.ladder.is_variable else f"{codec.num_rates} rungs"
        log(f"loaded {spec.name}/{point.name} with {path} ({rates}, weights tag "
            f"{ladder.weights_tag.hex()}) in {time.perf_counter() - started:.1f} s")
        return codec


def server_tail(tail: torch.nn.Module) -> torch.nn.Module:
    """``tail`` as the server runs it: batch norms folded into the convolutions, weights in TAIL_LAYOUT."""
    return fold_batch_norms(tail).to(memory_format=TAIL_LAYOUT)


@lru_cache(maxsize=64)
def _resolved(path: str) -> str:
    return str(Path(path).resolve())


def decode_latent(codec: Codec, record: Record) -> torch.Tensor:
    """Entropy-decode one checked record's latent (1, C, h, w), as ``Codec.decode_split_tensor`` does,
    as its BU decoder takes it (``decoder_input``: a variable-rate BU's inverse gain applied).

    Threads may call it at once: a hyperprior rung codes with its own float64 copy of ``h_s``."""
    rung = codec.ladder.rung(record.rate)
    return rung.decoder_input(rung.decompress_latent([[s] for s in record.strings], record.latent_shape))


def decoder_of(codec: Codec, rate) -> torch.nn.Module:
    """The BU decoder of records of rate ``rate``: their rung, or a variable-rate BU for all its rates."""
    return codec.ladder.rung(rate).decoder


@dataclass
class DecodeRequest:
    """One request: its parsed records with their byte shares, and what to answer."""

    records: list[tuple[ParsedRecord, int]]
    top: int = 5
    features: bool = False


@dataclass
class _Item:
    request: int
    index: int
    parsed: ParsedRecord
    size: int
    codec: Codec
    latent: torch.Tensor
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@torch.no_grad()
def decode_requests(cache: CodecCache, requests: list[DecodeRequest], chunk: int = COMPUTE_CHUNK) -> list[Answer]:
    """Decode several requests in one batch; per request its answer or the exception that refused it."""
    answers: list[Answer | None] = [None] * len(requests)
    items: list[_Item] = []
    for number, request in enumerate(requests):
        try:
            mine = []
            for index, (parsed, size) in enumerate(request.records):
                codec = cache.for_record(parsed.record)
                codec.check_record(parsed.record)
                mine.append(_Item(number, index, parsed, size, codec, decode_latent(codec, parsed.record)))
            items += mine
        except Exception as exc:  # noqa: BLE001  this request is refused, the others go on
            answers[number] = exc

    def run_batched(group_key: Callable, step: Callable) -> None:
        """Run ``step(key, items)`` per group and chunk; a failing chunk fails its requests only."""
        groups: dict = {}
        for item in items:
            if answers[item.request] is None:
                groups.setdefault(group_key(item), []).append(item)
        for key, group in groups.items():
            for start in range(0, len(group), chunk):
                part = group[start : start + chunk]
                try:
                    step(key, part)
                except Exception as exc:  # noqa: BLE001
                    for item in part:
                        answers[item.request] = exc

    def bu_decoder(decoder, part: list[_Item]) -> None:
        rebuilt = decoder.synthesize(torch.cat([item.latent for item in part]))
        for item, features in zip(part, rebuilt):
            item.features, item.latent = features, None

    def tail(codec, part: list[_Item]) -> None:
        features = torch.stack([item.features for item in part])
        if features.dim() == 4:
            features = features.contiguous(memory_format=TAIL_LAYOUT)
        logits = codec.model.tail(features)
        for item, row in zip(part, logits):
            item.logits = row

    run_batched(lambda item: decoder_of(item.codec, item.parsed.record.rate), bu_decoder)
    run_batched(lambda item: item.codec, tail)
    results: list[list[DecodedImage]] = [[] for _ in requests]
    for item in items:
        if answers[item.request] is None:
            results[item.request].append(
                DecodedImage(item.index, item.parsed.record, item.size, item.features, item.logits)
            )
    for number, request in enumerate(requests):
        if answers[number] is None:
            answers[number] = answer_of(results[number], request)
    return answers


def answer_of(results: list[DecodedImage], request: DecodeRequest) -> list | bytes:
    """``featcodec decode --json``'s rows, or with ``features`` the bytes of ``decode --features``'s file."""
    from .cli import _decoded_to_json, _features_file

    if request.features:
        return _features_file(results)
    return [_decoded_to_json(result, request.top) for result in results]
