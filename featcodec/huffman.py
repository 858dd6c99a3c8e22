"""A static, canonical Huffman code over small non-negative integers (the ``huffman-bu`` coder).

The code is described by one code length per symbol (0 = symbol never coded),
built once from symbol counts on training data and stored with the weights.
Codes are canonical, so the lengths alone define them. A payload is the codes
of all symbols, most significant bit first, padded with zero bits to a whole
byte. No kept library offers a Huffman coder for numpy arrays, so this module
is written by hand: encoding is vectorised with numpy, decoding walks the bits
with a lookup table indexed by the next ``max_length`` bits.
"""

from __future__ import annotations

import heapq
from fractions import Fraction

import numpy as np

from .errors import FeatcodecError

MAX_CODE_LENGTH = 16


class HuffmanError(FeatcodecError):
    """A payload or code table that is not valid Huffman data."""


def code_lengths(counts, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8) for symbol ``counts``, every length at most ``max_length``.

    Symbols with a zero count get no code (length 0). Where the optimal code is
    too long, the counts are halved (rounding up) until it fits: a standard,
    slightly suboptimal way to limit code lengths.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise HuffmanError("symbol counts must be a 1-D array of non-negative integers")
    used = np.flatnonzero(counts)
    if used.size == 0:
        raise HuffmanError("no symbol has a non-zero count")
    if used.size > 1 << max_length:
        raise HuffmanError(f"{used.size} symbols cannot have codes of at most {max_length} bits")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    weights = counts[used]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree over ``weights`` (ties broken by symbol order, so deterministic)."""
    heap = [(int(weight), index, [index]) for index, weight in enumerate(weights)]
    heapq.heapify(heap)
    depth = np.zeros(len(weights), dtype=np.int64)
    order = len(weights)
    while len(heap) > 1:
        weight_a, _, leaves_a = heapq.heappop(heap)
        weight_b, _, leaves_b = heapq.heappop(heap)
        depth[leaves_a] += 1
        depth[leaves_b] += 1
        heapq.heappush(heap, (weight_a + weight_b, order, leaves_a + leaves_b))
        order += 1
    return depth


def check_lengths(lengths) -> np.ndarray:
    """The lengths as uint8 if they form a complete prefix code; HuffmanError otherwise."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or lengths.size == 0:
        raise HuffmanError("code lengths must be a non-empty 1-D array")
    if (lengths < 0).any() or (lengths > MAX_CODE_LENGTH).any():
        raise HuffmanError(f"code lengths must lie in 0..{MAX_CODE_LENGTH}")
    used = lengths[lengths > 0].astype(np.int64)
    kraft = sum((Fraction(1, 1 << int(n)) for n in used), Fraction(0))
    if used.size == 1 and used[0] == 1:
        return lengths.astype(np.uint8)  # one symbol: the code "0" alone
    if kraft != 1:
        raise HuffmanError(f"code lengths do not form a complete prefix code (Kraft sum {float(kraft):.4f})")
    return lengths.astype(np.uint8)


def canonical_codes(lengths) -> np.ndarray:
    """The canonical code (uint32) of each symbol: shorter codes first, then by symbol."""
    lengths = check_lengths(lengths)
    codes = np.zeros(lengths.size, dtype=np.uint32)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        previous = int(lengths[symbol])
        codes[symbol] = code
        code += 1
    return codes


def encode(symbols, lengths) -> bytes:
    """The payload for ``symbols`` (integers indexing ``lengths``); HuffmanError for a symbol with no code."""
    lengths = check_lengths(lengths)
    return _encode(symbols, lengths, canonical_codes(lengths))


def _encode(symbols, lengths: np.ndarray, codes: np.ndarray) -> bytes:
    """:func:`encode` with the lengths already checked and their canonical codes at hand."""
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size == 0:
        return b""
    if symbols.min() < 0 or symbols.max() >= lengths.size or (lengths[symbols] == 0).any():
        raise HuffmanError("a symbol has no Huffman code")
    codes = codes.astype(np.int64)[symbols]
    sizes = lengths[symbols].astype(np.int64)
    owner = np.repeat(np.arange(symbols.size), sizes)  # which symbol each output bit belongs to
    starts = np.cumsum(sizes) - sizes
    bit_in_code = np.arange(owner.size) - starts[owner]
    bits = (codes[owner] >> (sizes[owner] - 1 - bit_in_code)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


class Code:
    """One code's lengths, checked once, with its canonical codes and decoding table: what a BU keeps."""

    def __init__(self, lengths):
        self.lengths = check_lengths(lengths)
        self.codes = canonical_codes(self.lengths)
        self.table = decoding_table(self.lengths)

    def encode(self, symbols) -> bytes:
        """The payload for ``symbols``."""
        return _encode(symbols, self.lengths, self.codes)

    def decode(self, data: bytes, count: int) -> np.ndarray:
        """``count`` symbols from a payload."""
        return decode(data, self.table, count)


def decoding_table(lengths) -> tuple[list[int], list[int], int]:
    """(symbol, code length) for every value of the next ``width`` bits, and ``width``."""
    lengths = check_lengths(lengths)
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    table_symbol = np.zeros(1 << width, dtype=np.int64)
    table_length = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        size = int(lengths[symbol])
        first = int(codes[symbol]) << (width - size)
        table_symbol[first : first + (1 << (width - size))] = symbol
        table_length[first : first + (1 << (width - size))] = size
    return table_symbol.tolist(), table_length.tolist(), width


def decode(data: bytes, table: tuple[list[int], list[int], int], count: int) -> np.ndarray:
    """``count`` symbols from a payload; HuffmanError if it is too short, too long or malformed."""
    table_symbol, table_length, width = table
    if len(data) > (count * width + 7) // 8:  # also bounds the memory below by the symbol count
        raise HuffmanError(f"payload of {len(data)} bytes is longer than {count} symbols can be")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    total = bits.size
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint8)]).astype(np.int32)
    window = np.zeros(total + 1, dtype=np.int32)  # the next `width` bits at every position
    for offset in range(width):
        window = (window << 1) | padded[offset : offset + total + 1]
    window_values = window.tolist()
    out = [0] * count
    position = 0
    for index in range(count):
        if position >= total:
            raise HuffmanError(f"payload ends after {index} of {count} symbols")
        value = window_values[position]
        length = table_length[value]
        if length == 0:
            raise HuffmanError("payload holds a bit pattern that is no code")
        out[index] = table_symbol[value]
        position += length
    if position > total:
        raise HuffmanError(f"payload ends inside symbol {count - 1}")
    if total - position >= 8 or bits[position:].any():
        raise HuffmanError("payload has bytes or bits after its last symbol")
    return np.asarray(out, dtype=np.int64)
