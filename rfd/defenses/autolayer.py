"""``layers="auto"``: pick the layer to noise from Theorem 1, at equal clean-accuracy drop.

The rule is implemented by :func:`auto_layer` (documented there) and scored by
:func:`layer_scores`. It looks only at calibration images, never at an attack, so it can be
checked against :func:`rfd.analysis.layer_sweep`, which does attack every layer.

It lives with the defenses because ``rfd.protect(layers="auto")`` and ``rfd.calibrate(layers=
"auto")`` apply it; it needs only :mod:`rfd.gradients` and the core calibration search, so the
defenses never import :mod:`rfd.analysis` (which re-exports this module's names).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from rfd.defenses.calibration import calibrate_report
from rfd.gradients import (
    INPUT,
    Data,
    LayerGradients,
    _q,
    analysis_layers,
    dataset_gradients,
    iter_batches,
    predicted_nu,
)

NU_SOURCES = ("calibrated", "predicted")


@dataclass
class LayerScores:
    """The robustness indicator of every candidate layer and the layer it picks.

    ``score[l] = nu[l] * median_i ||dL/dh_l(x'_i)|| / ||dL/dx(x'_i)||`` over correctly classified
    calibration images ``x'`` (one gradient step into the attack). ``2 * score^2 / mu`` is
    Theorem 1's ratio for the median image at the equal-clean-drop noise level, for any attacker
    probe variance ``mu``.

    Attributes:
        layers: ``"input"`` then the hidden layers scored.
        score: layer -> S_l (the input's is reported for comparison; it is never picked).
        nu: layer -> the noise std used (rfd convention), from ``nu_source``.
        nu_pred: layer -> the first-order prediction :func:`rfd.gradients.predicted_nu`.
        nu_source: ``"calibrated"`` (``rfd.calibrate``) or ``"predicted"``.
        best: the picked hidden layer.
    """

    layers: list[str]
    score: dict[str, float]
    nu: dict[str, float]
    nu_pred: dict[str, float]
    nu_source: str
    best: str
    target_drop: float
    step: float | None

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": n,
                "nu": self.nu[n],
                "nu_pred": self.nu_pred[n],
                "score": self.score[n],
                "auto": n == self.best,
            }
            for n in self.layers
        ]


def layer_scores(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] | None = None,
    target_drop: float = 0.02,
    step: float | None = 0.1,
    n_images: int | None = 500,
    batch_size: int = 256,
    nu: str = "calibrated",
    n_passes: int = 3,
    nus: Mapping[str, float] | None = None,
    grads: tuple[LayerGradients, LayerGradients | None] | None = None,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> LayerScores:
    """Score every layer (and the input) by Theorem 1 at equal clean-accuracy drop.

    See :func:`auto_layer` for the rule and the arguments. ``nus`` supplies already calibrated
    stds (layer -> nu) and skips calibration; ``grads`` reuses a ``(clean, stepped)`` pair from
    :func:`rfd.gradients.dataset_gradients` computed on ``data`` with the same ``step``.
    """
    if nu not in NU_SOURCES:
        raise ValueError(f"unknown nu source {nu!r}; valid: {', '.join(NU_SOURCES)}")
    batches = list(iter_batches(data, batch_size, n_images))
    if not batches:
        raise ValueError("data yielded no images")
    if grads is None:
        names = analysis_layers(model, layers)
        clean, stepped = dataset_gradients(model, batches, names, None, batch_size, step)
    else:
        clean, stepped = grads
        names = clean.layers
    at = stepped if stepped is not None else clean
    sel = clean.correct
    if not bool(sel.any()):
        raise ValueError("no correctly classified image: cannot score layers")
    nu_pred = {n: predicted_nu(clean.loss, clean.grad_norm[n], target_drop) for n in names}
    if nus is not None:
        used, source = {n: float(nus[n]) for n in names}, "calibrated"
    elif nu == "predicted":
        used, source = dict(nu_pred), "predicted"
    else:
        used, source = {}, "calibrated"
        for n in names:
            defense, where = ("input", "penultimate") if n == INPUT else ("feature", n)
            used[n] = calibrate_report(
                model, defense, where, data=batches, target_drop=target_drop,
                n_passes=n_passes, cache_dir=cache_dir, use_cache=use_cache,
            ).nu  # fmt: skip
    score = {n: used[n] * _q(at.ratio(n)[sel], 0.5) for n in names}
    candidates = [n for n in names if n != INPUT and math.isfinite(score[n])]
    if not candidates:
        raise ValueError("no hidden layer has a finite robustness score")
    best = max(candidates, key=lambda n: score[n])  # max keeps the first (shallowest) of ties
    return LayerScores(names, score, used, nu_pred, source, best, target_drop, step)


def auto_layer(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] | None = None,
    target_drop: float = 0.02,
    step: float | None = 0.1,
    n_images: int | None = 500,
    batch_size: int = 256,
    nu: str = "calibrated",
    n_passes: int = 3,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> str:
    """The hidden layer where feature noise should mislead a score-based attacker most.

    The rule (Theorem 1 at equal clean-accuracy drop, evaluated where the attack operates):

    1. For each layer l, the noise std ``nu_l`` that costs ``target_drop`` of clean accuracy on
       ``data``: by default measured with ``rfd.calibrate`` (``nu="calibrated"``); or the
       first-order prediction of Section 3.5 (``nu="predicted"``, no noisy passes, but on the
       embedded Fashion-MNIST model it overestimates the std of shallow layers up to 5x, because
       noise there propagates non-linearly). Equal clean drop is the footing the paper compares
       layers on.
    2. Move every image one signed gradient step toward the boundary (``step``, the attack's
       Linf radius): Theorem 1's flip probability matters along the attack path, and Figure 1 /
       Table 14 show layers separating there.
    3. Score ``S_l = nu_l * median_i ||dL/dh_l(x'_i)|| / ||dL/dx(x'_i)||`` over correctly
       classified images. Theorem 1's probability that the median image's comparison is flipped
       is ``1/2 - arctan(sqrt(mu / (2 S_l^2))) / pi``, increasing in S_l for every attacker probe
       variance mu, so the ranking does not depend on the attacker.
    4. Return the hidden layer with the largest ``S_l`` (ties: the shallower layer).

    Args:
        model: a classifier on [0, 1] images.
        data: calibration images (never the attacked ones): a loader or an ``(x, y)`` pair.
        layers: candidate layers (``None``: all of ``rfd.feature_layers``).
        target_drop: the clean-accuracy drop the layers are compared at (0.02 = 2 points).
        step: Linf size of the gradient step (``None``: score at the clean images).
        n_images: calibration images used.
        batch_size: images per forward/backward.
        nu: ``"calibrated"`` or ``"predicted"`` (see step 1).
        n_passes: noisy passes per calibration evaluation.
        cache_dir, use_cache: the calibration cache of ``rfd.defenses.calibrate``.

    Returns:
        A layer name accepted by ``rfd.protect(layers=...)``.
    """
    return layer_scores(
        model, data, layers, target_drop, step, n_images, batch_size, nu=nu,
        n_passes=n_passes, cache_dir=cache_dir, use_cache=use_cache,
    ).best  # fmt: skip
