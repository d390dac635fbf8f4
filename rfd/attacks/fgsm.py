"""FGSM: one signed gradient step of size eps (Linf).

Goodfellow, Shlens, Szegedy. "Explaining and Harnessing Adversarial Examples." ICLR 2015.

The fast gradient sign method queries the gradient of the cross-entropy at the clean image and
steps eps along its sign: ``x + eps * sign(grad)``, clipped to [0, 1]. As every rfd query, the
step's endpoint is then queried once (charged) to learn whether it fools the model: FGSM costs
two gradient queries after the clean one.
"""

from __future__ import annotations

from typing import Any

from rfd.attacks.base import Attack
from rfd.attacks.pgd import ASCEND, PGD


class FGSM(PGD):
    """FGSM (Goodfellow et al., ICLR 2015), white-box, Linf: PGD's loop with one step of size eps
    from the clean image. Only the ``loss`` can be changed (the paper's is the cross-entropy)."""

    name = "fgsm"
    title = "FGSM"
    order = 100
    uses_rng = False
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {"linf": {"loss": "ce"}}

    def __init__(self, norm: str = "linf", loss: str | None = None) -> None:
        Attack.__init__(self, norm, loss=loss)
        if self.loss not in ASCEND:
            raise ValueError(f"unknown fgsm loss {self.loss!r}; valid: {', '.join(ASCEND)}")
        self.steps, self.rel_step, self.random_start, self.restarts = 1, 1.0, False, 1

    def column(self, eot: int = 1) -> str | None:
        return self.title + (f" EOT{eot}" if eot > 1 else "")
