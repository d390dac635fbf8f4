"""Sign-Flip Attack (SFA): hard-label Linf attack by projection and random sign flips.

Chen, Zhang, Hu, Wu. "Boosting Decision-based Black-box Adversarial Attacks with Random Sign
Flip." ECCV 2020.

Start from a random image that is already misclassified, binary-search it towards the original
in Linf (10 steps), then alternate two steps, each one query and kept only if the point stays
adversarial: (1) a random +-alpha perturbation projected onto a slightly smaller Linf ball,
shrinking the perturbation; (2) flipping the sign of a few random coordinates of the
perturbation. Every ``adapt_every`` iterations, alpha and the flip probabilities adapt to the
acceptance rates. The random initialization and the binary search are charged to the budget (the
published code charges its binary search but not the random images it tries first); success is
the first verified adversarial query inside the epsilon ball.
Each image walks these phases on its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, Rows, State, View, phase_rows, select
from rfd.tensors import put, take

INIT, SEARCH, PROJECT, FLIP = 0, 1, 2, 3


class SignFlip(Attack):
    """SignFlip (Chen et al., ECCV 2020), decision-based, Linf.

    Hyperparameters (the original code's): ``alpha`` initial projection step; ``keep_prob`` the
    per-coordinate probability of keeping its sign (the code's ``prob``; a coordinate flips with
    ``1 - keep_prob``), clamped to ``[prob_min, prob_max]``; ``search_steps`` of the initial
    binary search; ``adapt_every`` iterations between adaptations.
    """

    name = "signflip"
    title = "SignFlip"
    order = 50
    kind = "decision"
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {
        "linf": {
            "alpha": 0.004,
            "keep_prob": 0.999,
            "prob_min": 0.99,
            "prob_max": 0.9999,
            "search_steps": 10,
            "adapt_every": 10,
        }
    }

    def __init__(
        self,
        norm: str = "linf",
        alpha: float | None = None,
        keep_prob: float | None = None,
        prob_min: float | None = None,
        prob_max: float | None = None,
        search_steps: int | None = None,
        adapt_every: int | None = None,
    ) -> None:
        super().__init__(
            norm,
            alpha=alpha,
            keep_prob=keep_prob,
            prob_min=prob_min,
            prob_max=prob_max,
            search_steps=search_steps,
            adapt_every=adapt_every,
        )
        if not 0 <= self.prob_min <= self.keep_prob <= self.prob_max <= 1:
            raise ValueError("signflip needs 0 <= prob_min <= keep_prob <= prob_max <= 1")
        if self.alpha <= 0 or self.search_steps < 0 or self.adapt_every < 1:
            raise ValueError("signflip needs alpha > 0, search_steps >= 0, adapt_every >= 1")

    def init(self, view: View) -> State:
        x0 = view.x0
        a, dev = len(view), x0.device
        zero = torch.zeros(a, device=dev)
        izero = torch.zeros(a, dtype=torch.long, device=dev)
        return {
            "phase": izero,
            "xa": x0.clone(),  # the adversarial starting point (phases INIT and SEARCH)
            "lo": zero,
            "hi": zero.clone(),
            "count": izero.clone(),  # binary-search steps done; then iterations done
            "delta": torch.zeros_like(x0),
            "alpha": torch.full((a,), float(self.alpha), device=dev),
            "prob": torch.full_like(x0, float(self.keep_prob)),
            "acc_proj": zero.clone(),
            "acc_flip": zero.clone(),
        }

    # -- the candidate of each phase; PROJECT and FLIP leave their random draw (the candidate
    # perturbation, or the signs) in the state as scratch, so observe need not redraw it
    def _random(self, view: View) -> Tensor:
        return view.rng.stream("init").uniform(view.x0.shape[1:], view.x0.dtype)

    def _projected(self, view: View, s: Rows) -> Tensor:
        delta = s["delta"]
        bits = view.rng.stream("sign").bits01(delta.shape[1:], delta.dtype)
        return _project_step(delta, s["alpha"], bits)

    def _flips(self, view: View, s: Rows) -> Tensor:
        return view.rng.stream("flip").bernoulli(s["prob"]).to(s["delta"].dtype) * 2 - 1

    def propose(self, view: View, state: State) -> Tensor:
        if int(state["phase"].min()) >= PROJECT:
            return self._propose_steady(view, state)
        out, draw = torch.empty_like(view.x0), None
        for ph, m in phase_rows(state["phase"]):
            v, s = (view, Rows(state, None)) if m is None else (view.subset(m), Rows(state, m))
            d = None
            if ph == INIT:
                q = self._random(v)
            elif ph == SEARCH:
                q = _toward(s["xa"], v.x0, (s["lo"] + s["hi"]) / 2)
            elif ph == PROJECT:
                d = self._projected(v, s)
                q = (v.x0 + d).clamp(0.0, 1.0)
            else:
                d = self._flips(v, s)
                q = (v.x0 + s["delta"] * d).clamp(0.0, 1.0)
            if m is None:
                out, draw = q, d
                break
            put(out, m, q)
            if d is not None:
                if draw is None:
                    draw = torch.empty_like(view.x0)
                put(draw, m, d)
        if draw is not None:
            state["draw"] = draw
        return out

    def _propose_steady(self, view: View, state: State) -> Tensor:
        """Every image alternating PROJECT and FLIP (the rest of the run after the search):
        both candidates from one hash pass and one set of full-width ops instead of gathering
        each phase's images. Each image gets the numbers and the candidate its phase's own
        branch of :meth:`propose` gives, bit for bit."""
        delta, flip = state["delta"], state["phase"] == FLIP
        rng = view.rng.streams(flip, "sign", "flip")
        u, bits = rng.uniform_and_bits01(delta.shape[1:], delta.dtype)
        projected = _project_step(delta, state["alpha"], bits)
        flips = (u < state["prob"]).to(delta.dtype) * 2 - 1
        draw = select(flip, delta * flips, projected)
        state["draw"], state["flips"], state["flip"] = draw, flips, flip  # scratch for observe
        return (view.x0 + draw).clamp(0.0, 1.0)

    def _observe_steady(self, state: State, ok: Tensor) -> State:
        """:meth:`observe` after :meth:`_propose_steady`: the PROJECT and FLIP updates as masked
        full-width ops (each image's values are those of its phase's own update)."""
        flip = state["flip"]  # the FLIP images, as propose found them
        acc_proj = state["acc_proj"] + (ok & ~flip)
        acc_flip = state["acc_flip"] + (ok & flip)
        it = state["count"] + flip
        adapt = flip & (it % int(self.adapt_every) == 0)
        return {
            "delta": select(ok, state["draw"], state["delta"]),
            **self._adapt(
                state["prob"], state["flips"], ok & flip, adapt, acc_proj, acc_flip, state["alpha"]
            ),
            "count": it,
            "phase": torch.where(flip, PROJECT, FLIP),
        }

    def observe(self, view: View, state: State, reply: Reply) -> State:
        # Each phase updates only its own images and only the keys it changes; a key is copied
        # (once) the first time a phase writes it, so steady-state steps never copy ``xa``.
        ok, xq = reply.adversarial[:, 0], reply.x[:, 0]
        if "flips" in state:
            return self._observe_steady(state, ok)
        steps = (self._after_init, self._after_search, self._after_project, self._after_flip)
        out: State = {}
        for ph, m in phase_rows(state["phase"]):
            if m is None:
                return steps[ph](view, Rows(state, None), ok, xq)
            new = steps[ph](view.subset(m), Rows(state, m), ok[m], xq[m])
            for k, t in new.items():
                if k not in out:
                    out[k] = state[k].clone()
                put(out[k], m, t)
        return out

    def _after_init(self, view: View, s: Rows, ok: Tensor, x: Tensor) -> State:
        # 1. uniform random images until one is misclassified (each try is a query)
        xa = select(ok, x, s["xa"])
        hi = torch.where(ok, (xa - view.x0).flatten(1).abs().amax(1), s["hi"])
        new = {"xa": xa, "hi": hi, "lo": torch.zeros_like(hi)}
        if self.search_steps == 0:
            return {**new, **self._start_flips(view, s, xa, hi, s["count"], ok)}
        return {**new, "phase": torch.where(ok, SEARCH, INIT)}

    def _after_search(self, view: View, s: Rows, ok: Tensor, x: Tensor) -> State:
        # 2. Linf binary search between the original and the random image
        mid = (s["lo"] + s["hi"]) / 2
        hi, lo = torch.where(ok, mid, s["hi"]), torch.where(ok, s["lo"], mid)
        count = s["count"] + 1
        go = count >= int(self.search_steps)
        return {"hi": hi, "lo": lo, **self._start_flips(view, s, s["xa"], hi, count, go)}

    def _start_flips(
        self, view: View, s: Rows, xa: Tensor, hi: Tensor, count: Tensor, go: Tensor
    ) -> State:
        delta = _toward(xa, view.x0, hi) - view.x0
        return {
            "delta": select(go, delta, s["delta"]),
            "phase": torch.where(go, PROJECT, s["phase"]),
            "count": torch.where(go, 0, count),
        }

    def _after_project(self, view: View, s: Rows, ok: Tensor, x: Tensor) -> State:
        # 3. a random +-alpha move, projected into the Linf ball of radius l - alpha
        return {
            "delta": select(ok, s["draw"], s["delta"]),
            "acc_proj": s["acc_proj"] + ok,
            "phase": torch.full_like(s["phase"], FLIP),
        }

    def _after_flip(self, view: View, s: Rows, ok: Tensor, x: Tensor) -> State:
        # 4. flip the signs of a few random coordinates; adapt every `adapt_every` iterations
        flips, delta = s["draw"], s["delta"]
        it = s["count"] + 1
        adapt = it % int(self.adapt_every) == 0
        return {
            "delta": select(ok, delta * flips, delta),
            **self._adapt(
                s["prob"], flips, ok, adapt, s["acc_proj"], s["acc_flip"] + ok, s["alpha"]
            ),
            "count": it,
            "phase": torch.full_like(s["phase"], PROJECT),
        }

    def _adapt(
        self, prob: Tensor, flips: Tensor, accepted: Tensor, adapt: Tensor, acc_proj: Tensor,
        acc_flip: Tensor, alpha: Tensor,
    ) -> State:  # fmt: skip
        """The flip step's adaptation: ``accepted`` images move their flip probabilities against
        the signs they flipped; ``adapt`` images (every ``adapt_every`` iterations) shift them and
        alpha by the acceptance rates, then restart their counts."""
        lo, hi = self.prob_min, self.prob_max
        # only accepted images move their flip probabilities, and only adapting ones shift them
        # (the others would add an exact zero and clamp values already inside the bounds)
        acc, ad = accepted.nonzero()[:, 0], adapt.nonzero()[:, 0]
        if acc.numel() or ad.numel():
            prob = prob.clone()
        if acc.numel():
            put(prob, acc, (take(prob, acc) - take(flips, acc) * 1e-4).clamp(lo, hi))
        rate_p, rate_f = acc_proj / self.adapt_every, acc_flip / self.adapt_every
        if ad.numel():
            shift = (rate_f < 0.3).to(prob.dtype) * 1e-3 - (rate_f > 0.7).to(prob.dtype) * 1e-3
            put(prob, ad, (take(prob, ad) + take(shift, ad).view(-1, 1, 1, 1)).clamp(lo, hi))
        new_alpha = torch.where(rate_p > 0.7, alpha * 1.5, alpha)
        new_alpha = torch.where(rate_p < 0.3, new_alpha / 1.5, new_alpha)
        return {
            "prob": prob,
            "alpha": torch.where(adapt, new_alpha, alpha),
            "acc_proj": torch.where(adapt, 0.0, acc_proj),
            "acc_flip": torch.where(adapt, 0.0, acc_flip),
        }


def _project_step(delta: Tensor, alpha: Tensor, bits: Tensor) -> Tensor:
    """The PROJECT candidate: ``delta`` moved by +-alpha (the sign from 0/1 ``bits``), projected
    into the Linf ball of radius ``|delta|_inf - alpha``."""
    alpha = alpha.view(-1, 1, 1, 1)
    radius = (delta.flatten(1).abs().amax(1).view(-1, 1, 1, 1) - alpha).clamp(min=0)
    return torch.maximum(torch.minimum(delta + (bits * 2 - 1) * alpha, radius), -radius)


def _toward(xa: Tensor, x0: Tensor, radius: Tensor) -> Tensor:
    """``xa`` clipped into the Linf ball of the given radius around ``x0`` (and into [0, 1])."""
    r = radius.view(-1, 1, 1, 1)
    return torch.maximum(x0 - r, torch.minimum(xa, x0 + r)).clamp(0.0, 1.0)
