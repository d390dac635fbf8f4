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
    uses_rng = False
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

    def _chunk(self, state: State) -> tuple[Tensor, Tensor, Tensor]:
        """This step's chunk [start, end) per image, and whether the image has started (its
        all-plus vertex answered: before that nothing is flipped)."""
        level, chunk = state["level"], state["chunk"]
        d = state["up"].shape[1]
        size = torch.ceil(d / torch.pow(2.0, level.double())).long()
        start = chunk * size
        end = torch.clamp(start + size, max=d)
        return start, end, torch.isfinite(state["best"])

    def _vertex(self, view: View, up: Tensor) -> Tensor:
        up = up.view_as(view.x0)
        if self.norm == "linf":
            return torch.lerp(view.lower, view.upper, up)
        step = view.eps / math.sqrt(view.x0[0].numel())
        return (view.x0 + step * (2 * up - 1)).clamp_(0.0, 1.0)

    def propose(self, view: View, state: State) -> Tensor:
        up = state["up"]
        start, end, started = self._chunk(state)
        state["end"], state["started"] = end, started  # scratch for observe
        ar = torch.arange(up.shape[1], device=up.device)
        mask = (ar >= start.unsqueeze(1)) & (ar < end.unsqueeze(1)) & started.unsqueeze(1)
        state["mask"] = mask
        return self._vertex(view, (up - mask.to(up.dtype)).abs())

    def observe(self, view: View, state: State, reply: Reply) -> State:
        up, best, level, chunk = state["up"], state["best"], state["level"], state["chunk"]
        end, started = state["end"], state["started"]
        m = reply.margin[:, 0]
        keep = (m <= best).unsqueeze(1) & state["mask"]  # ties keep the flip, as in the original
        d = up.shape[1]
        nxt = chunk + started  # the chunk position advances once the hierarchy has started
        wrap = started & ((nxt == torch.pow(2, level)) | (end == d))
        # all levels done: restart the hierarchy from the current signs (the queries stay
        # vertices of the ball around the original, so the center never moves)
        top = math.ceil(math.log2(d))
        new_level = torch.where(wrap, (level + 1) % (top + 1), level)
        return {
            "up": (up - keep.to(up.dtype)).abs(),
            "best": torch.minimum(best, m),
            "level": new_level,
            "chunk": torch.where(wrap, 0, nxt),
        }

    def best(self, view: View, state: State) -> Tensor:
        return self._vertex(view, state["up"])
