"""featcodec's own resize / crop / normalise give the bits of torchvision's, which it no longer imports."""

import pytest
import torch
from PIL import Image

from conftest import COFFEE
from featcodec.backbones import Preprocessing, get_backbone
from featcodec.images import ImageError, crop_image, load_image, normalise, preprocess


def _torchvision_preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    import torchvision.transforms.functional as TF

    resized = TF.resize(image, prep.resize, interpolation=TF.InterpolationMode.BILINEAR)
    return TF.normalize(TF.to_tensor(TF.center_crop(resized, prep.crop)), prep.mean, prep.std)


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 257), (257, 333), (256, 256), (225, 900), (1001, 999)])
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite2", "resnet50"])
def test_preprocess_equals_torchvision(size, backbone):
    prep = get_backbone(backbone).preprocessing
    image = load_image(COFFEE).resize(size, Image.BICUBIC)
    ours = preprocess(image, prep)
    assert ours.shape == (3, prep.crop, prep.crop)
    assert torch.equal(ours, _torchvision_preprocess(image, prep))


def test_crop_larger_than_resize_is_refused():
    with pytest.raises(ImageError, match="smaller than the crop"):
        crop_image(load_image(COFFEE), Preprocessing(resize=200, crop=224))


def test_normalise_of_a_grey_image_gives_three_channels():
    grey = Image.new("L", (8, 8), 128)
    assert normalise(grey, Preprocessing()).shape == (3, 8, 8)
