"""featcodec: a rate-distortion optimized codec for the intermediate tensors of split DNNs.

The Python API lives in :mod:`featcodec.codec` (``Codec.load``, ``Codec.encode``,
``Codec.decode``); it is not imported here so that the CLI starts without torch.
"""

__version__ = "0.1.0"
