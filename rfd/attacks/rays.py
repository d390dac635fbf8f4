"""RayS: hard-label ray search for the nearest decision boundary in Linf.

Chen, Gu. "RayS: A Ray Searching Method for Hard-label Adversarial Attack." KDD 2020.

RayS searches over sign directions ``s`` for the one whose ray ``x + r * s`` crosses the decision
boundary closest to ``x`` (in Linf, ``r`` is the distance). Directions are explored by flipping
blocks of signs, halving block size level by level; a candidate is first checked at the current
best radius (one query) and only binary-searched if it beats it. Each image walks this as its own
state machine (check, then search, then the next block). Success is decided per image by the
engine: the first verified adversarial query inside the epsilon ball, never a batch-summed
distance as in the published batched code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select

CHECK, SEARCH = 0, 1


class RayS(Attack):
    """RayS (Chen & Gu, KDD 2020), decision-based, Linf.

    Hyperparameters: ``tol``, the binary-search tolerance in the original code's units (distance
    along the unit-L2 direction ``s / sqrt(d)``), i.e. ``tol / sqrt(d)`` in Linf radius.
    """

    name = "rays"
    title = "RayS"
    order = 40
    uses_rng = False
    kind = "decision"
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {"linf": {"tol": 1e-3}}

    def __init__(self, norm: str = "linf", tol: float | None = None) -> None:
        super().__init__(norm, tol=tol)
        if not self.tol > 0:
            raise ValueError(f"rays tol must be > 0, got {self.tol}")

    def init(self, view: View) -> State:
        a, d = len(view), view.x0[0].numel()
        dev = view.x0.device
        zero = torch.zeros(a, dtype=torch.long, device=dev)
        zf = torch.zeros(a, device=dev)
        return {
            "sgn": torch.ones((a, d), dtype=view.x0.dtype, device=dev),
            "dist": torch.full((a,), float("inf"), device=dev),  # best Linf radius so far
            "level": zero,
            "block": zero.clone(),
            "phase": zero.clone(),
            "lo": zf,
            "hi": zf.clone(),
        }

    def _attempt(self, state: State) -> Tensor:
        """The current direction with this step's block flipped."""
        sgn, level, block = state["sgn"], state["level"], state["block"]
        d = sgn.shape[1]
        size = torch.ceil(d / 2.0 ** level.double()).long()
        ar = torch.arange(d, device=sgn.device)
        flip = (ar >= (block * size).unsqueeze(1)) & (ar < ((block + 1) * size).unsqueeze(1))
        return sgn * (1 - 2 * flip.to(sgn.dtype))

    def _radius(self, state: State) -> Tensor:
        # Radius 1 already reaches the corner of [0, 1]^d along any sign direction.
        check = state["dist"].clamp(max=1.0)
        return torch.where(state["phase"] == CHECK, check, (state["lo"] + state["hi"]) / 2)

    def propose(self, view: View, state: State) -> Tensor:
        x0 = view.x0.flatten(1)
        state["att"] = att = self._attempt(state)  # scratch for observe
        point = x0 + self._radius(state).unsqueeze(1) * att
        return point.clamp(0.0, 1.0).view_as(view.x0)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        adv = reply.adversarial[:, 0]
        tol = self.tol / math.sqrt(state["sgn"].shape[1])
        check = state["phase"] == CHECK
        mid = (state["lo"] + state["hi"]) / 2
        # check: lo = 0, hi = the tried radius; search: halve the bracket
        hi = torch.where(check, state["dist"].clamp(max=1.0), torch.where(adv, mid, state["hi"]))
        lo = torch.where(check, torch.zeros_like(mid), torch.where(adv, state["lo"], mid))
        searching = (check & adv | ~check) & (hi - lo > tol)
        found = ~check | adv  # a search only starts from a found direction
        finish = ~searching
        better = finish & found & (hi < state["dist"])
        sgn = select(better, state["att"], state["sgn"])
        dist = torch.where(better, hi, state["dist"])
        level, block = state["level"], state["block"]
        d = sgn.shape[1]
        size = torch.ceil(d / 2.0 ** level.double()).long()
        nxt = block + 1
        wrap = (nxt == 2**level) | ((block + 1) * size >= d)
        new_block = torch.where(wrap, 0, nxt)
        new_level = torch.where(wrap, level + 1, level)
        return {
            "sgn": sgn,
            "dist": dist,
            "level": torch.where(finish, new_level, level),
            "block": torch.where(finish, new_block, block),
            "phase": torch.where(searching, SEARCH, CHECK),
            "lo": lo,
            "hi": hi,
        }
