"""Reading images and turning them into a backbone's input tensor."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .backbones import Preprocessing
from .errors import FeatcodecError

MAX_IMAGE_PIXELS = 1 << 28  # refuse decompression bombs above ~268 MP


class ImageError(FeatcodecError):
    """A file that is missing or cannot be decoded as an image."""


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open a path or raw bytes as an RGB PIL image; ImageError on failure."""
    label = name or (str(source) if not isinstance(source, bytes) else "<stdin>")
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{label}: no image data")
        stream: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{label}: no such file")
        if not path.is_file():
            raise ImageError(f"{label}: not a file")
        stream = str(path)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(stream) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageError(f"{label}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{label}: cannot decode image ({exc})") from None


def crop_image(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side and centre-crop: the (crop x crop) RGB image the model sees, before normalising."""
    import torchvision.transforms.functional as TF

    resized = TF.resize(image, prep.resize, interpolation=TF.InterpolationMode.BILINEAR)
    return TF.center_crop(resized, prep.crop)


def normalise(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Scale an RGB image to [0, 1] and normalise with the backbone's mean and std: a (3, H, W) tensor."""
    import torchvision.transforms.functional as TF

    return TF.normalize(TF.to_tensor(image), prep.mean, prep.std)


def preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the short side, centre-crop and normalise: a (3, crop, crop) float tensor."""
    return normalise(crop_image(image, prep), prep)
