"""Bottleneck units (BUs): conv encoder, entropy coder, conv decoder.

Three kinds, chosen by ``BottleneckConfig.entropy``:

``factorized`` (:class:`BottleneckUnit`, featcodec's own)
    conv/GDN encoder, CompressAI's EntropyBottleneck with rANS coding, conv decoder.
``hyperprior`` (:class:`HyperpriorBottleneckUnit`)
    the same encoder and decoder around a scale hyperprior (Balle et al. 2018): a
    side latent ``z`` (EntropyBottleneck) carries the scale of every latent value,
    which CompressAI's GaussianConditional codes with rANS; z and y share one
    payload string (bitstream 1.0 wrote two, which still decode).
``huffman`` (:class:`HuffmanBottleneckUnit`, the ``huffman-bu`` anchor)
    the seed paper's style: depthwise 3x3 conv, 1x1 channel-reducing conv with
    BN and ReLU, a uniform scalar quantizer (step ``quant_step``) with a
    straight-through gradient, and a static Huffman code built on training
    data; the decoder mirrors the encoder.

All follow CompressAI's contract: ``forward(x)`` returns the reconstruction
and a differentiable ``bits`` per image for training; ``compress(x)`` returns
``{"strings", "shape"}`` and ``decompress(strings, shape)`` rebuilds ``x``.
``PAYLOAD_STRING_COUNTS`` says how many strings a record of the kind may carry
(the first count is the one this version writes). rANS strings are framed by
:mod:`featcodec.rans`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import copy
import math

import numpy as np
import torch
from torch import nn

from . import huffman, rans
from .errors import FeatcodecError
from .lazy_compressai import ENTROPY_CODER, GDN, EntropyBottleneck, GaussianConditional, quantize_ste

ENTROPY_CODERS = ("factorized", "hyperprior", "huffman")


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
    entropy: str = "factorized"  # "factorized" (EntropyBottleneck + rANS), "hyperprior" or "huffman"
    quant_step: float = 1.0  # the huffman BU's quantizer step qp
    refine_blocks: int = 0  # residual blocks after g_s, on the decoder side only (0: none)
    rates: int = 0  # anchor rates of a variable-rate (gain-unit) hyperprior BU; 0: one fixed rate
    end_kernel: int = 3  # kernel of g_a's first and g_s's last conv (1: wide latents at few parameters)
    hyper_channels: int = 0  # channels of the hyperprior's z; 0: as many as the latent

    def to_dict(self) -> dict:
        """A JSON-ready dict. A factorized BU's dict leaves out the fields added after it (entropy,
        quant_step, refine_blocks), so that ladders written before they existed keep their bytes, and
        their weights tags, when re-saved; only a huffman BU records its quantizer step, and only a BU
        with a refiner its block count."""
        data = asdict(self)
        data["out_size"] = list(self.out_size)
        if self.entropy != "huffman":
            del data["quant_step"]
        if not self.refine_blocks:
            del data["refine_blocks"]
        if not self.rates:
            del data["rates"]
        if self.end_kernel == 3:
            del data["end_kernel"]
        if not self.hyper_channels:
            del data["hyper_channels"]
        if self.entropy == "factorized":
            del data["entropy"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "BottleneckConfig":
        """Rebuild from :meth:`to_dict`; FeatcodecError on unknown or missing keys."""
        try:
            config = cls(**{**data, "out_size": tuple(data["out_size"])})
        except (TypeError, KeyError) as exc:
            raise FeatcodecError(f"bad bottleneck config in weights metadata: {exc}") from None
        if (
            config.stride not in (1, 2)
            or config.layers < 2
            or min(config.out_size) < 1
            or config.entropy not in ENTROPY_CODERS
            or not isinstance(config.refine_blocks, int)
            or config.refine_blocks < 0
            or not (config.quant_step > 0 and math.isfinite(config.quant_step))
            or not isinstance(config.rates, int)
            or config.rates < 0
            or (config.rates and (config.rates < 2 or config.entropy != "hyperprior"))
            or config.layout_problem()
        ):
            raise FeatcodecError(f"bad bottleneck config in weights metadata: {data}")
        return config

    def layout_problem(self) -> str | None:
        """What is wrong with ``end_kernel`` or ``hyper_channels`` (set by a user), else None."""
        if type(self.end_kernel) is not int or self.end_kernel not in (1, 3):
            return f"end_kernel must be 1 or 3, got {self.end_kernel!r}"
        if type(self.hyper_channels) is not int or self.hyper_channels < 0:
            return f"hyper_channels must be a whole number >= 0, got {self.hyper_channels!r}"
        if self.end_kernel != 3 and self.entropy == "huffman":
            return "end_kernel applies to the conv BUs, not the huffman BU"
        if self.hyper_channels and self.entropy != "hyperprior":
            return "hyper_channels needs a hyperprior BU (--entropy hyperprior or --variable-rate)"
        return None


def bits_per_image(likelihoods: torch.Tensor) -> torch.Tensor:
    """Estimated bits per image from the entropy model's likelihoods, averaged over the batch."""
    return -torch.log2(likelihoods).sum() / likelihoods.shape[0]


def scale_table_indexes(scales: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per scale, the index of the first table entry at or above it (the top entry for larger ones):
    the count of the other entries strictly below it, found by binary search."""
    return torch.searchsorted(table[:-1].contiguous(), scales.contiguous()).to(torch.int32)


def _round_straight_through(y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``round(y - centres) + centres`` with the gradient of the identity."""
    return quantize_ste(y - centres) + centres


def _encoder(config: BottleneckConfig) -> nn.Sequential:
    widths = [config.in_channels] + [config.hidden_channels] * (config.layers - 1) + [config.latent_channels]
    modules: list[nn.Module] = []
    for index in range(config.layers):
        last = index == config.layers - 1
        stride = config.stride if last else 1
        kernel = config.end_kernel if index == 0 else 3
        modules.append(nn.Conv2d(widths[index], widths[index + 1], kernel, stride=stride, padding=kernel // 2))
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
            kernel = config.end_kernel if last else 3
            modules.append(nn.Conv2d(widths[index], widths[index + 1], kernel, padding=kernel // 2))
        if not last:
            modules.append(GDN(widths[index + 1], inverse=True) if config.gdn else nn.ReLU(inplace=True))
    return nn.Sequential(*modules)


class ResidualBlock(nn.Module):
    """``x + conv(relu(conv(x)))`` at the split tensor's width, through ``hidden`` channels. The second
    conv starts at zero, so a new block passes its input through unchanged."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.expand = nn.Conv2d(channels, hidden, 3, padding=1)
        self.project = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(torch.relu(self.expand(x)))


def _refiner(config: BottleneckConfig) -> nn.Sequential | None:
    """The decoder-side refiner: ``config.refine_blocks`` residual blocks after ``g_s`` (None for 0).

    It runs on the server only and changes no bit of the payload: a ladder's rung can gain one and
    be trained further with its encoder frozen (``featcodec train --decoder-only``)."""
    if not config.refine_blocks:
        return None
    return nn.Sequential(*(ResidualBlock(config.in_channels, config.hidden_channels) for _ in range(config.refine_blocks)))


class _EntropyCoded(nn.Module):
    """What a BU with CompressAI entropy models needs of CompressAI's CompressionModel (whose module
    would import the rest of CompressAI): the aux loss, building the CDF tables, and loading the
    tables, whose sizes the weights file decides."""

    _TABLES = ("_quantized_cdf", "_offset", "_cdf_length")

    def aux_loss(self) -> torch.Tensor:
        """The EntropyBottlenecks' quantile loss (the aux optimizer's)."""
        return sum(m.loss() for m in self.modules() if isinstance(m, EntropyBottleneck))

    def update(self, scale_table: torch.Tensor | None = None, force: bool = False) -> None:
        """Build the CDF tables of every entropy model (a GaussianConditional's from ``scale_table``)."""
        for module in self.modules():
            if isinstance(module, EntropyBottleneck):
                module.update(force=force)
            elif isinstance(module, GaussianConditional):
                module.update_scale_table(scale_table, force=force)

    def load_state_dict(self, state_dict, strict: bool = True):
        """nn.Module's, after sizing each entropy model's table buffers as ``state_dict`` has them."""
        for name, module in self.named_modules():
            if isinstance(module, (EntropyBottleneck, GaussianConditional)):
                tables = self._TABLES + (("scale_table",) if isinstance(module, GaussianConditional) else ())
                for table in tables:
                    stored = state_dict.get(f"{name}.{table}")
                    if stored is not None:
                        getattr(module, table).resize_(stored.shape)
        return super().load_state_dict(state_dict, strict=strict)


class _SplitTensorShape:
    """Latent and output geometry shared by all kinds of BU (``config``, ``g_s`` and ``g_r``, the
    refiner or None, come from the BU)."""

    def latent_shape(self) -> tuple[int, int]:
        """(h, w) of the latent for a split tensor of ``config.out_size``."""
        height, width = self.config.out_size
        stride = self.config.stride
        return (height + stride - 1) // stride, (width + stride - 1) // stride

    def synthesize(self, y_hat: torch.Tensor) -> torch.Tensor:
        """The BU decoder on a batch of decoded latents (``decompress_latent``'s): what ``decompress``
        runs after entropy decoding."""
        return self._synthesize(y_hat)

    def decoder_input(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Decoded latents as ``decoder.synthesize`` takes them (a fixed-rate BU: unchanged)."""
        return y_hat

    @property
    def decoder(self) -> "_SplitTensorShape":
        """The BU whose ``synthesize`` rebuilds ``decoder_input``'s latents: latents of one decoder
        may share a batch."""
        return self

    def _synthesize(self, y_hat: torch.Tensor) -> torch.Tensor:
        height, width = self.config.out_size
        x_hat = self.g_s(y_hat)[..., :height, :width]
        return x_hat if self.g_r is None else self.g_r(x_hat)

    def decoder_side_modules(self) -> list[nn.Module]:
        """The modules only the decoder runs: ``g_s`` and the refiner (what ``--decoder-only`` trains)."""
        return [self.g_s] + ([self.g_r] if self.g_r is not None else [])


class BottleneckUnit(_SplitTensorShape, _EntropyCoded):
    """One rung of a rate ladder: ``g_a`` -> EntropyBottleneck -> ``g_s``."""

    PAYLOAD_STRING_COUNTS = (1,)  # entropy-coded strings a record may carry

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        self.g_a = _encoder(config)
        self.entropy_bottleneck = EntropyBottleneck(config.latent_channels, entropy_coder=ENTROPY_CODER)
        self.g_s = _decoder(config)
        self.g_r = _refiner(config)

    def forward(self, x: torch.Tensor, rounded_decoder_input: bool = False) -> dict:
        """Training pass: noisy latent, reconstruction, likelihoods and estimated bits per image.

        The rate always comes from the noisy latent; with ``rounded_decoder_input`` the decoder
        sees the latent rounded around the medians as the coder sends it (straight-through
        gradient), not the noisy one.
        """
        y = self.g_a(x)
        y_hat, y_likelihoods = self.entropy_bottleneck(y)
        if rounded_decoder_input:
            y_hat = _round_straight_through(y, self.entropy_bottleneck._get_medians().detach())
        bits = bits_per_image(y_likelihoods)
        return {"x_hat": self._synthesize(y_hat), "likelihoods": {"y": y_likelihoods}, "bits": bits}

    def quantized_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent as the entropy coder sees it: rounded around the medians."""
        y = self.g_a(x)
        medians = self.entropy_bottleneck._get_medians()
        return self.entropy_bottleneck.quantize(y, "dequantize", medians)

    def compress(self, x: torch.Tensor) -> dict:
        """Entropy-code a batch of split tensors: ``{"strings": [[bytes]*N], "shape": (h, w)}``."""
        return self.compress_latent(self.g_a(x))

    def compress_latent(self, y: torch.Tensor) -> dict:
        """Entropy-code the latent ``g_a`` gave: the second half of :meth:`compress`."""
        strings = [rans.trim_state(string) for string in self.entropy_bottleneck.compress(y)]
        return {"strings": [strings], "shape": tuple(y.shape[-2:])}

    def decompress_latent(self, strings: list, shape: tuple[int, int]) -> torch.Tensor:
        """Decode the quantized latent from its strings."""
        symbols = self.config.latent_channels * shape[0] * shape[1]
        return self.entropy_bottleneck.decompress([rans.for_decoding(s, symbols) for s in strings[0]], shape)

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        """Rebuild split tensors from ``compress`` output: ``{"x_hat": tensor}``."""
        y_hat = self.decompress_latent(strings, shape)
        return {"x_hat": self._synthesize(y_hat)}

    def has_coding_tables(self) -> bool:
        """True once update() has built the quantized CDF tables used by the coder."""
        return self.entropy_bottleneck._quantized_cdf.numel() > 0

    def build_coding_tables(self, split_tensors: torch.Tensor | None = None) -> None:
        """Build the CDF tables from the learned entropy model (the data is not needed)."""
        self.update(force=True)

    def encoder_modules(self) -> list[nn.Module]:
        """The modules the encoder runs (for parameter counts)."""
        return [self.g_a, self.entropy_bottleneck]

    def decoder_modules(self) -> list[nn.Module]:
        """The modules whose parameters the decoder uses (the entropy model only as CDF tables)."""
        return self.decoder_side_modules()


class HyperpriorBottleneckUnit(_SplitTensorShape, _EntropyCoded):
    """A rung with a scale hyperprior: ``g_a`` -> y; ``h_a(|y - mean|)`` -> z (EntropyBottleneck);
    ``h_s(z_hat)`` -> the scale of each value of y, which a GaussianConditional codes; ``g_s``.

    The record carries one payload string, z's symbols then y's in one rANS stream, and the latent
    shape of y (z has half its size, rounded up); a record of bitstream 1.0 carries two strings,
    y's then z's, and decodes too. The decoder must derive exactly the encoder's scale indexes from z_hat,
    or y decodes wrongly; so when coding, ``h_s`` runs in float64 (relative rounding about 1e-16,
    against 1e-7 in float32), and an index could differ between CPUs or kernels only for a scale
    within that rounding of a scale-table boundary. Training runs ``h_s`` in float32.
    """

    PAYLOAD_STRING_COUNTS = (1, 2)  # one joint string; two (y, z) in bitstream 1.0

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        n, m = config.latent_channels, config.hyper_channels or config.latent_channels
        self.g_a = _encoder(config)
        self.h_a = nn.Sequential(nn.Conv2d(n, m, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(m, m, 3, stride=2, padding=1))
        self.h_s = nn.Sequential(
            nn.ConvTranspose2d(m, m, 3, stride=2, padding=1, output_padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(m, n, 3, padding=1),
            nn.Softplus(),
        )
        self.entropy_bottleneck = EntropyBottleneck(m, entropy_coder=ENTROPY_CODER)
        self.gaussian_conditional = GaussianConditional(None, entropy_coder=ENTROPY_CODER)
        self.latent_means = nn.Parameter(torch.zeros(1, n, 1, 1))  # y is coded as round(y - mean) + mean
        self.g_s = _decoder(config)
        self.g_r = _refiner(config)

    def side_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of z for a latent y of (h, w)."""
        return (shape[0] + 1) // 2, (shape[1] + 1) // 2

    def forward(self, x: torch.Tensor, rounded_decoder_input: bool = False) -> dict:
        """Training pass: noisy y and z, reconstruction, and the bits of both per image
        (``rounded_decoder_input`` as in :meth:`BottleneckUnit.forward`)."""
        return self._forward(x, rounded_decoder_input, None)

    def _forward(self, x: torch.Tensor, rounded_decoder_input: bool, gains: "Gains | None") -> dict:
        """:meth:`forward`, with y and z scaled by ``gains`` before they are coded (None: no gains)."""
        y, means = self._coded_latent(self.g_a(x), gains)
        z = self.h_a(torch.abs(y - means))
        z_hat, z_likelihoods = self.entropy_bottleneck(z if gains is None else z * gains.hyper)
        z_hat = z_hat if gains is None else z_hat * gains.hyper_inverse
        scales = self.h_s(z_hat)[..., : y.shape[-2], : y.shape[-1]]
        y_hat, y_likelihoods = self.gaussian_conditional(y, scales, means=means)
        if rounded_decoder_input:
            y_hat = _round_straight_through(y, means)
        bits = bits_per_image(y_likelihoods) + bits_per_image(z_likelihoods)
        x_hat = self._synthesize(y_hat if gains is None else y_hat * gains.latent_inverse)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}, "bits": bits}

    def _coded_latent(self, y: torch.Tensor, gains: "Gains | None") -> tuple[torch.Tensor, torch.Tensor]:
        """y as it is quantized, and the means it is rounded around: scaled by the latent gain if any."""
        if gains is None:
            return y, self.latent_means
        gain = gains.latent.to(y.dtype)
        return y * gain, self.latent_means * gain

    def quantized_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The latent y as the entropy coder sees it: rounded around the latent means."""
        return self.gaussian_conditional.quantize(self.g_a(x), "dequantize", self.latent_means)

    def _scale_indexes(self, z_hat: torch.Tensor, shape: tuple[int, int], gains: "Gains | None" = None) -> torch.Tensor:
        """The scale-table index of every value of y, from z_hat (z's inverse gain applied), in float64."""
        z_hat = z_hat.double() if gains is None else z_hat.double() * gains.hyper_inverse.double()
        scales = self._h_s_float64()(z_hat)[..., : shape[0], : shape[1]]
        table = self.gaussian_conditional.scale_table.double()
        scales = scales.clamp_min(float(self.gaussian_conditional.lower_bound_scale.bound))
        return scale_table_indexes(scales, table)

    def _h_s_float64(self) -> nn.Module:
        """A float64 copy of ``h_s`` for coding, remade when its parameters change.

        A copy rather than the shared module run with swapped parameters, so that several threads
        may code at once (``featcodec serve`` decodes in a pool of threads)."""
        return rans.cached_until_changed(  # outside the module tree: not a submodule
            self, "_h_s64", self.h_s.parameters(), lambda: copy.deepcopy(self.h_s).double().requires_grad_(False)
        )

    def compress(self, x: torch.Tensor) -> dict:
        """Entropy-code a batch: ``{"strings": [[one string per image]], "shape": (h, w) of y}``."""
        return self.compress_latent(self.g_a(x))

    def _side_medians(self) -> torch.Tensor:
        return self.entropy_bottleneck._get_medians().detach().reshape(1, -1, 1, 1)

    def compress_latent(self, y: torch.Tensor, gains: "Gains | None" = None) -> dict:
        """Entropy-code the latent ``g_a`` gave (z, then y, in one string per image): the second
        half of :meth:`compress`."""
        side, conditional = self.entropy_bottleneck, self.gaussian_conditional
        side_medians = self._side_medians()
        y, means = self._coded_latent(y, gains)
        z = self.h_a(torch.abs(y - means))
        z = z if gains is None else z * gains.hyper.to(z.dtype)
        z_symbols = side.quantize(z, "symbols", side_medians)
        z_indexes = side._build_indexes(z.size())
        z_hat = side.dequantize(z_symbols, side_medians)
        indexes = self._scale_indexes(z_hat, tuple(y.shape[-2:]), gains)
        y_symbols = conditional.quantize(y, "symbols", means)
        z_tables, y_tables = rans.coding_tables(side), rans.coding_tables(conditional)
        strings = [
            rans.encode_groups([(z_tables, z_symbols[i], z_indexes[i]), (y_tables, y_symbols[i], indexes[i])])
            for i in range(y.shape[0])
        ]
        return {"strings": [strings], "shape": tuple(y.shape[-2:])}

    def decompress_latent(self, strings: list, shape: tuple[int, int], gains: "Gains | None" = None) -> torch.Tensor:
        """Decode y from its strings: z first, then y with the scales z gives (with ``gains``: y as
        it was quantized, before the inverse gain)."""
        channels, side_shape = self.config.latent_channels, self.side_shape(shape)
        side_channels = self.config.hyper_channels or channels
        y_count, z_count = channels * shape[0] * shape[1], side_channels * side_shape[0] * side_shape[1]
        if len(strings) == 2:  # bitstream 1.0: y's strings, then z's, each coded alone
            z_strings = [rans.for_decoding(s, z_count) for s in strings[1]]
            z_hat = self.entropy_bottleneck.decompress(z_strings, side_shape)
            indexes = self._scale_indexes(z_hat, tuple(shape))
            means = self.latent_means.expand(indexes.shape)
            y_strings = [rans.for_decoding(s, y_count) for s in strings[0]]
            return self.gaussian_conditional.decompress(y_strings, indexes, dtype=z_hat.dtype, means=means)
        latents = []
        z_indexes = self.entropy_bottleneck._build_indexes((1, side_channels, *side_shape))
        side_medians = self._side_medians()
        z_tables, y_tables = rans.coding_tables(self.entropy_bottleneck), rans.coding_tables(self.gaussian_conditional)
        means = self.latent_means if gains is None else self.latent_means * gains.latent.to(self.latent_means.dtype)
        for string in strings[0]:
            decoder = rans.GroupDecoder(string, y_count + z_count)
            z_hat = self.entropy_bottleneck.dequantize(decoder.decode(z_tables, z_indexes), side_medians)
            indexes = self._scale_indexes(z_hat, tuple(shape), gains)
            y_symbols = decoder.decode(y_tables, indexes)
            latents.append(self.gaussian_conditional.dequantize(y_symbols, means))
        return torch.cat(latents)

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        """Rebuild split tensors from ``compress`` output: ``{"x_hat": tensor}``."""
        return {"x_hat": self._synthesize(self.decompress_latent(strings, shape))}

    def has_coding_tables(self) -> bool:
        """True once update() has built the CDF tables of z and the scale table's Gaussians."""
        return (
            self.entropy_bottleneck._quantized_cdf.numel() > 0
            and self.gaussian_conditional._quantized_cdf.numel() > 0
        )

    # 64 scales from CompressAI's lower bound 0.11 up to 32, not CompressAI's default 256: the
    # shipped hyperprior rungs predict scales of at most 8.1 on 512 training views (a larger scale
    # is coded with the top one, which costs bits, never correctness), and the table of CDFs,
    # which the coder converts on every call, shrinks from 64 x 3133 to 64 x 395 entries.
    SCALE_TABLE = torch.exp(torch.linspace(math.log(0.11), math.log(32.0), 64))

    def build_coding_tables(self, split_tensors: torch.Tensor | None = None) -> None:
        """Build the CDF tables of z and of the Gaussians of ``SCALE_TABLE`` (no data needed)."""
        self.update(scale_table=self.SCALE_TABLE, force=True)

    def encoder_modules(self) -> list[nn.Module]:
        """The modules the encoder runs (for parameter counts)."""
        return [self.g_a, self.h_a, self.entropy_bottleneck, self.h_s]

    def decoder_modules(self) -> list[nn.Module]:
        """The modules whose parameters the decoder uses (z's entropy model only as CDF tables)."""
        return [self.h_s, *self.decoder_side_modules()]


@dataclass(frozen=True)
class Gains:
    """Channel gains of one rate, each (1, C, 1, 1): y is quantized as ``y * latent`` and decoded as
    ``y_hat * latent_inverse``; z likewise with ``hyper`` and ``hyper_inverse``."""

    latent: torch.Tensor
    latent_inverse: torch.Tensor
    hyper: torch.Tensor
    hyper_inverse: torch.Tensor


class GainHyperpriorUnit(HyperpriorBottleneckUnit):
    """One BU for every rate: a scale-hyperprior BU with gain units (Cui et al., CVPR 2021).

    Anchor rate ``r`` (0 .. ``config.rates`` - 1) has a gain vector over the latent channels that
    scales y before quantization, and an inverse gain applied after; z has its own pair. A larger
    gain quantizes finer: more bits, less distortion. Between anchors the gains interpolate
    exponentially, so any real rate in [0, rates - 1] is a quantizer of its own; training draws
    the rate and its lambda per step. Gains are stored as logarithms, and computed in float64
    when coding, so that encoder and decoder derive the same scale indexes (see the parent).
    """

    PAYLOAD_STRING_COUNTS = (1,)
    # Gains stretch y's scales at high rates: a table up to 64, twice the fixed-rate BU's reach.
    SCALE_TABLE = torch.exp(torch.linspace(math.log(0.11), math.log(64.0), 64))

    def __init__(self, config: BottleneckConfig):
        super().__init__(config)
        n, m = config.latent_channels, config.hyper_channels or config.latent_channels
        spread = torch.linspace(math.log(0.25), math.log(2.0), config.rates).unsqueeze(1)  # finer with rate
        self.log_gains = nn.Parameter(spread.repeat(1, n))
        self.log_inverse_gains = nn.Parameter(-spread.repeat(1, n))
        self.log_hyper_gains = nn.Parameter(torch.zeros(config.rates, m))
        self.log_hyper_inverse_gains = nn.Parameter(torch.zeros(config.rates, m))

    @property
    def max_rate(self) -> float:
        return float(self.config.rates - 1)

    def gains(self, rate: float | torch.Tensor, dtype: torch.dtype = torch.float32) -> Gains:
        """The gains at ``rate``: exponential interpolation between the two anchors around it."""
        rate = torch.as_tensor(rate, dtype=torch.float64).clamp(0, self.max_rate)
        low = int(min(math.floor(float(rate)), self.config.rates - 2))
        weight = (rate - low).to(dtype)

        def at(log_values: torch.Tensor) -> torch.Tensor:
            pair = log_values[low : low + 2].to(dtype)
            return torch.exp((1 - weight) * pair[0] + weight * pair[1]).reshape(1, -1, 1, 1)

        return Gains(at(self.log_gains), at(self.log_inverse_gains), at(self.log_hyper_gains),
                     at(self.log_hyper_inverse_gains))

    def forward(self, x: torch.Tensor, rate: float = 0.0, rounded_decoder_input: bool = False) -> dict:
        """Training pass at ``rate`` (see :meth:`HyperpriorBottleneckUnit.forward`)."""
        return self._forward(x, rounded_decoder_input, self.gains(rate))

    def compress(self, x: torch.Tensor, rate: float = 0.0) -> dict:
        """Entropy-code a batch at ``rate``: ``{"strings": [[one string per image]], "shape": (h, w) of y}``."""
        return self.compress_latent(self.g_a(x), self._coding_gains(rate))

    def _coding_gains(self, rate: float) -> Gains:
        """The gains at ``rate`` in float64: z's inverse gain feeds the scale indexes, which encoder
        and decoder must derive alike. Kept per rate until the gains change (computing them costs
        more than a record's scale indexes)."""
        by_rate = rans.cached_until_changed(self, "_gains64", self._gain_parameters(), dict)
        gains = by_rate.get(float(rate))
        if gains is None:
            with torch.no_grad():
                gains = self.gains(rate, torch.float64)
            if len(by_rate) >= 1024:  # a sweep of many fractional rates: start over
                by_rate.clear()
            by_rate[float(rate)] = gains
        return gains

    def _gain_parameters(self) -> tuple[torch.Tensor, ...]:
        return (self.log_gains, self.log_inverse_gains, self.log_hyper_gains, self.log_hyper_inverse_gains)

    def decompress(self, strings: list, shape: tuple[int, int], rate: float = 0.0) -> dict:
        """Rebuild split tensors coded at ``rate``: ``{"x_hat": tensor}``."""
        gains = self._coding_gains(rate)
        y_hat = self.decompress_latent(strings, shape, gains)
        return {"x_hat": self._synthesize(y_hat * gains.latent_inverse.to(y_hat.dtype))}

    def at_rate(self, rate: float) -> "UnitAtRate":
        """This BU at one rate, with a fixed-rate BU's ``compress`` / ``decompress`` contract."""
        if not 0 <= rate <= self.max_rate:
            raise FeatcodecError(f"rate {rate:g} is outside this BU's range 0..{self.max_rate:g}")
        return UnitAtRate(self, rate)


class UnitAtRate:
    """A variable-rate BU fixed at one rate: what a ladder's rung is for the codec."""

    def __init__(self, unit: GainHyperpriorUnit, rate: float):
        self.unit, self.rate = unit, rate
        self.config = unit.config
        self.PAYLOAD_STRING_COUNTS = unit.PAYLOAD_STRING_COUNTS

    def latent_shape(self) -> tuple[int, int]:
        return self.unit.latent_shape()

    def compress(self, x: torch.Tensor) -> dict:
        return self.unit.compress(x, self.rate)

    def compress_latent(self, y: torch.Tensor) -> dict:
        return self.unit.compress_latent(y, self.unit._coding_gains(self.rate))

    def decompress_latent(self, strings: list, shape: tuple[int, int]) -> torch.Tensor:
        """The decoded latent as it was quantized (symbols plus means, at this rate's gain)."""
        return self.unit.decompress_latent(strings, shape, self.unit._coding_gains(self.rate))

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        return self.unit.decompress(strings, shape, self.rate)

    def synthesize(self, y_hat: torch.Tensor) -> torch.Tensor:
        """The BU decoder on decoded latents of this rate: the inverse gain, then ``g_s`` (and refiner)."""
        return self.decoder.synthesize(self.decoder_input(y_hat))

    def decoder_input(self, y_hat: torch.Tensor) -> torch.Tensor:
        """Decoded latents of this rate times its inverse gain: what ``g_s`` takes, the same for every rate."""
        return y_hat * self.unit._coding_gains(self.rate).latent_inverse.to(y_hat.dtype)

    @property
    def decoder(self) -> GainHyperpriorUnit:
        """The variable-rate BU itself: after ``decoder_input``, latents of every rate share its decoder."""
        return self.unit

    def __getattr__(self, name: str):  # modules and counts (encoder_modules, g_s, ...) are the unit's
        return getattr(self.unit, name)


class HuffmanBottleneckUnit(_SplitTensorShape, nn.Module):
    """The ``huffman-bu`` anchor: depthwise + 1x1 conv, uniform quantizer, static Huffman code."""

    ALPHABET = 256  # symbols 0..255: the quantized, non-negative latent is clamped to this range
    PAYLOAD_STRING_COUNTS = (1,)

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        channels, latent, stride = config.in_channels, config.latent_channels, config.stride
        self.g_a = nn.Sequential(
            nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels),
            nn.Conv2d(channels, latent, 1),
            nn.BatchNorm2d(latent),
            nn.ReLU(),
        )
        if stride > 1:
            spatial = nn.ConvTranspose2d(
                channels, channels, 3, stride=stride, padding=1, output_padding=stride - 1, groups=channels
            )
        else:
            spatial = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.g_s = nn.Sequential(nn.Conv2d(latent, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(), spatial)
        self.g_r = _refiner(config)
        self.register_buffer("code_lengths", torch.zeros(self.ALPHABET, dtype=torch.uint8))
        self._code = None  # the huffman.Code of code_lengths, built on first use

    def _symbols(self, y: torch.Tensor) -> torch.Tensor:
        return torch.round(y / self.config.quant_step).clamp(0, self.ALPHABET - 1)

    def forward(self, x: torch.Tensor, rounded_decoder_input: bool = True) -> dict:
        """Training pass: straight-through quantized latent, reconstruction, and a rate proxy.

        The decoder always sees the rounded latent here; ``rounded_decoder_input`` is accepted
        only so that every kind of BU trains through one call.

        The rate term (``bits``) is the latent's L1 norm in quantizer steps per image: a
        differentiable stand-in for the Huffman code length. Measured sizes always
        use the real code.
        """
        y = self.g_a(x)
        y_hat = y + (self._symbols(y) * self.config.quant_step - y).detach()
        bits = (y / self.config.quant_step).sum() / x.shape[0]
        return {"x_hat": self._synthesize(y_hat), "bits": bits}

    def quantized_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantized latent the decoder sees."""
        return self._symbols(self.g_a(x)) * self.config.quant_step

    @torch.no_grad()
    def symbol_counts(self, split_tensors: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """How often each symbol occurs in the latents of ``split_tensors`` (N, C, H, W)."""
        counts = torch.zeros(self.ALPHABET, dtype=torch.int64)
        device = next(self.parameters()).device
        for start in range(0, len(split_tensors), batch_size):
            batch = split_tensors[start : start + batch_size].float().to(device)
            symbols = self._symbols(self.g_a(batch)).long().flatten().cpu()
            counts += torch.bincount(symbols, minlength=self.ALPHABET)
        return counts

    def build_coding_tables(self, split_tensors: torch.Tensor | None = None) -> None:
        """Build the static Huffman code from the symbol counts of ``split_tensors``.

        Every symbol gets one count more than it was seen, so that symbols absent
        from the training data still have a (long) code. With no data, all
        symbols are equally likely.
        """
        counts = torch.ones(self.ALPHABET, dtype=torch.int64)
        if split_tensors is not None:
            counts += self.symbol_counts(split_tensors)
        self.code_lengths.copy_(torch.from_numpy(huffman.code_lengths(counts.numpy())))
        self._code = None

    def has_coding_tables(self) -> bool:
        """True once the Huffman code lengths are set and form a complete prefix code."""
        try:
            huffman.check_lengths(self.code_lengths.numpy())
        except huffman.HuffmanError:
            return False
        return True

    def encoder_modules(self) -> list[nn.Module]:
        """The modules the encoder runs (for parameter counts)."""
        return [self.g_a]

    def decoder_modules(self) -> list[nn.Module]:
        """The modules the decoder runs (for parameter counts)."""
        return self.decoder_side_modules()

    def _huffman_code(self) -> huffman.Code:
        if self._code is None:
            self._code = huffman.Code(self.code_lengths.cpu().numpy())
        return self._code

    def _load_from_state_dict(self, *args, **kwargs):
        self._code = None
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def compress(self, x: torch.Tensor) -> dict:
        """Huffman-code a batch of split tensors: ``{"strings": [[bytes]*N], "shape": (h, w)}``."""
        return self.compress_latent(self.g_a(x))

    @torch.no_grad()
    def compress_latent(self, y: torch.Tensor) -> dict:
        """Huffman-code the latent ``g_a`` gave: the second half of :meth:`compress`."""
        symbols = self._symbols(y).to(torch.int64).cpu().numpy()
        code = self._huffman_code()
        strings = [code.encode(item.ravel()) for item in symbols]
        return {"strings": [strings], "shape": tuple(symbols.shape[-2:])}

    @torch.no_grad()
    def decompress_latent(self, strings: list, shape: tuple[int, int]) -> torch.Tensor:
        """Decode the dequantized latent from its strings; FeatcodecError on a malformed payload."""
        height, width = shape
        count = self.config.latent_channels * height * width
        code = self._huffman_code()
        latents = [code.decode(data, count).astype(np.float32) for data in strings[0]]
        device = self.code_lengths.device
        y = torch.from_numpy(np.stack(latents)).to(device).reshape(-1, self.config.latent_channels, height, width)
        return y * self.config.quant_step

    def decompress(self, strings: list, shape: tuple[int, int]) -> dict:
        """Rebuild split tensors from ``compress`` output: ``{"x_hat": tensor}``."""
        return {"x_hat": self._synthesize(self.decompress_latent(strings, shape))}


def make_unit(config: BottleneckConfig) -> nn.Module:
    """A fresh BU of the kind ``config.entropy`` names."""
    if config.rates:
        return GainHyperpriorUnit(config)
    kinds = {"factorized": BottleneckUnit, "hyperprior": HyperpriorBottleneckUnit, "huffman": HuffmanBottleneckUnit}
    return kinds[config.entropy](config)
