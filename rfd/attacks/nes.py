"""NES: natural-evolution-strategies gradient estimation, Linf and L2.

Ilyas, Engstrom, Athalye, Lin. "Black-box Adversarial Attacks with Limited Queries and
Information." ICML 2018.

Each step estimates the gradient of the margin loss from antithetic Gaussian probes
``x ± sigma * u`` and takes a projected step: a sign step for Linf (PGD-style), a normalized
gradient step for L2. The current iterate is queried with its probes (one extra query per
step): without it, an iterate that is already adversarial would go unnoticed, and the published
code's habit of checking it for free would undercount the budget. The probes are laid out as
``[x, +u1, -u1, +u2, -u2, ...]`` so that a last step with fewer queries left still sends whole
pairs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select


class NESAttack(Attack):
    """NES (Ilyas et al., ICML 2018), score-based gradient estimation with antithetic sampling.

    Hyperparameters (the paper's appendix D.3): ``samples`` probes per gradient estimate (even:
    ``samples / 2`` antithetic pairs), ``fd_eta`` the probe scale sigma, ``lr`` the step size.
    """

    name = "nes"
    title = "NES"
    order = 20
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"samples": 60, "fd_eta": 0.01, "lr": 0.005},
        "l2": {"samples": 30, "fd_eta": 0.005, "lr": 1.0},
    }
    min_queries = 3  # the iterate and one antithetic pair

    def __init__(
        self,
        norm: str = "linf",
        samples: int | None = None,
        fd_eta: float | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__(norm, samples=samples, fd_eta=fd_eta, lr=lr)
        n = self.samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"nes samples must be an even integer >= 2, got {n!r}")
        self.require_positive("fd_eta", "lr")
        self.pairs = n // 2

    def queries(self, remaining: Tensor) -> Tensor:
        # the last step uses fewer pairs so that the budget is used up rather than left over
        return 2 * torch.clamp((remaining - 1) // 2, max=self.pairs) + 1

    def init(self, view: View) -> State:
        x0 = view.x0
        inf = torch.full((len(view),), float("inf"), device=x0.device)
        return {"x": x0.clone(), "best": x0.clone(), "best_m": inf}

    def _probes(self, view: View) -> Tensor:
        return view.rng.stream("u").normal((self.pairs, *view.x0.shape[1:]), view.x0.dtype)

    def propose(self, view: View, state: State) -> Tensor:
        x = state["x"]
        state["u"] = u = self._probes(view)  # (A, k, C, H, W); scratch for observe
        step = u * self.fd_eta
        xe = x.unsqueeze(1)
        pairs = torch.stack([xe + step, xe - step], 2).flatten(1, 2)  # +u1, -u1, +u2, -u2, ...
        return torch.cat([xe, pairs], 1)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        x, m = state["x"], reply.margin  # (A, 1 + 2k)
        better = m[:, 0] < state["best_m"]
        best = select(better, x, state["best"])
        best_m = torch.minimum(state["best_m"], m[:, 0])
        k = (self.queries(view.remaining) - 1) // 2  # pairs actually sent per image
        valid = torch.arange(self.pairs, device=x.device).unsqueeze(0) < k.unsqueeze(1)
        diff = (m[:, 1::2] - m[:, 2::2]) * valid / (2 * k.unsqueeze(1) * self.fd_eta)
        grad = torch.einsum("ak,ak...->a...", diff, state["u"])
        # Descend the margin: it is the attacker's loss and turns negative once fooled.
        if self.norm == "linf":
            step = grad.sign()
        else:
            step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return {"x": view.project(x - self.lr * step), "best": best, "best_m": best_m}

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
