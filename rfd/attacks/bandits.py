"""Bandits-TD: gradient estimation with time and data priors, Linf and L2.

Ilyas, Engstrom, Madry. "Prior Convictions: Black-Box Adversarial Attacks with Bandits and
Priors." ICLR 2019.

The attack keeps a prior ``v``, a running estimate of the gradient of the loss, at a low
resolution (the data prior: one value per ``tile_size`` x ``tile_size`` pixel tile) that
carries over from step to step (the time prior). Each step explores around the prior with
one antithetic pair, ``u = exploration * N(0, I) / sqrt(dim)``, querying
``x + fd_eta * q / ||q||_2`` for ``q = up(v + u)`` and ``q = up(v - u)``; the finite difference
``(l1 - l2) / (fd_eta * exploration) * u`` is a gradient estimate for the prior, which takes an
online-learning step (Linf: exponentiated gradient on [-1, 1]; L2: gradient ascent). The image
then takes a projected step along the prior: ``x + image_lr * sign(up(v))`` (Linf) or
``x + image_lr * up(v) / ||up(v)||_2`` (L2). The loss is the margin loss, descended (the
published code ascends cross-entropy).

Where this differs from the published code (MadryLab/blackbox-bandits) and why:

- The published code checks the new iterate for success with a forward it does not charge.
  Here every step sends the iterate itself along with its two probes, ``[x, probe+, probe-]``,
  three charged queries, so success is judged on charged queries only; a last step with fewer
  than three queries left sends only the iterate (and the image stops).
- The exponentiated-gradient step ``(r e^{hg}) / (r e^{hg} + (1 - r) e^{-hg})`` (``r`` the
  prior mapped to [0, 1]) equals ``tanh(atanh(v) + h g)``; the prior is stored as
  ``atanh(v)``, so the update is that same step without the float overflow of ``e^{hg}`` (NaN
  once ``h g > 88`` in float32, common with ``h = 100`` on small images) and without the
  prior freezing at exactly +-1 once float rounding reaches it (it still takes as long to
  turn as exact arithmetic says, which with ``h = 100`` can be long).
- As in the published code, the probes are not projected onto the eps-ball (they leave it by
  at most ``fd_eta`` in L2; the engine clips them to [0, 1]): the attack is unconstrained in
  the engine's sense, so a probe outside the ball can never count as a success, while the
  iterate, projected after every step, always lies inside. Projecting the probes would cut
  them at the ball's faces exactly along the prior, where the iterate already sits, and the
  prior would stop learning.
- The tile size is in pixels: the published configs upsample a 50 x 50 prior to 299 x 299
  Inception-v3 inputs by nearest neighbour (tiles of 5 or 6 px); rfd repeats each prior value
  over an exact ``tile_size`` x ``tile_size`` tile (cropped at the image's edge) and keeps
  6 px tiles, so a 28 px image has a 5 x 5 prior and a 224 px image a 38 x 38 one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View, select

_TINY = 1e-8  # the published code's guard for the norm of a zero vector


def _norm(t: Tensor) -> Tensor:
    """Per-row L2 norm shaped for broadcasting, with the published code's zero guard."""
    n = t.flatten(1).norm(dim=1)
    return (n + (n == 0).to(n.dtype) * _TINY).view(-1, *[1] * (t.dim() - 1))


def eg_step(prior: Tensor, grad: Tensor, lr: float) -> Tensor:
    """The published exponentiated-gradient step on [-1, 1], written as the code has it.

    Only for reference and tests: it overflows for ``lr * grad > 88`` in float32. The attack
    uses the equal ``tanh(atanh(prior) + lr * grad)`` on the stored ``atanh(prior)``.
    """
    real = (prior + 1) / 2
    pos = real * torch.exp(lr * grad)
    neg = (1 - real) * torch.exp(-lr * grad)
    return pos / (pos + neg) * 2 - 1


class BanditsAttack(Attack):
    """Bandits-TD (Ilyas, Engstrom & Madry, ICLR 2019), score-based, time and data priors.

    Hyperparameters (the authors' ImageNet configs ``linf.json`` / ``l2.json``): ``fd_eta`` the
    L2 length of each probe, ``image_lr`` the image step, ``online_lr`` the prior's learning
    rate, ``exploration`` the scale of the exploration noise around the prior, ``tile_size``
    the side in pixels of one prior tile.
    """

    name = "bandits"
    title = "Bandits"
    order = 60
    kind = "score"
    norms = ("linf", "l2")
    defaults: dict[str, dict[str, Any]] = {
        "linf": {
            "fd_eta": 0.1,
            "image_lr": 0.01,
            "online_lr": 100.0,
            "exploration": 1.0,
            "tile_size": 6,
        },
        "l2": {
            "fd_eta": 0.01,
            "image_lr": 0.5,
            "online_lr": 0.1,
            "exploration": 0.01,
            "tile_size": 6,
        },
    }
    min_queries = 1  # a last step with fewer than 3 queries left checks the iterate alone
    # probes leave the ball along the prior, as in the published code; only points inside count
    constrained = False

    def __init__(
        self,
        norm: str = "linf",
        fd_eta: float | None = None,
        image_lr: float | None = None,
        online_lr: float | None = None,
        exploration: float | None = None,
        tile_size: int | None = None,
    ) -> None:
        super().__init__(
            norm, fd_eta=fd_eta, image_lr=image_lr, online_lr=online_lr,
            exploration=exploration, tile_size=tile_size,
        )  # fmt: skip
        self.require_positive("fd_eta", "image_lr", "online_lr", "exploration")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int):
            raise ValueError(f"bandits tile_size must be an integer >= 1, got {self.tile_size!r}")
        if self.tile_size < 1:
            raise ValueError(f"bandits tile_size must be an integer >= 1, got {self.tile_size}")

    def queries(self, remaining: Tensor) -> Tensor:
        # the iterate and one antithetic pair; with fewer left, the iterate alone (a last check)
        return torch.where(remaining >= 3, 3, 1).to(remaining.dtype)

    def _prior_shape(self, x0: Tensor) -> tuple[int, int, int]:
        c, h, w = x0.shape[1:]
        return c, math.ceil(h / self.tile_size), math.ceil(w / self.tile_size)

    def init(self, view: View) -> State:
        x0 = view.x0
        a, dev = len(view), x0.device
        return {
            "x": x0.clone(),
            # the prior v in its natural parameter z = atanh(v) (Linf) or v itself (L2)
            "z": torch.zeros((a, *self._prior_shape(x0)), dtype=x0.dtype, device=dev),
            "best": x0.clone(),
            "best_m": torch.full((a,), float("inf"), device=dev),
            "done": torch.zeros(a, dtype=torch.bool, device=dev),
        }

    def _prior(self, z: Tensor) -> Tensor:
        return torch.tanh(z) if self.norm == "linf" else z

    def _up(self, v: Tensor, like: Tensor) -> Tensor:
        """Each prior value repeated over its tile, cropped to the image."""
        t = self.tile_size
        h, w = like.shape[-2:]
        return v.repeat_interleave(t, -2).repeat_interleave(t, -1)[..., :h, :w]

    def propose(self, view: View, state: State) -> Tensor:
        x, v = state["x"], self._prior(state["z"])
        dim = v[0].numel()
        noise = view.rng.stream("u").normal(v.shape[1:], v.dtype)
        state["u"] = u = noise * (self.exploration / math.sqrt(dim))  # scratch for observe
        q1, q2 = self._up(v + u, x), self._up(v - u, x)
        probes = [x + self.fd_eta * q / _norm(q) for q in (q1, q2)]
        return torch.stack([x, *probes], 1)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        x, z, m = state["x"], state["z"], reply.margin
        better = m[:, 0] < state["best_m"]
        best = select(better, x, state["best"])
        best_m = torch.minimum(state["best_m"], m[:, 0])
        full = self.queries(view.remaining) == 3
        # loss = -margin (ascended); the published code's l1 - l2 with l = cross-entropy
        deriv = (m[:, 2] - m[:, 1]) / (self.fd_eta * self.exploration)
        grad = deriv.view(-1, 1, 1, 1) * state["u"]
        z_new = z + self.online_lr * grad  # EG on tanh(z) (Linf), gradient ascent (L2)
        g = self._up(self._prior(z_new), x)
        if self.norm == "linf":
            step = g.sign()
        else:
            step = g / _norm(g)
        x_new = view.project(x + self.image_lr * step)
        return {
            "x": select(full, x_new, x),
            "z": select(full, z_new, z),
            "best": best,
            "best_m": best_m,
            "done": ~full,
        }

    def best(self, view: View, state: State) -> Tensor:
        return state["best"]
