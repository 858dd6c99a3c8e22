"""featcodec: a rate-distortion optimized codec for the intermediate tensors of split DNNs.

>>> from featcodec import Codec
>>> codec = Codec.load("efficientnet_lite0", "stage3")

``Codec``, ``decode``, ``iter_decode`` and ``DecodedImage`` live in :mod:`featcodec.codec`; they
are imported on first use, so that ``import featcodec`` (and the CLI's start) does not load torch.
"""

__version__ = "0.1.0"
__all__ = ["Codec", "DecodedImage", "decode", "iter_decode", "__version__"]

_API = {"Codec", "DecodedImage", "decode", "iter_decode"}


def __getattr__(name: str):
    if name in _API:
        from . import codec

        return getattr(codec, name)
    raise AttributeError(f"module 'featcodec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API))
