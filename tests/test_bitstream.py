import zlib

import pytest

from featcodec import bitstream
from featcodec.bitstream import BitstreamError, Record


def make_record(**changes) -> Record:
    fields = dict(
        backbone_id=1, split_id=3, rate=2, weights_tag=bytes(range(8)), image_size=(640, 480),
        latent_shape=(7, 7), strings=(bytes(range(200)),),
    )
    fields.update(changes)
    return Record(**fields)


def test_round_trip_several_records():
    records = [make_record(), make_record(rate=0, strings=(b"\x00",), image_size=(1, 70000 - 4465))]
    data = bitstream.write_stream(records)
    assert data[:4] == bitstream.PREAMBLE
    assert bitstream.read_stream(data) == records


def test_header_overhead_is_at_most_24_bytes_per_record():
    # 200-byte payload (2-byte varint length), 640x480 image: every header field at typical size
    record = make_record()
    encoded = bitstream.encode_record(record)
    assert len(encoded) - record.payload_bytes == 24
    two = bitstream.write_stream([record, record])
    assert len(two) == len(bitstream.PREAMBLE) + 2 * len(encoded)


def test_concatenated_streams_are_one_stream():
    a = bitstream.write_stream([make_record(rate=1)])
    b = bitstream.write_stream([make_record(rate=4), make_record(rate=5)])
    assert [r.rate for r in bitstream.read_stream(a + b)] == [1, 4, 5]


def test_magic_has_high_bit_set():
    assert bitstream.MAGIC[0] & 0x80


def test_every_single_byte_corruption_is_rejected():
    data = bitstream.write_stream([make_record(strings=(b"payload!",)), make_record(rate=1, strings=(b"xy",))])
    for position in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            corrupt = bytearray(data)
            corrupt[position] ^= flip
            with pytest.raises(BitstreamError):
                bitstream.parse_stream(bytes(corrupt))


def test_every_truncation_is_rejected():
    data = bitstream.write_stream([make_record(strings=(b"payload!",))])
    for length in range(len(data)):
        with pytest.raises(BitstreamError):
            bitstream.parse_stream(data[:length])


def test_empty_and_foreign_data_rejected():
    with pytest.raises(BitstreamError, match="empty"):
        bitstream.parse_stream(b"")
    with pytest.raises(BitstreamError, match="not a featcodec stream"):
        bitstream.parse_stream(b"\xff\xd8\xff\xe0 a JPEG")
    with pytest.raises(BitstreamError, match="no records"):
        bitstream.parse_stream(bitstream.PREAMBLE)


def test_unknown_version_rejected():
    data = bytearray(bitstream.write_stream([make_record()]))
    data[2], data[3] = 2, 0
    with pytest.raises(BitstreamError, match="unsupported bitstream version 2.0"):
        bitstream.parse_stream(bytes(data))
    data[2], data[3] = 1, 3
    with pytest.raises(BitstreamError, match="version 1.3"):
        bitstream.parse_stream(bytes(data))


def test_streams_of_version_1_0_still_parse_and_say_so():
    """A 1.0 record differs only in its payload layout (see featcodec.rans): the framing reads the same."""
    old_preamble = bitstream.MAGIC + bytes([1, 0])
    body = bitstream.encode_record(make_record())[:-4]
    (parsed,) = bitstream.parse_stream(_with_crc(old_preamble, body))
    assert parsed.version == "1.0" and parsed.record == make_record()
    assert bitstream.parse_stream(bitstream.write_stream([make_record()]))[0].version == "1.2"


def _with_crc(preamble: bytes, body: bytes) -> bytes:
    return preamble + body + zlib.crc32(preamble + body).to_bytes(4, "big")


def test_huge_claimed_sizes_are_refused_before_allocation():
    pre = bitstream.PREAMBLE
    head = bytes([1, 3, 0]) + bytes(8)
    # a payload length of 2**27 with 3 bytes present: refused as truncated, nothing allocated
    body = head + bytes([0x80, 0x05, 0x80, 0x05, 7, 7, 1]) + bytes([0xFF, 0xFF, 0xFF, 0x3F]) + b"abc"
    with pytest.raises(BitstreamError, match="truncated"):
        bitstream.parse_stream(_with_crc(pre, body))
    # a latent side of 100000: out of range even with a valid CRC
    body = head + bytes([0x80, 0x05, 0x80, 0x05]) + bytes([0xA0, 0x8D, 0x06, 7, 1, 1]) + b"a"
    with pytest.raises(BitstreamError, match="latent height"):
        bitstream.parse_stream(_with_crc(pre, body))
    # an overlong varint
    body = head + bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x01])
    with pytest.raises(BitstreamError, match="overlong"):
        bitstream.parse_stream(_with_crc(pre, body))


def test_writer_refuses_out_of_range_fields():
    with pytest.raises(BitstreamError):
        bitstream.encode_record(make_record(backbone_id=0x80))
    with pytest.raises(BitstreamError):
        bitstream.encode_record(make_record(latent_shape=(0, 7)))
    with pytest.raises(BitstreamError):
        bitstream.encode_record(make_record(strings=()))
    with pytest.raises(BitstreamError):
        bitstream.write_stream([])


def test_a_whole_rate_costs_one_byte_a_fraction_two():
    whole = bitstream.Record(1, 5, 3, bytes(8), (10, 10), (4, 4), (b"abc",))
    fractional = bitstream.Record(1, 5, 3.5, bytes(8), (10, 10), (4, 4), (b"abc",))
    assert len(bitstream.encode_record(fractional)) == len(bitstream.encode_record(whole)) + 1
    assert bitstream.read_stream(bitstream.write_stream([fractional, whole])) == [fractional, whole]
    with pytest.raises(BitstreamError, match="multiple of 1/256"):
        bitstream.encode_record(bitstream.Record(1, 5, 0.1, bytes(8), (10, 10), (4, 4), (b"abc",)))
    body = bitstream.encode_record(whole)[:-4]
    zero_fraction = body[:2] + bytes([body[2] | 0x80, 0]) + body[3:]
    with pytest.raises(BitstreamError, match="zero rate fraction"):
        bitstream.parse_stream(_with_crc(bitstream.PREAMBLE, zero_fraction))


def test_version_1_1_records_still_parse():
    """A 1.1 record has the same bytes as a 1.2 record of a whole rate; its rate byte is a plain index."""
    body = bitstream.encode_record(bitstream.Record(1, 5, 3, bytes(8), (10, 10), (4, 4), (b"abc",)))[:-4]
    body = body[:2] + bytes([200]) + body[3:]  # 1.1 reads the byte as a rung index, high bit and all
    (parsed,) = bitstream.parse_stream(_with_crc(bitstream.MAGIC + bytes([1, 1]), body))
    assert parsed.version == "1.1" and parsed.record.rate == 200 and parsed.record.strings == (b"abc",)
