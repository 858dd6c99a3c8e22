"""rANS payload strings: the trimmed flushed state and several groups in one string."""

import pytest
import torch
from compressai.entropy_models import EntropyBottleneck

from featcodec import rans
from featcodec.bitstream import BitstreamError


def coded_bottleneck(channels: int = 4, seed: int = 0) -> EntropyBottleneck:
    torch.manual_seed(seed)
    model = EntropyBottleneck(channels)
    model.update(force=True)
    return model


@pytest.mark.parametrize("scale", [0.01, 0.5, 3.0, 40.0])
def test_trimmed_strings_restore_to_compressais_and_decode(scale):
    """Small scales leave a tiny final state (its top bytes zero, trimmed away); large ones fill it."""
    model = coded_bottleneck()
    trimmed_any = False
    for seed in range(12):
        torch.manual_seed(seed)
        y = torch.randn(1, 4, 3, 5) * scale
        (string,) = model.compress(y)
        short = rans.trim_state(string)
        assert len(string) % 4 == 0 and len(string) - 3 <= len(short) <= len(string)
        trimmed_any |= len(short) < len(string)
        assert rans.restore_state(short) == string
        assert torch.equal(model.decompress([rans.restore_state(short)], (3, 5)),
                           model.decompress([string], (3, 5)))
    if scale < 1:
        assert trimmed_any


def test_untrimmed_strings_of_bitstream_1_0_restore_to_themselves():
    string = bytes([1, 2, 3, 4, 5, 0, 0, 0]) + bytes(range(8))
    assert rans.restore_state(string) == string
    assert rans.trim_state(string) == bytes([1, 2, 3, 4, 5]) + bytes(range(8))
    assert rans.restore_state(rans.trim_state(string)) == string


def test_malformed_strings_are_refused():
    with pytest.raises(ValueError, match="not a CompressAI rANS string"):
        rans.trim_state(b"\x01\x02\x03")
    for length in range(5):  # 5 bytes (a state whose 3 top bytes were zero) is the shortest string
        with pytest.raises(BitstreamError, match="shorter than its state"):
            rans.restore_state(bytes(range(1, length + 1)))
    for length in (5, 6, 7):
        assert len(rans.restore_state(bytes(range(1, length + 1)))) == 8


def test_groups_share_one_string_and_decode_in_order():
    first, second = coded_bottleneck(4, seed=1), coded_bottleneck(6, seed=2)
    a = torch.randint(-5, 6, (1, 4, 2, 2), dtype=torch.int32)
    b = torch.randint(-40, 41, (1, 6, 3, 3), dtype=torch.int32)  # beyond the CDFs: escaped, still exact
    a_indexes, b_indexes = first._build_indexes(a.size()), second._build_indexes(b.size())
    first_tables, second_tables = rans.coding_tables(first), rans.coding_tables(second)
    string = rans.encode_groups([(first_tables, a, a_indexes), (second_tables, b, b_indexes)])
    decoder = rans.GroupDecoder(string, a.numel() + b.numel())
    assert torch.equal(decoder.decode(first_tables, a_indexes), a)
    assert torch.equal(decoder.decode(second_tables, b_indexes), b)


@pytest.mark.parametrize("seed", range(6))
def test_crafted_strings_decode_within_the_guard_words(seed):
    """A string cut short or made of noise makes CompressAI's decoder read past its real words; with
    the guard those reads land in zeros, so the result equals that of the same string followed by
    far more zeros (without enough guard, the decode would read whatever lies beyond and differ)."""
    model = coded_bottleneck(8, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    (valid,) = model.compress(torch.randn(1, 8, 6, 6, generator=generator) * 30)  # many escapes
    noise = bytes(torch.randint(0, 256, (40,), generator=generator).tolist())
    for string in (rans.trim_state(valid)[: 5 + seed], b"\xff" * (9 + seed), noise[: 8 + 4 * seed]):
        guarded = model.decompress([rans.for_decoding(string, 8 * 6 * 6)], (6, 6))
        roomy = model.decompress([rans.restore_state(string) + bytes(1 << 20)], (6, 6))
        assert torch.equal(guarded, roomy)
    assert torch.equal(model.decompress([rans.for_decoding(rans.trim_state(valid), 8 * 6 * 6)], (6, 6)),
                       model.decompress([valid], (6, 6)))


def gaussian_tables():
    from compressai.entropy_models import GaussianConditional

    model = GaussianConditional(None)
    model.update_scale_table(torch.exp(torch.linspace(-2.2, 4.1, 64)), force=True)
    return model


def test_coding_with_the_used_tables_only_gives_compressais_bytes():
    """A record passes only its own CDFs, each cut to its length, to the coder: the same bits as
    CompressAI's whole table of padded rows, bypass-coded values (far outside a CDF) included."""
    from featcodec.lazy_compressai import BufferedRansEncoder

    model = gaussian_tables()
    tables = rans.coding_tables(model)
    assert [len(row) for row in tables[0]] == tables[1] < [model._quantized_cdf.shape[1]] * len(tables[1])
    padded = (model._quantized_cdf.tolist(), model._cdf_length.int().tolist(), model._offset.int().tolist())
    torch.manual_seed(0)
    indexes = torch.randint(10, 30, (2, 5, 6)).int()
    symbols = torch.randint(-6, 7, (2, 5, 6)).int()
    symbols[0, 0, :3] = torch.tensor([-300, 300, 5000])
    whole = BufferedRansEncoder()
    whole.encode_with_indexes(symbols.reshape(-1).tolist(), indexes.reshape(-1).tolist(), *padded)
    string = rans.encode_groups([(tables, symbols, indexes)])
    assert string == rans.trim_state(whole.flush())
    decoded = rans.GroupDecoder(string, symbols.numel()).decode(tables, indexes)
    assert torch.equal(decoded, symbols)


def test_coding_tables_are_kept_until_the_model_changes():
    model = gaussian_tables()
    first = rans.coding_tables(model)
    assert rans.coding_tables(model) is first
    model.update_scale_table(torch.exp(torch.linspace(-2.2, 3.0, 32)), force=True)
    again = rans.coding_tables(model)
    assert again is not first and len(again[0]) == 32
