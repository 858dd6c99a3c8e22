"""rANS payload strings: CompressAI's coder, framed a few bytes tighter.

CompressAI's rANS coder writes whole 32-bit words and finishes each string by
flushing its 64-bit state, which lands at the start of the string (two
little-endian words). Two things here make a record smaller without changing
what is coded:

* :func:`encode_groups` codes several groups of symbols (for a hyperprior rung:
  z, then y) into one string with CompressAI's ``BufferedRansEncoder``, as
  CompressAI's own autoregressive models do, and a :class:`GroupDecoder` reads
  them back in the same order. One flushed state instead of one per group.
* :func:`trim_state` drops the zero top bytes (at most 3) of the state's high
  word; the string's length modulo 4 then says how many were dropped, and
  :func:`restore_state` puts them back before CompressAI decodes. A string whose
  length is a multiple of 4 (every string of bitstream 1.0) restores to itself.

CompressAI's decoder never checks where its buffer ends: a crafted string (with
a valid CRC) could lead it to read past the end. :func:`for_decoding` therefore
appends zero words, enough for what such a decode can read once it has run out
of real words (bounded below), so those reads stay in memory this module owns.
Decoding a valid string never reads them.
"""

from __future__ import annotations

import numpy as np
import torch

from .bitstream import BitstreamError
from .lazy_compressai import BufferedRansEncoder, EntropyModel, RansDecoder

STATE_BYTES = 8  # the flushed 64-bit rANS state at the start of every string
WORD_BYTES = 4
# Zero words a decode may read past the real ones. From CompressAI's decode loop: once the
# decoder reads only zeros, a symbol reads at most 2 words (one to advance, one bypass chunk,
# as the state decays to zero), and the state's leftover 64 bits can start one escape of at
# most 16 length chunks of 15 and so 255 value chunks, a word each: 2 per symbol plus 512 covers it.
GUARD_WORDS_PER_SYMBOL = 2
GUARD_WORDS = 512


def trim_state(string: bytes) -> bytes:
    """Drop the zero top bytes (up to 3) of the flushed state's high word from a CompressAI string."""
    if len(string) < STATE_BYTES or len(string) % WORD_BYTES:
        raise ValueError(f"not a CompressAI rANS string ({len(string)} bytes)")
    zeros = 0
    while zeros < WORD_BYTES - 1 and string[STATE_BYTES - 1 - zeros] == 0:
        zeros += 1
    return string[: STATE_BYTES - zeros] + string[STATE_BYTES:]


def restore_state(string: bytes) -> bytes:
    """Undo :func:`trim_state`: the CompressAI string again (unchanged when nothing was trimmed)."""
    zeros = -len(string) % WORD_BYTES
    if len(string) < STATE_BYTES - zeros:
        raise BitstreamError(f"corrupt stream: a {len(string)}-byte rANS payload is shorter than its state")
    return string[: STATE_BYTES - zeros] + bytes(zeros) + string[STATE_BYTES - zeros :]


def for_decoding(string: bytes, symbols: int) -> bytes:
    """The restored string with zero guard words after it, for decoding ``symbols`` symbols."""
    guard = GUARD_WORDS + GUARD_WORDS_PER_SYMBOL * symbols
    return restore_state(string) + bytes(WORD_BYTES * guard)


def _tensors_key(tensors) -> tuple:
    """Identifies the contents of ``tensors`` for a cache: storage and in-place version of each (an
    inference-mode tensor has no version counter; it cannot change outside inference mode)."""

    def version(tensor: torch.Tensor):
        try:
            return tensor._version
        except RuntimeError:
            return None

    return tuple((t.data_ptr(), version(t), tuple(t.shape)) for t in tensors)


def cached_until_changed(owner, name: str, tensors, make):
    """``make()``, kept in ``owner.__dict__[name]`` (outside any module's state: never saved) until
    ``tensors`` change."""
    key = _tensors_key(tensors)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, make())
        owner.__dict__[name] = cached
    return cached[1]


def coding_tables(model: EntropyModel) -> tuple[list, list, list]:
    """The quantized CDFs, their lengths and offsets, as CompressAI's coder takes them: converted once
    and kept on ``model`` until its tables change (the Gaussian table's conversion takes about 0.5 ms).

    Each CDF is cut to its length: CompressAI pads every row to the longest (787 values for a
    variable-rate BU's Gaussians), its coder reads no value past a row's length, and it converts
    every value it is given on each call, so the padding cost a stage2 record about 0.2 ms a side."""
    cdfs, lengths, offsets = model._quantized_cdf, model._cdf_length, model._offset

    def convert() -> tuple[list, list, list]:
        sizes = lengths.reshape(-1).int().tolist()
        return [row[:size] for row, size in zip(cdfs.tolist(), sizes)], sizes, offsets.reshape(-1).int().tolist()

    return cached_until_changed(model, "_coding_tables", (cdfs, lengths, offsets), convert)


def _tables_used(tables: tuple, indexes: torch.Tensor) -> tuple[tuple, list]:
    """Only the CDFs that ``indexes`` names, and the indexes renumbered into them.

    CompressAI's coder converts every CDF it is given on each call (64 x 787 values for a
    variable-rate BU's Gaussians): passing a record's own CDFs makes coding about three times
    faster, and the coded bits are the same, since each symbol still uses its own CDF."""
    cdfs, lengths, offsets = tables
    flat = indexes.reshape(-1).long()
    present = torch.bincount(flat, minlength=len(cdfs)) > 0  # a few times faster than torch.unique here
    used, local = present.nonzero().reshape(-1), (torch.cumsum(present, 0) - 1)[flat]
    picked = used.tolist()
    return ([cdfs[i] for i in picked], [lengths[i] for i in picked], [offsets[i] for i in picked]), local.int().tolist()


def encode_groups(groups: list[tuple[tuple, torch.Tensor, torch.Tensor]]) -> bytes:
    """One trimmed rANS string holding each ``(coding tables, symbols, CDF indexes)`` group in turn."""
    encoder = BufferedRansEncoder()
    for tables, symbols, indexes in groups:
        used, local = _tables_used(tables, indexes)
        encoder.encode_with_indexes(symbols.reshape(-1).int().tolist(), local, *used)
    return trim_state(encoder.flush())


class GroupDecoder:
    """Reads back, group by group and in order, a string that :func:`encode_groups` wrote
    (``symbols``: how many symbols all groups hold together)."""

    def __init__(self, string: bytes, symbols: int):
        self._decoder = RansDecoder()
        self._decoder.set_stream(for_decoding(string, symbols))

    def decode(self, tables: tuple, indexes: torch.Tensor) -> torch.Tensor:
        """The next group's symbols (int32, shaped like ``indexes``), coded with ``tables``
        (:func:`coding_tables` of its entropy model)."""
        used, local = _tables_used(tables, indexes)
        values = self._decoder.decode_stream(local, *used)
        # through numpy: about 2.5 times faster than torch.tensor on a list of Python ints
        return torch.from_numpy(np.array(values, dtype=np.int32)).reshape(indexes.shape)
