"""SimBA: simple black-box attack by greedy coordinate steps along an orthonormal basis, L2.

Guo, Gardner, You, Wilson, Weinberger. "Simple Black-box Adversarial Attacks." ICML 2019.

SimBA walks through the directions ``q`` of an orthonormal basis in a random order. For each it
tries ``x - step * q``; if the margin loss decreased the point is kept, otherwise it tries
``x + step * q`` and keeps that if the loss decreased, otherwise it moves on to the next
direction. A direction therefore costs one or two queries; here every image walks this as its own
phase machine (MINUS, then PLUS if MINUS failed), one query per step, so the count is exact.

Basis (``basis``): ``pixel`` (SimBA, the standard basis) or ``dct`` (SimBA-DCT, the default: the
orthonormal 2-D DCT-II basis, built here with torch by matrix products, no scipy). For
SimBA-DCT the order is the authors' ``strided`` block order (README command for ImageNet:
``--freq_dims 28 --order strided --stride 7`` at 224px): first the ``freq_dims x freq_dims``
lowest frequencies of every channel in random order, then L-shaped bands of width ``stride`` of
higher frequencies, each band in random order. The sizes are given as fractions of the image
side, the ImageNet command's 28/224 = 1/8 and 7/224 = 1/32, rounded half up and at least 1: a
4 x 4 block then bands of width 1 at 28px and 32px. (The authors' CIFAR-10 script defaults to
``--freq_dims 32 --order rand``, i.e. no low-frequency prior at all; the ImageNet ratio keeps
the prior that defines SimBA-DCT.) The pixel basis uses the authors' ``rand`` order over all
coordinates. The permutation is drawn per image in ``init`` from the image's own keyed RNG
(argsort of uniforms plus the band index), so it does not depend on batch packing; the
published code shares one permutation across the batch. Once every direction has been tried
the order starts again from the beginning (the published code stops).

Differences from the published code, and why:

- The loss is rfd's margin ``z_y - max_{i != y} z_i`` rather than the probability of the true
  class: every score attack here descends the same loss.
- The published attack has no L2 bound (it reports the norm it reached). Here the threat model
  is the eps-ball: each query is projected onto the ball and [0, 1] by the engine, and the kept
  point is the projected query itself (its margin is the one observed), so once the accumulated
  perturbation would leave the ball SimBA continues as a projected search on the sphere. The
  published code instead accumulates unclipped coefficients and clips only the image it
  queries.
- The engine does not hand attacks the clean query's margin, so the first step re-queries the
  original image (one query) to learn the loss that the first direction must beat.
- The published code tries ``x - step * q`` first (the paper's Algorithm 1 lists ``+step``
  first); this follows the code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select
from rfd.dct import dct_matrix

START, MINUS, PLUS = 0, 1, 2
BASES = ("pixel", "dct")


def _side(frac: float, n: int) -> int:
    return max(1, int(math.floor(frac * n + 0.5)))


def band_index(c: int, h: int, w: int, freq: float, stride: float) -> Tensor:
    """(C*H*W,) band of each DCT coefficient in the authors' strided order: 0 for the lowest
    ``freq_dims x freq_dims`` frequencies, then 1, 2, ... for L-shaped bands of width ``stride``."""
    side = min(h, w)
    fd, st = _side(freq, side), _side(stride, side)
    k = torch.arange(h).view(h, 1).expand(h, w)
    l_ = torch.arange(w).view(1, w).expand(h, w)
    r = torch.maximum(k, l_)
    band = torch.where(r < fd, 0, 1 + torch.div(r - fd, st, rounding_mode="floor"))
    return band.unsqueeze(0).expand(c, h, w).flatten()


class SimBA(Attack):
    """SimBA / SimBA-DCT (Guo et al., ICML 2019), score-based, L2.

    Hyperparameters (the authors' code): ``basis`` ``dct`` (SimBA-DCT) or ``pixel``; ``step``,
    the step size epsilon along each unit basis direction (0.2); ``freq`` and ``stride``, the
    low-frequency block side and the band width of the DCT order as fractions of the image side
    (1/8 and 1/32: the ImageNet command's 28 and 7 at 224px). ``freq``/``stride`` are unused for
    the pixel basis.
    """

    name = "simba"
    title = "SimBA"
    order = 80
    kind = "score"
    norms = ("l2",)
    defaults: dict[str, dict[str, Any]] = {
        "l2": {"basis": "dct", "step": 0.2, "freq": 0.125, "stride": 0.03125}
    }

    def __init__(
        self,
        norm: str = "l2",
        basis: str | None = None,
        step: float | None = None,
        freq: float | None = None,
        stride: float | None = None,
    ) -> None:
        super().__init__(norm, basis=basis, step=step, freq=freq, stride=stride)
        if self.basis not in BASES:
            raise ValueError(f"simba basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        self.require_positive("step")
        if not 0 < self.freq <= 1 or not 0 < self.stride <= 1:
            raise ValueError(
                f"simba freq and stride must be in (0, 1], got {self.freq}, {self.stride}"
            )

    # State: ``x`` the kept point, ``loss`` its margin (+inf until the original is answered),
    # ``perm`` the image's order of basis directions (the first min(d, total) entries: an image
    # never tries more directions than it has queries), ``k`` the current direction's position
    # and ``phase`` START (query x itself), MINUS or PLUS.
    def init(self, view: View) -> State:
        x0 = view.x0
        a, c, h, w = x0.shape
        d = c * h * w
        u = view.rng.stream("order").uniform(d, torch.float64)
        if self.basis == "dct":
            u = u + band_index(c, h, w, self.freq, self.stride).to(u)
        perm = torch.argsort(u, dim=1, stable=True)[:, : min(d, max(view.total, 1))]
        zero = torch.zeros(a, dtype=torch.long, device=x0.device)
        return {
            "x": x0.clone(),
            "loss": torch.full((a,), float("inf"), device=x0.device),
            "perm": perm,
            "k": zero,
            "phase": zero.clone(),
        }

    def direction(self, idx: Tensor, shape: torch.Size) -> Tensor:
        """The unit basis images (A, C, H, W) of flat basis indices ``idx`` (A,)."""
        a, c, h, w = shape
        if self.basis == "pixel":
            q = torch.zeros((a, c * h * w), device=idx.device)
            q.scatter_(1, idx.view(-1, 1), 1.0)
            return q.view(a, c, h, w)
        ch = torch.div(idx, h * w, rounding_mode="floor")
        r = idx % (h * w)
        dh, dw = (dct_matrix(n).to(idx.device, torch.float32) for n in (h, w))
        rows = dh[torch.div(r, w, rounding_mode="floor")]  # (A, H)
        cols = dw[r % w]  # (A, W)
        img = rows.unsqueeze(2) * cols.unsqueeze(1)
        onehot = (torch.arange(c, device=idx.device).unsqueeze(0) == ch.unsqueeze(1)).float()
        return onehot.view(a, c, 1, 1) * img.unsqueeze(1)

    def propose(self, view: View, state: State) -> Tensor:
        x, phase, perm = state["x"], state["phase"], state["perm"]
        idx = perm.gather(1, (state["k"] % perm.shape[1]).view(-1, 1))[:, 0]
        q = self.direction(idx, x.shape).to(x.dtype)
        sign = torch.where(phase == MINUS, -1.0, torch.where(phase == PLUS, 1.0, 0.0))
        return x + (self.step * sign).to(x.dtype).view(-1, 1, 1, 1) * q

    def observe(self, view: View, state: State, reply: Reply) -> State:
        m, phase, k = reply.margin[:, 0], state["phase"], state["k"]
        start = phase == START
        better = m < state["loss"]  # strict, as in the original; START always "improves" on inf
        advance = ~start & (better | (phase == PLUS))
        new_phase = torch.where(start | advance, MINUS, PLUS)
        return {
            "x": select(better, reply.x[:, 0], state["x"]),
            "loss": torch.minimum(m, state["loss"]),
            "perm": state["perm"],
            "k": k + advance.long(),
            "phase": new_phase,
        }

    def best(self, view: View, state: State) -> Tensor:
        return state["x"]

    def incumbent(self, view: View, state: State) -> Tensor:
        return state["loss"]
