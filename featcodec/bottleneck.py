"""The bottleneck unit (BU): conv encoder, CompressAI entropy bottleneck, conv decoder.

A BU follows CompressAI's contract: ``forward(x)`` returns the reconstruction
and the latent likelihoods for training; ``compress(x)`` returns
``{"strings", "shape"}`` and ``decompress(strings, shape)`` rebuilds ``x``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from compressai.models import CompressionModel
from torch import nn

from .errors import FeatcodecError


@dataclass(frozen=True)
class BottleneckConfig:
    """Sizes of a BU; stored in the weights metadata so loading needs no config file."""

    in_channels: int  # channels of the split tensor
    out_size: tuple[int, int]  # (H, W) of the split tensor, restored exactly by g_s
    latent_channels: int = 32
    hidden_channels: int = 128
    stride: int = 2  # spatial downsampling of the latent: 1 or 2
    layers: int = 2  # conv layers in g_a (and in g_s)
    gdn: bool = True  # GDN / inverse GDN between layers, else ReLU

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["out_size"] = list(self.out_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BottleneckConfig":
        """Rebuild from :meth:`to_dict`; FeatcodecError on unknown or missing keys."""
        try:
            config = cls(**{**data, "out_size": tuple(data["out_size"])})
        except (TypeError, KeyError) as exc:
            raise FeatcodecError(f"bad bottleneck config in weights metadata: {exc}") from None
        if config.stride not in (1, 2) or config.layers < 2 or min(config.out_size) < 1:
            raise FeatcodecError(f"bad bottleneck config in weights metadata: {data}")
        return config


def _encoder(config: BottleneckConfig) -> nn.Sequential:
    widths = [config.in_channels] + [config.hidden_channels] * (config.layers - 1) + [config.latent_channels]
    modules: list[nn.Module] = []
    for index in range(config.layers):
        last = index == config.layers - 1
        stride = config.stride if last else 1
        modules.append(nn.Conv2d(widths[index], widths[index + 1], 3, stride=stride, padding=1))
        if not last:
            modules.append(GDN(widths[index + 1]) if config.gdn else nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


def _decoder(config: BottleneckConfig) -> nn.Sequential:
    widths = [config.latent_channels] + [config.hidden_channels] * (config.layers - 1) + [config.in_channels]
    modules: list[nn.Module] = []
    for index in range(config.layers):
        first, last = index == 0, index == config.layers - 1
        if first and config.stride > 1:
            modules.append(
                nn.ConvTranspose2d(
                    widths[0], widths[1], 3, stride=config.stride, padding=1, output_padding=config.stride - 1
                )
            )
        else:
            modules.append(nn.Conv2d(widths[index], widths[index + 1], 3, padding=1))
        if not last:
            modules.append(GDN(widths[index + 1], inverse=True) if config.gdn else nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


class BottleneckUnit(CompressionModel):
    """One rung of a rate ladder: ``g_a`` -> EntropyBottleneck -> ``g_s``."""

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        self.g_a = _encoder(config)
        self.entropy_bottleneck = EntropyBottleneck(config.latent_channels)
        self.g_s = _decoder(config)

    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the latent for a split tensor of ``config.out_size``."""
        height, width = self.config.out_size
        stride = self.config.stride
        return (height + stride - 1) // stride, (width + stride - 1) // stride

    def _synthesize(self, y_hat: torch.Tensor) -> torch.Tensor:
        height, width = self.config.out_size
        return self.g_s(y_hat)[..., :height, :width]

    def forward(self, x: torch.Tensor) -> dict:
        """Training pass: noisy latent, reconstruction and likelihoods."""
        y = self.g_a(x)
        y_hat, y_likelihoods = self.entropy_bottleneck(y)
        return {"x_hat": self._synthesize(y_hat), "likelihoods": {"y": y_likelihoods}}

    def quantized_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent as the entropy coder sees it: rounded around the medians."""
        y = self.g_a(x)
        medians = self.entropy_bottleneck._get_medians()
        return self.entropy_bottleneck.quantize(y, "dequantize", medians)

    def compress(self, x: torch.Tensor) -> dict:
        """Entropy-code a batch of split tensors: ``{"strings": [[bytes]*N], "shape": (h, w)}``."""
        y = self.g_a(x)
        strings = self.entropy_bottleneck.compress(y)
        return {"strings": [strings], "shape": tuple(y.shape[-2:])}

    def decompress_latent(self, strings: list, shape: tuple[int, int]) -> torch.Tensor:
        """Decode the quantized latent from its strings."""
        return self.entropy_bottleneck.decompress(strings[0], shape)

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        """Rebuild split tensors from ``compress`` output: ``{"x_hat": tensor}``."""
        y_hat = self.decompress_latent(strings, shape)
        return {"x_hat": self._synthesize(y_hat)}

    def has_cdf_tables(self) -> bool:
        """True once update() has built the quantized CDF tables used by the coder."""
        return self.entropy_bottleneck._quantized_cdf.numel() > 0
