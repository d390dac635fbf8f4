"""Sign-Flip Attack (SFA): hard-label Linf attack by projection and random sign flips.

Chen, Zhang, Hu, Wu. "Boosting Decision-based Black-box Adversarial Attacks with Random Sign
Flip." ECCV 2020.

Start from a random image that is already misclassified, binary-search it towards the original
in Linf (10 steps), then alternate two steps per iteration, each one query and kept only if the
point stays adversarial: (1) a random +-alpha perturbation projected onto a slightly smaller Linf
ball, shrinking the perturbation; (2) flipping the sign of a few random coordinates of the
perturbation. Every ``adapt_every`` iterations, alpha and the flip probabilities adapt to the
acceptance rates. Unlike the published code, the random initialization and the binary search are
charged to the budget; success is the first verified adversarial query inside the epsilon ball.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, QueryOracle, select, shrink


class SignFlip(Attack):
    """SignFlip (Chen et al., ECCV 2020), decision-based, Linf.

    Hyperparameters (the original code's): ``alpha`` initial projection step; ``keep_prob`` the
    per-coordinate probability of keeping its sign (the code's ``prob``; a coordinate flips with
    ``1 - keep_prob``), clamped to ``[prob_min, prob_max]``; ``search_steps`` of the initial
    binary search; ``adapt_every`` iterations between adaptations.
    """

    name = "signflip"
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

    def run(self, oracle: QueryOracle) -> None:
        idx = oracle.active(1)
        if idx.numel() == 0:
            return
        g = oracle.generator
        x0 = oracle.images[idx]
        # 1. Uniform random images until each one is misclassified (each try is a query).
        xa = torch.rand(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
        have = oracle.is_adversarial(idx, xa)
        while True:
            need = ~have & oracle.alive(idx)
            if not bool(need.any()):
                break
            r = need.nonzero()[:, 0]
            xa[r] = torch.rand(xa[r].shape, generator=g, device=x0.device, dtype=x0.dtype)
            have[r] = oracle.is_adversarial(idx[r], xa[r])
        idx, x0, xa = idx[have], x0[have], xa[have]
        # 2. Linf binary search between the original and the random image.
        lo = torch.zeros(len(idx), device=x0.device)
        hi = (xa - x0).flatten(1).abs().amax(1)
        for _ in range(int(self.search_steps)):
            r = oracle.alive(idx).nonzero()[:, 0]
            if r.numel() == 0:
                break
            mid = (lo[r] + hi[r]) / 2
            adv = oracle.is_adversarial(idx[r], _toward(xa[r], x0[r], mid))
            hi[r] = torch.where(adv, mid, hi[r])
            lo[r] = torch.where(adv, lo[r], mid)
        delta = _toward(xa, x0, hi) - x0
        self._flip_loop(oracle, idx, x0, delta)

    def _flip_loop(self, oracle: QueryOracle, idx: Tensor, x0: Tensor, delta: Tensor) -> None:
        g, a = oracle.generator, len(idx)
        alpha = torch.full((a,), float(self.alpha), device=x0.device)
        prob = torch.full_like(x0, float(self.keep_prob))
        acc_proj = torch.zeros(a, device=x0.device)
        acc_flip = torch.zeros(a, device=x0.device)
        state = [x0, delta, alpha, prob, acc_proj, acc_flip]
        it = 0
        while True:
            idx, state = shrink(oracle, idx, state, best=None)
            if idx.numel() == 0:
                return
            x0, delta, alpha, prob, acc_proj, acc_flip = state
            it += 1
            # Projection step: a random +-alpha move, then into the Linf ball of radius l - alpha.
            sign = (
                torch.randint(0, 2, x0.shape, generator=g, device=x0.device, dtype=x0.dtype) * 2 - 1
            )
            radius = (delta.flatten(1).abs().amax(1) - alpha).clamp(min=0).view(-1, 1, 1, 1)
            cand = torch.maximum(
                torch.minimum(delta + sign * alpha.view(-1, 1, 1, 1), radius), -radius
            )
            ok = oracle.is_adversarial(idx, (x0 + cand).clamp(0.0, 1.0))
            delta = select(ok, cand, delta)
            acc_proj += ok
            # Sign-flip step, for the images that can still pay for it.
            r = oracle.alive(idx).nonzero()[:, 0]
            if r.numel():
                s = torch.bernoulli(prob[r], generator=g) * 2 - 1
                cand = delta[r] * s
                ok = oracle.is_adversarial(idx[r], (x0[r] + cand).clamp(0.0, 1.0))
                okf = ok.to(s.dtype).view(-1, 1, 1, 1)
                prob[r] = (prob[r] - okf * s * 1e-4).clamp(self.prob_min, self.prob_max)
                delta[r] = select(ok, cand, delta[r])
                acc_flip[r] += ok
            if it % int(self.adapt_every) == 0:
                rate_p, rate_f = acc_proj / self.adapt_every, acc_flip / self.adapt_every
                alpha = torch.where(rate_p > 0.7, alpha * 1.5, alpha)
                alpha = torch.where(rate_p < 0.3, alpha / 1.5, alpha)
                shift = (rate_f < 0.3).to(prob.dtype) * 1e-3 - (rate_f > 0.7).to(prob.dtype) * 1e-3
                prob = (prob + shift.view(-1, 1, 1, 1)).clamp(self.prob_min, self.prob_max)
                acc_proj.zero_()
                acc_flip.zero_()
            state = [x0, delta, alpha, prob, acc_proj, acc_flip]


def _toward(xa: Tensor, x0: Tensor, radius: Tensor) -> Tensor:
    """``xa`` clipped into the Linf ball of the given radius around ``x0`` (and into [0, 1])."""
    r = radius.view(-1, 1, 1, 1)
    return torch.maximum(x0 - r, torch.minimum(xa, x0 + r)).clamp(0.0, 1.0)
