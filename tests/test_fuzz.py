"""Fuzzing the decoder: mutated, truncated, spliced and random streams.

Every input must either be refused with a one-line FeatcodecError or decode to
exactly what the original stream's records decode to. Nothing else (no other
exception type, no traceback, no large allocation) is allowed, in
``bitstream.parse_stream``/``read_stream``, in the full ``codec.decode`` path
and in ``featcodec info``.
"""

from __future__ import annotations

import contextlib
import io
import json
import tracemalloc
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHELSEA, COFFEE
from featcodec import bitstream
from featcodec.bottleneck import BottleneckUnit
from featcodec.cli import main
from featcodec.codec import Codec, decode
from featcodec.errors import FeatcodecError

FUZZ = settings(
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module", autouse=True)
def tiny_weights(weights_dir):
    """codec.decode() finds the tiny ladders of every split through $FEATCODEC_WEIGHTS."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEATCODEC_WEIGHTS", str(weights_dir))
        yield


@pytest.fixture(scope="module")
def corpus(codec, weights_dir, tiny_weights):
    """Valid streams (one record, several records, two splits) and each record's reference decode."""
    stage5 = Codec.load("efficientnet_lite0", "stage5", weights=weights_dir / "efficientnet_lite0" / "stage5.safetensors")
    streams = {
        "one": codec.encode([COFFEE], rate=1),
        "multi": codec.encode([COFFEE, CHELSEA], rate=0),
        "stage5": stage5.encode([CHELSEA], rate=1),
    }
    streams["concat"] = streams["one"] + streams["stage5"]
    reference = {}
    for data in streams.values():
        for result in decode(data):
            reference[bitstream.encode_record(result.record)] = (result.features, result.logits)
    return Corpus({"streams": streams, "reference": reference})


class Corpus(dict):
    """The corpus dict, with a short repr for Hypothesis' failure reports."""

    def __repr__(self) -> str:
        return f"<corpus of {len(self['streams'])} streams>"


def _assert_one_line(exc: BaseException) -> str:
    message = str(exc)
    assert isinstance(exc, FeatcodecError), f"{type(exc).__name__}: {message}"
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN included: decoding garbage payloads may give NaN or inf)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def check_parse(data: bytes):
    """parse_stream and read_stream agree, and fail only with a one-line FeatcodecError."""
    try:
        parsed = bitstream.parse_stream(data)
    except Exception as exc:  # noqa: BLE001  anything else is the bug being hunted
        message = _assert_one_line(exc)
        with pytest.raises(FeatcodecError) as again:
            bitstream.read_stream(data)
        assert str(again.value) == message
        return None, message
    assert parsed, "parse_stream returned no records without raising"
    assert bitstream.read_stream(data) == [p.record for p in parsed]
    end = 0
    for start, stop in [(p.offset, p.offset + p.size) for p in parsed] + [(len(data), len(data))]:
        gap = data[end:start]  # between records (and after the last) only whole preambles
        assert len(gap) % 4 == 0 and gap == bitstream.PREAMBLE * (len(gap) // 4) and (end or gap)
        end = stop
    return parsed, None


def check_decode(data: bytes, corpus, decoder=decode, known_records: bool = True):
    """Run the full decode path: a one-line FeatcodecError, or exactly the original records' decode.

    ``known_records``: every record that parses must be one of the corpus's
    records (true for inputs built from valid streams, since the CRC covers
    each record); its features and logits must then equal the reference.
    """
    parsed, parse_error = check_parse(data)
    try:
        results = decoder(data)
    except Exception as exc:  # noqa: BLE001
        message = _assert_one_line(exc)
        if parse_error is not None:
            assert message == parse_error
        return "rejected"
    assert parse_error is None, f"decoded what parse_stream refuses: {parse_error}"
    assert [r.record for r in results] == [p.record for p in parsed]
    assert [r.index for r in results] == list(range(len(parsed)))
    # each record's share is its bytes plus the preamble(s) before it; a trailing preamble counts for none
    assert sum(r.bytes for r in results) == parsed[-1].offset + parsed[-1].size
    for result in results:
        key = bitstream.encode_record(result.record)
        if known_records:
            assert key in corpus["reference"], "a record that is in no original stream passed its CRC"
        if key in corpus["reference"]:
            features, logits = corpus["reference"][key]
            assert _same_tensor(result.features, features)
            assert _same_tensor(result.logits, logits)
    return "decoded"


# -- building inputs from valid streams ---------------------------------------------------------

STREAM_NAMES = ["one", "multi", "stage5", "concat"]


@st.composite
def mutated(draw, streams):
    """A valid stream with 1..4 byte flips, insertions or deletions."""
    data = bytearray(streams[draw(st.sampled_from(STREAM_NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        position = draw(st.integers(0, len(data) - (0 if kind == "insert" else 1)))
        if kind == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x89, 0xFF]))
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif len(data) > 1:
            del data[position : position + draw(st.integers(1, 8))]
    return bytes(data)


def _boundaries(data: bytes) -> list[int]:
    """Offsets where a record or preamble starts or ends in a valid stream."""
    points = {0, len(bitstream.PREAMBLE), len(data)}
    for item in bitstream.parse_stream(data):
        points |= {item.offset, item.offset + item.size}
    return sorted(points)


@st.composite
def cut_point(draw, data: bytes) -> int:
    """Anywhere in the stream, or (half the time) exactly on a record boundary."""
    if draw(st.booleans()):
        return draw(st.sampled_from(_boundaries(data)))
    return draw(st.integers(0, len(data)))


@st.composite
def spliced(draw, streams):
    """The start of one valid stream, then a piece of another (or the same) one."""
    a = streams[draw(st.sampled_from(STREAM_NAMES))]
    b = streams[draw(st.sampled_from(STREAM_NAMES))]
    head = a[: draw(cut_point(a))]
    start = draw(cut_point(b))
    end = draw(st.one_of(st.just(len(b)), cut_point(b)))
    return head + b[start:max(start, end)]


# -- the tests ---------------------------------------------------------------------------------


def test_corpus_decodes(corpus):
    assert [len(bitstream.parse_stream(d)) for d in corpus["streams"].values()] == [1, 2, 1, 2]
    assert len(corpus["reference"]) == 4
    for data in corpus["streams"].values():
        assert check_decode(data, corpus) == "decoded"


@FUZZ
@given(data=st.data())
def test_mutated_streams(corpus, data):
    check_decode(data.draw(mutated(corpus["streams"])), corpus)


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_truncated_streams(corpus, data):
    name = data.draw(st.sampled_from(STREAM_NAMES))
    stream = corpus["streams"][name]
    length = data.draw(cut_point(stream))
    outcome = check_decode(stream[:length], corpus)
    if name in ("one", "stage5"):  # one record: only the whole stream decodes
        assert (outcome == "decoded") == (length == len(stream))


def test_every_truncation_of_a_multi_record_stream(corpus):
    """Each prefix parses only if it ends on a record boundary, and then holds the records before the cut."""
    stream = corpus["streams"]["concat"]
    ends = {p.offset + p.size for p in bitstream.parse_stream(stream)}
    decoded = []
    for length in range(len(stream)):
        parsed, _ = check_parse(stream[:length])
        if parsed is not None:
            decoded.append(length)
    # the first record's end, and that end plus the second stream's preamble
    assert decoded == sorted(e for e in ends | {min(ends) + 4} if e < len(stream))
    for length in decoded:
        assert check_decode(stream[:length], corpus) == "decoded"


@settings(FUZZ, max_examples=80)
@given(data=st.data())
def test_spliced_streams(corpus, data):
    check_decode(data.draw(spliced(corpus["streams"])), corpus)


@settings(FUZZ, max_examples=80)
@given(
    body=st.binary(max_size=300),
    prefix=st.sampled_from([b"", bitstream.PREAMBLE, bitstream.PREAMBLE + bytes([1, 3])]),
)
def test_random_streams(corpus, body, prefix):
    check_decode(prefix + body, corpus)


@st.composite
def crafted_records(draw, tag: bytes, payloads: list[bytes]):
    """Records with a valid CRC whose every field is plausible or off by a little."""

    def maybe(valid, other):
        return draw(st.one_of(st.just(valid), other)) if draw(st.integers(0, 5)) == 0 else valid

    payload = draw(st.one_of(st.sampled_from(payloads), st.binary(max_size=400)))
    strings = maybe((payload,), st.lists(st.binary(max_size=40), min_size=1, max_size=bitstream.MAX_STRINGS).map(tuple))
    return bitstream.Record(
        backbone_id=maybe(1, st.integers(0, bitstream.MAX_ID)),
        split_id=maybe(3, st.sampled_from([0, 2, 5, 0x7F])),
        rate=maybe(draw(st.integers(0, 1)), st.integers(0, round(bitstream.MAX_RATE * bitstream.RATE_SCALE)).map(
            lambda steps: steps / bitstream.RATE_SCALE)),  # whole rates and fractions, as 1.2 records carry them
        weights_tag=maybe(tag, st.binary(min_size=8, max_size=8)),
        image_size=(draw(st.integers(1, bitstream.MAX_IMAGE_SIDE)), draw(st.integers(1, bitstream.MAX_IMAGE_SIDE))),
        latent_shape=maybe((7, 7), st.tuples(*[st.integers(1, bitstream.MAX_LATENT_SIDE)] * 2)),
        strings=strings,
    )


@pytest.fixture()
def decompress_spy(monkeypatch):
    """Fail if the entropy decoder is ever asked for a latent shape other than its unit's own."""
    calls = []
    original = BottleneckUnit.decompress

    def spy(self, strings, shape):
        assert tuple(shape) == self.latent_shape() and len(strings) == 1
        calls.append(tuple(shape))
        return original(self, strings, shape)

    monkeypatch.setattr(BottleneckUnit, "decompress", spy)
    return calls


def _crafted_streams(codec, corpus):
    payloads = [r.strings[0] for r in bitstream.read_stream(corpus["streams"]["multi"])]
    return st.lists(crafted_records(codec.ladder.weights_tag, payloads), min_size=1, max_size=3).map(
        bitstream.write_stream
    )


def test_crafted_records_through_codec_decode(codec, corpus, decompress_spy):
    """Structurally valid records (good CRC) with garbage payloads or odd fields, through Codec.decode."""
    outcomes = []

    @settings(FUZZ, max_examples=120)
    @given(data=_crafted_streams(codec, corpus))
    def run(data):
        outcomes.append(check_decode(data, corpus, decoder=codec.decode, known_records=False))

    run()
    assert {"decoded", "rejected"} <= set(outcomes)  # both kinds of crafted record were tried
    assert decompress_spy


def test_crafted_records_through_module_decode(codec, corpus, decompress_spy):
    """The same through codec.decode(), which picks a codec from each header (slower: it loads models)."""
    outcomes = []

    @settings(FUZZ, max_examples=25)
    @given(data=_crafted_streams(codec, corpus))
    def run(data):
        outcomes.append(check_decode(data, corpus, known_records=False))

    run()
    assert {"decoded", "rejected"} <= set(outcomes)


def test_decode_with_an_explicit_weights_file(corpus, stage3_weights):
    """weights= is a stage3 ladder: stage3 records decode, a stage5 record is refused in one line."""
    def with_file(data):
        return decode(data, weights=stage3_weights)

    assert check_decode(corpus["streams"]["multi"], corpus, decoder=with_file) == "decoded"
    for name in ("stage5", "concat"):
        with pytest.raises(FeatcodecError, match="weights are for efficientnet_lite0/stage3") as error:
            with_file(corpus["streams"][name])
        _assert_one_line(error.value)


# -- featcodec info ----------------------------------------------------------------------------


def run_info(path, *options):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["info", str(path), *options])
    return code, out.getvalue(), err.getvalue()


def test_info_on_fuzzed_streams(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("info")
    outcomes = set()

    @settings(FUZZ, max_examples=120)
    @given(
        data=st.one_of(mutated(corpus["streams"]), spliced(corpus["streams"]), st.binary(max_size=64)),
        as_json=st.booleans(),
    )
    def run(data, as_json):
        path = folder / "fuzz.fcb"
        path.write_bytes(data)
        code, out, err = run_info(path, *(["--json"] if as_json else []))
        parsed, parse_error = check_parse(data)
        assert "Traceback" not in err
        if parse_error is not None:
            assert code == 2, err
            assert err == f"featcodec: error: {parse_error}\n" and out == ""
        else:
            assert code == 0 and err == ""
            if as_json:
                summary = json.loads(out)
                assert summary["bytes"] == len(data)
                assert [r["offset"] for r in summary["records"]] == [p.offset for p in parsed]
            else:
                assert f"{len(parsed)} record(s)" in out
        outcomes.add(code)

    run()
    assert outcomes == {0, 2}


# -- no large allocations ----------------------------------------------------------------------


def _with_crc(body: bytes) -> bytes:
    return bitstream.PREAMBLE + body + zlib.crc32(bitstream.PREAMBLE + body).to_bytes(4, "big")


def _varint(value: int) -> bytes:
    out = bytearray()
    bitstream._put_varint(out, value)
    return bytes(out)


HEAD = bytes([1, 3, 0]) + bytes(8)
BIG = (1 << 28) - 1  # the largest value a 4-byte varint holds
HUGE_CLAIMS = {
    "string length": HEAD + _varint(600) + _varint(400) + bytes([7, 7, 1]) + _varint(BIG) + b"abc",
    "4 strings": HEAD + _varint(600) + _varint(400) + bytes([7, 7, 4]) + _varint(BIG) * 4,
    "latent shape": HEAD + _varint(600) + _varint(400) + _varint(BIG) + _varint(BIG) + bytes([1, 1]) + b"x",
    "image size": HEAD + _varint(BIG) + _varint(BIG) + bytes([7, 7, 1, 1]) + b"x",
    "string count": HEAD + _varint(600) + _varint(400) + bytes([7, 7, 255]) + bytes(8),
}
LIMIT = 512 * 1024  # bytes of Python allocations while refusing a stream of a few dozen bytes


def _peak_while(function, data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(FeatcodecError) as error:
            function(data)
        _assert_one_line(error.value)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("claim", sorted(HUGE_CLAIMS))
@pytest.mark.parametrize("with_crc", [True, False])
def test_huge_claims_are_refused_without_allocating(claim, with_crc):
    data = _with_crc(HUGE_CLAIMS[claim]) if with_crc else bitstream.PREAMBLE + HUGE_CLAIMS[claim]
    assert _peak_while(bitstream.parse_stream, data) < LIMIT
    assert _peak_while(decode, data) < LIMIT  # refused before any model is loaded


@settings(FUZZ, max_examples=60)
@given(
    fields=st.tuples(
        *[st.one_of(st.integers(1, bitstream.MAX_IMAGE_SIDE), st.integers(0, BIG))] * 2,
        *[st.one_of(st.integers(1, bitstream.MAX_LATENT_SIDE), st.integers(0, BIG))] * 2,
    ),
    lengths=st.lists(st.integers(0, BIG), min_size=1, max_size=4),
    tail=st.binary(max_size=32),
)
def test_claimed_sizes_never_allocate(fields, lengths, tail):
    body = HEAD + b"".join(map(_varint, fields)) + bytes([len(lengths)]) + b"".join(map(_varint, lengths)) + tail
    for data in (bitstream.PREAMBLE + body, _with_crc(body)):
        tracemalloc.start()
        try:
            try:
                bitstream.parse_stream(data)
            except FeatcodecError as exc:
                _assert_one_line(exc)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < LIMIT


def test_parse_memory_is_proportional_to_the_input(corpus):
    """Parsing a 1 MB stream of valid records, or refusing it for its last byte, allocates about its size."""
    data = corpus["streams"]["multi"] * ((1 << 20) // len(corpus["streams"]["multi"]))
    tracemalloc.start()
    try:
        parsed = bitstream.parse_stream(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(parsed) > 3000
    assert peak < 4 * len(data)
    assert _peak_while(bitstream.parse_stream, data[:-1]) < 4 * len(data)
