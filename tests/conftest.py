"""Shared fixtures: small ladders built on the fly, and the shipped example photos."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COFFEE = EXAMPLES / "coffee.jpg"
CHELSEA = EXAMPLES / "chelsea.jpg"
ESPRESSO = 967  # ImageNet-1k label of "espresso"


def make_tiny_ladder(backbone: str, split: str, path: Path, lambdas=(0.5, 4.0), seed: int = 0) -> Path:
    """Save an untrained (randomly initialised) ladder with CDF tables for ``backbone``/``split``."""
    from featcodec.backbones import get_backbone
    from featcodec.bottleneck import BottleneckConfig
    from featcodec.ladder import save_ladder, untrained_ladder

    channels, height, width = get_backbone(backbone).split(split).shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width), latent_channels=8, hidden_channels=16)
    ladder = untrained_ladder(backbone, split, config, list(lambdas), seed=seed)
    save_ladder(ladder, path)
    return path


def make_image_folder(root: Path, count: int = 8, nested: bool = False, spread: int = 60) -> Path:
    """``count`` small generated images (a random flat colour plus noise) under ``root``, in two
    class folders when ``nested``."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"class{index % 2}" if nested else root
        folder.mkdir(exist_ok=True)
        base = rng.integers(0, 255, (1, 1, 3))
        noise = rng.integers(0, spread, (96, 128, 3))
        Image.fromarray((base + noise).clip(0, 255).astype("uint8")).save(folder / f"img{index}.png")
    return root


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder laid out like weights/, holding tiny ladders for every lite0 split."""
    root = tmp_path_factory.mktemp("weights")
    for split in ("stage2", "stage3", "stage5"):
        make_tiny_ladder("efficientnet_lite0", split, root / "efficientnet_lite0" / f"{split}.safetensors")
    return root


@pytest.fixture(scope="session")
def stage3_weights(weights_dir) -> Path:
    return weights_dir / "efficientnet_lite0" / "stage3.safetensors"


@pytest.fixture(scope="session")
def codec(stage3_weights):
    """The real EfficientNet-Lite0 cut at stage3, with a tiny untrained ladder."""
    from featcodec.codec import Codec

    return Codec.load("efficientnet_lite0", "stage3", weights=stage3_weights)


@pytest.fixture()
def generated_image(tmp_path) -> Path:
    """A small generated scene (gradient sky, a disc, a bar) saved as PNG."""
    import numpy as np
    from PIL import Image, ImageDraw

    height, width = 180, 260
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 120)], -1).astype("uint8")
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 40, 150, 130), fill=(230, 200, 40))
    draw.rectangle((170, 20, 200, 160), fill=(30, 60, 200))
    path = tmp_path / "scene.png"
    image.save(path)
    return path
