import pytest
import torch

from conftest import COFFEE, make_image_folder
from featcodec.bottleneck import BottleneckConfig
from featcodec.bitstream import read_stream
from featcodec.codec import Codec
from featcodec.ladder import load_ladder
from featcodec.train import TrainConfig, TrainError, checkpoint_path, train_ladder

SMALL_BU = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16)
HUFFMAN_BU = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=6, stride=1, entropy="huffman")
HYPERPRIOR_BU = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=8, hidden_channels=16,
                                 entropy="hyperprior")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Eight generated images in nested folders, plus a file that is not an image."""
    root = make_image_folder(tmp_path_factory.mktemp("images"), 8, nested=True)
    (root / "readme.txt").write_text("not an image")
    return root


def tiny_config(**changes):
    values = dict(backbone="efficientnet_lite0", split="stage5", lambdas=[0.01, 10.0], distortion="mse",
                  steps=12, batch_size=4, views=1, checkpoint_every=5)
    values.update(changes)
    return TrainConfig(**values)


def test_tiny_training_run_writes_a_ladder_that_decodes(image_folder, tmp_path):
    out = tmp_path / "stage5.safetensors"
    events = []
    train_ladder(tiny_config(distortion="mse+kd", kd_weight=30.0), image_folder, out, SMALL_BU,
                 cache_dir=tmp_path / "cache", reporter=events.append)
    assert not checkpoint_path(out).exists()
    ladder = load_ladder(out)
    assert [r["lambda"] for r in ladder.rung_info] == [0.01, 10.0]
    # lambda alone does not say how hard a rung was pushed: the kd term's weight is recorded with it
    assert [r["kd_weight"] for r in ladder.rung_info] == [30.0, 30.0]
    assert ladder.extra["training"]["data"].startswith("8 images")
    train_events = [e for e in events if e["phase"] == "train"]
    assert {"bits", "mse", "kd", "loss"} <= set(train_events[-1])
    assert train_events[-1]["rung"] == 1 and train_events[-1]["step"] == 12
    codec = Codec.load("efficientnet_lite0", "stage5", weights=out)
    for rate in (0, 1):
        results = codec.decode(codec.encode([COFFEE], rate=rate))
        assert results[0].features.shape == (192, 7, 7)


@pytest.mark.parametrize(
    "schedule,bu",
    [({}, SMALL_BU), ({"pretrain_steps": 4, "warm_start": True}, SMALL_BU), ({"pretrain_steps": 4}, SMALL_BU),
     ({"pretrain_steps": 4}, HUFFMAN_BU), ({"pretrain_steps": 4}, HYPERPRIOR_BU)],
    ids=["plain", "warm-start", "pretrain", "huffman", "hyperprior"],
)
def test_resume_after_interruption_matches_uninterrupted_run(image_folder, tmp_path, schedule, bu):
    cache = tmp_path / "cache"

    def tiny(**changes):
        return tiny_config(**{**schedule, **changes})

    reference = train_ladder(tiny(), image_folder, tmp_path / "a.safetensors", bu, cache_dir=cache)

    class Killed(Exception):
        pass

    def interrupt(event):
        if event["phase"] == "train" and event["rung"] == 1 and event["step"] == 7:
            raise Killed

    out = tmp_path / "b.safetensors"
    with pytest.raises(Killed):
        train_ladder(tiny(), image_folder, out, bu, cache_dir=cache, reporter=interrupt)
    assert checkpoint_path(out).exists() and not out.exists()
    resumed = train_ladder(tiny(), image_folder, out, bu, cache_dir=cache, resume=True)
    for a, b in zip(reference.rungs, resumed.rungs):
        for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            # Weights agree to about 1e-8 (float rounding differs after a resume, as it did before the
            # sharded cache); the 16-bit CDF tables built from them may differ by a few counts of 65536.
            tolerance = 8 if key.endswith("_quantized_cdf") else 1e-6
            assert torch.allclose(va.float(), vb.float(), atol=tolerance), key
    with pytest.raises(Killed):
        train_ladder(tiny(), image_folder, out, bu, cache_dir=cache, reporter=interrupt)
    with pytest.raises(TrainError, match="other settings"):
        train_ladder(tiny(steps=13), image_folder, out, bu, cache_dir=cache, resume=True)


def test_larger_lambda_gives_more_bits_and_less_distortion(image_folder, tmp_path):
    from featcodec.train import bits_per_image, load_or_build_cache
    from featcodec.backbones import load_split_model

    config = tiny_config(lambdas=[0.001, 100.0], steps=60)
    ladder = train_ladder(config, image_folder, tmp_path / "l.safetensors", SMALL_BU, cache_dir=tmp_path / "c")
    model = load_split_model("efficientnet_lite0", "stage5")
    cache = load_or_build_cache(config, model, sorted(image_folder.rglob("*.png")), tmp_path / "c", "cpu")
    batch = cache.features(torch.arange(8)).float()
    measured = []
    with torch.no_grad():
        for unit in ladder.rungs:
            out = unit(batch)
            measured.append((bits_per_image(out["likelihoods"]["y"]).item(), torch.mean((out["x_hat"] - batch) ** 2).item()))
    (bits_low, mse_low), (bits_high, mse_high) = measured
    assert bits_high > bits_low
    assert mse_high < mse_low


@pytest.mark.parametrize(
    "changes,message",
    [({"lambdas": [1.0, -2.0]}, "positive"), ({"lambdas": []}, "at least one"), ({"distortion": "l1"}, "unknown distortion"),
     ({"mixup": -1.0}, "mixup"), ({"mixup": float("nan")}, "mixup"), ({"feature_mixup": -1.0}, "feature mixup"),
     ({"penultimate_weight": -1.0}, "penultimate"), ({"penultimate_weight": float("inf")}, "penultimate")],
)
def test_bad_training_settings(changes, message, image_folder, tmp_path):
    with pytest.raises(TrainError, match=message):
        train_ladder(tiny_config(**changes), image_folder, tmp_path / "x.safetensors", SMALL_BU)


def test_mixup_cache_blends_views_after_the_first(image_folder, tmp_path):
    from featcodec.backbones import load_split_model
    from featcodec.train import build_feature_cache, cache_key, list_images

    files = list_images(image_folder)
    model = load_split_model("efficientnet_lite0", "stage5").eval()

    def build(mixup):
        return build_feature_cache(model, "efficientnet_lite0", files, 2, 0, True, mixup=mixup)

    plain, mixed, again = build(0.0), build(1.0), build(1.0)
    n = len(files)
    assert torch.equal(mixed["features"][:n], plain["features"][:n])  # view 0 stays plain
    assert not torch.allclose(mixed["features"][n:].float(), plain["features"][n:].float(), atol=1e-2)
    assert torch.equal(mixed["features"], again["features"])  # seeded
    # the teacher saw the same blended view as the student's input
    with torch.no_grad():
        tail_logits = model.tail(mixed["features"][n:].float())
    assert torch.allclose(tail_logits, mixed["logits"][n:].float(), atol=0.1)
    assert cache_key(tiny_config(mixup=1.0), files, True) != cache_key(tiny_config(), files, True)


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainError, match="no images"):
        train_ladder(tiny_config(), tmp_path / "empty", tmp_path / "x.safetensors", SMALL_BU)
    with pytest.raises(TrainError, match="not found"):
        train_ladder(tiny_config(), tmp_path / "missing", tmp_path / "x.safetensors", SMALL_BU)


def test_train_cli_writes_a_ladder_and_reports_bad_settings(image_folder, tmp_path, capsys):
    from featcodec.cli import main

    out = tmp_path / "cli.safetensors"
    args = ["train", "--data", str(image_folder), "--split", "stage5", "--lambdas", "1,10", "--steps", "3",
            "--batch-size", "2", "--views", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c")]
    assert main(args) == 0, capsys.readouterr().err
    assert len(load_ladder(out).rungs) == 2
    assert "wrote 2-rung ladder" in capsys.readouterr().err
    assert main(args + ["--rounded-decoder-input"]) == 0, capsys.readouterr().err
    assert [info.get("decoder_input") for info in load_ladder(out).rung_info] == ["rounded", "rounded"]
    assert main(args + ["--penultimate-weight", "2"]) == 0
    assert "penultimate " in capsys.readouterr().err  # the term's value on the progress line
    assert [info["penultimate_weight"] for info in load_ladder(out).rung_info] == [2.0, 2.0]
    refined = tmp_path / "refined.safetensors"
    refine = ["--init-from", str(out), "--refine-blocks", "1", "--decoder-only", "--distortion", "kd"]
    assert main(args[:-4] + refine + ["--out", str(refined), "--cache-dir", str(tmp_path / "c")]) == 0
    assert load_ladder(refined).config.refine_blocks == 1
    capsys.readouterr()
    for bad, message in [
        (["--decoder-only"], "give --init-from"),
        (["--refine-blocks", "-1"], "--refine-blocks"),
        (["--lambdas", "1,-2"], "positive"),
        (["--lambdas", "1,x"], "comma-separated numbers"),
        (["--split", "stage9"], "unknown split"),
        (["--distortion", "l1"], "unknown distortion"),
        (["--mixup", "-0.5"], "--mixup"),
        (["--feature-mixup", "-0.5"], "--feature-mixup"),
        (["--penultimate-weight", "-1"], "--penultimate-weight"),
        (["--data", str(tmp_path / "nothing")], "not found"),
    ]:
        assert main(args + bad) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_init_from_continues_each_rung_of_a_ladder(image_folder, tmp_path):
    cache = tmp_path / "cache"
    first = tmp_path / "first.safetensors"
    train_ladder(tiny_config(steps=3), image_folder, first, SMALL_BU, cache_dir=cache)
    zero = tmp_path / "zero.safetensors"
    # 1 step at learning rate 0 changes nothing but the quantiles' aux step: g_a/g_s are rung k of `first`
    train_ladder(tiny_config(steps=1, learning_rate=0.0), image_folder, zero, cache_dir=cache, init_from=first)
    before, after = load_ladder(first), load_ladder(zero)
    assert after.config == SMALL_BU and [r["steps"] for r in after.rung_info] == [4, 4]
    for old, new in zip(before.rungs, after.rungs):
        for name, value in old.g_a.state_dict().items():
            assert torch.equal(value, new.g_a.state_dict()[name])
    assert after.extra["training"]["init_from"] == "first.safetensors"
    with pytest.raises(TrainError, match="rungs"):
        train_ladder(tiny_config(lambdas=[1.0]), image_folder, tmp_path / "x.safetensors", cache_dir=cache,
                     init_from=first)
    with pytest.raises(TrainError, match="BU config"):
        other = BottleneckConfig(in_channels=192, out_size=(7, 7), latent_channels=4, hidden_channels=16)
        train_ladder(tiny_config(), image_folder, tmp_path / "y.safetensors", other, cache_dir=cache, init_from=first)


def test_cache_key_follows_image_content_not_location(image_folder, tmp_path):
    import shutil

    from featcodec.train import cache_key, list_images

    copy = tmp_path / "copy"
    shutil.copytree(image_folder, copy)
    key = cache_key(tiny_config(), list_images(image_folder), True)
    assert cache_key(tiny_config(), list_images(copy), True) == key
    edited = list_images(copy)[3]
    edited.write_bytes(edited.read_bytes() + b"\0")
    assert cache_key(tiny_config(), list_images(copy), True) != key
    assert cache_key(tiny_config(views=2), list_images(image_folder), True) != key


def test_rounded_decoder_input_run_is_recorded_per_rung(image_folder, tmp_path):
    out = tmp_path / "r.safetensors"
    ladder = train_ladder(tiny_config(rounded_decoder_input=True, steps=4), image_folder, out, SMALL_BU,
                          cache_dir=tmp_path / "cache")
    assert [info.get("decoder_input") for info in load_ladder(out).rung_info] == ["rounded", "rounded"]
    plain = train_ladder(tiny_config(steps=4), image_folder, tmp_path / "p.safetensors", SMALL_BU,
                         cache_dir=tmp_path / "cache")
    assert "decoder_input" not in plain.rung_info[0] and "kd_weight" not in plain.rung_info[0]  # mse only
    # same seed and batches, so only the decoder's input differs between the two runs
    assert not torch.equal(ladder.rungs[0].g_s[0].weight, plain.rungs[0].g_s[0].weight)


@pytest.mark.parametrize("bu", [SMALL_BU, HYPERPRIOR_BU, HUFFMAN_BU], ids=["factorized", "hyperprior", "huffman"])
def test_decoder_only_run_adds_a_refiner_and_keeps_every_stream(image_folder, tmp_path, bu):
    from dataclasses import replace

    cache = tmp_path / "cache"
    first = tmp_path / "first.safetensors"
    train_ladder(tiny_config(steps=3, distortion="mse+kd"), image_folder, first, bu, cache_dir=cache)
    refined_out = tmp_path / "refined.safetensors"
    refined_bu = replace(bu, refine_blocks=1)
    # other views than the first run's: a Huffman code rebuilt from them would change the streams
    train_ladder(tiny_config(steps=4, distortion="kd", decoder_only=True, learning_rate=1e-2, views=2), image_folder,
                 refined_out, refined_bu, cache_dir=cache, init_from=first)
    before, after = load_ladder(first), load_ladder(refined_out)
    assert after.config == refined_bu
    assert [info["decoder_only_steps"] for info in after.rung_info] == [4, 4]
    assert [info["decoder_input"] for info in after.rung_info] == ["rounded", "rounded"]
    # the rate recipe is the start rung's: its lambda and distortion, not this run's
    assert [(info["lambda"], info["distortion"]) for info in after.rung_info] == [(0.01, "mse+kd"), (10.0, "mse+kd")]
    assert [info["steps"] for info in after.rung_info] == [7, 7]
    assert after.rung_info[0]["decoder_distortion"] == "kd"
    for old, new in zip(before.rungs, after.rungs):
        decoder_side = {id(p) for module in new.decoder_side_modules() for p in module.parameters()}
        new_state = new.state_dict()
        for name, value in old.state_dict().items():  # the encoder side, its buffers and tables stay
            changed = not torch.equal(value, new_state[name])
            assert not changed or name.startswith("g_s."), name
        assert any(not torch.equal(p, torch.zeros_like(p)) for p in new.g_r[0].project.parameters())
        assert len(decoder_side) == len(list(new.g_s.parameters())) + len(list(new.g_r.parameters()))
    old_codec = Codec.load("efficientnet_lite0", "stage5", weights=first)
    new_codec = Codec.load("efficientnet_lite0", "stage5", weights=refined_out)
    for rate in (0, 1):
        old_stream, new_stream = old_codec.encode([COFFEE], rate=rate), new_codec.encode([COFFEE], rate=rate)
        old_record, new_record = read_stream(old_stream)[0], read_stream(new_stream)[0]
        assert new_record.weights_tag != old_record.weights_tag  # the decoder must be the new one ...
        assert new_record.strings == old_record.strings  # ... but not a bit of the payload changes
        assert new_codec.decode(new_stream)[0].features.shape == (192, 7, 7)
    with pytest.raises(TrainError, match="--init-from"):
        train_ladder(tiny_config(decoder_only=True), image_folder, tmp_path / "x.safetensors", refined_bu,
                     cache_dir=cache)


def split_shape(backbone, split):
    from featcodec.backbones import get_backbone

    return get_backbone(backbone).split(split).shape


@pytest.mark.parametrize("backbone,split,width", [("efficientnet_lite0", "stage5", 1280), ("resnet50", "layer3.4", 2048)])
def test_penultimate_term_compares_the_features_the_classifier_sees(backbone, split, width):
    from featcodec.backbones import load_split_model
    from featcodec.train import distortion, tail_outputs

    torch.manual_seed(0)
    tail = load_split_model(backbone, split, random_init=backbone != "efficientnet_lite0").tail
    x = torch.randn(2, *split_shape(backbone, split))
    with torch.no_grad():
        logits, features = tail_outputs(tail, x)
        assert features.shape == (2, width)
        assert torch.allclose(logits, tail(x), atol=1e-5)
        last = [m for m in tail.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert torch.allclose(last(features), logits, atol=1e-4)
        teacher = tail(x)
    assert "penultimate" not in distortion("mse", x, x + 0.1, teacher, tail)
    assert distortion("mse", x, x.clone(), teacher, tail, penultimate_weight=5.0)["penultimate"].item() == 0.0
    x_hat = (x + 0.5 * torch.randn_like(x)).requires_grad_()
    terms = distortion("mse+kd", x, x_hat, teacher, tail, penultimate_weight=5.0)
    with torch.no_grad():
        expected = 5.0 * torch.mean((tail_outputs(tail, x_hat)[1] - features) ** 2)
    assert terms["penultimate"].item() == pytest.approx(expected.item(), rel=1e-4) and expected > 0
    assert terms["total"].item() == pytest.approx(sum(terms[k].item() for k in ("mse", "kd", "penultimate")), rel=1e-5)
    terms["penultimate"].backward()
    assert x_hat.grad.abs().sum() > 0
    # a run computes the targets once for the whole cache; they are the features above
    from featcodec.train import penultimate_targets

    assert torch.allclose(penultimate_targets(tail, x.split(1)), features, atol=1e-5)
    given = distortion("mse+kd", x, x_hat, teacher, tail, penultimate_weight=5.0, penultimate_target=features)
    assert given["penultimate"].item() == pytest.approx(terms["penultimate"].item(), rel=1e-5)
    with pytest.raises(TrainError, match="linear classifier"):
        tail_outputs(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()), x)


def test_penultimate_weight_trains_without_kd_and_is_recorded_per_rung(image_folder, tmp_path):
    events = []
    ladder = train_ladder(tiny_config(penultimate_weight=3.0, steps=4), image_folder, tmp_path / "p.safetensors",
                          SMALL_BU, cache_dir=tmp_path / "c", reporter=events.append)
    assert [info["penultimate_weight"] for info in ladder.rung_info] == [3.0, 3.0]
    last = [e for e in events if e["phase"] == "train"][-1]
    assert last["penultimate"] > 0 and "kd" not in last
    plain = train_ladder(tiny_config(steps=1), image_folder, tmp_path / "q.safetensors", SMALL_BU, cache_dir=tmp_path / "c")
    assert "penultimate_weight" not in plain.rung_info[0]


def test_feature_mixup_blends_within_the_batch_and_targets_the_blend():
    from featcodec.backbones import load_split_model
    from featcodec.train import blend_batch, tail_outputs

    tail = load_split_model("efficientnet_lite0", "stage5").eval().tail
    x = torch.randn(6, 192, 7, 7)
    blended, logits, penultimate = blend_batch(x, 1.0, torch.Generator().manual_seed(3), tail, True)
    again, _, _ = blend_batch(x, 1.0, torch.Generator().manual_seed(3), tail, True)
    other, _, _ = blend_batch(x, 1.0, torch.Generator().manual_seed(4), tail, True)
    assert torch.equal(blended, again) and not torch.equal(blended, other)  # seeded by the step's generator
    assert not torch.allclose(blended, x)
    # every blend is w * x[i] + (1 - w) * x[j] for one partner j and 0 <= w <= 1
    for i in range(6):
        fits = []
        for j in range(6):
            d = (x[i] - x[j]).flatten()
            w = 1.0 if j == i else float(((blended[i] - x[j]).flatten() @ d) / (d @ d))
            fits.append(0 <= w <= 1 and torch.allclose(blended[i], w * x[i] + (1 - w) * x[j], atol=1e-5))
        assert any(fits)
    with torch.no_grad():
        expected_logits, expected_penultimate = tail_outputs(tail, blended)
    assert torch.allclose(logits, expected_logits) and torch.allclose(penultimate, expected_penultimate)
    mse_only, none, _ = blend_batch(x, 1.0, torch.Generator().manual_seed(3), None, False)
    assert torch.equal(mse_only, blended) and none is None


def test_feature_mixup_run_is_recorded_and_differs_from_a_plain_run(image_folder, tmp_path):
    config = dict(distortion="mse+kd", kd_weight=3.0, penultimate_weight=3.0, steps=3)
    plain = train_ladder(tiny_config(**config), image_folder, tmp_path / "a.safetensors", SMALL_BU,
                         cache_dir=tmp_path / "c")
    mixed = train_ladder(tiny_config(feature_mixup=0.5, **config), image_folder, tmp_path / "b.safetensors", SMALL_BU,
                         cache_dir=tmp_path / "c")
    assert [info["feature_mixup"] for info in mixed.rung_info] == [0.5, 0.5]
    assert "feature_mixup" not in plain.rung_info[0]
    weights = [dict(ladder.rungs[0].named_parameters())["g_s.0.weight"] for ladder in (plain, mixed)]
    assert not torch.equal(*weights)
