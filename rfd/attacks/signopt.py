"""Sign-OPT: hard-label attack by sign-gradient descent on the distance to the boundary.

Cheng, Singh, Chen, Chen, Liu, Hsieh. "Sign-OPT: A Query-Efficient Hard-label Adversarial
Attack." ICLR 2020.

The attack optimizes a search direction ``theta`` (unit norm) to minimize ``g(theta)``, the
distance from ``x0`` to the decision boundary along ``theta``, found by binary search. The start is
the best of ``directions`` random Gaussian directions; each iteration then estimates the sign of
the directional derivative of ``g`` from ``k`` random unit vectors ``u``, each answered by ONE
query (is ``x0 + g(theta) * unit(theta + beta u)`` adversarial? then ``g`` decreases along
``u``), steps ``theta <- unit(theta - alpha * mean(sign * u))`` with the published line search
(double ``alpha`` while ``g`` improves, else quarter it up to 15 times) and re-measures ``g`` by
the published local search (grow or shrink the bracket by 1 %, then bisect to ``beta / 500``).

Each image walks these phases on its own, one query per step (the engine's ``queries()`` sees
only the budget left, not the phase, so the ``k`` sign queries of a gradient estimate are ``k``
one-query steps; the random vector of each is redrawn from the step's keyed stream).

Differences from the authors' code (cmhcbb/attackbox, ``attack/Sign_OPT.py``), all deliberate:

- every query is charged, including the check of each random initial direction and every local
  search query (the published count skips some of them);
- a random initial direction is checked once, at ``min(||theta||, best g)`` (the published code
  checks it at ``||theta||`` and again at the best ``g``): one query fewer, and the same decision
  wherever the ray crosses the boundary once;
- the initial direction count is ``min(directions, total // 10)`` so that small budgets keep
  queries for the descent (100 directions at 1000 queries, as published);
- in the growing local search the lower end of the bracket follows the last non-adversarial
  radius (the published code keeps the first; the bracket is valid either way, ours is tighter);
  the search gives up beyond the largest distance the image box allows (``sqrt(d)`` in L2, 1 in
  Linf) instead of the published constant 20;
- success is decided by the engine per query (first verified adversarial query inside the ball);
- a binary search also ends when its float32 bracket can no longer shrink (the authors' float64
  tolerance ``beta / 500`` is finer than float32's spacing at distances above 32).

Linf follows the authors' ``attack/Sign_OPT_lf.py``: ``theta`` and the probes ``u`` are normalized to unit
Linf norm (so ``g`` is the Linf distance), the initial search stops at 1e-5 and a step size below
1e-6 (1e-4 in L2) counts as stalled.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, bracket_stuck, select

CHECK, SEARCH, GRAD, FIRST, GROW, SHRINK, BIN = range(7)
UP, DOWN = 0, 1
INIT_TOL = {"l2": 1e-3, "linf": 1e-5}  # the published initial binary-search tolerances
STALL = {"l2": 1e-4, "linf": 1e-6}  # below this step size the published code resets alpha, beta
LS_TRIES = 15  # the published line-search length (each way)


class SignOPT(Attack):
    """Sign-OPT (Cheng et al., ICLR 2020), decision-based, untargeted, L2 and Linf.

    Hyperparameters (the authors' code): ``alpha`` initial line-search step, ``beta`` probe
    size of the sign-gradient estimate (the local search tolerance is ``beta / 500``), ``k``
    single-query sign evaluations per gradient estimate, ``directions`` random initial
    directions (at most ``total // 10``).
    """

    name = "signopt"
    title = "Sign-OPT"
    order = 56
    kind = "decision"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"alpha": 0.2, "beta": 0.001, "k": 200, "directions": 100},
        "l2": {"alpha": 0.2, "beta": 0.001, "k": 200, "directions": 100},
    }

    def __init__(
        self,
        norm: str = "l2",
        alpha: float | None = None,
        beta: float | None = None,
        k: int | None = None,
        directions: int | None = None,
    ) -> None:
        super().__init__(norm, alpha=alpha, beta=beta, k=k, directions=directions)
        if not (self.alpha > 0 and self.beta > 0):
            raise ValueError(f"signopt alpha and beta must be > 0, got {self.alpha}, {self.beta}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"signopt k must be an integer >= 1, got {self.k!r}")
        if int(self.directions) != self.directions or self.directions < 1:
            raise ValueError(f"signopt directions must be an integer >= 1, got {self.directions!r}")

    # -- geometry --------------------------------------------------------------------------
    def _size(self, v: Tensor) -> Tensor:
        """(A,) norm of flat vectors in the attack's norm."""
        return v.abs().amax(1) if self.norm == "linf" else v.norm(dim=1)

    def _unit(self, v: Tensor) -> Tensor:
        return v / self._size(v).clamp(min=1e-12).unsqueeze(1)

    def _cap(self, d: int) -> float:
        """The largest distance along a unit direction that can still change the image."""
        return 1.0 if self.norm == "linf" else math.sqrt(d)

    # -- protocol --------------------------------------------------------------------------
    def init(self, view: View) -> State:
        x0 = view.x0.flatten(1)
        a, dev = x0.shape[0], x0.device
        zf = torch.zeros(a, device=dev)
        zl = torch.zeros(a, dtype=torch.long, device=dev)
        return {
            "phase": zl,
            "theta": torch.zeros_like(x0),  # current direction (unit norm)
            "g": torch.full((a,), float("inf"), device=dev),  # distance along theta
            "cand": torch.zeros_like(x0),  # direction being searched
            "grad": torch.zeros_like(x0),  # sum of sign * u over this estimate
            "min_theta": torch.zeros_like(x0),  # line search: best so far
            "min_g": zf.clone(),
            "lo": zf.clone(),
            "hi": zf.clone(),
            "alpha": torch.full((a,), float(self.alpha), device=dev),
            "beta": torch.full((a,), float(self.beta), device=dev),
            "dirs": zl.clone(),  # initial directions tried
            "count": zl.clone(),  # sign queries of this estimate / line-search tries
            "mode": zl.clone(),  # line search UP or DOWN
            "done": torch.zeros(a, dtype=torch.bool, device=dev),
        }

    def _draw(self, view: View, d: int) -> Tensor:
        return view.rng.stream("z").normal((d,), view.x0.dtype)

    def propose(self, view: View, state: State) -> Tensor:
        x0 = view.x0.flatten(1)
        ph, g = state["phase"], state["g"]
        z = self._draw(view, x0.shape[1])
        raw = self._size(z)
        u = self._unit(z)
        probe = self._unit(state["theta"] + state["beta"].unsqueeze(1) * u)
        direction = select(
            ph == CHECK, z / raw.unsqueeze(1), select(ph == GRAD, probe, state["cand"])
        )
        mid = (state["lo"] + state["hi"]) / 2
        r = torch.where(ph == CHECK, torch.minimum(raw, g), mid)
        r = torch.where(ph == GRAD, g, r)
        r = torch.where((ph == FIRST) | (ph == GROW), state["hi"], r)
        r = torch.where(ph == SHRINK, state["lo"], r)
        state["dir"], state["r"], state["u"] = direction, r, u  # scratch for observe
        return (x0 + r.unsqueeze(1) * direction).clamp(0.0, 1.0).view_as(view.x0)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        s = {k: state[k] for k in self.init_keys}
        adv = reply.adversarial[:, 0]
        ph, r, direction = s["phase"], state["r"], state["dir"]
        d = direction.shape[1]
        lo, hi = s["lo"], s["hi"]
        mid = (lo + hi) / 2

        # -- initialization: random directions, each checked once, searched if it may be better
        check, search = ph == CHECK, ph == SEARCH
        to_search = check & adv
        s["cand"] = select(to_search, direction, s["cand"])
        lo = torch.where(to_search, 0.0, lo)
        hi = torch.where(to_search, r, hi)
        hi = torch.where(search & adv, mid, hi)
        lo = torch.where(search & ~adv, mid, lo)
        searched = search & ((hi - lo <= INIT_TOL[self.norm]) | bracket_stuck(lo, hi))
        better = searched & (hi < s["g"])
        s["theta"] = select(better, s["cand"], s["theta"])
        s["g"] = torch.where(better, hi, s["g"])
        tried = (check & ~adv) | searched
        s["dirs"] = s["dirs"] + tried.long()
        n_dirs = max(1, min(int(self.directions), view.total // 10))
        start = tried & (s["dirs"] >= n_dirs) & torch.isfinite(s["g"])
        phase = torch.where(to_search, SEARCH, ph)
        phase = torch.where(tried, CHECK, phase)

        # -- sign-gradient estimate: one query per random unit vector
        grad_step = ph == GRAD
        sign = 1.0 - 2.0 * adv.to(direction.dtype)  # adversarial: g decreases along u
        s["grad"] = s["grad"] + (grad_step.to(sign.dtype) * sign).unsqueeze(1) * state["u"]
        count = s["count"] + grad_step.long()
        estimated = grad_step & (count >= int(self.k))
        count = torch.where(estimated, 0, count)
        s["mode"] = torch.where(estimated, UP, s["mode"])
        s["min_theta"] = select(estimated, s["theta"], s["min_theta"])
        s["min_g"] = torch.where(estimated, s["g"], s["min_g"])

        # -- local search of g along cand, starting from hi (FIRST)
        first, grow, shrink, bsec = ph == FIRST, ph == GROW, ph == SHRINK, ph == BIN
        lbd = hi
        phase = torch.where(first, torch.where(adv, SHRINK, GROW), phase)
        lo = torch.where(first, torch.where(adv, 0.99 * lbd, lbd), lo)
        hi = torch.where(first & ~adv, 1.01 * lbd, hi)
        # growing: the last non-adversarial radius becomes the lower end
        lo = torch.where(grow & ~adv, hi, lo)
        hi = torch.where(grow & ~adv, hi * 1.01, hi)
        lost = grow & ~adv & (hi > self._cap(d))
        phase = torch.where(grow & adv, BIN, phase)
        # shrinking
        hi = torch.where(shrink & adv, lo, hi)
        lo = torch.where(shrink & adv, lo * 0.99, lo)
        phase = torch.where(shrink & ~adv, BIN, phase)
        # bisecting
        hi = torch.where(bsec & adv, mid, hi)
        lo = torch.where(bsec & ~adv, mid, lo)
        local = (bsec & ((hi - lo <= s["beta"] / 500) | bracket_stuck(lo, hi))) | lost
        new_g = torch.where(lost, float("inf"), hi)

        # -- line search on the step size (the published two loops)
        alpha, mode, theta = s["alpha"], s["mode"], s["theta"]
        up, down = local & (mode == UP), local & (mode == DOWN)
        alpha = torch.where(up, alpha * 2, alpha)
        count = count + local.long()
        improved = local & torch.where(up, new_g < s["min_g"], new_g < s["g"])
        s["min_theta"] = select(improved, s["cand"], s["min_theta"])
        s["min_g"] = torch.where(improved, new_g, s["min_g"])
        more_up = up & improved & (count < LS_TRIES)
        go_down = up & ~more_up & (s["min_g"] >= s["g"])
        more_down = down & ~improved & (count < LS_TRIES)
        count = torch.where(go_down, 0, count)
        mode = torch.where(go_down, DOWN, mode)
        alpha = torch.where(go_down | more_down, alpha * 0.25, alpha)
        finished = local & ~(more_up | go_down | more_down)
        # the first candidate of a line search, or its next one
        nxt = estimated | more_up | go_down | more_down
        sg = s["grad"] / float(self.k)
        s["cand"] = select(nxt, self._unit(theta - alpha.unsqueeze(1) * sg), s["cand"])
        phase = torch.where(nxt, FIRST, phase)
        hi = torch.where(nxt, s["min_g"], hi)

        # -- end of an iteration: move, reset the estimate, rescue a stalled step size
        stalled = finished & (alpha < STALL[self.norm])
        alpha = torch.where(stalled, 1.0, alpha)
        s["beta"] = torch.where(stalled, s["beta"] * 0.1, s["beta"])
        s["theta"] = select(finished, s["min_theta"], s["theta"])
        s["g"] = torch.where(finished, s["min_g"], s["g"])
        restart = start | finished
        s["grad"] = select(restart, torch.zeros_like(s["grad"]), s["grad"])
        count = torch.where(restart, 0, count)
        phase = torch.where(restart, GRAD, phase)
        s["done"] = s["done"] | (s["beta"] < 1e-8)
        s.update(phase=phase, lo=lo, hi=hi, alpha=alpha, mode=mode, count=count)
        return s

    init_keys = (
        "phase", "theta", "g", "cand", "grad", "min_theta", "min_g", "lo", "hi", "alpha",
        "beta", "dirs", "count", "mode", "done",
    )  # fmt: skip
