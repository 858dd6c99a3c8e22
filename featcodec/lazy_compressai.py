"""CompressAI's entropy models, GDN, straight-through rounding and rANS coder, without its package start-up.

``import compressai`` runs ``compressai/__init__.py``, which imports all of CompressAI: its
datasets and registry pull in torch_geometric and torchvision, its entropy models scipy.stats.
That is about 5 s on a 2-core machine, paid by every one-image ``encode`` or ``decode``, for
five small modules that featcodec uses (entropy_models, layers, ops, ans, _CXX).

So when CompressAI is not imported yet, ``compressai`` is registered as its package module
with ``__init__`` not run: a submodule asked for is imported alone, and any other name
(``compressai.__version__``, ``compressai.set_entropy_coder``, ...) runs the real ``__init__``
first, so code that uses CompressAI afterwards sees all of it. Until then the package answers
the two questions that building an entropy model asks (which coders exist and which is the
default) as CompressAI does without the optional range_coder: "ans". ``scipy.stats``, which
only building new Gaussian CDF tables uses, is imported on first use.

The FutureWarning that CompressAI's ``torch.jit.script`` decorators raise on import is
silenced here, and only that one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from types import ModuleType

_JIT_SCRIPT_WARNING = r".*torch\.jit\.script.*is deprecated"
_ENTROPY_CODER = "ans"


def _quietly(action):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_SCRIPT_WARNING, category=FutureWarning)
        return action()


def _register_bare_package() -> None:
    """Put ``compressai`` in sys.modules with its ``__init__`` deferred (see the module doc)."""
    spec = importlib.util.find_spec("compressai")
    package = importlib.util.module_from_spec(spec)

    def run_init() -> None:
        for name in ("__getattr__", "available_entropy_coders", "get_entropy_coder"):
            package.__dict__.pop(name, None)
        _quietly(lambda: spec.loader.exec_module(package))

    def __getattr__(name: str):
        if not name.startswith("__") and importlib.util.find_spec(f"compressai.{name}") is not None:
            return _quietly(lambda: importlib.import_module(f"compressai.{name}"))
        run_init()
        return getattr(package, name)

    package.__getattr__ = __getattr__
    package.available_entropy_coders = lambda: [_ENTROPY_CODER]
    package.get_entropy_coder = lambda: _ENTROPY_CODER
    sys.modules["compressai"] = package


def _defer_scipy_stats() -> None:
    """Register a stand-in for ``scipy.stats`` that imports the real module on first attribute use,
    unless it is imported already. (importlib's LazyLoader would not do: an ``import scipy.stats``
    statement reads the module's ``__spec__``, which makes LazyLoader load it.)"""
    if "scipy.stats" in sys.modules:
        return
    import scipy

    stand_in = ModuleType("scipy.stats")
    stand_in.__spec__ = importlib.util.find_spec("scipy.stats")

    def __getattr__(name: str):
        if sys.modules.get("scipy.stats") is stand_in:
            del sys.modules["scipy.stats"]
        return getattr(importlib.import_module("scipy.stats"), name)

    stand_in.__getattr__ = __getattr__
    sys.modules["scipy.stats"] = stand_in
    scipy.stats = stand_in


with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=_JIT_SCRIPT_WARNING, category=FutureWarning)
    if "compressai" not in sys.modules:
        _defer_scipy_stats()
        _register_bare_package()
    from compressai.ans import BufferedRansEncoder, RansDecoder  # noqa: E402
    from compressai.entropy_models.entropy_models import (  # noqa: E402
        EntropyBottleneck, EntropyModel, GaussianConditional,
    )
    from compressai.layers.gdn import GDN  # noqa: E402
    from compressai.ops import quantize_ste  # noqa: E402

ENTROPY_CODER = _ENTROPY_CODER
__all__ = ["BufferedRansEncoder", "RansDecoder", "EntropyBottleneck", "EntropyModel", "GaussianConditional", "GDN",
           "quantize_ste", "ENTROPY_CODER"]

