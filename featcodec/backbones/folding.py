"""Batch norms folded into the convolutions before them, for a frozen tail that only infers.

``featcodec serve`` decodes with folded tails: one convolution with a bias costs less
than a convolution and a batch norm (docs/serve.md). The graph is traced with
``torch.fx`` so that only a batch norm whose input is a convolution's output, used
nowhere else, is folded; torch's ``fuse_conv_bn_eval`` computes the new weights.
"""

from __future__ import annotations

import copy
from collections import Counter

from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .efficientnet_lite import BatchNormAct2d, Conv2dSame

# convolutions whose forward uses their weights as they are (not, say, a weight-standardized conv)
FOLDABLE_CONVS = (nn.Conv2d, Conv2dSame)


class _LeafTracer(fx.Tracer):
    """Keeps every convolution and batch norm one call (a conv with SAME padding cannot be traced inside)."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(module, name)


def _what_remains(norm: nn.Module) -> nn.Module | None:
    """What a batch norm leaves behind once folded (its activation), or None if it cannot be folded."""
    if norm.training or norm.running_mean is None or norm.running_var is None:
        return None
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm) is BatchNormAct2d:
        return norm.act
    return None  # a subclass whose forward we do not know


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (eval mode) with its convolution-batch norm pairs folded; ``module`` itself
    if fx cannot trace it or it holds no such pair."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # noqa: BLE001  control flow fx cannot follow: keep the module as it is
        return module
    folded = fx.GraphModule(copy.deepcopy(module), graph, class_name=type(module).__name__)
    submodules = dict(folded.named_modules())
    calls = Counter(node.target for node in folded.graph.nodes if node.op == "call_module")
    changed = False
    for node in list(folded.graph.nodes):
        if node.op != "call_module" or not isinstance(submodules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        if calls[source.target] != 1 or calls[node.target] != 1:  # a layer called twice keeps its weights
            continue
        conv, norm = submodules[source.target], submodules[node.target]
        remains = _what_remains(norm)
        if type(conv) not in FOLDABLE_CONVS or conv.training or remains is None:
            continue
        folded.set_submodule(source.target, fuse_conv_bn_eval(conv, norm))
        folded.set_submodule(node.target, remains)
        changed = True
    if not changed:
        return module
    folded.recompile()
    return folded
