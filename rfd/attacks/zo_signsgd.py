"""ZO-signSGD: sign of a zeroth-order gradient estimate, Linf.

Liu, Chen, Chen, Hong. "signSGD via Zeroth-Order Oracle." ICLR 2019.

Each step estimates the gradient of the margin loss at the iterate ``x`` by forward differences
along ``q`` random Gaussian directions, ``g = sum_i (m(x + mu * u_i) - m(x)) / mu * u_i``, and
takes a projected sign step ``x <- proj(x - lr * sign(g))`` (the margin is descended: it is the
attacker's loss and turns negative once the image is fooled). A step sends ``q + 1`` queries,
the iterate first, so every iterate is itself checked for success.

The estimator and defaults follow BlackboxBench's ZO-signSGD (the code the Random Noise Defense
paper ran; rewritten from the SignHunter repository): Gaussian rather than unit-sphere
directions (the sign step does not see the estimator's scale, only its direction distribution
differs), forward differences from the iterate, and its CIFAR-10 Linf setting ``q = 30``,
``fd_eta = lr = 2.55 / 255 = 0.01`` (eps 0.05). The paper's own attack experiments optimize a
C&W-style loss in tanh space and do not carry over to an eps-ball attack. Unlike that code, a
last step with fewer than ``q + 1`` queries left uses fewer directions rather than overrunning
the budget, and every query is projected onto the ball and [0, 1] by the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select


class ZOSignSGD(Attack):
    """ZO-signSGD (Liu et al., ICLR 2019), score-based, Linf.

    Hyperparameters (BlackboxBench's CIFAR-10 Linf config, as run by the RND paper): ``q``
    random directions per gradient estimate, ``fd_eta`` the smoothing radius mu (per-pixel
    standard deviation of a probe), ``lr`` the sign step.
    """

    name = "zo_signsgd"
    title = "ZO-signSGD"
    order = 70
    kind = "score"
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {"linf": {"q": 30, "fd_eta": 0.01, "lr": 0.01}}
    min_queries = 2  # the iterate and one direction

    def __init__(
        self,
        norm: str = "linf",
        q: int | None = None,
        fd_eta: float | None = None,
        lr: float | None = None,
    ) -> None:
        super().__init__(norm, q=q, fd_eta=fd_eta, lr=lr)
        if isinstance(self.q, bool) or not isinstance(self.q, int) or self.q < 1:
            raise ValueError(f"zo_signsgd q must be an integer >= 1, got {self.q!r}")
        self.require_positive("fd_eta", "lr")

    def queries(self, remaining: Tensor) -> Tensor:
        # the last step uses fewer directions so that the budget is used up, not overrun
        return torch.clamp(remaining, max=self.q + 1)

    def init(self, view: View) -> State:
        x0 = view.x0
        inf = torch.full((len(view),), float("inf"), device=x0.device)
        return {"x": x0.clone(), "best": x0.clone(), "best_m": inf}

    def propose(self, view: View, state: State) -> Tensor:
        x = state["x"]
        u = view.rng.stream("u").normal((self.q, *x.shape[1:]), x.dtype)
        state["u"] = u  # (A, q, C, H, W); scratch for observe
        return torch.cat([x.unsqueeze(1), x.unsqueeze(1) + self.fd_eta * u], 1)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        x, m = state["x"], reply.margin  # (A, 1 + q)
        better = m[:, 0] < state["best_m"]
        best = select(better, x, state["best"])
        best_m = torch.minimum(state["best_m"], m[:, 0])
        k = self.queries(view.remaining) - 1  # directions actually sent per image
        valid = torch.arange(self.q, device=x.device).unsqueeze(0) < k.unsqueeze(1)
        diff = (m[:, 1:] - m[:, :1]) / self.fd_eta * valid
        grad = torch.einsum("ak,ak...->a...", diff, state["u"])
        return {"x": view.project(x - self.lr * grad.sign()), "best": best, "best_m": best_m}

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
