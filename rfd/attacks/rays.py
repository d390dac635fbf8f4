"""RayS: hard-label ray search for the nearest decision boundary in Linf.

Chen, Gu. "RayS: A Ray Searching Method for Hard-label Adversarial Attack." KDD 2020.

RayS searches over sign directions ``s`` for the one whose ray ``x + r * s`` crosses the decision
boundary closest to ``x`` (in Linf, ``r`` is the distance). Directions are explored by flipping
blocks of signs, halving block size level by level; a candidate is first checked at the current
best radius (one query) and only binary-searched if it beats it. Success is decided per image by
the oracle: the first verified adversarial query inside the epsilon ball, never a batch-summed
distance as in the published batched code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, QueryOracle, select, shrink


class RayS(Attack):
    """RayS (Chen & Gu, KDD 2020), decision-based, Linf.

    Hyperparameters: ``tol``, the binary-search tolerance in the original code's units (distance
    along the unit-L2 direction ``s / sqrt(d)``), i.e. ``tol / sqrt(d)`` in Linf radius.
    """

    name = "rays"
    kind = "decision"
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {"linf": {"tol": 1e-3}}

    def __init__(self, norm: str = "linf", tol: float | None = None) -> None:
        super().__init__(norm, tol=tol)
        if not self.tol > 0:
            raise ValueError(f"rays tol must be > 0, got {self.tol}")

    def run(self, oracle: QueryOracle) -> None:
        idx = oracle.active(1)
        if idx.numel() == 0:
            return
        shape = oracle.images.shape[1:]
        x0 = oracle.images[idx].flatten(1)
        d = x0.shape[1]
        tol = self.tol / math.sqrt(d)
        sgn = torch.ones_like(x0)
        dist = torch.full((len(idx),), float("inf"), device=x0.device)  # best Linf radius
        level, block = 0, 0
        state = [x0, sgn, dist]
        while True:
            idx, state = shrink(oracle, idx, state, best=None)
            if idx.numel() == 0:
                return
            x0, sgn, dist = state
            size = math.ceil(d / 2**level)
            start, end = block * size, min(d, (block + 1) * size)
            att = sgn.clone()
            att[:, start:end] *= -1
            # Radius 1 already reaches the corner of [0, 1]^d along any sign direction.
            hi = dist.clamp(max=1.0)
            found = oracle.is_adversarial(idx, self._point(x0, att, hi, shape))
            lo = torch.zeros_like(hi)
            search = found & (hi - lo > tol)
            while True:
                search &= oracle.alive(idx)
                if not bool(search.any()):
                    break
                rows = search.nonzero()[:, 0]
                mid = (lo[rows] + hi[rows]) / 2
                adv = oracle.is_adversarial(idx[rows], self._point(x0[rows], att[rows], mid, shape))
                hi[rows] = torch.where(adv, mid, hi[rows])
                lo[rows] = torch.where(adv, lo[rows], mid)
                search[rows] = hi[rows] - lo[rows] > tol
            better = found & (hi < dist)
            dist = torch.where(better, hi, dist)
            sgn = select(better, att, sgn)
            state = [x0, sgn, dist]
            block += 1
            if block == 2**level or end == d:
                level, block = level + 1, 0

    @staticmethod
    def _point(x0: Tensor, direction: Tensor, radius: Tensor, shape: torch.Size) -> Tensor:
        return (x0 + radius.unsqueeze(1) * direction).clamp(0.0, 1.0).view(-1, *shape)
