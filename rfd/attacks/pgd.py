"""PGD: projected gradient descent on the attack loss, Linf and L2, with random start and restarts.

Madry, Makelov, Schmidt, Tsipras, Vladu. "Towards Deep Learning Models Resistant to Adversarial
Attacks." ICLR 2018.

Each step queries the gradient of the loss at the current iterate (one charged query; with EOT
the mean gradient over M noise draws, charged M) and moves ``step_size`` along its sign (Linf) or
its normalized direction (L2), projected onto the eps-ball and [0, 1]. Every query is also a
forward, so the engine declares success at the first iterate that is (verifiably) misclassified;
after ``steps`` steps the final iterate is queried once more, then the next restart begins from a
new random point. The step size follows the common rule ``rel_step * eps / steps`` (2.5 / steps
of the radius), so that the walk can cross the ball and come back within the budget.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select

ASCEND = {"ce": 1.0, "dlr": 1.0, "margin": -1.0}  # CE and DLR go up; the margin goes down


def random_start(view: View, stream: str = "start") -> Tensor:
    """A uniformly random point of the ball (Linf: per pixel; L2: a random direction at a radius
    uniform in [0, eps]), clipped to [0, 1]."""
    x0, rng = view.x0, view.rng.stream(stream)
    if view.norm == "linf":
        u = rng.uniform(x0.shape[1:], x0.dtype) * 2 - 1
        return (x0 + view.eps * u).clamp(0.0, 1.0)
    d = rng.normal(x0.shape[1:], x0.dtype)
    d = d / d.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    r = rng.stream("radius").uniform((), x0.dtype).view(-1, 1, 1, 1)
    return (x0 + view.eps * r * d).clamp(0.0, 1.0)


def direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent direction of a gradient in the norm's unit ball."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)


class PGD(Attack):
    """PGD (Madry et al., ICLR 2018), white-box, Linf and L2.

    Hyperparameters: ``steps`` per restart, ``rel_step`` (step size = rel_step * eps / steps),
    ``random_start``, ``restarts``, and the ``loss`` (``"ce"`` as in the paper; ``"margin"`` or
    ``"dlr"``).
    """

    name = "pgd"
    title = "PGD"
    kind = "gradient"
    order = 110
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"steps": 20, "rel_step": 2.5, "random_start": True, "restarts": 1, "loss": "ce"},
        "l2": {"steps": 20, "rel_step": 2.5, "random_start": True, "restarts": 1, "loss": "ce"},
    }

    def __init__(
        self,
        norm: str = "linf",
        steps: int | None = None,
        rel_step: float | None = None,
        random_start: bool | None = None,
        restarts: int | None = None,
        loss: str | None = None,
    ) -> None:
        super().__init__(
            norm, steps=steps, rel_step=rel_step, random_start=random_start, restarts=restarts,
            loss=loss,
        )  # fmt: skip
        if int(self.steps) < 1 or int(self.restarts) < 1 or not self.rel_step > 0:
            raise ValueError(f"{self.name} needs steps >= 1, restarts >= 1, rel_step > 0")
        if self.loss not in ASCEND:
            raise ValueError(f"unknown {self.name} loss {self.loss!r}; valid: {', '.join(ASCEND)}")
        self.steps, self.restarts = int(self.steps), int(self.restarts)

    def column(self, eot: int = 1) -> str | None:
        return f"{self.title}-{self.steps}" + (f" EOT{eot}" if eot > 1 else "")

    def start(self, view: View) -> Tensor:
        return random_start(view) if self.random_start else view.x0.clone()

    def init(self, view: View) -> State:
        a, dev = len(view), view.x0.device
        x = self.start(view)
        zero = torch.zeros(a, dtype=torch.long, device=dev)
        worst = torch.full((a,), float("-inf"), device=dev)
        return {"x": x, "best": x.clone(), "best_f": worst, "it": zero, "restart": zero.clone(),
                "done": torch.zeros(a, dtype=torch.bool, device=dev)}  # fmt: skip

    def propose(self, view: View, state: State) -> Tensor:
        return state["x"]

    def observe(self, view: View, state: State, reply: Reply) -> State:
        x, it, restart = state["x"], state["it"], state["restart"]
        sign = ASCEND[self.loss]
        f = sign * reply.loss[:, 0]  # the objective, larger is better for the attacker
        better = f > state["best_f"]
        best, best_f = select(better, x, state["best"]), torch.maximum(f, state["best_f"])
        stepping = it < self.steps  # else the final iterate has just been queried
        step = self.rel_step * view.eps / self.steps
        moved = view.project(x + sign * step * direction(reply.grad[:, 0], view.norm))
        nxt_restart = restart + (~stepping).long()
        fresh = self.start(view)  # the next restart's random point (drawn from this step's keys)
        x = select(stepping, moved, fresh)
        return {
            "x": x, "best": best, "best_f": best_f,
            "it": torch.where(stepping, it + 1, 0), "restart": nxt_restart,
            "done": nxt_restart >= self.restarts,
        }  # fmt: skip

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
