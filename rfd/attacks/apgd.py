"""APGD: Auto-PGD with step-size adaptation and momentum, CE or DLR loss, Linf and L2.

Croce, Hein. "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks." ICML 2020.

APGD removes PGD's step-size tuning: it starts at ``2 eps``, takes momentum steps
``x + 0.75 (z - x) + 0.25 (x - x_prev)`` with ``z`` the projected gradient step, and at checkpoints
(the first after 22% of the iterations, then ever closer, at least 6% apart) halves the step and
returns to the best point found (with its gradient) when fewer than 75% of the steps since the
last checkpoint increased the loss, or when the best loss has not moved since a checkpoint that
did not halve. Each image keeps its own schedule. With EOT (each query the mean gradient over M
noise draws, charged M) it is AutoAttack's standard attack on randomized defenses. The DLR loss
(:func:`rfd.gradients.dlr_loss`) is invariant to the logits' scale.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select
from rfd.attacks.pgd import direction


class APGD(Attack):
    """APGD (Croce & Hein, ICML 2020), white-box, Linf and L2.

    Hyperparameters (the paper's): ``n_iter`` iterations (100), ``loss`` ``"ce"`` or ``"dlr"``,
    ``rho`` (0.75, the share of loss increases below which the step is halved), ``momentum``
    (0.75), ``restarts`` (1).
    """

    name = "apgd"
    title = "APGD"
    kind = "gradient"
    order = 130
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        n: {"n_iter": 100, "loss": "ce", "rho": 0.75, "momentum": 0.75, "restarts": 1}
        for n in ("linf", "l2")
    }

    def __init__(
        self,
        norm: str = "linf",
        n_iter: int | None = None,
        loss: str | None = None,
        rho: float | None = None,
        momentum: float | None = None,
        restarts: int | None = None,
    ) -> None:
        super().__init__(norm, n_iter=n_iter, loss=loss, rho=rho, momentum=momentum,
                         restarts=restarts)  # fmt: skip
        if self.loss not in ("ce", "dlr"):
            raise ValueError(f"apgd loss must be 'ce' or 'dlr', got {self.loss!r}")
        if int(self.n_iter) < 1 or int(self.restarts) < 1 or not 0 < self.momentum <= 1:
            raise ValueError("apgd needs n_iter >= 1, restarts >= 1, 0 < momentum <= 1")
        self.n_iter, self.restarts = int(self.n_iter), int(self.restarts)
        # the checkpoint schedule of the reference implementation, in iterations
        self.first = max(int(0.22 * self.n_iter), 1)
        self.decrease = max(int(0.03 * self.n_iter), 1)
        self.min_gap = max(int(0.06 * self.n_iter), 1)

    def column(self, eot: int = 1) -> str | None:
        loss = "" if self.loss == "ce" else f"-{self.loss.upper()}"
        return f"{self.title}{loss}-{self.n_iter}" + (f" EOT{eot}" if eot > 1 else "")

    def _start(self, view: View) -> Tensor:
        # the reference implementation's random start: a random point on the ball's boundary
        x0, rng = view.x0, view.rng.stream("start")
        if view.norm == "linf":
            t = rng.uniform(x0.shape[1:], x0.dtype) * 2 - 1
            t = t / t.flatten(1).abs().amax(1).clamp(min=1e-12).view(-1, 1, 1, 1)
        else:
            t = rng.normal(x0.shape[1:], x0.dtype)
            t = t / t.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return (x0 + view.eps * t).clamp(0.0, 1.0)

    def _fresh(self, view: View) -> State:
        a, dev = len(view), view.x0.device
        x = self._start(view)
        zi = torch.zeros(a, dtype=torch.long, device=dev)
        zf = torch.zeros(a, device=dev)
        return {
            "x": x, "x_prev": x.clone(), "best": x.clone(), "grad_best": torch.zeros_like(x),
            "f_best": zf - math.inf, "f_prev": zf.clone(), "f_best_ck": zf - math.inf,
            "eta": zf + 2 * view.eps, "it": zi, "since_ck": zi.clone(), "gap": zi + self.first,
            "ups": zi.clone(), "halved_ck": torch.ones(a, dtype=torch.bool, device=dev),
        }  # fmt: skip

    def init(self, view: View) -> State:
        st = self._fresh(view)
        st["restart"] = torch.zeros_like(st["it"])
        st["done"] = torch.zeros_like(st["halved_ck"])
        return st

    def propose(self, view: View, state: State) -> Tensor:
        return state["x"]

    def observe(self, view: View, state: State, reply: Reply) -> State:
        s = dict(state)
        x, g, f = s["x"], reply.grad[:, 0], reply.loss[:, 0]
        first = s["it"] == 0
        # the loss at the queried iterate: count increases, keep the best point and its gradient
        s["ups"] = s["ups"] + (~first & (f > s["f_prev"])).long()
        s["f_prev"] = f
        better = f > s["f_best"]
        s["best"], s["grad_best"] = select(better, x, s["best"]), select(better, g, s["grad_best"])
        s["f_best"] = torch.maximum(f, s["f_best"])
        # checkpoints: halve the step and go back to the best point when progress has stalled
        s["since_ck"] = s["since_ck"] + (~first).long()
        check = ~first & (s["since_ck"] == s["gap"])
        oscillating = s["ups"].float() <= s["gap"].float() * self.rho
        stuck = ~s["halved_ck"] & (s["f_best_ck"] >= s["f_best"])
        halve = check & (oscillating | stuck)
        s["eta"] = torch.where(halve, s["eta"] / 2, s["eta"])
        x, g = select(halve, s["best"], x), select(halve, s["grad_best"], g)
        s["halved_ck"] = torch.where(check, halve, s["halved_ck"])
        s["f_best_ck"] = torch.where(check, s["f_best"], s["f_best_ck"])
        s["gap"] = torch.where(check, (s["gap"] - self.decrease).clamp(min=self.min_gap), s["gap"])
        s["since_ck"] = torch.where(check, 0, s["since_ck"])
        s["ups"] = torch.where(check, 0, s["ups"])
        # the step: a projected gradient step, then momentum (none on the first step)
        z = view.project(x + s["eta"].view(-1, 1, 1, 1) * direction(g, view.norm))
        a = torch.where(first, 1.0, self.momentum).view(-1, 1, 1, 1)
        nxt = view.project(x + a * (z - x) + (1 - a) * (x - s["x_prev"]))
        s["x_prev"], s["x"], s["it"] = x, nxt, s["it"] + 1
        # after n_iter steps the last iterate has been queried: restart, or finish
        over = s["it"] > self.n_iter
        if bool(over.any()):
            s["restart"] = s["restart"] + over.long()
            fresh = self._fresh(view)
            for k, t in fresh.items():
                if k in ("best", "grad_best", "f_best"):
                    continue  # the best point survives restarts
                s[k] = select(over, t, s[k]) if t.dim() > 1 else torch.where(over, t, s[k])
        s["done"] = s["restart"] >= self.restarts
        return s

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
