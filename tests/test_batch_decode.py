"""Batched decoding for `featcodec serve` (featcodec.batch_decode), without HTTP: the same answers as
Codec.decode record by record, a bad request refused alone, and decoding threads that share codecs."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from conftest import CHELSEA, COFFEE, make_tiny_ladder
from featcodec import bitstream
from featcodec.batch_decode import CodecCache, DecodeRequest, decode_requests
from featcodec.cli import _decoded_to_json
from featcodec.codec import Codec, _with_sizes

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def hyperprior_weights(tmp_path_factory):
    """A tiny stage5 ladder of two hyperprior rungs (their scale indexes run h_s in float64)."""
    from featcodec.backbones import get_backbone
    from featcodec.bottleneck import BottleneckConfig
    from featcodec.ladder import save_ladder, untrained_ladder

    channels, height, width = get_backbone("efficientnet_lite0").split("stage5").shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=8,
                              hidden_channels=16, entropy="hyperprior")
    path = tmp_path_factory.mktemp("hyper") / "stage5.safetensors"
    save_ladder(untrained_ladder("efficientnet_lite0", "stage5", config, [0.5, 4.0]), path)
    return path


@pytest.fixture(scope="module")
def setup(hyperprior_weights):
    codec = Codec.load("efficientnet_lite0", "stage5", weights=hyperprior_weights)
    streams = [codec.encode([image], rate=rate) for rate in (0, 1) for image in (COFFEE, CHELSEA)]
    streams.append(codec.encode([COFFEE, CHELSEA], rate=1) + streams[0])  # three records, two preambles
    return codec, CodecCache(weights=hyperprior_weights), streams


def expected(codec: Codec, data: bytes):
    return [codec.decode_parsed(index, parsed, size) for index, (parsed, size) in enumerate(_with_sizes(data))]


def assert_rows_match(rows: list[dict], results, top: int = 5) -> None:
    assert len(rows) == len(results)
    for row, result in zip(rows, results):
        want = _decoded_to_json(result, top)
        assert {k: v for k, v in row.items() if k != "top"} == {k: v for k, v in want.items() if k != "top"}
        probs = result.logits.softmax(-1)
        assert all(abs(entry["prob"] - float(probs[entry["label"]])) <= TOLERANCE for entry in row["top"])


def test_a_batch_decodes_as_codec_decode(setup):
    codec, cache, streams = setup
    requests = [DecodeRequest(_with_sizes(data), top=3) for data in streams]
    layouts = []  # the server's tails take their batches in channels_last (TAIL_LAYOUT)
    for chunk in (1, 8):
        for data, answer in zip(streams, decode_requests(cache, requests, chunk=chunk)):
            assert_rows_match(answer, expected(codec, data), top=3)
        if chunk == 1:
            (model,) = cache.models.values()  # loaded on first use
            hook = model.tail.register_forward_pre_hook(
                lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                                    and not args[0].is_contiguous())
            )
    hook.remove()
    assert layouts and all(layouts)
    features = decode_requests(cache, [DecodeRequest(_with_sizes(streams[-1]), features=True)])[0]
    from safetensors.torch import load

    served = load(features)
    for result in expected(codec, streams[-1]):
        assert (served[f"record{result.index}"] - result.features).abs().max() <= TOLERANCE


def test_a_variable_rate_bu_batches_records_of_all_rates(tmp_path):
    from featcodec.bottleneck import BottleneckConfig
    from featcodec.ladder import save_ladder, untrained_ladder

    config = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                              entropy="hyperprior", rates=3)
    ladder = untrained_ladder("efficientnet_lite0", "stage5", config, [1.0])
    ladder.rung_info = [{"lambdas": [0.05, 1.0, 20.0]}]
    save_ladder(ladder, tmp_path / "variable.safetensors")
    codec = Codec.load("efficientnet_lite0", "stage5", weights=tmp_path / "variable.safetensors")
    assert codec.ladder.is_variable
    streams = [codec.encode([image], rate=rate) for rate in (0, 0.5, 1.25, 1.25, 2) for image in (COFFEE,)]
    cache = CodecCache(weights=tmp_path / "variable.safetensors")
    served = cache.preload()[0].ladder.rungs[0]
    batches = []
    served.g_s.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    answers = decode_requests(cache, [DecodeRequest(_with_sizes(data)) for data in streams])
    for data, answer in zip(streams, answers):
        assert_rows_match(answer, expected(codec, data))
    assert [row[0]["rate"] for row in answers] == [0, 0.5, 1.25, 1.25, 2]
    assert batches == [5]  # one g_s batch for four different rates


def _with_rate(data: bytes, rate: int) -> bytes:
    record = bitstream.read_stream(data)[0]
    return bitstream.write_stream([replace(record, rate=rate)])


def test_a_bad_request_is_refused_alone(setup, tmp_path):
    codec, cache, streams = setup
    other = make_tiny_ladder("efficientnet_lite0", "stage5", tmp_path / "other.safetensors", seed=5)
    bad = [_with_rate(streams[0], 7), Codec.load("efficientnet_lite0", "stage5", weights=other).encode([COFFEE])]
    mixed = [streams[0], bad[0], streams[-1], bad[1], streams[3]]
    answers = decode_requests(cache, [DecodeRequest(_with_sizes(data)) for data in mixed])
    for data, answer in zip(mixed, answers):
        if data in bad:
            with pytest.raises(bitstream.FeatcodecError) as refused:
                codec.decode(data)
            assert isinstance(answer, bitstream.FeatcodecError) and str(answer) == str(refused.value)
        else:
            assert_rows_match(answer, expected(codec, data))


def test_decoding_threads_share_the_codecs(setup):
    codec, cache, streams = setup
    requests = [DecodeRequest(_with_sizes(data), features=True) for data in streams]
    reference = decode_requests(cache, requests)
    failures = []

    def decode_repeatedly() -> None:
        for _ in range(8):
            for answer, want in zip(decode_requests(cache, requests, chunk=2), reference):
                if isinstance(answer, Exception):
                    failures.append(repr(answer))
                elif answer != want:
                    from safetensors.torch import load

                    got, wanted = load(answer), load(want)
                    if any((got[k] - wanted[k]).abs().max() > TOLERANCE for k in wanted):
                        failures.append("different tensors")

    threads = [threading.Thread(target=decode_repeatedly) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert all(p.dtype == torch.float32 for p in codec.ladder.rungs[0].parameters())
    assert all(p.dtype == torch.float32 for unit in cache.codecs.values() for p in unit.ladder.rungs[0].parameters())
