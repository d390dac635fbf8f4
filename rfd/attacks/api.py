"""``rfd.attack``: attack one (possibly randomized) classifier on a batch of images."""

from __future__ import annotations

import math
import time
from typing import Any

from torch import Tensor, nn

from rfd.attacks.base import (
    ATTACKS,
    CRITERIA,
    NORMS,
    Attack,
    AttackResult,
    check_eps,
    default_eps,
)
from rfd.attacks.engine import Cell, Engine
from rfd.defenses.rows import PRECISIONS
from rfd.models import check_inputs


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
    ids: Tensor | None = None,
    precision: str = "32",
    channels_last: bool = False,
    compile: bool = False,
    bpda: bool = True,
    success: str = "any",
    **attack_kwargs: Any,
) -> AttackResult:
    """Attack a (possibly randomized) classifier through the engine, all images at once.

    Query attacks only query the model; white-box attacks (``kind="gradient"``) also take its
    input gradient, through the same forwards. The model is never reseeded. An ``rfd``
    defense (``rfd.protect``) draws its noise keyed by (its seed, image, query), so the same call
    gives the same result; any other model is queried as it is. The attacker draws from streams
    keyed by (``seed``, image, step). Each image first spends one charged clean query; images
    misclassified then (under ``criterion``) are reported with ``clean_correct=False`` and not
    attacked.

    Args:
        model: classifier on [0, 1] images returning logits; left in whatever mode it is in.
        images: (N, C, H, W) in [0, 1].
        labels: (N,) true labels.
        attack: a name in ``ATTACKS``.
        norm: ``"linf"`` or ``"l2"``, where the attack supports it (RayS and SignFlip:
            ``"linf"`` only; an unsupported pair is refused by name).
        eps: ball radius in [0, 1] pixel units; ``None`` picks :func:`default_eps` for the size.
        max_queries: charged-query budget per image, the clean query included.
        criterion: ``"vote"`` (a query that looks adversarial is re-queried 9 times, uncharged,
            and counts only if >= 5 are misclassified; the paper's rule), ``"single"`` (one
            misclassified query suffices, the "lucky" rule) or ``"none"`` (undefended semantics).
        eot: each query is answered from ``eot`` noisy forwards, charged ``eot`` queries: score
            attacks read the mean logits; decision and gradient attacks the majority label (equal
            votes go to the higher mean logit), gradient attacks the mean gradient and loss.
        seed: the attacker's seed.
        max_batch: rows per model forward (queries, EOT samples and votes together).
        ids: (N,) identities keying each image's randomness (e.g. dataset indices); default the
            positions 0..N-1. With the same ids, an image's result does not depend on the batch.
        precision: ``"32"``, ``"tf32"`` or ``"bf16"`` for the forwards.
        channels_last, compile: forward layout and ``torch.compile`` (the model is restored).
        bpda: white-box attacks pass the surrogate (the identity) of a defense's declared
            non-differentiable part (JPEG) in its place (Athalye et al. 2018); ``False``
            differentiates through the defense as implemented (and meets its masked gradient).
        success: which fooling queries count. ``"any"``: every one the criterion confirms (the
            stricter evaluation). ``"improved"``: only one whose margin is also below the
            attack's incumbent (``Attack.incumbent``: the stored loss of Square and SimBA, the
            published early stop of Parsimonious), the rule of the paper's public code for
            random-search and greedy attacks; attacks without an incumbent are unaffected.
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
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    check_inputs(model, images, labels)
    if ids is not None and (ids.shape != labels.shape or ids.unique().numel() != ids.numel()):
        raise ValueError("ids must be (N,) distinct integers, one per image")
    if eps is None:
        h, w = images.shape[-2:]
        if h != w:
            raise ValueError(f"no default eps for non-square {h}x{w} images; pass eps=")
        eps = default_eps(int(h), norm)
    if (
        isinstance(eps, bool)
        or not isinstance(eps, (int, float))
        or not math.isfinite(eps)
        or eps <= 0
    ):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    check_eps(float(eps), norm, tuple(images.shape[1:]))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else images.device
    cell = Cell(model, atk, float(eps), max_queries, criterion, eot, seed, attack, success)
    engine = Engine(max_batch, precision=precision, channels_last=channels_last, compile=compile,
                    bpda=bpda)  # fmt: skip
    t0 = time.perf_counter()
    x, y = images.to(device), labels.to(device)
    run = engine.run([cell], x, y, ids=None if ids is None else ids.to(device), keep_adv=True)
    seconds = time.perf_counter() - t0
    assert run.adv is not None

    def out(t: Tensor) -> Tensor:  # the engine runs in inference mode; results are plain tensors
        return t.to(images.device).clone()

    return AttackResult(
        adv=out(run.adv),
        success=out(run.success),
        queries=out(run.used),
        verify_queries=out(run.verify),
        clean_correct=out(run.clean_correct),
        fooled_at=out(run.fooled_at),
        labels=out(y),
        probe=out(run.probe),
        attack=attack,
        norm=norm,
        eps=float(eps),
        max_queries=max_queries,
        criterion=criterion,
        eot=eot,
        seed=seed,
        success_rule=success,
        randomized=run.stats[0].randomized,
        seconds=seconds,
        params=dict(atk.params),
        stats=run.stats[0].as_dict(),
        padded_rows=run.padded,
    )
