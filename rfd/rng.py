"""Counter-based random numbers keyed by (seed, image, query): randomness that packing cannot move.

rfd packs queries of many images, attacks and defenses into shared forward batches, and splits
images across processes. With a stateful generator, an image's noise would then depend on which
rows happened to share its forward. Here every random number is a pure function of a 64-bit key
and its position: the key is derived from the seed, the image's dataset index, the query number
and a named stream, so an image gets the same draws whatever batch size, packing or number of
devices is used.

The hash is splitmix64 (Steele, Lea, Flood 2014; the finalizer of Java's SplittableRandom), applied
to ``key + (i + 1) * golden`` for element ``i``: a counter-based generator that passes BigCrush. It
is written with int64 tensor arithmetic (multiplication wraps modulo 2^64 on CPU and CUDA), so it
runs vectorized on any device: one hash per element, no Python loop over rows.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

_MASK = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _MASK
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_TWO_PI = 2.0 * math.pi
_U24 = 2.0**-24
_TWO_PI_U24 = _TWO_PI * _U24  # float32(2pi * 2^-24) == float32(2pi) * 2^-24 exactly


def _shr(x: Tensor, s: int, bits: int = 64) -> Tensor:
    """The ``bits`` bits above the lowest ``s`` of int64 ``x``, as a non-negative int64: a logical
    right shift (torch's ``>>`` is arithmetic: it would copy the sign bit), masked."""
    if _numpy_words(x):
        return torch.from_numpy(_shr_np(x, s, bits).view(np.int64))
    t = x >> s
    t &= (1 << min(bits, 64 - s)) - 1
    return t


def _numpy_words(x: Tensor) -> bool:
    """Whether ``x``'s words go through numpy: CPU tensors with at least one dimension (numpy
    hands back a scalar, not an array, for a 0-dim one)."""
    return x.device.type == "cpu" and x.dim() > 0


def _u64(x: Tensor) -> np.ndarray:
    """The words of a CPU int64 tensor as a uint64 array sharing its memory."""
    return x.numpy().view(np.uint64)


def _shr_np(x: Tensor, s: int, bits: int) -> np.ndarray:
    """:func:`_shr` as a uint64 array: numpy shifts logically, so a field that reaches the top
    bit needs no mask."""
    t = np.right_shift(_u64(x), np.uint64(s))
    if bits < 64 - s:
        t &= np.uint64((1 << bits) - 1)
    return t


_NP_M1, _NP_M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_NP_SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


def _mix_(x: Tensor) -> Tensor:
    """splitmix64's finalizer, in place on ``x`` (a fresh tensor the caller gives up): in-place
    int64 ops save an allocation and a memory pass each on the engine's hottest path.

    On CPU the words go through numpy as uint64 (the same bits: shifts, xors and wrapping
    multiplications are exact in both), which shifts logically without a mask and costs half
    the time of torch's int64 kernels; randomness is generated on every forward."""
    if _numpy_words(x) and x.is_contiguous():
        a = _u64(x)
        t = np.empty_like(a)
        for shift, mult in zip(_NP_SHIFTS, (_NP_M1, _NP_M2, None), strict=True):
            np.right_shift(a, shift, out=t)
            a ^= t
            if mult is not None:
                a *= mult
        return x
    x ^= _shr(x, 30)
    x *= _M1
    x ^= _shr(x, 27)
    x *= _M2
    x ^= _shr(x, 31)
    return x


def _mix_int(x: int) -> int:
    x &= _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return _signed(x ^ (x >> 31))


def stream_id(name: str) -> int:
    """A stable integer for a stream name (Python's ``hash`` is salted per process)."""
    return zlib.crc32(name.encode())


# One odd multiplier per part position: folding all parts into one sum before a single mix keeps
# key derivation to one hash per call (it runs on every forward row); distinct small part
# values cannot collide unless the multipliers' ratio mod 2^64 is a small rational.
_PART_MULT = [_signed((0x9E3779B97F4A7C15 * (2 * i + 1)) | 1) for i in range(8)]


def _part(p: int | str) -> int:
    return stream_id(p) if isinstance(p, str) else int(p)


def derive(key: int, *parts: int | str) -> int:
    """A new scalar key from ``key`` and integer or named parts (order matters)."""
    acc = key
    for i, p in enumerate(parts):
        acc += (_part(p) + 1) * _PART_MULT[i]
    return _mix_int(acc)


def derive_rows(keys: Tensor, *parts: int | str | Tensor) -> Tensor:
    """Per-row keys: ``derive`` applied elementwise; tensor parts vary per row."""
    if len(parts) > len(_PART_MULT):
        raise ValueError(f"at most {len(_PART_MULT)} key parts, got {len(parts)}")
    const = 0
    k = keys
    for i, p in enumerate(parts):
        if isinstance(p, Tensor):
            k = k + (p.long() + 1) * _PART_MULT[i]
        else:  # fold constants in Python: int64 tensors cannot hold the unwrapped product
            const += (_part(p) + 1) * _PART_MULT[i]
    return _mix_(k + _signed(const)) if const or parts else _mix_(k.clone())


# Independent odd multipliers (not multiples of the golden step) for offset_rows: consecutive
# query numbers must not shift one stream onto another.
_OFFSET_MULT = [_mix_int(0xD1B54A32D192ED03 + i) | 1 for i in range(8)]


def offset_rows(keys: Tensor, *parts: int | Tensor) -> Tensor:
    """Per-row keys for a final stage: ``keys + sum(part_i * m_i)`` without a hash.

    Only for keys that feed a :class:`KeyedRNG` draw, which hashes every element anyway: with
    well-mixed ``keys`` and independent odd multipliers, two (row, parts) pairs collide or shift
    one stream onto another only if a small linear combination of the multipliers lands within
    a stream's length of zero (probability ~2^-40 over every pair in a run). It saves one hash
    per row on the engine's hottest path.
    """
    k = keys
    for i, p in enumerate(parts):
        if isinstance(p, Tensor):
            k = k + p.long() * _OFFSET_MULT[i]
        elif p:
            k = k + _signed(int(p) * _OFFSET_MULT[i])
    return k


def row_keys(seed: int, ids: Tensor) -> Tensor:
    """One key per image from a seed and the images' dataset indices (int64, on ``ids``' device)."""
    return derive_rows(torch.full_like(ids, derive(seed), dtype=torch.int64), ids.long())


@functools.lru_cache(maxsize=256)
def _counters(n: int, offset: int, device: torch.device) -> Tensor:
    """``(i + 1) * golden + offset`` for i < n: the counter sequence of one stream."""
    i = torch.arange(1, n + 1, dtype=torch.int64) * _GOLDEN + offset
    return i.to(device)


def _bits(keys: Tensor, n: int, offset: int = 0) -> Tensor:
    """(A, n) hashed int64 words: element i of row a is ``mix(keys[a] + (i + 1) * golden + offset)``
    (splitmix64 seeded with the row's key; named streams shift the counter by ``offset``)."""
    return _mix_(keys.view(-1, 1) + _counters(n, offset, keys.device))


def _field(
    words: Tensor, s: int, bits: int, scale: float, dtype: torch.dtype, complement: bool = False
) -> Tensor:
    """Bits ``s .. s + bits`` of each word as an integer ``t`` (``2^bits - t`` with
    ``complement``), times ``scale``, as ``dtype``: exact for ``bits <= 24`` and a power-of-two
    scale; otherwise one float32 rounding of ``float32(t) * float32(scale)`` (for float32).

    On CPU the integer part runs in numpy (logical uint64 shifts, a cheap int-to-float cast),
    with the same bits as the torch expression below, which other devices use."""
    if _numpy_words(words) and dtype in (torch.float32, torch.float64):
        npd = np.float32 if dtype == torch.float32 else np.float64
        t = _shr_np(words, s, bits)
        if complement:
            np.subtract(np.uint64(1 << bits), t, out=t)
        f = t.astype(npd)
        if scale != 1.0:
            f *= npd(scale)
        return torch.from_numpy(f)
    t = _shr(words, s, bits)
    if complement:
        t = (1 << bits) - t
    if scale == 1.0:
        return t.to(dtype)
    # int64 * float scalar computes in float32: one op
    return t * scale if dtype == torch.float32 else t.to(dtype) * scale


def _uniform_field(words: Tensor, dtype: torch.dtype) -> Tensor:
    """U[0, 1) from the top 24 bits of each word (float32's mantissa)."""
    return _field(words, 40, 24, _U24, dtype)


def _bit_field(words: Tensor, dtype: torch.dtype) -> Tensor:
    """0/1 from the top bit of each word."""
    return _field(words, 63, 1, 1.0, dtype)


def _shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


class KeyedRNG:
    """Random draws for a set of rows, each row reproducible from its own key alone.

    ``rng.normal((C, H, W))`` returns an ``(A, C, H, W)`` tensor whose row ``a`` depends only on
    ``keys[a]`` (and the stream and shape asked for). Use ``rng.stream("name")`` for independent
    draws within one step; asking twice for the same stream gives the same numbers. Named streams
    cost nothing per row: they shift the counter sequence (a constant), while tensor parts (per
    row) re-hash the keys. Different kinds of draw must use different streams: ``uniform`` and
    ``bits01`` of one stream read the same words.
    """

    def __init__(self, keys: Tensor, offset: int = 0) -> None:
        if keys.dtype != torch.int64 or keys.dim() != 1:
            raise ValueError("keys must be a 1-D int64 tensor")
        self.keys, self.offset = keys, offset

    def __len__(self) -> int:
        return self.keys.shape[0]

    def stream(self, *parts: int | str | Tensor) -> KeyedRNG:
        if any(isinstance(p, Tensor) for p in parts):
            return KeyedRNG(derive_rows(self.keys, self.offset, *parts))
        return KeyedRNG(self.keys, _signed(derive(self.offset, *parts) * 0x9E3779B97F4A7C15 | 1))

    def __getitem__(self, idx: Tensor) -> KeyedRNG:
        return KeyedRNG(self.keys[idx], self.offset)

    def streams(self, which: Tensor, *names: str) -> KeyedRNG:
        """Row ``a`` of ``stream(names[which[a]])``, for rows that each draw from one of several
        named streams (images in different phases of an attack): one hash pass over all rows
        instead of one per stream on gathered subsets. A named stream shifts the counter by a
        constant, and the shift folds into the row's key (int64 addition wraps like the
        counter's), so the words are exactly those of the stream. Draw from the result; do not
        derive further streams from it."""
        offsets = [self.stream(n).offset for n in names]
        shift = torch.tensor(offsets, dtype=torch.int64, device=self.keys.device)
        return KeyedRNG(self.keys + shift.index_select(0, which.long()), 0)

    def _words(self, n: int) -> Tensor:
        return _bits(self.keys, n, self.offset)

    def uniform(
        self, shape: Sequence[int] | int = (), dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """U[0, 1) with 24 random bits (float32's mantissa), shaped ``(A, *shape)``."""
        s = _shape(shape)
        n = math.prod(s)
        return _uniform_field(self._words(n), dtype).view(len(self), *s)

    def normal(self, shape: Sequence[int] | int = (), dtype: torch.dtype = torch.float32) -> Tensor:
        """N(0, 1) by Box-Muller: one 64-bit hash gives two 24-bit uniforms and two normals."""
        s = _shape(shape)
        n = math.prod(s)
        h = (n + 1) // 2
        b = self._words(h)
        # 1 - u = (2^24 - t) * 2^-24 for the 24-bit integer t: exact, in (0, 1], the log finite
        r = _field(b, 40, 24, _U24, torch.float32, complement=True)
        r.log_()
        r *= -2.0
        r.sqrt_()
        # t * (2pi * 2^-24) rounds exactly as (t * 2^-24) * 2pi: scaling by 2^-24 is exact
        theta = _field(b, 16, 24, _TWO_PI_U24, torch.float32)
        z = torch.empty((len(self), 2, h), dtype=torch.float32, device=b.device)
        torch.cos(theta, out=z[:, 0])
        torch.sin(theta, out=z[:, 1])
        z *= r.unsqueeze(1)
        z = z.view(len(self), 2 * h)
        z = z[:, :n] if n < 2 * h else z
        return z.to(dtype).reshape(len(self), *s)

    def laplace(
        self, shape: Sequence[int] | int = (), dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Laplace noise scaled to unit standard deviation (scale 1/sqrt(2)), by inverse CDF."""
        u = self.uniform(shape, torch.float32) - 0.5
        # 1 - 2|u| lies in (0, 1]: -log is finite; |u| = 0.5 is impossible with 24-bit uniforms
        z = -torch.sign(u) * torch.log1p(-2.0 * u.abs()) / math.sqrt(2.0)
        return z.to(dtype)

    def randint(self, high: int | Tensor, shape: Sequence[int] | int = ()) -> Tensor:
        """Integers in [0, high) (``high`` per row as an (A,) tensor, or one int), int64."""
        u = self.uniform(shape, torch.float64)
        if isinstance(high, Tensor):
            high = high.to(torch.float64).view(-1, *[1] * (u.dim() - 1))
        return (u * high).floor().long()

    def bits01(self, shape: Sequence[int] | int = (), dtype: torch.dtype = torch.float32) -> Tensor:
        """Fair 0/1 draws as floats (the cheap form of random signs)."""
        s = _shape(shape)
        return _bit_field(self._words(math.prod(s)), dtype).view(len(self), *s)

    def uniform_and_bits01(
        self, shape: Sequence[int] | int = (), dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """``(uniform(shape), bits01(shape))`` from one hash pass. Both read the same words, so
        they are not independent: use each on different rows (rows of :meth:`streams` that draw
        signs from one stream and uniforms from another)."""
        s = _shape(shape)
        words = self._words(math.prod(s))
        u = _uniform_field(words, dtype).view(len(self), *s)
        return u, _bit_field(words, dtype).view(len(self), *s)

    def bernoulli(self, p: Tensor) -> Tensor:
        """Booleans that are True with probability ``p`` (shaped ``(A, ...)``, per element)."""
        return self.uniform(p.shape[1:], torch.float32) < p
