"""HopSkipJumpAttack (HSJA): hard-label boundary walk by sign-of-decision gradient estimates.

Chen, Jordan, Wainwright.
"HopSkipJumpAttack: A Query-Efficient Decision-Based Attack." IEEE S&P 2020.

Untargeted, Linf and L2. Each image walks these phases on its own clock, one query per step:

1. INIT: uniform random images until one is misclassified (at most ``init_tries``), then
2. SEARCH: binary search between the original ``x0`` and that point down to the boundary (L2:
   along the segment, tolerance ``theta`` on the blend factor; Linf: clipping into a shrinking
   Linf box, tolerance ``min(theta * dist, theta)``), with ``theta = gamma / d^(3/2)`` (L2) or
   ``gamma / d^2`` (Linf);
3. GRAD (iteration ``t``): ``B_t = init_num_evals * sqrt(t)`` probes ``x_t + delta_t * u``
   (capped by ``max_num_evals`` and the queries left), ``u`` uniform on the unit L2 sphere (L2:
   normalized Gaussian, Linf: normalized uniform[-1, 1], as in the authors' code), clipped to
   [0, 1]; the direction is the baseline-corrected mean ``mean((phi_i - mean phi) u_i)`` of the
   +-1 decisions (``+-mean u`` when all decisions agree), normalized; Linf steps along its sign.
   ``delta_1 = 0.1``, then ``delta_t = d^q * theta * dist_{t-1}`` (``q = 1/2`` L2, ``1`` Linf);
4. STEP: geometric step-size search, ``xi_t = dist_t / sqrt(t)`` halved until the stepped point
   ``clip(x_t + xi * v)`` is adversarial, then SEARCH back to the boundary, and the next GRAD.

The engine checks every query for success (misclassified and inside the eps ball), so the attack
only minimizes its distance, as the paper does; it is judged per image, never on a batch.

Where this differs from the authors' code (github.com/Jianbo-Lab/HSJA) and why:

- One query per step, the gradient probes included: the engine asks an attack for a step's query
  count from the budget left alone, not from the per-image phase, so a phase-dependent
  ``B_t``-query step would charge every binary-search step ``B_t`` queries. The probes' decisions
  are accumulated (``sum phi u``, ``sum u``, ``sum phi``) and the estimate formed after the
  ``B_t``-th, which is exactly the code's estimator; the directions come from each step's keyed
  stream.
- The code finds random noise without a cap (it asserts fewer than 10^4 tries); here an image
  gives up after ``init_tries`` (100, ART's ``init_size``) and reports the original.
- The code binary-searches the initial noise twice (a blend search to tolerance 0.001, then the
  norm's search); here once, with the norm's search and tolerance (it saves ~10 queries).
- ``delta_t`` uses the distance of the boundary point ``x_{t-1}`` (the paper's ``d_{t-1}``); the
  code uses the distance of the stepped point before its binary search.
- The code halves the step size without limit; here the step is abandoned (the next iteration
  re-estimates at the same point) once ``xi`` falls below the binary search's resolution
  ``theta * dist``, which keeps a randomized model from trapping an image in this loop.
- No iteration cap (the code's ``num_iterations=40``): the query budget ends the attack.
- Images are float32 here, float64 in the code. At 224 px the code's tolerances and probe radii
  lie below float32's spacing (Linf: ``theta * dist`` is ~1e-11, a probe moves pixels by ~1e-9).
  So a search also ends when its bracket can no longer shrink, and ``delta_t`` is at least
  ``4 sqrt(d) eps_dtype``, which moves a probe's pixels by a few float steps. Neither bound is
  reached at 28 or 32 px; without them an image would repeat one query until its budget ran out.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import (
    Attack,
    Reply,
    Rows,
    State,
    View,
    bracket_stuck,
    phase_rows,
    select,
)

INIT, SEARCH, GRAD, STEP = 0, 1, 2, 3


class HopSkipJump(Attack):
    """HopSkipJumpAttack (Chen, Jordan & Wainwright, S&P 2020), decision-based, Linf and L2.

    Hyperparameters (the authors' code's defaults): ``init_num_evals`` the probes ``B_0`` of the
    first gradient estimate (``B_t = B_0 sqrt(t)``), ``max_num_evals`` their cap, ``gamma`` the
    binary-search tolerance scale (``theta = gamma / d^(3/2)`` for L2, ``gamma / d^2`` for Linf),
    ``init_tries`` the random images tried before an image gives up.
    """

    name = "hsja"
    title = "HSJA"
    order = 55
    kind = "decision"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"init_num_evals": 100, "max_num_evals": 10000, "gamma": 1.0, "init_tries": 100},
        "l2": {"init_num_evals": 100, "max_num_evals": 10000, "gamma": 1.0, "init_tries": 100},
    }

    def __init__(
        self,
        norm: str = "linf",
        init_num_evals: int | None = None,
        max_num_evals: int | None = None,
        gamma: float | None = None,
        init_tries: int | None = None,
    ) -> None:
        super().__init__(
            norm,
            init_num_evals=init_num_evals,
            max_num_evals=max_num_evals,
            gamma=gamma,
            init_tries=init_tries,
        )
        for k in ("init_num_evals", "max_num_evals", "init_tries"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"hsja {k} must be an integer >= 1, got {v!r}")
        if self.max_num_evals < self.init_num_evals:
            raise ValueError(
                f"hsja max_num_evals ({self.max_num_evals}) must be >= init_num_evals "
                f"({self.init_num_evals})"
            )
        self.require_positive("gamma")

    # -- constants of the image size -------------------------------------------------------
    def _theta(self, d: int) -> float:
        return self.gamma / (d**1.5 if self.norm == "l2" else d**2)

    def _dist(self, x: Tensor, x0: Tensor) -> Tensor:
        diff = (x - x0).flatten(1)
        return diff.norm(dim=1) if self.norm == "l2" else diff.abs().amax(1)

    def _toward(self, x0: Tensor, xa: Tensor, r: Tensor) -> Tensor:
        """The code's ``project``: blend ``x0 -> xa`` by ``r`` (L2), or ``xa`` clipped into the
        Linf box of radius ``r`` around ``x0``."""
        r = r.view(-1, 1, 1, 1)
        if self.norm == "l2":
            return torch.lerp(x0, xa, r)
        return torch.maximum(x0 - r, torch.minimum(xa, x0 + r))

    # -- the protocol ----------------------------------------------------------------------
    def init(self, view: View) -> State:
        x0 = view.x0
        a, dev = len(view), x0.device
        zf = torch.zeros(a, device=dev)
        zl = torch.zeros(a, dtype=torch.long, device=dev)
        return {
            "phase": zl,
            "x": x0.clone(),  # the current boundary point x_t (x0 until the first search ends)
            # SEARCH: the adversarial end of the segment searched; STEP: the update direction
            "ray": torch.zeros_like(x0),
            "sfu": torch.zeros_like(x0),  # GRAD: sum of phi_i * u_i
            "su": torch.zeros_like(x0),  # GRAD: sum of u_i
            "sf": zf,  # GRAD: sum of phi_i
            "k": zl.clone(),  # GRAD: probes answered; INIT: random images tried
            "n": zl.clone(),  # GRAD: probes of this estimate (B_t)
            "it": zl.clone(),  # iterations started (t)
            "lo": zf.clone(),
            "hi": zf.clone(),
            "thr": zf.clone(),
            "dist": zf.clone(),  # distance of x_t to x0
            "delta": zf.clone(),  # probe radius delta_t
            "xi": zf.clone(),  # STEP: the step size being tried
            "done": torch.zeros(a, dtype=torch.bool, device=dev),
        }

    def _noise(self, view: View, s: Rows) -> Tensor:
        return view.rng.stream("init").uniform(view.x0.shape[1:], view.x0.dtype)

    def _mid(self, view: View, s: Rows) -> Tensor:
        return self._toward(view.x0, s["ray"], (s["lo"] + s["hi"]) / 2)

    def _probe(self, view: View, s: Rows) -> Tensor:
        shape, dt = view.x0.shape[1:], view.x0.dtype
        rng = view.rng.stream("dir")
        u = rng.normal(shape, dt) if self.norm == "l2" else rng.uniform(shape, dt) * 2 - 1
        u = u / u.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
        return (s["x"] + s["delta"].view(-1, 1, 1, 1) * u).clamp(0.0, 1.0)

    def _stepped(self, view: View, s: Rows) -> Tensor:
        return (s["x"] + s["xi"].view(-1, 1, 1, 1) * s["ray"]).clamp(0.0, 1.0)

    def propose(self, view: View, state: State) -> Tensor:
        makers = {INIT: self._noise, SEARCH: self._mid, GRAD: self._probe, STEP: self._stepped}
        out = torch.empty_like(view.x0)
        for ph, m in phase_rows(state["phase"]):
            if m is None:
                return makers[ph](view, Rows(state, None))
            out[m] = makers[ph](view.subset(m), Rows(state, m))
        return out

    def observe(self, view: View, state: State, reply: Reply) -> State:
        x0, s = view.x0, state
        d = x0[0].numel()
        theta = self._theta(d)
        ok, xq = reply.adversarial[:, 0], reply.x[:, 0]
        phase = s["phase"]
        init, search, grad, step = (
            (phase == INIT),
            (phase == SEARCH),
            (phase == GRAD),
            (phase == STEP),
        )

        # INIT: a misclassified random image starts the search; give up after init_tries
        k = s["k"] + init
        done = s["done"] | (init & ~ok & (k >= self.init_tries))

        # STEP: adversarial -> search back to the boundary from there; else halve the step
        start = (init | step) & ok
        ray = select(start, xq, s["ray"])
        if self.norm == "l2":
            hi0 = torch.ones_like(s["hi"])
            thr0 = torch.full_like(s["hi"], theta)
        else:
            hi0 = self._dist(xq, x0)
            thr0 = (hi0 * theta).clamp(max=theta)
        lo = torch.where(start, 0.0, s["lo"])
        hi = torch.where(start, hi0, s["hi"])
        thr = torch.where(start, thr0, s["thr"])
        xi = torch.where(step & ~ok, s["xi"] / 2, s["xi"])
        # a step below the search's resolution cannot move x_t: re-estimate at x_t instead
        giveup = step & ~ok & (xi < theta * s["dist"])

        # SEARCH: halve the bracket; done once it is within the tolerance
        mid = (s["lo"] + s["hi"]) / 2
        lo = torch.where(search & ~ok, mid, lo)
        hi = torch.where(search & ok, mid, hi)
        searching = search | start
        # done within the tolerance, or once the bracket cannot shrink in the images' dtype: the
        # authors' float64 tolerance (d^-2 of the distance, Linf) lies below float32's spacing at
        # 224 px, and the midpoint would then repeat one end for the rest of the budget
        fin = searching & (~(hi - lo > thr) | bracket_stuck(lo, hi))
        xb = self._toward(x0, ray, hi)  # the adversarial end of the bracket
        x = select(fin, xb, s["x"])
        dist = torch.where(fin, self._dist(xb, x0), s["dist"])

        # GRAD: accumulate the probe's decision phi = +-1 and its (clipped) direction
        g = grad.to(x0.dtype)
        phi = ok.to(x0.dtype) * 2 - 1
        w = (g / s["delta"].clamp(min=1e-30)).view(-1, 1, 1, 1)
        rv = (xq - s["x"]) * w  # (clip(x + delta u) - x) / delta for probes, 0 otherwise
        sfu = s["sfu"] + phi.view(-1, 1, 1, 1) * rv
        su = s["su"] + rv
        sf = s["sf"] + g * phi
        k = torch.where(grad, s["k"] + 1, k)
        estimated = grad & (k >= s["n"])
        kf = k.to(x0.dtype).clamp(min=1)
        # baseline-corrected mean; when every decision agrees the baseline would cancel it,
        # and the code takes +-mean(u) instead (= sum(phi u) / k then)
        base = torch.where(sf.abs() >= kf, 0.0, sf / kf).view(-1, 1, 1, 1)
        est = sfu / kf.view(-1, 1, 1, 1) - base * su / kf.view(-1, 1, 1, 1)
        est = est / est.flatten(1).norm(dim=1).clamp(min=1e-30).view(-1, 1, 1, 1)
        upd = est.sign() if self.norm == "linf" else est
        ray = select(estimated, upd, ray)
        it = s["it"]
        xi = torch.where(estimated, dist / it.clamp(min=1).to(dist.dtype).sqrt(), xi)

        # the next iteration: after a search ends, or a step is abandoned
        nxt = fin | giveup
        it = it + nxt
        t = it.clamp(min=1).to(torch.float64)
        left = (view.remaining - 1).clamp(min=1)  # queries left after this one
        n_t = torch.floor(self.init_num_evals * t.sqrt()).long().clamp(max=self.max_num_evals)
        n = torch.where(nxt, torch.minimum(n_t, left), s["n"])
        scale = math.sqrt(d) if self.norm == "l2" else d  # d^q
        # the probe radius, floored where a probe would move pixels by less than the images'
        # float spacing (224 px Linf in float32): an unmoved probe answers nothing
        floor = 4.0 * math.sqrt(d) * torch.finfo(x0.dtype).eps
        delta_t = torch.where(it == 1, 0.1, (scale * theta * dist).clamp(min=floor))
        delta = torch.where(nxt, delta_t, s["delta"])
        reset = nxt.to(x0.dtype).view(-1, 1, 1, 1)
        new_phase = torch.where(searching, SEARCH, phase)
        new_phase = torch.where(estimated, STEP, new_phase)
        new_phase = torch.where(nxt, GRAD, new_phase)
        return {
            "phase": new_phase,
            "x": x,
            "ray": ray,
            "sfu": sfu * (1 - reset),
            "su": su * (1 - reset),
            "sf": torch.where(nxt, 0.0, sf),
            "k": torch.where(nxt, 0, k),
            "n": n,
            "it": it,
            "lo": lo,
            "hi": hi,
            "thr": thr,
            "dist": dist,
            "delta": delta,
            "xi": xi,
            "done": done,
        }

    def best(self, view: View, state: State) -> Tensor:
        return state["x"]
