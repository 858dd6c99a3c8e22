"""BUs with a scale hyperprior: coding, the float64 scale indexes, ladders, training and the codec."""

import zlib
from dataclasses import replace

import pytest
import torch

from conftest import COFFEE, make_image_folder
from featcodec import bitstream
from featcodec.bitstream import BitstreamError
from featcodec.bottleneck import BottleneckConfig, HyperpriorBottleneckUnit, make_unit
from featcodec.codec import Codec
from featcodec.errors import FeatcodecError
from featcodec.ladder import (LadderError, join_ladders, load_ladder, read_ladder_metadata, save_ladder,
                              untrained_ladder)
from featcodec.train import TrainConfig, TrainError, train_ladder

FACTORIZED = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16)
HYPERPRIOR = replace(FACTORIZED, entropy="hyperprior")


def coded_unit(config: BottleneckConfig, seed: int = 0) -> HyperpriorBottleneckUnit:
    torch.manual_seed(seed)
    unit = make_unit(config).eval()
    unit.build_coding_tables()
    return unit


@pytest.mark.parametrize("shape,stride,gain", [((80, 14, 14), 2, 4), ((192, 7, 7), 2, 4), ((40, 28, 28), 1, 4),
                                               ((24, 9, 5), 1, 4), ((80, 14, 14), 2, 3000)])
def test_decoded_latent_equals_quantized_latent(shape, stride, gain):
    """Also for latent values far outside the largest scale's CDF (g_a's output scaled by 3000), which
    the coder escapes."""
    config = BottleneckConfig(in_channels=shape[0], out_size=shape[1:], latent_channels=8, hidden_channels=16,
                              stride=stride, entropy="hyperprior")
    unit = coded_unit(config)
    x = torch.randn(3, *shape) * 4
    with torch.no_grad():
        unit.g_a[-1].weight.mul_(gain / 4)
    with torch.no_grad():
        coded = unit.compress(x)
        assert tuple(coded["shape"]) == unit.latent_shape()
        (strings,) = coded["strings"]  # z and y share one string per image
        assert len(strings) == 3
        latent = unit.decompress_latent(coded["strings"], coded["shape"])
        assert torch.equal(latent, unit.quantized_latent(x))
        if gain > 100:
            assert latent.abs().max() > 20 * unit.SCALE_TABLE.max()
        assert unit.decompress(coded["strings"], coded["shape"])["x_hat"].shape == x.shape
        # one image at a time gives the same strings as the batch
        single = unit.compress(x[1:2])["strings"]
        assert single == [[strings[1]]]


def test_wide_latent_with_1x1_ends_and_a_narrow_hyperprior_codes_exactly():
    """end_kernel 1 and hyper_channels: a wider latent for fewer parameters, coded like any hyperprior BU."""
    wide = replace(HYPERPRIOR, latent_channels=24, end_kernel=1, hyper_channels=4)
    unit = coded_unit(wide)
    assert unit.g_a[0].kernel_size == (1, 1) and unit.g_s[-1].kernel_size == (1, 1)
    assert unit.entropy_bottleneck.channels == 4 and unit.h_s[-2].out_channels == 24
    params = sum(p.numel() for p in unit.parameters())
    assert params < sum(p.numel() for p in make_unit(replace(HYPERPRIOR, latent_channels=24)).parameters())
    x = torch.randn(3, 192, 7, 7) * 4
    with torch.no_grad():
        coded = unit.compress(x)
        assert torch.equal(unit.decompress_latent(coded["strings"], coded["shape"]), unit.quantized_latent(x))
    assert BottleneckConfig.from_dict(wide.to_dict()) == wide
    # ladders written before these fields keep their metadata, and so their weights tags
    assert not {"end_kernel", "hyper_channels"} & set(HYPERPRIOR.to_dict())


@pytest.mark.parametrize("fields, message", [
    ({"end_kernel": 2}, "end_kernel must be 1 or 3"),
    ({"hyper_channels": -1}, "hyper_channels must be a whole number"),
    ({"hyper_channels": 4, "entropy": "factorized"}, "hyper_channels needs a hyperprior BU"),
    ({"end_kernel": 1, "entropy": "huffman"}, "not the huffman BU"),
])
def test_bad_layouts_are_named(fields, message):
    config = replace(HYPERPRIOR, **fields)
    assert message in config.layout_problem()
    with pytest.raises(FeatcodecError, match="bad bottleneck config in weights metadata"):
        BottleneckConfig.from_dict(config.to_dict())


def bitstream_1_0_strings(unit: HyperpriorBottleneckUnit, x: torch.Tensor) -> list:
    """The two strings per image that featcodec 1.0 wrote: y's and z's, each coded alone by CompressAI."""
    y = unit.g_a(x)
    z = unit.h_a(torch.abs(y - unit.latent_means))
    z_strings = unit.entropy_bottleneck.compress(z)
    z_hat = unit.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
    indexes = unit._scale_indexes(z_hat, tuple(y.shape[-2:]))
    return [unit.gaussian_conditional.compress(y, indexes, means=unit.latent_means), z_strings]


def test_records_of_bitstream_1_0_decode_to_the_same_latent_as_the_joint_string():
    unit = coded_unit(HYPERPRIOR, seed=4)
    x = torch.randn(3, 192, 7, 7) * 4
    with torch.no_grad():
        old = bitstream_1_0_strings(unit, x)
        new = unit.compress(x)["strings"]
        assert torch.equal(unit.decompress_latent(old, unit.latent_shape()), unit.quantized_latent(x))
        assert torch.equal(unit.decompress_latent(new, unit.latent_shape()), unit.quantized_latent(x))
    # the joint string saves the second flushed rANS state: at least 5 bytes per image here
    for image in range(3):
        assert len(new[0][image]) + 5 <= len(old[0][image]) + len(old[1][image])


def test_scale_indexes_agree_with_compressai_away_from_table_boundaries():
    unit = coded_unit(HYPERPRIOR)
    z_hat = torch.round(torch.randn(4, 8, 4, 4) * 3)
    shape = unit.latent_shape()
    ours = unit._scale_indexes(z_hat, shape)
    with torch.no_grad():
        scales = unit.h_s(z_hat)[..., : shape[0], : shape[1]]
    theirs = unit.gaussian_conditional.build_indexes(scales)
    assert ours.dtype == torch.int32 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)
    assert ours.unique().numel() > 1  # the test sees more than one scale


def test_hyperprior_training_pass_counts_the_bits_of_y_and_z():
    unit = make_unit(HYPERPRIOR)
    out = unit(torch.randn(2, 192, 7, 7))
    y, z = out["likelihoods"]["y"], out["likelihoods"]["z"]
    assert y.shape == (2, 8, 4, 4) and z.shape == (2, 8, 2, 2)
    expected = (-torch.log2(y).sum() - torch.log2(z).sum()) / 2
    assert torch.allclose(out["bits"], expected)
    out["bits"].backward()
    assert unit.h_a[0].weight.grad.abs().sum() > 0 and unit.h_s[0].weight.grad.abs().sum() > 0


def test_ladder_stores_both_cdf_tables_and_never_rebuilds_them(tmp_path, monkeypatch):
    path = tmp_path / "hyper.safetensors"
    ladder = untrained_ladder("efficientnet_lite0", "stage5", HYPERPRIOR, [1.0, 2.0])
    save_ladder(ladder, path)
    assert read_ladder_metadata(path)["bu"]["entropy"] == "hyperprior"
    assert "quant_step" not in read_ladder_metadata(path)["bu"]
    monkeypatch.setattr(HyperpriorBottleneckUnit, "update", lambda *a, **k: pytest.fail("tables rebuilt"))
    loaded = load_ladder(path)
    x = torch.randn(1, 192, 7, 7) * 3
    for a, b in zip(ladder.rungs, loaded.rungs):
        assert torch.equal(a.gaussian_conditional._quantized_cdf, b.gaussian_conditional._quantized_cdf)
        assert torch.equal(a.gaussian_conditional.scale_table, b.gaussian_conditional.scale_table)
        assert torch.allclose(b.gaussian_conditional.scale_table, HyperpriorBottleneckUnit.SCALE_TABLE)
        with torch.no_grad():
            assert a.compress(x)["strings"] == b.compress(x)["strings"]
    untrained = make_unit(HYPERPRIOR)
    assert not untrained.has_coding_tables()
    ladder.rungs[0] = untrained
    with pytest.raises(LadderError, match="no coding tables"):
        save_ladder(ladder, tmp_path / "x.safetensors")


def test_codec_round_trip_and_payload_string_count(tmp_path):
    path = tmp_path / "hyper.safetensors"
    save_ladder(untrained_ladder("efficientnet_lite0", "stage5", HYPERPRIOR, [1.0, 2.0]), path)
    codec = Codec.load("efficientnet_lite0", "stage5", weights=path)
    stream = codec.encode([COFFEE], rate=1)
    (parsed,) = bitstream.parse_stream(stream)
    assert len(parsed.record.strings) == 1 and parsed.version == "1.2"
    (decoded,) = codec.decode(stream)
    unit = codec.ladder.rung(1)
    x, _ = codec.preprocess(COFFEE)
    with torch.no_grad():
        split_tensor = codec.model.head(x.unsqueeze(0))
        expected = unit.decompress(unit.compress(split_tensor)["strings"], unit.latent_shape())["x_hat"][0]
        old_strings = tuple(strings[0] for strings in bitstream_1_0_strings(unit, split_tensor))
    assert torch.equal(decoded.features, expected)
    # a record as featcodec 1.0 wrote it (two strings, in a 1.0 stream) decodes to the same features
    old_body = bitstream.encode_record(replace(parsed.record, strings=old_strings))[:-4]
    old_preamble = bitstream.MAGIC + bytes([1, 0])
    old_stream = old_preamble + old_body + zlib.crc32(old_preamble + old_body).to_bytes(4, "big")
    assert len(old_stream) > len(stream)
    (old_decoded,) = codec.decode(old_stream)
    assert torch.equal(old_decoded.features, expected) and old_decoded.top(5) == decoded.top(5)
    three_strings = bitstream.write_stream([replace(parsed.record, strings=parsed.record.strings * 3)])
    with pytest.raises(BitstreamError, match="3 payload strings, expected 1 or 2"):
        codec.decode(three_strings)


def test_factorized_and_hyperprior_rungs_join_into_one_ladder(tmp_path):
    lower = untrained_ladder("efficientnet_lite0", "stage5", HYPERPRIOR, [1.0, 2.0])
    upper = untrained_ladder("efficientnet_lite0", "stage5", replace(FACTORIZED, stride=1), [8.0])
    path = tmp_path / "joined.safetensors"
    save_ladder(join_ladders(lower, upper), path)
    codec = Codec.load("efficientnet_lite0", "stage5", weights=path)
    for rate, strings in [(0, 1), (2, 1)]:
        (decoded,) = codec.decode(codec.encode([COFFEE], rate=rate))
        assert len(decoded.record.strings) == strings
    huffman = untrained_ladder("efficientnet_lite0", "stage5", replace(FACTORIZED, entropy="huffman"), [1.0])
    with pytest.raises(LadderError, match="huffman entropy coder"):
        join_ladders(lower, huffman)


def test_training_a_hyperprior_ladder(tmp_path):
    images = make_image_folder(tmp_path / "img", 4)
    cache = tmp_path / "cache"

    def config(**changes):
        values = dict(backbone="efficientnet_lite0", split="stage5", lambdas=[0.01, 10.0], distortion="mse",
                      steps=4, batch_size=2, views=1)
        return TrainConfig(**{**values, **changes})

    trained = train_ladder(config(distortion="mse+kd"), images, tmp_path / "h.safetensors", HYPERPRIOR, cache_dir=cache)
    assert all(isinstance(unit, HyperpriorBottleneckUnit) for unit in trained.rungs)
    codec = Codec.load("efficientnet_lite0", "stage5", weights=tmp_path / "h.safetensors")
    assert codec.decode(codec.encode([COFFEE], rate=1))[0].features.shape == (192, 7, 7)

    factorized = tmp_path / "f.safetensors"
    train_ladder(config(), images, factorized, FACTORIZED, cache_dir=cache)
    # --init-from must give the same kind of BU
    with pytest.raises(TrainError, match="BU config"):
        train_ladder(config(), images, tmp_path / "x.safetensors", FACTORIZED, cache_dir=cache,
                     init_from=tmp_path / "h.safetensors")
    with pytest.raises(TrainError, match="BU config"):
        train_ladder(config(), images, tmp_path / "x.safetensors", HYPERPRIOR, cache_dir=cache, init_from=factorized)


def test_train_cli_entropy_choice(tmp_path, capsys):
    from featcodec.cli import main

    images = make_image_folder(tmp_path / "img", 2)
    out = tmp_path / "cli.safetensors"
    base = ["train", "--data", str(images), "--split", "stage5", "--lambdas", "1", "--steps", "1", "--batch-size", "2",
            "--views", "1", "--latent-channels", "8", "--hidden-channels", "16", "--cache-dir", str(tmp_path / "c")]
    assert main(base + ["--out", str(out)]) == 0, capsys.readouterr().err
    assert load_ladder(out).config.entropy == "factorized"
    hyper = tmp_path / "hyper.safetensors"
    assert main(base + ["--out", str(hyper), "--entropy", "hyperprior"]) == 0
    assert load_ladder(hyper).config == replace(load_ladder(out).config, entropy="hyperprior")
    again = tmp_path / "again.safetensors"
    assert main(base + ["--out", str(again), "--init-from", str(hyper)]) == 0  # the ladder's own coder
    assert load_ladder(again).config.entropy == "hyperprior"
    capsys.readouterr()
    assert main(base + ["--entropy", "gaussian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown --entropy 'gaussian'" in err
    assert main(base + ["--out", str(tmp_path / "y.safetensors"), "--init-from", str(hyper), "--entropy", "factorized"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BU config" in err
    wide = tmp_path / "wide.safetensors"
    assert main(base + ["--out", str(wide), "--entropy", "hyperprior", "--end-kernel", "1", "--hyper-channels", "4"]) == 0
    assert load_ladder(wide).config == replace(load_ladder(hyper).config, end_kernel=1, hyper_channels=4)
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "z.safetensors"), "--end-kernel", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--end-kernel must be 1 or 3" in err
    assert not (tmp_path / "z.safetensors").exists()

