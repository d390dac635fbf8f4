"""NES: natural-evolution-strategies gradient estimation, Linf and L2.

Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited Queries and
Information." ICML 2018.

Each iteration estimates the gradient of the margin loss from antithetic Gaussian probes
``x ± sigma * u`` and takes a projected step: a sign step for Linf (PGD-style), a normalized
gradient step for L2. The current iterate is queried with its probes (one extra query per
iteration): without it, an iterate that is already adversarial would go unnoticed, and the
published code's habit of checking it for free would undercount the budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, QueryOracle, select, shrink


class NESAttack(Attack):
    """NES (Ilyas et al., ICML 2018), score-based gradient estimation with antithetic sampling.

    Hyperparameters (the paper's appendix D.3): ``samples`` probes per gradient estimate (even:
    ``samples / 2`` antithetic pairs), ``fd_eta`` the probe scale sigma, ``lr`` the step size.
    """

    name = "nes"
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"samples": 60, "fd_eta": 0.01, "lr": 0.005},
        "l2": {"samples": 30, "fd_eta": 0.005, "lr": 1.0},
    }

    def __init__(
        self,
        norm: str = "linf",
        samples: int | None = None,
        fd_eta: float | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__(norm, samples=samples, fd_eta=fd_eta, lr=lr)
        if int(self.samples) < 2 or int(self.samples) % 2:
            raise ValueError(f"nes samples must be an even number >= 2, got {self.samples}")
        if self.fd_eta <= 0 or self.lr <= 0:
            raise ValueError(f"nes fd_eta and lr must be > 0, got {self.fd_eta}, {self.lr}")

    def run(self, oracle: QueryOracle) -> None:
        pairs = int(self.samples) // 2
        idx = oracle.active(3)
        if idx.numel() == 0:
            return
        x0 = oracle.images[idx]
        state = [x0.clone(), x0, torch.full((len(idx),), float("inf"), device=x0.device), x0]
        shape = x0.shape[1:]
        u = probes = torch.empty(0)
        while True:
            # All attacked images spend in lockstep; the last iteration uses fewer pairs so that
            # the budget is used up rather than left over.
            idx, state = shrink(oracle, idx, state, cost=3, best=0)
            if idx.numel() == 0:
                return
            k = min(pairs, (int(oracle.remaining(idx).min()) // oracle.eot - 1) // 2)
            best, x, best_m, x0 = state
            a = len(idx)
            if u.shape[:2] != (a, k):  # the big buffers live until the active set shrinks
                u = torch.empty((a, k, *shape), device=x.device, dtype=x.dtype)
                probes = torch.empty((a, 2 * k + 1, *shape), device=x.device, dtype=x.dtype)
            u.normal_(generator=oracle.generator)
            probes[:, 0] = x
            xe = x.unsqueeze(1)
            torch.add(xe, u, alpha=self.fd_eta, out=probes[:, 1 : k + 1])
            torch.sub(xe, u, alpha=self.fd_eta, out=probes[:, k + 1 :])
            m = oracle.margin(idx, probes)  # (A, 2k + 1): one call, the oracle's grouped form
            better = m[:, 0] < best_m
            best = select(better, x, best)
            best_m = torch.minimum(best_m, m[:, 0])
            diff = (m[:, 1 : k + 1] - m[:, k + 1 :]) / (2 * k * self.fd_eta)
            grad = torch.einsum("ak,ak...->a...", diff, u)
            x = self._step(oracle, idx, x, grad)
            state = [best, x, best_m, x0]

    def _step(self, oracle: QueryOracle, idx: Tensor, x: Tensor, grad: Tensor) -> Tensor:
        # Descend the margin: it is the attacker's loss and turns negative once fooled.
        if self.norm == "linf":
            return oracle.project(idx, x - self.lr * grad.sign())
        norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return oracle.project(idx, x - self.lr * grad / norm)
