"""Query-based black-box attacks behind an exact query oracle.

    res = rfd.attack(net, images, labels, attack="square", norm="linf", eps=0.05,
                     max_queries=1000, criterion="vote", eot=1, seed=0)
    res.adv, res.success, res.queries, res.verify_queries, res.clean_correct, res.fooled_at
    res.robust_accuracy(200)      # robust accuracy had the budget been 200 queries
    res.summary()

Attacks (``ATTACKS``): score-based ``square``, ``nes``, ``signhunter`` (Linf and L2) and
decision-based ``rays``, ``signflip`` (Linf). Default hyperparameters are the paper's
(``configs/attack/<name>.yaml`` mirrors them).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor, nn

from rfd.attacks.base import (
    CRITERIA,
    KINDS,
    MAJORITY,
    NORMS,
    VOTES,
    AccessError,
    Attack,
    AttackResult,
    BudgetError,
    QueryOracle,
    default_eps,
)
from rfd.attacks.nes import NESAttack
from rfd.attacks.rays import RayS
from rfd.attacks.signflip import SignFlip
from rfd.attacks.signhunter import SignHunter
from rfd.attacks.square import SquareAttack

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SquareAttack, NESAttack, SignHunter, RayS, SignFlip)
}

__all__ = [
    "ATTACKS",
    "CRITERIA",
    "KINDS",
    "MAJORITY",
    "NORMS",
    "VOTES",
    "AccessError",
    "Attack",
    "AttackResult",
    "BudgetError",
    "NESAttack",
    "QueryOracle",
    "RayS",
    "SignFlip",
    "SignHunter",
    "SquareAttack",
    "attack",
    "default_eps",
    "make_attack",
]


def make_attack(name: str, norm: str = "linf", **params: Any) -> Attack:
    """Build a registered attack, validating its name, norm and hyperparameters.

    Raises:
        ValueError: unknown attack, unsupported norm or unknown hyperparameter; the message lists
            the valid choices.
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; valid attacks: {', '.join(ATTACKS)}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    cls = ATTACKS[name]
    if norm in cls.defaults:  # name the valid hyperparameters rather than a bare TypeError
        unknown = sorted(set(params) - set(cls.defaults[norm]))
        if unknown:
            valid = sorted(cls.defaults[norm]) or "none"
            raise ValueError(f"unknown {name} hyperparameter(s) {unknown}; valid: {valid}")
    return cls(norm, **params)


def attack(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    attack: str = "square",
    norm: str = "linf",
    eps: float | None = None,
    max_queries: int = 1000,
    criterion: str = "vote",
    eot: int = 1,
    seed: int = 0,
    max_batch: int = 512,
    **attack_kwargs: Any,
) -> AttackResult:
    """Attack a (possibly randomized) classifier through a query oracle, all images at once.

    The model is only ever queried, never differentiated, and never reseeded: a defense keeps its
    own noise stream, the attacker draws from a ``torch.Generator`` seeded with ``seed``. Each
    image first spends one charged clean query; images misclassified then (under ``criterion``)
    are reported with ``clean_correct=False`` and not attacked.

    Args:
        model: classifier on [0, 1] images returning logits; left in whatever mode it is in.
        images: (N, C, H, W) in [0, 1].
        labels: (N,) true labels.
        attack: a name in ``ATTACKS``.
        norm: ``"linf"`` or ``"l2"`` (decision attacks: ``"linf"`` only).
        eps: ball radius in [0, 1] pixel units; ``None`` picks :func:`default_eps` for the size.
        max_queries: charged-query budget per image, the clean query included.
        criterion: ``"vote"`` (a query that looks adversarial is re-queried 9 times, uncharged,
            and counts only if >= 5 are misclassified; the paper's rule), ``"single"`` (one
            misclassified query suffices, the "lucky" rule) or ``"none"`` (undefended semantics).
        eot: each query is the mean of ``eot`` noisy logits (majority label for decision
            attacks), charged ``eot`` queries.
        seed: the attacker's seed.
        max_batch: most images per model forward (the oracle splits larger query batches).
        **attack_kwargs: hyperparameters overriding the attack's defaults (see ``ATTACKS``).

    Returns:
        An :class:`AttackResult` on the device of ``images``.

    Raises:
        ValueError: invalid attack, norm, criterion, eps, eot, budget or inputs.
    """
    atk = make_attack(attack, norm, **attack_kwargs)
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria: {', '.join(CRITERIA)}")
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ValueError(f"eot must be an integer >= 1, got {eot!r}")
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < eot:
        raise ValueError(f"max_queries must be an integer >= eot={eot}, got {max_queries!r}")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be (N,) = ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError("images must lie in [0, 1]; rfd models normalize internally")
    if eps is None:
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"no default eps for non-square {h}x{w} images; pass eps=")
        eps = default_eps(int(h), norm)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    oracle = QueryOracle(
        model,
        images.to(device),
        labels.to(device),
        kind=atk.kind,
        norm=norm,
        eps=float(eps),
        max_queries=max_queries,
        criterion=criterion,
        eot=eot,
        seed=seed,
        max_batch=max_batch,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        if images.shape[0]:
            oracle.start()
            atk.run(oracle)
    seconds = time.perf_counter() - t0
    res = oracle.result(
        attack=attack,
        norm=norm,
        eps=float(eps),
        max_queries=max_queries,
        criterion=criterion,
        eot=eot,
        seed=seed,
        seconds=seconds,
        params=dict(atk.params),
    )
    return _to(res, images.device)


def _to(res: AttackResult, device: torch.device) -> AttackResult:
    for k, v in vars(res).items():
        if isinstance(v, Tensor):
            setattr(res, k, v.to(device))
    return res
