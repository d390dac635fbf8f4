"""C&W L2: Carlini and Wagner's minimum-distortion L2 attack with a binary search over c.

Carlini, Wagner. "Towards Evaluating the Robustness of Neural Networks." IEEE S&P 2017.

In tanh space, ``x = (tanh(w) + 1) / 2``, Adam minimizes ``||x - x0||_2^2 + c * f(x)`` with
``f = max(z_y - max_{i != y} z_i, -kappa)``; after each run of iterations the constant ``c`` is
bisected (doubled by ten until an adversarial point is found, then halved toward the smallest
successful ``c``) and the search restarts from the original. The iterates are not kept in the
eps-ball (the attack minimizes distortion instead): in rfd's threat model a query succeeds only
when it is misclassified inside the ball, which the engine checks on every query. Each Adam
iteration is one gradient query; the iterations per binary-search step are the paper's maximum
or the budget's share, whichever is smaller, and a step stops early when the objective stalls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View

_BIG = 1e10


def _atanh(x0: Tensor) -> Tensor:
    return torch.atanh((x0 * 2 - 1) * 0.999999)


class CWL2(Attack):
    """C&W-L2 (Carlini & Wagner, S&P 2017), white-box, L2.

    Hyperparameters (the paper's code): ``binary_steps`` (9), ``max_iterations`` (10000, capped
    by the budget), ``lr`` (0.01, Adam), ``initial_c`` (1e-3), ``kappa`` (0), ``abort_early``.
    """

    name = "cw_l2"
    title = "C&W-L2"
    kind = "gradient"
    order = 125
    uses_rng = False
    constrained = False
    loss = "margin"
    norms = ("l2",)
    defaults: dict[str, dict[str, Any]] = {
        "l2": {"binary_steps": 9, "max_iterations": 10000, "lr": 0.01, "initial_c": 1e-3,
               "kappa": 0.0, "abort_early": True},
    }  # fmt: skip

    def __init__(
        self,
        norm: str = "l2",
        binary_steps: int | None = None,
        max_iterations: int | None = None,
        lr: float | None = None,
        initial_c: float | None = None,
        kappa: float | None = None,
        abort_early: bool | None = None,
    ) -> None:
        super().__init__(
            norm, binary_steps=binary_steps, max_iterations=max_iterations, lr=lr,
            initial_c=initial_c, kappa=kappa, abort_early=abort_early,
        )  # fmt: skip
        if int(self.binary_steps) < 1 or int(self.max_iterations) < 1 or not self.lr > 0:
            raise ValueError("cw_l2 needs binary_steps >= 1, max_iterations >= 1, lr > 0")
        if not self.initial_c > 0 or self.kappa < 0:
            raise ValueError("cw_l2 needs initial_c > 0 and kappa >= 0")
        self.binary_steps, self.max_iterations = int(self.binary_steps), int(self.max_iterations)

    def column(self, eot: int = 1) -> str | None:
        return f"{self.title}-{self.binary_steps}" + (f" EOT{eot}" if eot > 1 else "")

    def _iterations(self, view: View) -> int:
        # the budget (less the clean query) shared among the binary-search steps
        return max(1, min(self.max_iterations, (view.total - 1) // self.binary_steps))

    def _reset(self, view: View) -> State:
        w = _atanh(view.x0)
        z = torch.zeros_like(w)
        return {"w": w, "m": z, "v": z.clone()}

    def init(self, view: View) -> State:
        a, dev = len(view), view.x0.device
        zi = torch.zeros(a, dtype=torch.long, device=dev)
        zf = torch.zeros(a, device=dev)
        return {
            **self._reset(view), "c": zf + self.initial_c, "lower": zf.clone(), "upper": zf + _BIG,
            "bstep": zi, "it": zi.clone(), "found": torch.zeros(a, dtype=torch.bool, device=dev),
            "prev": zf + _BIG, "best": view.x0.clone(), "best_l2": zf + _BIG,
            "done": torch.zeros(a, dtype=torch.bool, device=dev),
        }  # fmt: skip

    def propose(self, view: View, state: State) -> Tensor:
        return (torch.tanh(state["w"]) + 1) / 2

    def observe(self, view: View, state: State, reply: Reply) -> State:
        s = dict(state)
        x = (torch.tanh(s["w"]) + 1) / 2
        margin, grad_m = reply.loss[:, 0], reply.grad[:, 0]
        c = s["c"].view(-1, 1, 1, 1)
        l2sq = (x - view.x0).flatten(1).square().sum(1)
        obj = l2sq + s["c"] * margin.clamp(min=-self.kappa)
        fooled = reply.adversarial[:, 0]
        s["found"] = s["found"] | fooled
        closer = fooled & (l2sq.sqrt() < s["best_l2"])
        s["best_l2"] = torch.where(closer, l2sq.sqrt(), s["best_l2"])
        s["best"] = torch.where(closer.view(-1, 1, 1, 1), x, s["best"])
        # Adam on w: d obj / dx = 2 (x - x0) + c * d margin / dx while the margin exceeds -kappa
        active = (margin > -self.kappa).to(x.dtype).view(-1, 1, 1, 1)
        gx = 2 * (x - view.x0) + c * active * grad_m
        gw = gx * (1 - torch.tanh(s["w"]).square()) / 2
        t = (s["it"] + 1).to(x.dtype).view(-1, 1, 1, 1)
        s["m"] = 0.9 * s["m"] + 0.1 * gw
        s["v"] = 0.999 * s["v"] + 0.001 * gw.square()
        mhat, vhat = s["m"] / (1 - 0.9**t), s["v"] / (1 - 0.999**t)
        s["w"] = s["w"] - self.lr * mhat / (vhat.sqrt() + 1e-8)
        s["it"] = s["it"] + 1
        # the end of a binary-search step: all iterations, or stalled (checked every tenth)
        iters = self._iterations(view)
        tick = s["it"] % max(iters // 10, 1) == 0
        stalled = tick & (obj > s["prev"] * 0.9999) if self.abort_early else torch.zeros_like(tick)
        s["prev"] = torch.where(tick, obj, s["prev"])
        end = (s["it"] >= iters) | stalled
        if bool(end.any()):
            found, cc = s["found"], s["c"]
            upper = torch.where(end & found, torch.minimum(s["upper"], cc), s["upper"])
            lower = torch.where(end & ~found, torch.maximum(s["lower"], cc), s["lower"])
            bisect = (lower + upper) / 2
            nxt = torch.where(found | (upper < _BIG), bisect, cc * 10)
            s["c"] = torch.where(end, nxt, cc)
            s["upper"], s["lower"] = upper, lower
            s["bstep"] = s["bstep"] + end.long()
            fresh = self._reset(view)
            e4 = end.view(-1, 1, 1, 1)
            for k in ("w", "m", "v"):
                s[k] = torch.where(e4, fresh[k], s[k])
            s["it"] = torch.where(end, 0, s["it"])
            s["found"] = torch.where(end, False, s["found"])
            s["prev"] = torch.where(end, _BIG, s["prev"])
        s["done"] = s["bstep"] >= self.binary_steps
        return s

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
