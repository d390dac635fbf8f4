"""The hot-path row helpers return exactly what plain indexing returns, byte for byte."""

from __future__ import annotations

import pytest
import torch

from rfd.tensors import put, take

SHAPES = [(40, 1, 28, 28), (40, 784), (40, 3), (40,), (40, 4, 7), (40, 2, 2)]
DTYPES = [torch.float32, torch.float64, torch.int64, torch.bool, torch.bfloat16]


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=g)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_take_and_put_match_indexing(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    t = _random(shape, dtype, g)
    idx = torch.randperm(shape[0], generator=g)[:17]
    v = _random((17, *shape[1:]), dtype, g)
    assert torch.equal(take(t, idx), t[idx])
    want, got = t.clone(), t.clone()
    want[idx] = v
    put(got, idx, v)
    assert torch.equal(got, want)


def test_put_copies_every_bit_pattern_of_float_rows() -> None:
    """Rows written as 16-byte words keep NaN payloads and signed zeros: a copy, no arithmetic."""
    g = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31, (30, 784), generator=g, dtype=torch.int64)
    t = bits.to(torch.int32).view(torch.float32)
    v = torch.randint(-(2**31), 2**31, (8, 784), generator=g).to(torch.int32).view(torch.float32)
    assert bool(torch.isnan(v).any())  # the random patterns include NaNs
    idx = torch.tensor([3, 0, 29, 7, 12, 5, 18, 22])
    want = t.view(torch.int32).clone()
    want[idx] = v.view(torch.int32)
    put(t, idx, v)
    assert torch.equal(t.view(torch.int32), want)


def test_put_and_take_accept_masks_and_broadcast_values() -> None:
    t = torch.arange(12.0).view(6, 2)
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(take(t, mask), t[mask])
    want, got = t.clone(), t.clone()
    want[torch.tensor([1, 4])] = 7.0
    put(got, torch.tensor([1, 4]), torch.tensor(7.0))
    assert torch.equal(got, want)


def test_put_keeps_autograd_working() -> None:
    """A tensor in a graph is written the plain way, so the gradient flows through the rows."""
    x = torch.zeros(4, 8, requires_grad=True)
    y = x.clone()
    v = torch.ones(2, 8, requires_grad=True)
    put(y, torch.tensor([0, 2]), v * 3)
    y.sum().backward()
    assert torch.equal(v.grad, torch.full((2, 8), 3.0))
    assert torch.equal(x.grad, torch.tensor([0.0, 1, 0, 1]).view(4, 1).expand(4, 8))


def test_put_into_rows_at_any_offset_of_a_larger_tensor() -> None:
    """A slice starting at an odd float cannot be read as 16-byte words: the plain path."""
    flat = torch.zeros(1 + 6 * 8)
    t = flat[1:].view(6, 8)  # offset by one float: 4 bytes
    v = torch.arange(16.0).view(2, 8)
    put(t, torch.tensor([4, 1]), v)
    assert torch.equal(t[4], v[0]) and torch.equal(t[1], v[1])
