"""SignHunter: hierarchical sign-flip search for the gradient sign, Linf and L2.

Al-Dujaili, O'Reilly. "Sign Bits Are All You Need for Black-Box Attacks." ICLR 2020.

The attack keeps a sign vector ``s`` and queries the ball's vertex ``x + eps * s`` (the finite
difference probe equals eps, so every query is itself a candidate adversarial example). It flips
contiguous chunks of ``s``, halving the chunk length level by level, and keeps a flip only if the
margin loss does not increase. For L2 the sign vector is scaled onto the L2 sphere,
``x + eps * s / sqrt(d)``, as BlackboxBench does. Unlike the published code, every query is
clipped to [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, QueryOracle, shrink


class SignHunter(Attack):
    """SignHunter (Al-Dujaili & O'Reilly, ICLR 2020), score-based sign search.

    It has no hyperparameters beyond the radius: the probe size is eps by design.
    """

    name = "signhunter"
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {"linf": {}, "l2": {}}

    def __init__(self, norm: str = "linf") -> None:
        super().__init__(norm)

    def run(self, oracle: QueryOracle) -> None:
        idx = oracle.active(1)
        if idx.numel() == 0:
            return
        x0 = oracle.images[idx]
        d = x0[0].numel()
        if self.norm == "linf":
            extra = [oracle.lower[idx], oracle.upper[idx]]
        else:  # the sphere's "vertices" x + step * s, step = eps / sqrt(d); kept as x - step
            step = oracle.eps / math.sqrt(d)
            extra = [x0 - step, torch.full_like(x0[:, :1, :1, :1], 2 * step)]
        # The sign vector as 0/1 floats (1 = +eps): plain float arithmetic on the hot path.
        up = torch.ones((len(idx), d), dtype=x0.dtype, device=x0.device)
        best = oracle.margin(idx, _vertex([up, *extra]))
        level, chunk_i, top = 0, 0, math.ceil(math.log2(d))
        state = [up, *extra, best]
        while True:
            idx, state = shrink(oracle, idx, state, best=_vertex)
            if idx.numel() == 0:
                return
            up, *extra, best = state
            size = math.ceil(d / 2**level)
            start, end = chunk_i * size, min(d, (chunk_i + 1) * size)
            chunk = up[:, start:end]
            chunk.neg_().add_(1.0)  # flip the chunk's signs in place
            m = oracle.margin(idx, _vertex([up, *extra]))
            worse = m > best  # ties keep the flip, as in the original
            chunk.sub_(worse.to(up.dtype).unsqueeze(1)).abs_()  # undo the flip where worse
            best = torch.minimum(best, m)
            state = [up, *extra, best]
            chunk_i += 1
            if chunk_i == 2**level or end == d:
                level, chunk_i = level + 1, 0
                if level == top + 1:
                    # All levels done: restart the hierarchy from the current signs. Queries stay
                    # vertices of the ball around the original, so the center never moves.
                    level = 0


def _vertex(state: list[Tensor]) -> Tensor:
    """The query point of the sign state ``[up, a, b, ...]``.

    Linf: ``lerp(lower, upper, up)``, the box vertex. L2: ``(x - step) + 2 * step * up`` clamped
    to [0, 1], i.e. ``x + step * s`` with ``s = 2 * up - 1``.
    """
    up, a, b = state[0], state[1], state[2]
    up = up.view_as(a)
    if b.shape == a.shape:
        return torch.lerp(a, b, up)
    return torch.addcmul(a, up, b).clamp_(0.0, 1.0)
