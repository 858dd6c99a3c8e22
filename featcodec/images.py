"""Reading images and turning them into a backbone's input tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
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


# The two functions below give the bits of torchvision's resize / center_crop / to_tensor / normalize
# on a PIL image (tests/test_images.py compares them), without importing torchvision: about 2 s that
# every one-image encode would pay.


def crop_image(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side (bilinear, antialiased) and centre-crop: the (crop x crop) RGB image the
    model sees, before normalising."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    size = (new_short, new_long) if width <= height else (new_long, new_short)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    width, height = image.size
    if prep.crop > min(width, height):
        raise ImageError(f"resize {prep.resize} is smaller than the crop {prep.crop}")
    top, left = int(round((height - prep.crop) / 2.0)), int(round((width - prep.crop) / 2.0))
    return image.crop((left, top, left + prep.crop, top + prep.crop))


def normalise(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Scale an RGB image to [0, 1] and normalise with the backbone's mean and std: a (3, H, W) tensor."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))
    tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    mean = torch.as_tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)


def preprocess(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """Resize the short side, centre-crop and normalise: a (3, crop, crop) float tensor."""
    return normalise(crop_image(image, prep), prep)
