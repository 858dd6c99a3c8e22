import pytest
import torch

from conftest import make_tiny_ladder
from featcodec.bottleneck import BottleneckConfig, BottleneckUnit, make_unit
from featcodec.ladder import LadderError, load_ladder, save_ladder, untrained_ladder


@pytest.mark.parametrize("shape,stride", [((80, 14, 14), 2), ((192, 7, 7), 2), ((40, 28, 28), 1)])
def test_decoded_latent_equals_quantized_latent(shape, stride):
    torch.manual_seed(0)
    config = BottleneckConfig(in_channels=shape[0], out_size=shape[1:], latent_channels=8, hidden_channels=16, stride=stride)
    unit = BottleneckUnit(config).eval()
    unit.update(force=True)
    x = torch.randn(3, *shape) * 4
    with torch.no_grad():
        coded = unit.compress(x)
        assert tuple(coded["shape"]) == unit.latent_shape()
        latent = unit.decompress_latent(coded["strings"], coded["shape"])
        assert torch.equal(latent, unit.quantized_latent(x))
        x_hat = unit.decompress(coded["strings"], coded["shape"])["x_hat"]
    assert x_hat.shape == x.shape
    assert len(coded["strings"][0]) == 3


def test_forward_gives_likelihoods_and_exact_shape():
    config = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16)
    out = BottleneckUnit(config)(torch.randn(2, 192, 7, 7))
    assert out["x_hat"].shape == (2, 192, 7, 7)
    assert out["likelihoods"]["y"].shape == (2, 8, 4, 4)


def test_ladder_round_trip_keeps_cdf_tables(tmp_path, monkeypatch):
    path = make_tiny_ladder("efficientnet_lite0", "stage3", tmp_path / "l.safetensors", lambdas=(1, 2, 3))
    original = load_ladder(path)

    def forbidden(*args, **kwargs):
        raise AssertionError("the decoder must not rebuild CDF tables")

    monkeypatch.setattr(BottleneckUnit, "update", forbidden)
    loaded = load_ladder(path)
    assert len(loaded.rungs) == 3
    assert loaded.config == original.config
    assert [r["lambda"] for r in loaded.rung_info] == [1, 2, 3]
    x = torch.randn(1, 80, 14, 14) * 3
    for a, b in zip(original.rungs, loaded.rungs):
        assert torch.equal(a.entropy_bottleneck._quantized_cdf, b.entropy_bottleneck._quantized_cdf)
        with torch.no_grad():
            assert a.compress(x)["strings"] == b.compress(x)["strings"]
    assert loaded.weights_tag == original.weights_tag and len(loaded.weights_tag) == 8


def test_ladder_file_errors(tmp_path):
    with pytest.raises(LadderError, match="not found"):
        load_ladder(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(LadderError, match="not a featcodec ladder"):
        load_ladder(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(LadderError, match="not a featcodec ladder"):
        load_ladder(plain)


@pytest.mark.parametrize("entropy", ["factorized", "huffman"])
def test_ladder_without_coding_tables_cannot_be_saved(tmp_path, entropy):
    config = BottleneckConfig(
        in_channels=80, out_size=(14, 14), latent_channels=8, hidden_channels=16, entropy=entropy
    )
    ladder = untrained_ladder("efficientnet_lite0", "stage3", config, [1.0])
    ladder.rungs[0] = make_unit(config)
    with pytest.raises(LadderError, match="no coding tables"):
        save_ladder(ladder, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("entropy", ["factorized", "hyperprior"])
def test_rounded_decoder_input_trains_g_s_on_what_the_coder_sends(entropy):
    config = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16, entropy=entropy)
    torch.manual_seed(0)
    unit = make_unit(config).train()
    x = 3 * torch.randn(2, 192, 7, 7)
    noisy = unit(x)
    rounded = unit(x, rounded_decoder_input=True)
    with torch.no_grad():
        sent = unit._synthesize(unit.quantized_latent(x))  # what decoding the stream gives
    assert torch.allclose(rounded["x_hat"], sent, atol=1e-5)
    assert not torch.allclose(noisy["x_hat"], sent, atol=1e-3)
    # the rate term is the same noisy estimate either way, and the gradient reaches g_a through the rounding
    assert rounded["bits"].shape == noisy["bits"].shape
    torch.mean((rounded["x_hat"] - x) ** 2).backward()
    assert unit.g_a[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("entropy", ["factorized", "hyperprior", "huffman"])
def test_new_refiner_blocks_pass_the_decoder_output_through(entropy):
    from dataclasses import replace

    from featcodec.bottleneck import BottleneckConfig, make_unit

    plain_config = BottleneckConfig(in_channels=24, out_size=(7, 7), latent_channels=6, hidden_channels=12,
                                    entropy=entropy)
    refined_config = replace(plain_config, refine_blocks=2)
    assert "refine_blocks" not in plain_config.to_dict()  # older ladders keep their bytes when re-saved
    assert BottleneckConfig.from_dict(refined_config.to_dict()) == refined_config
    torch.manual_seed(0)
    plain, refined = make_unit(plain_config).eval(), make_unit(refined_config).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("g_r.") for key in missing)
    x = torch.randn(2, 24, 7, 7)
    with torch.no_grad():
        assert torch.allclose(refined(x)["x_hat"], plain(x)["x_hat"])
        # a trained refiner changes the output; the refiner counts as decoder parameters
        refined.g_r[0].project.weight.add_(0.1)
        assert not torch.allclose(refined(x)["x_hat"], plain(x)["x_hat"])
    assert refined.g_r in refined.decoder_modules() and refined.g_r not in refined.encoder_modules()
    with pytest.raises(Exception, match="bad bottleneck config"):
        BottleneckConfig.from_dict({**refined_config.to_dict(), "refine_blocks": -1})
