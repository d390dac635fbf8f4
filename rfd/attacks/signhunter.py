"""SignHunter: hierarchical sign-flip search for the gradient sign, Linf and L2.

Al-Dujaili, O'Reilly. "Sign Bits Are All You Need for Black-Box Attacks." ICLR 2020.

The attack keeps a sign vector ``s`` and queries the ball's vertex ``x + eps * s`` (the finite
difference probe equals eps, so every query is itself a candidate adversarial example). It flips
contiguous chunks of ``s``, halving the chunk length level by level, and keeps a flip only if the
margin loss does not increase. For L2 the sign vector is scaled onto the L2 sphere,
``x + eps * s / sqrt(d)``, as BlackboxBench does. Unlike the published code, every query is
clipped to [0, 1]. Each image keeps its own level and chunk position.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View


class SignHunter(Attack):
    """SignHunter (Al-Dujaili & O'Reilly, ICLR 2020), score-based sign search.

    It has no hyperparameters beyond the radius: the probe size is eps by design.
    """

    name = "signhunter"
    title = "SignHunt"
    order = 30
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {"linf": {}, "l2": {}}

    def __init__(self, norm: str = "linf") -> None:
        super().__init__(norm)

    # State: ``up`` the sign vector as 0/1 floats (1 = +eps), ``best`` the margin of the kept
    # signs (+inf until the all-plus vertex has been answered), and the hierarchy position.
    def init(self, view: View) -> State:
        a, d = len(view), view.x0[0].numel()
        dev = view.x0.device
        zero = torch.zeros(a, dtype=torch.long, device=dev)
        return {
            "up": torch.ones((a, d), dtype=view.x0.dtype, device=dev),
            "best": torch.full((a,), float("inf"), device=dev),
            "level": zero,
            "chunk": zero.clone(),
        }

    def _mask(self, state: State) -> Tensor:
        """The chunk each image flips this step (nothing before its first answer)."""
        up, level, chunk = state["up"], state["level"], state["chunk"]
        d = up.shape[1]
        size = torch.ceil(d / 2.0 ** level.double()).long()
        start, end = chunk * size, torch.clamp((chunk + 1) * size, max=d)
        ar = torch.arange(d, device=up.device)
        started = torch.isfinite(state["best"]).unsqueeze(1)
        return (ar >= start.unsqueeze(1)) & (ar < end.unsqueeze(1)) & started

    def _vertex(self, view: View, up: Tensor) -> Tensor:
        up = up.view_as(view.x0)
        if self.norm == "linf":
            return torch.lerp(view.lower, view.upper, up)
        step = view.eps / math.sqrt(view.x0[0].numel())
        return (view.x0 + step * (2 * up - 1)).clamp_(0.0, 1.0)

    def propose(self, view: View, state: State) -> Tensor:
        up = state["up"]
        state["mask"] = mask = self._mask(state)  # scratch for observe
        return self._vertex(view, (up - mask.to(up.dtype)).abs())

    def observe(self, view: View, state: State, reply: Reply) -> State:
        up, best, level, chunk = state["up"], state["best"], state["level"], state["chunk"]
        mask = state["mask"]
        m = reply.margin[:, 0]
        keep = (m <= best).unsqueeze(1) & mask  # ties keep the flip, as in the original
        up = (up - keep.to(up.dtype)).abs()
        started = torch.isfinite(best)
        d = up.shape[1]
        size = torch.ceil(d / 2.0 ** level.double()).long()
        end = torch.clamp((chunk + 1) * size, max=d)
        nxt = chunk + 1
        wrap = (nxt == 2**level) | (end == d)
        top = math.ceil(math.log2(d))
        # all levels done: restart the hierarchy from the current signs (the queries stay
        # vertices of the ball around the original, so the center never moves)
        new_level = torch.where(wrap, torch.where(level + 1 == top + 1, 0, level + 1), level)
        return {
            "up": up,
            "best": torch.minimum(best, m),
            "level": torch.where(started, new_level, level),
            "chunk": torch.where(started, torch.where(wrap, 0, nxt), chunk),
        }

    def best(self, view: View, state: State) -> Tensor:
        return self._vertex(view, state["up"])
