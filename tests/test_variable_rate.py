"""One variable-rate BU (gain units) for every rate: fractional rates in the record header, --max-bytes
searching the continuous rate, old ladders' streams kept apart."""

import pytest
import torch

from conftest import COFFEE, make_image_folder, make_tiny_ladder
from featcodec import bitstream
from featcodec.bottleneck import BottleneckConfig, GainHyperpriorUnit
from featcodec.cli import main
from featcodec.codec import Codec
from featcodec.errors import FeatcodecError
from featcodec.ladder import load_ladder
from featcodec.train import TrainConfig, TrainError, train_ladder

VARIABLE_BU = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                               entropy="hyperprior", rates=3)


@pytest.fixture(scope="module")
def variable_ladder(tmp_path_factory):
    """A variable-rate BU for Lite0/stage5, trained a few steps on generated images (rates 0..2)."""
    root = tmp_path_factory.mktemp("variable")
    images = make_image_folder(root / "images", 8)
    out = root / "stage5-variable.safetensors"
    config = TrainConfig("efficientnet_lite0", "stage5", [0.05, 1.0, 20.0], distortion="mse", steps=40,
                         batch_size=8, views=2, learning_rate=3e-3, variable_rate=True)
    train_ladder(config, images, out, VARIABLE_BU, cache_dir=root / "cache")
    return out


@pytest.fixture(scope="module")
def codec(variable_ladder):
    return Codec.load("efficientnet_lite0", "stage5", weights=variable_ladder)


def test_trained_file_is_one_bu_for_every_rate(variable_ladder):
    ladder = load_ladder(variable_ladder)
    assert ladder.is_variable and ladder.max_rate == 2 and len(ladder.rungs) == 1
    assert isinstance(ladder.rungs[0], GainHyperpriorUnit)
    assert ladder.rung_info[0]["lambdas"] == [0.05, 1.0, 20.0] and ladder.rung_info[0]["steps"] == 40
    assert ladder.sweep_rates() == [0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]


@pytest.mark.parametrize("rate", [0, 1, 2, 0.5, 1.25, 2.0])
def test_integer_and_fractional_rates_round_trip(codec, rate):
    data = codec.encode([COFFEE], rate=rate)
    (record,) = bitstream.read_stream(data)
    assert record.rate == rate
    (decoded,) = codec.decode(data)
    assert decoded.features.shape == (192, 7, 7) and torch.isfinite(decoded.logits).all()
    assert codec.encode([COFFEE], rate=rate) == data  # deterministic


@pytest.mark.parametrize("rate", [0.0, 1.5, 2.0])
def test_gain_unit_with_a_narrow_hyperprior_decodes_what_it_quantized(rate):
    from dataclasses import replace

    torch.manual_seed(0)
    unit = GainHyperpriorUnit(replace(VARIABLE_BU, latent_channels=16, end_kernel=1, hyper_channels=4)).eval()
    unit.build_coding_tables()
    x = torch.randn(2, 192, 7, 7)
    with torch.no_grad():
        coded = unit.compress(x, rate)
        gain = unit.gains(rate, torch.float64).latent.float()
        expected = unit.gaussian_conditional.quantize(unit.g_a(x) * gain, "dequantize", unit.latent_means * gain)
        assert torch.equal(unit.decompress_latent(coded["strings"], coded["shape"], unit._coding_gains(rate)), expected)
    assert unit.log_hyper_gains.shape == (3, 4)


def test_synthesize_of_decoded_latents_is_decompress(codec):
    """What a batching server runs: entropy-decode per record, then the BU decoder on the batch."""
    unit = codec.ladder.rung(1.5)
    coded = unit.compress(torch.randn(2, 192, 7, 7))
    latents = unit.decompress_latent(coded["strings"], coded["shape"])
    assert torch.allclose(unit.synthesize(latents), unit.decompress(coded["strings"], coded["shape"])["x_hat"],
                          atol=1e-5)


def test_header_carries_the_rate_it_was_coded_at(codec):
    data = codec.encode([COFFEE], rate=1.3)  # not a multiple of 1/256: coded at the nearest one
    (record,) = bitstream.read_stream(data)
    assert record.rate == round(1.3 * 256) / 256
    assert data == codec.encode([COFFEE], rate=record.rate)


def test_bytes_rise_with_rate_on_a_fixed_batch(codec):
    sizes = [len(codec.encode([COFFEE, COFFEE.parent / "chelsea.jpg"], rate=rate)) for rate in (0, 0.5, 1, 1.5, 2)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


def test_max_bytes_picks_the_highest_fractional_rate_that_fits(codec):
    low, high = (len(codec.encode([COFFEE], rate=r)) - len(bitstream.PREAMBLE) for r in (0, 2))
    budget = (low + high) // 2
    data, (rate,) = codec.encode_within([COFFEE], budget)
    (parsed,) = bitstream.parse_stream(data)
    assert parsed.size <= budget < high and 0 < rate < 2 and not float(rate).is_integer()
    step = 1 / bitstream.RATE_SCALE
    above = len(codec.encode([COFFEE], rate=rate + step)) - len(bitstream.PREAMBLE)
    assert above > budget  # the next rate a record can carry does not fit
    with pytest.raises(FeatcodecError, match="even rate 0 needs"):
        codec.encode_within([COFFEE], low - 1)


def test_out_of_range_rate_is_refused(codec):
    with pytest.raises(FeatcodecError, match="out of range"):
        codec.encode([COFFEE], rate=2.5)


def test_cli_encode_at_a_fractional_rate_and_decode(variable_ladder, tmp_path, capsys):
    stream = tmp_path / "frac.fcb"
    assert main(["encode", str(COFFEE), "-s", "stage5", "--weights", str(variable_ladder), "--rate", "1.5",
                 "-o", str(stream)]) == 0
    assert "rate 1.5" in capsys.readouterr().err
    assert main(["decode", str(stream), "--weights", str(variable_ladder), "--json"]) == 0
    assert '"rate": 1.5' in capsys.readouterr().out
    assert main(["info", str(stream), "--json"]) == 0
    assert '"version": "1.2"' in capsys.readouterr().out


def test_fixed_ladder_refuses_fractional_rates_and_other_ladders_streams(codec, tmp_path, capsys):
    ladder = make_tiny_ladder("efficientnet_lite0", "stage5", tmp_path / "ladder.safetensors")
    shipped = Codec.load("efficientnet_lite0", "stage5", weights=ladder)  # a per-lambda ladder
    with pytest.raises(FeatcodecError, match="not a rung"):
        shipped.encode([COFFEE], rate=0.5)
    data = shipped.encode([COFFEE], rate=1)
    with pytest.raises(FeatcodecError, match="made with other weights"):
        codec.decode(data)
    stream = tmp_path / "shipped.fcb"
    stream.write_bytes(data)
    assert main(["decode", str(stream), "--weights", str(codec.ladder.path)]) == 2
    assert "other weights" in capsys.readouterr().err


def test_variable_rate_settings_are_checked(tmp_path):
    with pytest.raises(TrainError, match="at least two lambdas"):
        TrainConfig("efficientnet_lite0", "stage5", [1.0], variable_rate=True).validate()
    config = TrainConfig("efficientnet_lite0", "stage5", [1.0, 2.0], steps=1, views=1, variable_rate=True)
    wrong = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                             entropy="hyperprior", rates=3)
    images = make_image_folder(tmp_path / "images", 2)
    with pytest.raises(TrainError, match="one rate per lambda"):
        train_ladder(config, images, tmp_path / "x.safetensors", wrong, cache_dir=tmp_path / "cache")


def test_scale_indexes_count_the_table_entries_below_each_scale():
    from featcodec.bottleneck import scale_table_indexes

    table = GainHyperpriorUnit.SCALE_TABLE.double()
    scales = torch.cat([table, table * (1 + 1e-15), table * (1 - 1e-15), torch.tensor([0.0, 0.11, 1e3]).double(),
                        torch.rand(501, dtype=torch.float64) * 70])
    expected = (scales.unsqueeze(-1) > table[:-1]).sum(-1).int()
    assert torch.equal(scale_table_indexes(scales.reshape(2, -1), table), expected.reshape(2, -1))


def test_coding_gains_are_kept_per_rate_until_the_gains_change():
    torch.manual_seed(0)
    unit = GainHyperpriorUnit(VARIABLE_BU)
    first = unit._coding_gains(1.5)
    assert unit._coding_gains(1.5) is first
    assert torch.equal(first.latent, unit.gains(1.5, torch.float64).latent)
    with torch.no_grad():
        unit.log_gains.add_(0.5)
    again = unit._coding_gains(1.5)
    assert again is not first and torch.equal(again.latent, unit.gains(1.5, torch.float64).latent)


def test_complexity_names_one_bu_for_every_rate(variable_ladder, capsys):
    assert main(["eval", "--complexity", "--weights", str(variable_ladder), "--rate", "1.5"]) == 0
    err = capsys.readouterr().err
    assert "BU at rate 1.5" in err and "ladder: one BU for rates 0..2," in err


def test_weights_decide_the_split_when_none_is_named(variable_ladder, tmp_path, capsys):
    assert Codec.load(weights=variable_ladder).split.name == "stage5"
    out = tmp_path / "a.fcb"
    assert main(["encode", str(COFFEE), "--weights", str(variable_ladder), "--rate", "1", "-o", str(out)]) == 0
    assert bitstream.read_stream(out.read_bytes())[0].split_id == Codec.load(weights=variable_ladder).split.id
    with pytest.raises(FeatcodecError, match="weights are for efficientnet_lite0/stage5, not efficientnet_lite0/stage3"):
        Codec.load(split="stage3", weights=variable_ladder)


def test_a_bu_made_in_inference_mode_codes():
    """Tensors made under torch.inference_mode have no version counter; the coding caches cope."""
    torch.manual_seed(0)
    with torch.inference_mode():
        unit = GainHyperpriorUnit(VARIABLE_BU).eval()
        unit.build_coding_tables()
        x = torch.randn(1, 192, 7, 7)
        coded = unit.compress(x, 1.0)
        rebuilt = unit.decompress(coded["strings"], coded["shape"], 1.0)["x_hat"]
    assert rebuilt.shape == x.shape and torch.isfinite(rebuilt).all()
