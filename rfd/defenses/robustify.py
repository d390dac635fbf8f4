"""Preemptive robustification: move an image, before releasing it, to where the label is stable.

Moon, An, Song. "Preemptive Image Robustification for Protecting Users against Man-in-the-Middle
Adversarial Attacks." AAAI 2022.

Every other defense in :mod:`rfd.defenses` changes what the classifier does to a query. This one
changes the image instead, and it acts before any attacker exists: the owner of an image ``x``
knows the classifier (white-box) and publishes ``x'`` with ``||x' - x||_inf <= delta``, chosen so
that a man in the middle who later adds any ``eta`` with ``||eta||_inf <= eps`` to the released
image cannot change the prediction:

    x' = argmin_{||x' - x||_inf <= delta, x' in [0, 1]}  max_{||eta||_inf <= eps}  L(f(x' + eta), y)

It is adversarial training turned around: the min-max is solved over the input, not the weights,
by alternating an inner PGD (the attacker's best ``eta`` at the current ``x'``) with an outer
signed-gradient descent step on ``x'`` at that worst point (Danskin's theorem: the gradient of
the max is the gradient at the maximizer), projected back onto the delta-ball and [0, 1].

It is a function, not a registered :class:`~rfd.defenses.base.Defense`: it runs once per image on
the defender's side and leaves the classifier untouched, so there is nothing to wrap.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rfd.checks import check_int, check_positive
from rfd.models import check_inputs, check_logits, eval_mode, model_device
from rfd.rng import KeyedRNG, row_keys

__all__ = ["robustify"]

# Fashion-MNIST defaults (pixels in [0, 1]): at rfd's usual eps 0.1 a standard-trained model has no
# robust point near its images to move to; at 0.03 it partly does. delta = eps: the owner changes
# the image no more than the attacker may (see rfd.analysis.robustify for the measurements).
DEFAULT_DELTA = 0.03
DEFAULT_EPS = 0.03


def _radius(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(
            f"{name} must be a number in (0, 1] (Linf, pixels in [0, 1]), got {value!r}"
        )
    return float(value)


def _inner_pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, rng: KeyedRNG
) -> Tensor:
    """The attacker's move at ``x``: Linf PGD on cross-entropy from a keyed random start, step
    2.5 eps / steps (the rule of :mod:`rfd.attacks.pgd`, so the walk can cross the ball)."""
    alpha = 2.5 * eps / steps
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    adv = torch.minimum(
        torch.maximum(x + eps * (2 * rng.uniform(x.shape[1:], x.dtype) - 1), lo), hi
    )
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y, reduction="sum")  # sum: a row's gradient is its own
        (g,) = torch.autograd.grad(loss, adv)
        adv = torch.minimum(torch.maximum(adv.detach() + alpha * g.sign(), lo), hi)
    return adv.detach()


def robustify(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None = None,
    delta: float = DEFAULT_DELTA,
    eps: float = DEFAULT_EPS,
    steps: int = 20,
    inner_steps: int = 5,
    step_size: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    ids: Tensor | None = None,
) -> Tensor:
    """Robustify images before release against a man-in-the-middle Linf attacker (Moon et al.).

    Defends against an attacker who intercepts the RELEASED image ``x'`` and adds a perturbation
    of Linf norm at most ``eps`` to it; the defender, who must have white-box access to the
    classifier (its gradients), moves each image by at most ``delta`` first, to a point whose
    whole eps-neighbourhood the classifier labels ``y``. It does nothing against an attacker who
    gets the original ``x``, and it is no black-box defense: it needs the model's gradients.

    Each of ``steps`` outer iterations runs an ``inner_steps`` PGD at eps from a random start
    (the attacker's best reply), then takes a signed gradient descent step of ``step_size`` on
    ``x'`` at that adversarial point. After the last step the final iterate is attacked once
    more, and each image gets back the iterate whose attacked loss was lowest (the start ``x``
    included): a step that made the image easier to attack is never what gets released.

    Args:
        model: classifier on [0, 1] images returning logits. Used in eval mode (every submodule's
            mode is restored afterwards); its parameters are only read, and no ``.grad`` is left
            on them.
        images: (N, C, H, W) in [0, 1], on any device (moved to the model's and back).
        labels: (N,) the labels to protect; default the model's own predictions on ``images``
            (the owner of an image rarely has a ground-truth label, and protecting a wrong
            prediction is then what happens).
        delta: Linf radius in (0, 1] the released image may move from the original: the visible
            change the owner accepts.
        eps: Linf radius in (0, 1] of the attacker the image is hardened against.
        steps: outer descent steps on ``x'`` (>= 1).
        inner_steps: PGD steps of the inner maximization (>= 1); its step is 2.5 eps / inner_steps.
        step_size: outer Linf step; default 2.5 delta / steps, so the walk can cross the ball.
        seed: keys the inner attack's random starts (with ``ids``): the same call gives the same
            images.
        batch_size: images per forward; the result does not depend on it (every draw is keyed by
            image, and the loss is summed so one row's gradient never sees another row).
        ids: (N,) distinct integers keying each image's randomness (e.g. dataset indices);
            default the positions 0..N-1.

    Returns:
        The robustified images, detached, on ``images``' device and dtype: in [0, 1] and within
        ``delta`` of ``images`` in Linf.

    Raises:
        ValueError: a radius outside (0, 1], non-positive step counts or step size, a bad seed,
            batch size or ids, or images/labels the model cannot take.
    """
    delta, eps = _radius(delta, "delta"), _radius(eps, "eps")
    steps, inner_steps = check_int(steps, "steps"), check_int(inner_steps, "inner_steps")
    batch_size = check_int(batch_size, "batch_size")
    step_size = 2.5 * delta / steps if step_size is None else check_positive(step_size, "step_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    check_inputs(model, images, labels)
    n = images.shape[0]
    if ids is None:
        ids = torch.arange(n)
    elif not isinstance(ids, Tensor) or ids.shape != (n,) or ids.is_floating_point():
        got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be an (N,) = ({n},) integer tensor, got {got}")
    elif ids.unique().numel() != n:
        raise ValueError("ids must be distinct, one per image")

    device = model_device(model)
    # inference_mode(False): callers inside inference mode still get the gradients this needs
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
        out = torch.empty(images.shape, dtype=images.dtype, device=images.device)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x0 = images[sl].to(device).clone()
            y = None if labels is None else labels[sl].to(device).long()
            keys = row_keys(seed, ids[sl].to(device))
            out[sl] = _robustify_batch(
                model, x0, y, delta, eps, steps, inner_steps, step_size, KeyedRNG(keys)
            ).to(images.device)
    return out


def _robustify_batch(
    model: nn.Module,
    x0: Tensor,
    y: Tensor | None,
    delta: float,
    eps: float,
    steps: int,
    inner_steps: int,
    step_size: float,
    rng: KeyedRNG,
) -> Tensor:
    with torch.no_grad():
        logits = model(x0)
    if y is None:
        y = logits.argmax(1)
    check_logits(logits, y)
    lo, hi = (x0 - delta).clamp(min=0.0), (x0 + delta).clamp(max=1.0)
    x, best = x0.clone(), x0.clone()
    best_loss = torch.full((x0.shape[0],), float("inf"), device=x0.device)
    for t in range(steps + 1):
        adv = _inner_pgd(model, x, y, eps, inner_steps, rng.stream("inner", t)).requires_grad_(True)
        loss = F.cross_entropy(model(adv), y, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), adv)
        loss = loss.detach()
        better = loss < best_loss
        best = torch.where(better.view(-1, 1, 1, 1), x, best)
        best_loss = torch.where(better, loss, best_loss)
        if t < steps:  # descend at the attacker's point, then back into the delta-ball
            x = torch.minimum(torch.maximum(x - step_size * g.sign(), lo), hi)
    return best
