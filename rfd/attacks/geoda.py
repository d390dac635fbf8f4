"""GeoDA: hard-label attack by estimating the normal of the decision boundary.

Rahmati, Moosavi-Dezfooli, Frossard, Dai. "GeoDA: a geometric framework for black-box
adversarial attacks." CVPR 2020.

A random adversarial start (Gaussian noise of growing size) is binary-searched towards ``x0`` to
a boundary point ``x_b``. Each iteration ``i`` then estimates the boundary's normal at ``x_b``
from ``q_i`` probes ``x_b + sigma * v`` (``v`` Gaussian in the low-frequency DCT subspace), one
query each: ``grad += mean(v if adversarial else -v)``, accumulated over iterations as in the
authors' code; walks from ``x0`` along the normal (L2) or its sign (Linf, the paper's Linf
variant) until a query is adversarial, and binary-searches that point back towards ``x0`` to get
the next ``x_b``. The per-iteration query counts ``q_i`` follow the paper's schedule
``q_i ∝ mu^(-2i/3)``, with the number of iterations chosen as in the authors' code
(``opt_query_iteration``: first estimate between 50 and 80 queries, 25 queries per iteration kept
for the boundary searches).

Each image walks these phases on its own, one query per step (the engine's ``queries()`` sees
only the budget left, not the phase); a probe's noise is redrawn from the step's keyed stream.

Differences from the authors' code (thisisalirah/GeoDA), all deliberate:

- every query is charged, the random start and the binary searches included; the schedule is
  computed from the image's whole budget, as published, and once it is used up the last
  iteration's query count repeats while budget remains;
- the published walk to the boundary steps ``x0 + n * 5 * grad`` with the unnormalized estimate
  in ImageNet's normalized pixel units, a step that means nothing for other data. Here it starts
  at the flat-boundary prediction ``r0 = <x_b - x0, grad> / <dir, grad>`` (the radius at which
  the line ``x0 + r dir`` meets the tangent plane at ``x_b``; ``dir`` the unit normal in L2, its
  sign in Linf) and grows by 1.5x per query (at most 100 queries, as published);
- the subspace is the lowest ``round(sub_ratio * H) x round(sub_ratio * W)`` DCT frequencies per
  channel: the published ``sub_dim = 75`` at 224px as a ratio (9 x 9 at 28px);
- the random start and the tolerances are in [0, 1] pixel units (the published ones are in the
  model's normalized units);
- success is decided by the engine per query (first verified adversarial query inside the ball).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select
from rfd.dct import dct_matrix

RAND, BIN, EST, WALK = range(4)
RESERVE = 25  # queries per iteration the published schedule keeps for the boundary searches
GROW, MAX_WALK = 1.5, 100


def opt_query_iteration(nq: int, t: int, mu: float) -> list[int]:
    """The published schedule: ``q_i ∝ mu^(-2i/3)`` summing to ``nq``, with the number of
    iterations ``t`` moved until the first one gets 50 to 80 queries (the authors'
    ``opt_query_iteration``, written as a loop that cannot oscillate or reach zero)."""
    seen = set()
    while True:
        t = max(1, t)
        coefs = [mu ** (-2 * i / 3) for i in range(t)]
        q = [max(1, round(nq * c / sum(coefs))) for c in coefs]
        seen.add(t)
        if q[0] > 80 and t + 1 not in seen:
            t += 1
        elif q[0] < 50 and t > 1 and t - 1 not in seen:
            t -= 1
        else:
            return q


@functools.lru_cache(maxsize=64)
def schedule(total: int, mu: float) -> tuple[int, ...]:
    """Queries of each gradient estimate for a budget of ``total`` (the authors' main script)."""
    it = max(1, round(total / 500))
    q = opt_query_iteration(max(1, total - it * RESERVE), it, mu)
    q = opt_query_iteration(max(1, total - len(q) * RESERVE), it, mu)
    return tuple(q)


def dct_basis(n: int, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n`` (k, n)."""
    return dct_matrix(n)[:k].to(device=device, dtype=dtype)


class GeoDA(Attack):
    """GeoDA (Rahmati et al., CVPR 2020), decision-based, untargeted, L2 and Linf.

    Hyperparameters (the authors' code): ``sigma`` probe scale, ``mu`` the schedule's ratio,
    ``tol`` binary-search tolerance (L2 length of the final bracket), ``init_step`` the random
    start's noise increment, ``sub_ratio`` the DCT subspace side as a fraction of the image side
    (``75 / 224``; 1 = the full space).
    """

    name = "geoda"
    title = "GeoDA"
    order = 57
    kind = "decision"
    norms = ("linf", "l2")
    _common: dict[str, Any] = {
        "sigma": 0.0002,
        "mu": 0.6,
        "tol": 0.0001,
        "init_step": 0.02,
        "sub_ratio": 0.3348,
    }
    defaults: dict[str, dict[str, Any]] = {"linf": dict(_common), "l2": dict(_common)}

    def __init__(
        self,
        norm: str = "l2",
        sigma: float | None = None,
        mu: float | None = None,
        tol: float | None = None,
        init_step: float | None = None,
        sub_ratio: float | None = None,
    ) -> None:
        super().__init__(
            norm, sigma=sigma, mu=mu, tol=tol, init_step=init_step, sub_ratio=sub_ratio
        )
        if not (self.sigma > 0 and self.tol > 0 and self.init_step > 0):
            raise ValueError("geoda sigma, tol and init_step must be > 0")
        if not 0 < self.mu < 1:
            raise ValueError(f"geoda mu must be in (0, 1), got {self.mu}")
        if not 0 < self.sub_ratio <= 1:
            raise ValueError(f"geoda sub_ratio must be in (0, 1], got {self.sub_ratio}")

    def init(self, view: View) -> State:
        x0 = view.x0.flatten(1)
        a, dev = x0.shape[0], x0.device
        zf = torch.zeros(a, device=dev)
        zl = torch.zeros(a, dtype=torch.long, device=dev)
        return {
            "phase": zl,
            "xr": torch.zeros_like(x0),  # far end of the segment being binary-searched
            "xb": torch.zeros_like(x0),  # the current boundary point
            "grad": torch.zeros_like(x0),  # accumulated normal estimate
            "lo": zf.clone(),  # bracket along x0 -> xr (fractions of the segment)
            "hi": zf.clone(),
            "count": zl.clone(),  # tries of the random start / probes of this estimate / walk
            "iter": zl.clone(),  # gradient estimates completed
            "r0": zf.clone(),  # walk: starting radius
        }

    # -- random draws, recomputable from the step's keyed stream
    def _noise(self, view: View) -> Tensor:
        c, h, w = view.x0.shape[1:]
        kh = max(1, round(self.sub_ratio * h))
        kw = max(1, round(self.sub_ratio * w))
        z = view.rng.stream("v").normal((c, kh, kw), view.x0.dtype)
        bh = dct_basis(h, kh, view.x0.device, view.x0.dtype)
        bw = dct_basis(w, kw, view.x0.device, view.x0.dtype)
        return torch.einsum("kh,ackl,lw->achw", bh, z, bw).flatten(1)

    def _direction(self, grad: Tensor) -> Tensor:
        if self.norm == "linf":
            return grad.sign()
        return grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-12)

    def propose(self, view: View, state: State) -> Tensor:
        x0 = view.x0.flatten(1)
        ph = state["phase"]
        out = torch.empty_like(x0)
        m = (ph == RAND).nonzero()[:, 0]
        if m.numel():
            v = view.subset(m)
            z = v.rng.stream("start").normal(x0.shape[1:], x0.dtype)
            scale = (state["count"][m] + 1).to(x0.dtype) * self.init_step
            out[m] = x0[m] + scale.unsqueeze(1) * z
        m = (ph == BIN).nonzero()[:, 0]
        if m.numel():
            t = ((state["lo"][m] + state["hi"][m]) / 2).unsqueeze(1)
            out[m] = x0[m] + t * (state["xr"][m] - x0[m])
        m = (ph == EST).nonzero()[:, 0]
        if m.numel():
            out[m] = state["xb"][m] + self.sigma * self._noise(view.subset(m))
        m = (ph == WALK).nonzero()[:, 0]
        if m.numel():
            r = state["r0"][m] * GROW ** state["count"][m].to(x0.dtype)
            out[m] = x0[m] + r.unsqueeze(1) * self._direction(state["grad"][m])
        return out.clamp(0.0, 1.0).view_as(view.x0)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        s = {k: state[k] for k in self._keys}
        adv = reply.adversarial[:, 0]
        x = reply.x[:, 0].flatten(1)  # the queries as sent (clipped to [0, 1])
        x0 = view.x0.flatten(1)
        ph, lo, hi, count = s["phase"], s["lo"], s["hi"], s["count"]
        mid = (lo + hi) / 2
        phase = ph

        # random start: the first adversarial noisy image starts a binary search
        rand = ph == RAND
        found = rand & adv
        s["xr"] = select(found, x, s["xr"])
        count = torch.where(rand, count + 1, count)

        # walk along the normal until adversarial (or give up after MAX_WALK queries)
        walk = ph == WALK
        hit = walk & adv
        s["xr"] = select(hit, x, s["xr"])
        gave_up = walk & ~adv & (count + 1 >= MAX_WALK)
        count = torch.where(walk & ~adv, count + 1, count)
        to_bin = found | hit
        lo = torch.where(to_bin, 0.0, lo)
        hi = torch.where(to_bin, 1.0, hi)
        phase = torch.where(to_bin, BIN, phase)

        # binary search between x0 and xr
        bsec = ph == BIN
        hi = torch.where(bsec & adv, mid, hi)
        lo = torch.where(bsec & ~adv, mid, lo)
        length = (s["xr"] - x0).norm(dim=1)
        settled = bsec & ((hi - lo) * length < self.tol)
        xb = x0 + hi.unsqueeze(1) * (s["xr"] - x0)
        s["xb"] = select(settled, xb, s["xb"])
        settled = settled | gave_up  # a failed walk keeps x_b and estimates again
        phase = torch.where(settled, EST, phase)
        count = torch.where(settled, 0, count)

        # probes around x_b: each adds +-v / q_i to the accumulated normal
        est = ph == EST
        q = torch.tensor(schedule(view.total, float(self.mu)), device=x0.device)
        q_i = q[s["iter"].clamp(max=q.numel() - 1)].to(x0.dtype)
        m = est.nonzero()[:, 0]
        if m.numel():
            v = self._noise(view.subset(m))
            sign = (2.0 * adv[m].to(v.dtype) - 1.0) / q_i[m]
            s["grad"] = s["grad"].clone()
            s["grad"][m] += sign.unsqueeze(1) * v
        count = torch.where(est, count + 1, count)
        estimated = est & (count >= q_i)
        s["iter"] = s["iter"] + estimated.long()
        direction = self._direction(s["grad"])
        dot = ((s["xb"] - x0) * s["grad"]).sum(1)
        along = (direction * s["grad"]).sum(1).clamp(min=1e-12)
        dist = self._size(s["xb"] - x0)
        r0 = torch.where(dot > 0, dot / along, dist).clamp(min=self.tol)
        s["r0"] = torch.where(estimated, r0, s["r0"])
        count = torch.where(estimated, 0, count)
        phase = torch.where(estimated, WALK, phase)
        s.update(phase=phase, lo=lo, hi=hi, count=count)
        return s

    def _size(self, v: Tensor) -> Tensor:
        return v.abs().amax(1) if self.norm == "linf" else v.norm(dim=1)

    _keys = ("phase", "xr", "xb", "grad", "lo", "hi", "count", "iter", "r0")
