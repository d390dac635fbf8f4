"""Adversarial Attack on Attackers (Chen et al., NeurIPS 2022), the deterministic baseline.

AAA post-processes logits so that, locally, the attacker's margin loss runs backwards: margins are
pushed towards their mirror image around an "attractor" placed every ``tau`` margin units, while a
calibration term keeps the top-1 probability where it was. The label is kept, so AAA cannot slow
decision-based attacks; rfd carries it as the paper's comparison row.
"""

from __future__ import annotations

import torch
from torch import nn

from rfd.defenses.base import Defense


def aaa_logits(
    logits: torch.Tensor,
    tau: float = 6.0,
    kappa: float = 1.0,
    weight: float = 5.0,
    lr: float = 0.1,
    steps: int = 100,
) -> torch.Tensor:
    """AAA-linear on a batch of logits; same input, same output (no randomness).

    With top-2 margin m0, attractor a = (floor(m0 / tau) + 1/2) * tau (the paper's
    round(m0/tau + 1/2) - 1/2 away from ties) and target t = a - kappa * (m0 - a), Adam optimizes
    the logits on |margin - t| + weight * |p_top1 - p_top1(z0)|. The loss is summed over samples
    rather than averaged: Adam's per-element step makes both the same up to its epsilon, and the
    sum keeps each sample's answer independent of what else is in the batch. Where the optimizer
    would change the predicted class, the original logits are returned, so the label is always
    kept. Runs under ``enable_grad`` on a clone, so it also works under ``no_grad`` and
    ``inference_mode`` (inference tensors cannot enter autograd).

    Returns:
        Logits in ``logits``' dtype; if ``logits`` requires grad, the AAA offset is added as a
        constant (straight-through), so white-box attacks see the undefended gradient (BPDA).
    """
    with torch.inference_mode(False), torch.enable_grad():
        ref = logits.detach().clone().to(torch.promote_types(logits.dtype, torch.float32))
        top = ref.argmax(1, keepdim=True)
        v0 = ref.topk(2, dim=1).values
        m0 = v0[:, 0] - v0[:, 1]
        attractor = (torch.floor(m0 / tau) + 0.5) * tau
        target = attractor - kappa * (m0 - attractor)
        p0 = ref.softmax(1).gather(1, top).squeeze(1)
        z = ref.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        for _ in range(steps):
            v = z.topk(2, dim=1).values
            p = z.softmax(1).gather(1, top).squeeze(1)
            loss = ((v[:, 0] - v[:, 1] - target).abs() + weight * (p - p0).abs()).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        z = z.detach()
        z = torch.where(z.argmax(1, keepdim=True) == top, z, ref)
    if torch.is_grad_enabled() and logits.requires_grad:
        return logits + (z.to(logits.dtype) - logits.detach())
    return z.to(logits.dtype)


class AAA(Defense):
    """A model whose logits go through :func:`aaa_logits` (defaults from the AAA paper).

    Deterministic: ``seed`` is accepted for a uniform interface and unused.

    Args:
        model: the classifier.
        tau: attractor interval in margin units.
        kappa: reverse step: the target mirrors the margin ``kappa`` times around the attractor.
        weight: weight of the top-1 probability calibration loss.
        lr: Adam learning rate on the logits.
        steps: Adam steps.
    """

    name = "aaa"
    title = "AAA"
    order = 30

    def __init__(
        self,
        model: nn.Module,
        seed: int | None = None,
        tau: float = 6.0,
        kappa: float = 1.0,
        weight: float = 5.0,
        lr: float = 0.1,
        steps: int = 100,
    ) -> None:
        super().__init__(model, seed=0)
        self.tau, self.kappa, self.weight, self.lr, self.steps = tau, kappa, weight, lr, steps
        self.layers = ["logits"]

    def row_logits(self, z: torch.Tensor) -> torch.Tensor:
        return aaa_logits(z, self.tau, self.kappa, self.weight, self.lr, self.steps)
