"""Cost report: parameters, MACs and milliseconds per image of each part of the split pipeline.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on one 224x224 image,
never by hand. Milliseconds are the median of several timed runs at batch 1 after a warm-up, on
whatever device and thread count the process has.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .bottleneck import BottleneckConfig
from .codec import Codec
from .ladder import Ladder, untrained_ladder


def parameter_count(*modules: nn.Module) -> int:
    """Total number of parameters of ``modules``."""
    return sum(p.numel() for module in modules for p in module.parameters())


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of one call of ``fn``, as torch's flop counter sees them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() // 2


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall milliseconds of ``fn`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def default_ladder(backbone: str, split: str | None, rungs: int = 1) -> Ladder:
    """A ladder of untrained BUs of the default size, for costing or timing a split that has no ladder."""
    from .backbones import get_backbone

    spec = get_backbone(backbone)
    point = spec.split(split or spec.default_split)
    channels, height, width = point.shape
    config = BottleneckConfig(in_channels=channels, out_size=(height, width))
    return untrained_ladder(spec.name, point.name, config, [float(k + 1) for k in range(rungs)])


@torch.no_grad()
def cost_report(codec: Codec, rate: int | None = None, repeats: int = 10, seed: int = 0) -> dict:
    """Parameters, MACs and ms/image (batch 1) of head, BU encoder, BU decoder and tail.

    The BU parts are those of rung ``rate`` (default: the top rung); the encoder's time includes
    entropy coding and the decoder's includes entropy decoding. Also gives the whole ladder's BU
    parameters as a percentage of the backbone's.
    """
    rate = codec.num_rates - 1 if rate is None else rate
    unit = codec.ladder.rung(rate)
    head, tail = codec.model.head, codec.model.tail
    generator = torch.Generator().manual_seed(seed)
    size = codec.spec.preprocessing.crop
    image = torch.randn(1, 3, size, size, generator=generator)
    split_tensor = head(image)
    compressed = unit.compress(split_tensor)
    rebuilt = unit.decompress(compressed["strings"], compressed["shape"])["x_hat"]

    parts = [
        ("head", parameter_count(head), count_macs(lambda: head(image)), lambda: head(image)),
        (
            "bu encoder",
            parameter_count(*unit.encoder_modules()),
            count_macs(lambda: unit.compress(split_tensor)),
            lambda: unit.compress(split_tensor),
        ),
        (
            "bu decoder",
            parameter_count(*unit.decoder_modules()),
            count_macs(lambda: unit.decompress(compressed["strings"], compressed["shape"])),
            lambda: unit.decompress(compressed["strings"], compressed["shape"]),
        ),
        ("tail", parameter_count(tail), count_macs(lambda: tail(rebuilt)), lambda: tail(rebuilt)),
    ]
    backbone_params = parameter_count(head, tail)
    ladder_params = parameter_count(*codec.ladder.rungs)
    return {
        "backbone": codec.spec.name,
        "split": codec.split.name,
        "rate": rate,
        "threads": torch.get_num_threads(),
        "parts": [
            {"part": name, "params": params, "macs": macs, "ms": median_ms(run, repeats)}
            for name, params, macs, run in parts
        ],
        "backbone_params": backbone_params,
        "ladder_rungs": codec.num_rates,
        "ladder_params": ladder_params,
        "ladder_percent_of_backbone": 100.0 * ladder_params / backbone_params,
    }
