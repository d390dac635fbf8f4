"""C&W (Linf): PGD on the Carlini-Wagner margin loss, as in the paper's white-box table.

Carlini, Wagner. "Towards Evaluating the Robustness of Neural Networks." IEEE S&P 2017.

The randomized-feature paper's Table 13 reports "C&W" under an Linf budget (eps 0.03): the common
reading, used by robustness benchmarks, is projected gradient descent on the C&W margin loss
``z_y - max_{i != y} z_i`` (descended until it turns negative) rather than C&W's original L2
optimization, which rfd offers as ``cw_l2``. The margin loss does not saturate the way the
cross-entropy does, which is why it often succeeds where PGD-CE stalls.
"""

from __future__ import annotations

from typing import Any

from rfd.attacks.pgd import PGD


class CW(PGD):
    """C&W-Linf (Carlini & Wagner, S&P 2017): PGD with the margin loss, random start, restarts."""

    name = "cw"
    title = "C&W"
    order = 120
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {
        "linf": {"steps": 20, "rel_step": 2.5, "random_start": True, "restarts": 1,
                 "loss": "margin"},
    }  # fmt: skip
