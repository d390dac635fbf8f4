"""Square Attack, Linf and L2.

Andriushchenko, Croce, Flammarion, Hein. "Square Attack: a query-efficient black-box adversarial
attack via random search." ECCV 2020.

Random search over square-shaped updates: each iteration changes one square window per image
and keeps the candidate only if the margin loss decreases. The window side follows the original
code's schedule: the fraction ``p`` of changed pixels halves at iterations 10, 50, ..., 8000 of a
10,000-iteration run, rescaled to the actual budget. As in the original code, Linf windows are
drawn per image and L2 windows are shared by the batch (signs are always per image).

Linf iterates are always vertices of the box ``[x - eps, x + eps] ∩ [0, 1]``, so the state is a
0/1 float tensor per pixel (``lerp(lower, upper, bits)`` is the image): every hot-path operation
is then plain float arithmetic, which on CPU is far cheaper than masked selects.
"""

from __future__ import annotations

import bisect
import functools
import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, QueryOracle, select, shrink

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels to change at iteration ``it`` of ``n_iters`` (the original schedule).

    The original code rescales the iteration to a 10,000-iteration run, so short budgets shrink
    the squares just as fast, relative to the budget, as the paper's long runs do.
    """
    return p_init / 2 ** bisect.bisect_left(_HALVINGS, int(it / n_iters * 10000))


def _intervals(size: int, length: int, like: Tensor) -> Tensor:
    """Row r is the 0/1 indicator of [r, r + size) in range(length): windows by one gather."""
    ar = torch.arange(length, device=like.device)
    rel = ar.unsqueeze(0) - ar[: length - size].unsqueeze(1)
    return ((rel >= 0) & (rel < size)).to(like.dtype)


def _rectangle(x: int, y: int) -> Tensor:
    """The original's pseudo-Gaussian bump: nested rectangles weighted 1/(k+1)^2, unit norm."""
    delta = torch.zeros(x, y)
    cx, cy = x // 2, y // 2
    for k in range(max(x // 2 + 1, y // 2 + 1)):
        delta[max(cx - k, 0) : min(cx + k + 1, x), max(cy - k, 0) : min(cy + k + 1, y)] += (
            1.0 / (k + 1) ** 2
        )
    return delta / delta.norm()


@functools.lru_cache(maxsize=32)
def meta_pattern(s: int) -> Tensor:
    """The original L2 update shape: two opposite bumps side by side, unit norm; returns the
    pattern and its transpose stacked (2, s, s), one of which is picked at random. Cached:
    the side only changes at the schedule's halvings; callers must not modify it."""
    d = torch.zeros(s, s)
    d[: s // 2] = _rectangle(s // 2, s)
    d[s // 2 :] = -_rectangle(s - s // 2, s)
    d /= d.norm()
    return torch.stack([d, d.t()])


class SquareAttack(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020), score-based random search.

    Hyperparameters: ``p_init``, the initial fraction of pixels changed per window (the paper's
    appendix: 0.05 Linf, 0.1 L2).
    """

    name = "square"
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {"linf": {"p_init": 0.05}, "l2": {"p_init": 0.1}}

    def __init__(self, norm: str = "linf", p_init: float | None = None) -> None:
        super().__init__(norm, p_init=p_init)
        if not 0 < self.p_init <= 1:
            raise ValueError(f"square p_init must be in (0, 1], got {self.p_init}")

    def run(self, oracle: QueryOracle) -> None:
        self._tables: tuple[int, Tensor, Tensor] | None = None  # window indicators for side s
        idx = oracle.active(1)
        if idx.numel() == 0:
            return
        n_iters = int(oracle.remaining(idx).max()) // oracle.eot  # init query included
        x0 = oracle.images[idx]
        if self.norm == "linf":
            lo, hi = oracle.lower[idx], oracle.upper[idx]
            bits = self._init_linf(oracle, lo)
            state, loss = [bits, lo, hi], oracle.margin(idx, torch.lerp(lo, hi, bits))
            step, best = self._step_linf, _vertex
        else:
            xb = self._init_l2(oracle, x0)
            state, loss = [xb, x0], oracle.margin(idx, xb)
            step, best = self._step_l2, 0
        for it in range(n_iters - 1):
            idx, (*state, loss) = shrink(oracle, idx, [*state, loss], best=best)
            if idx.numel() == 0:
                return
            cand, query = step(oracle, p_selection(self.p_init, it, n_iters), state)
            margin = oracle.margin(idx, query)
            better = margin < loss  # strict: the original accepts only a decrease
            state[0] = select(better, cand, state[0])
            loss = torch.minimum(margin, loss)
        oracle.report_best(idx, state[0] if best == 0 else _vertex(state))

    # ---------------------------------------------------------------------- Linf
    def _init_linf(self, oracle: QueryOracle, lo: Tensor) -> Tensor:
        # Vertical stripes: one random sign per (channel, column), the original's initialization.
        a, c, h, w = lo.shape
        g = oracle.generator
        bits = torch.randint(0, 2, (a, c, 1, w), generator=g, device=lo.device)
        return bits.to(lo.dtype).expand(a, c, h, w).contiguous()

    def _step_linf(
        self, oracle: QueryOracle, p: float, state: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        bits, lo, hi = state
        a, c, h, w = bits.shape
        g, dev, dt = oracle.generator, bits.device, bits.dtype
        s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w) - 1)
        if self._tables is None or self._tables[0] != s:
            self._tables = (s, _intervals(s, h, bits), _intervals(s, w, bits))
        rh = torch.randint(0, h - s, (a,), generator=g, device=dev)
        rw = torch.randint(0, w - s, (a,), generator=g, device=dev)
        win = self._tables[1][rh].view(a, 1, h, 1) * self._tables[2][rw].view(a, 1, 1, w)
        new = torch.randint(0, 2, (a, c, 1, 1), generator=g, device=dev, dtype=dt)
        # The original redraws the signs while the window would stay unchanged. A window is
        # unchanged iff every channel already holds its new sign throughout (count check). At
        # most one sign pattern leaves it unchanged (upper > lower everywhere), so XOR-ing that
        # pattern with a uniform nonzero mask is an exact, loop-free draw from the others.
        ones = (bits * win).sum((2, 3))
        same = (ones == new.view(a, c) * (s * s)).all(1)
        if bool(same.any()):
            if c == 1:  # the only other pattern is the flipped sign
                flip = same.to(dt)
            else:
                r = torch.randint(1, 2**c, (a, 1), generator=g, device=dev)
                flip = ((r >> torch.arange(c, device=dev)) & 1).to(dt) * same.unsqueeze(1)
            new = (new - flip.view(a, c, 1, 1)).abs()
        cand = torch.lerp(bits, new, win)
        return cand, torch.lerp(lo, hi, cand)

    # ---------------------------------------------------------------------- L2
    def _init_l2(self, oracle: QueryOracle, x0: Tensor) -> Tensor:
        # A grid of 5x5 bumps with random signs, rescaled to the sphere of radius eps.
        a, c, h, w = x0.shape
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2
        pat = meta_pattern(s)[0].to(x0)
        delta = torch.zeros_like(x0)
        g = oracle.generator
        for i in range(h // s):
            for j in range(w // s):
                sign = torch.randint(0, 2, (a, c, 1, 1), generator=g, device=x0.device) * 2 - 1
                r, q = sp + i * s, sp + j * s
                delta[:, :, r : r + s, q : q + s] += pat[: h - r, : w - q] * sign
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp(min=1e-12)
        return (x0 + delta / norm * oracle.eps).clamp(0.0, 1.0)

    def _step_l2(self, oracle: QueryOracle, p: float, state: list[Tensor]) -> tuple[Tensor, Tensor]:
        xb, x0 = state
        a, c, h, w = xb.shape
        g, dev, eps = oracle.generator, xb.device, oracle.eps
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s += 1 - s % 2  # odd, as in the original
        s = min(s, min(h, w) - 1 - min(h, w) % 2)  # and smaller than the image
        r1, r2 = torch.randint(0, h - s, (2,), generator=g, device=dev).tolist()
        q1, q2 = torch.randint(0, w - s, (2,), generator=g, device=dev).tolist()
        w1 = (..., slice(r1, r1 + s), slice(q1, q1 + s))
        w2 = (..., slice(r2, r2 + s), slice(q2, q2 + s))
        both = torch.zeros(h, w, device=dev, dtype=xb.dtype)
        both[w1[1:]] = 1.0
        both[w2[1:]] = 1.0
        pat = meta_pattern(s).to(xb)[int(torch.randint(0, 2, (1,), generator=g, device=dev))]
        sign = torch.randint(0, 2, (a, c, 1, 1), generator=g, device=dev).to(xb.dtype) * 2 - 1

        delta = xb - x0
        sq = delta.square()
        n_img = sq.sum((1, 2, 3)).sqrt().view(-1, 1, 1, 1)
        n_both = torch.einsum("achw,hw->ac", sq, both).sqrt().view(a, c, 1, 1)
        old = delta[w1]
        n_w1 = old.square().sum((2, 3), keepdim=True).sqrt()
        new = pat * sign + old / (1e-10 + n_w1)
        new_norm = new.square().sum((2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        room = ((eps**2 - n_img.square()).clamp(min=0) / c + n_both.square()).sqrt()
        delta[w2] = 0.0
        delta[w1] = new / new_norm * room
        norm = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        cand = (x0 + delta * (eps / norm)).clamp_(0.0, 1.0)
        return cand, cand


def _vertex(state: list[Tensor]) -> Tensor:
    """The Linf point of a bit state ``[bits, lower, upper, ...]``."""
    return torch.lerp(state[1], state[2], state[0])
