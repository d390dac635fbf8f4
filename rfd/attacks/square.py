"""Square Attack, Linf and L2.

Andriushchenko, Croce, Flammarion, Hein. "Square Attack: a query-efficient black-box adversarial
attack via random search." ECCV 2020.

Random search over square-shaped updates: each step changes one square window per image and keeps
the candidate only if the margin loss decreases. The window side follows the original code's
schedule: the fraction ``p`` of changed pixels halves at iterations 10, 50, ..., 8000 of a
10,000-iteration run, rescaled to the budget. Every image runs on its own clock (its own step
count, its own windows and signs), so images can be stepped in any grouping. The original code
draws Linf windows per image but shares L2 windows across the batch; here both are per image,
which makes an image's attack independent of the batch it runs in.

Against a randomized model the stored loss of the kept point is the lowest of the noisy answers it
got, biased low by lucky draws, so later candidates must beat a value the point itself would not
reproduce and the search can freeze. ``refresh_every=k`` (not in the paper; 0 = off, the original)
spends every k-th query re-querying the kept point and stores that fresh answer instead: the
adaptive counter to noise defenses. Refresh queries are charged like any other.

Linf iterates are vertices of the box ``[x - eps, x + eps] ∩ [0, 1]``: the state keeps the
point, and its sign pattern is read back exactly as ``x == upper``.
"""

from __future__ import annotations

import bisect
import functools
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select
from rfd.tensors import take

_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of pixels to change at iteration ``it`` of ``n_iters`` (the original schedule).

    The original code rescales the iteration to a 10,000-iteration run, so short budgets shrink
    the squares just as fast, relative to the budget, as the paper's long runs do.
    """
    return p_init / 2 ** bisect.bisect_left(_HALVINGS, int(it / n_iters * 10000))


def _sides(p_init: float, it: Tensor, n_iters: int, h: int, w: int, norm: str) -> Tensor:
    """Window side per image from its own iteration count: :func:`p_selection`, vectorized.

    Looked up in a table of every iteration's side (built once per schedule by the same
    arithmetic): the schedule runs on every step of every image. Iterations past the end of the
    run keep the last stage's side."""
    table = _side_table(p_init, n_iters, h, w, norm, it.device)
    return take(table, it.clamp(max=table.shape[0] - 1))


@functools.lru_cache(maxsize=64)
def _side_table(
    p_init: float, n_iters: int, h: int, w: int, norm: str, device: torch.device
) -> Tensor:
    return _side_formula(p_init, torch.arange(n_iters + 1, device=device), n_iters, h, w, norm)


def _side_formula(p_init: float, it: Tensor, n_iters: int, h: int, w: int, norm: str) -> Tensor:
    stage = torch.searchsorted(
        torch.tensor(_HALVINGS, device=it.device), (it.double() / n_iters * 10000).long()
    )
    p = p_init / torch.pow(2.0, stage.double())
    s = torch.round(torch.sqrt(p * (h * w))).long()  # half to even, like Python's round
    if norm == "linf":
        return s.clamp(min=1, max=min(h, w) - 1)
    s = s.clamp(min=3)
    s = s + 1 - s % 2  # odd, as in the original
    return s.clamp(max=min(h, w) - 1 - min(h, w) % 2)  # and smaller than the image


def _window(start: Tensor, side: Tensor, length: int, like: Tensor) -> Tensor:
    """(A, length) 0/1 indicator of [start, start + side) per image."""
    ar = torch.arange(length, device=like.device)
    return ((ar >= start.unsqueeze(1)) & (ar < (start + side).unsqueeze(1))).to(like.dtype)


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
    """The original L2 update shape: two opposite bumps side by side, unit norm; the pattern and
    its transpose stacked (2, s, s), one of which is picked at random. Cached: callers must not
    modify it."""
    d = torch.zeros(s, s)
    d[: s // 2] = _rectangle(s // 2, s)
    d[s // 2 :] = -_rectangle(s - s // 2, s)
    d /= d.norm()
    return torch.stack([d, d.t()])


class SquareAttack(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020), score-based random search.

    Hyperparameters: ``p_init``, the initial fraction of pixels changed per window (the paper's
    appendix: 0.05 Linf, 0.1 L2); ``refresh_every``: re-query the kept point every k-th step
    (0: never, the original).
    """

    name = "square"
    title = "Square"
    order = 10
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"p_init": 0.05, "refresh_every": 0},
        "l2": {"p_init": 0.1, "refresh_every": 0},
    }

    def __init__(
        self, norm: str = "linf", p_init: float | None = None, refresh_every: int | None = None
    ) -> None:
        super().__init__(norm, p_init=p_init, refresh_every=refresh_every)
        if not 0 < self.p_init <= 1:
            raise ValueError(f"square p_init must be in (0, 1], got {self.p_init}")
        k = self.refresh_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k == 1:
            raise ValueError(f"square refresh_every must be 0 (off) or an integer >= 2, got {k!r}")

    # The first step queries the initialization; every later step one candidate. ``loss`` is +inf
    # until the initialization has been answered.
    def init(self, view: View) -> State:
        x = self._init_linf(view) if self.norm == "linf" else self._init_l2(view)
        return {"x": x, "loss": torch.full((len(view),), float("inf"), device=x.device)}

    def propose(self, view: View, state: State) -> Tensor:
        x, first = state["x"], state["loss"] == float("inf")
        if self.refresh_every:  # every k-th step re-queries the kept point (scratch for observe)
            state["refresh"] = ~first & (view.step % self.refresh_every == 0)
            first = first | state["refresh"]
        if bool(first.all()):
            return x
        cand = self._step_linf(view, x) if self.norm == "linf" else self._step_l2(view, x)
        return select(first, x, cand)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        margin = reply.margin[:, 0]
        better = margin < state["loss"]  # strict: the original accepts only a decrease
        loss = torch.minimum(margin, state["loss"])
        if "refresh" in state:  # a re-queried kept point: its fresh answer replaces the stored one
            loss = torch.where(state["refresh"], margin, loss)
        return {"x": select(better, reply.x[:, 0], state["x"]), "loss": loss}

    def best(self, view: View, state: State) -> Tensor:
        return state["x"]

    def incumbent(self, view: View, state: State) -> Tensor:
        return state["loss"]

    def _iteration(self, view: View) -> tuple[Tensor, int]:
        # step 0 queried the initialization; candidate iterations count from step 1
        return (view.step - 1).clamp(min=0), max(view.total - 1, 1)

    # ---------------------------------------------------------------------- Linf
    def _init_linf(self, view: View) -> Tensor:
        # Vertical stripes: one random sign per (channel, column), the original's initialization.
        a, c, h, w = view.x0.shape
        bits = view.rng.stream("stripes").bits01((c, 1, w), view.x0.dtype).expand(a, c, h, w)
        return torch.lerp(view.lower, view.upper, bits)

    def _step_linf(self, view: View, x: Tensor) -> Tensor:
        lo, hi = view.lower, view.upper
        a, c, h, w = x.shape
        rng, dt = view.rng, x.dtype
        it, n_iters = self._iteration(view)
        s = _sides(self.p_init, it, n_iters, h, w, "linf")
        u = rng.uniform(2 + c)  # one draw per step: window row, window column, one sign per channel
        rh = (u[:, 0] * (h - s)).long()
        rw = (u[:, 1] * (w - s)).long()
        win = _window(rh, s, h, x).view(a, 1, h, 1) * _window(rw, s, w, x).view(a, 1, 1, w)
        bits = (x == hi).to(dt)
        new = (u[:, 2:] < 0.5).to(dt).view(a, c, 1, 1)
        # The original redraws the signs while the window would stay unchanged. A window is
        # unchanged iff every channel already holds its new sign throughout (count check). At
        # most one sign pattern leaves it unchanged (upper > lower everywhere), so XOR-ing that
        # pattern with a uniform nonzero mask is an exact, loop-free draw from the others.
        ones = (bits * win).sum((2, 3))
        same = (ones == new.view(a, c) * (s * s).view(a, 1).to(dt)).all(1)
        if bool(same.any()):
            if c == 1:  # the only other pattern is the flipped sign
                flip = same.to(dt)
            else:
                r = rng.stream("redraw").randint(2**c - 1).view(a, 1) + 1
                flip = ((r >> torch.arange(c, device=x.device)) & 1).to(dt) * same.unsqueeze(1)
            new = (new - flip.view(a, c, 1, 1)).abs()
        return torch.lerp(lo, hi, torch.lerp(bits, new, win))

    # ---------------------------------------------------------------------- L2
    def _init_l2(self, view: View) -> Tensor:
        # A grid of 5x5 bumps with random signs, rescaled to the sphere of radius eps. Each
        # cell's bump is transposed with probability 1/2, as the original's
        # meta_pseudo_gaussian_pert does per call; the original draws that bit once per cell for
        # the whole batch, here once per (image, cell), so an image's start does not depend on
        # its batch. The bits come from their own stream: the signs' draws stay as they were.
        x0 = view.x0
        a, c, h, w = x0.shape
        s = max(h // 5, 1)
        sp = (h - s * 5) // 2
        pats = meta_pattern(s).to(x0)
        delta = torch.zeros_like(x0)
        signs = view.rng.stream("grid").bits01((h // s, w // s, c, 1, 1), x0.dtype) * 2 - 1
        turn = view.rng.stream("grid-transpose").randint(2, (h // s, w // s))
        for i in range(h // s):
            for j in range(w // s):
                r, q = sp + i * s, sp + j * s
                pat = pats[turn[:, i, j], : h - r, : w - q].unsqueeze(1)  # (A, 1, s, s)
                delta[:, :, r : r + s, q : q + s] += pat * signs[:, i, j]
        norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp(min=1e-12)
        return (x0 + delta / norm * view.eps).clamp(0.0, 1.0)

    def _step_l2(self, view: View, xb: Tensor) -> Tensor:
        x0, eps, rng = view.x0, view.eps, view.rng
        a, c, h, w = xb.shape
        dt = xb.dtype
        it, n_iters = self._iteration(view)
        s = _sides(self.p_init, it, n_iters, h, w, "l2")
        r1, r2 = rng.stream("r1").randint(h - s), rng.stream("r2").randint(h - s)
        q1, q2 = rng.stream("q1").randint(w - s), rng.stream("q2").randint(w - s)
        w1 = _window(r1, s, h, xb).view(a, 1, h, 1) * _window(q1, s, w, xb).view(a, 1, 1, w)
        w2 = _window(r2, s, h, xb).view(a, 1, h, 1) * _window(q2, s, w, xb).view(a, 1, 1, w)
        both = torch.maximum(w1, w2)
        # the bump pattern (or its transpose) placed at each image's first window
        pat = torch.zeros((a, h, w), dtype=dt, device=xb.device)
        flip = rng.stream("transpose").randint(2)
        for side in torch.unique(s).tolist():
            m = (s == side).nonzero()[:, 0]
            p = meta_pattern(side).to(xb)[flip[m]]  # (k, side, side)
            ar = torch.arange(side, device=xb.device)
            rows = (r1[m].view(-1, 1, 1) + ar.view(1, -1, 1)).expand(-1, side, side)
            cols = (q1[m].view(-1, 1, 1) + ar.view(1, 1, -1)).expand(-1, side, side)
            pat[m.view(-1, 1, 1).expand(-1, side, side), rows, cols] = p
        sign = rng.stream("sign").bits01((c, 1, 1), dt) * 2 - 1

        delta = xb - x0
        sq = delta.square()
        n_img = sq.sum((1, 2, 3)).sqrt().view(-1, 1, 1, 1)
        n_both = (sq * both).sum((2, 3), keepdim=True).sqrt()
        old = delta * w1
        n_w1 = old.square().sum((2, 3), keepdim=True).sqrt()
        new = pat.unsqueeze(1) * sign + old / (1e-10 + n_w1)
        new_norm = new.square().sum((2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        room = ((eps**2 - n_img.square()).clamp(min=0) / c + n_both.square()).sqrt()
        delta = delta * (1 - both) + new / new_norm * room
        norm = delta.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return (x0 + delta * (eps / norm)).clamp_(0.0, 1.0)
