"""Figure 1 (gradient-norm ratios) and Figure 2 / Section 3.5 (robustness magnitude).

Both are summaries of the per-layer gradients that :mod:`rfd.gradients` computes; that machinery
sits below the defenses (``layers="auto"`` uses it too) and its names are re-exported here, so
``rfd.analysis.gradients.layer_gradients`` and friends keep working. The noise scale convention:
rfd's ``nu`` is the noise STANDARD DEVIATION (delta ~ N(0, nu^2 I)), the paper's Theorem 1 writes
a variance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rfd.gradients import (
    INPUT,
    Data,
    LayerGradients,
    _mean,
    _q,
    analysis_layers,
    collect,
    dataset_gradients,
    gradient_step,
    iter_batches,
    layer_gradients,
    margin_loss,
    penultimate_name,
    predicted_nu,
)

__all__ = [
    "INPUT",
    "Data",
    "LayerGradients",
    "MagnitudeResult",
    "RatioResult",
    "analysis_layers",
    "collect",
    "dataset_gradients",
    "gradient_norm_ratios",
    "gradient_step",
    "iter_batches",
    "layer_gradients",
    "margin_loss",
    "penultimate_name",
    "predicted_nu",
    "robustness_magnitude",
]


# --------------------------------------------------------------------------- Figure 1


@dataclass
class RatioResult:
    """Gradient-norm ratios ``||dL/dh|| / ||dL/dx||`` per layer and image (paper Figure 1).

    Attributes:
        clean: gradients at the clean images.
        stepped: gradients after one gradient step toward the boundary (``None`` if not taken).
        step: the Linf step size used.
        penultimate: which layer name is the penultimate layer.
    """

    clean: LayerGradients
    stepped: LayerGradients | None
    step: float | None
    penultimate: str | None = None

    @property
    def layers(self) -> list[str]:
        return self.clean.layers

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per layer over the clean-correct images (the ones an attack targets).

        ``change`` is the mean per-image ratio after the step divided by before (Table 14's
        "change of ratio"); ``frac_increased`` the fraction of images whose ratio went up.
        """
        sel = self.clean.correct
        out = []
        for layer in self.layers:
            r0 = self.clean.ratio(layer)[sel]
            row: dict[str, Any] = {
                "layer": layer,
                "penultimate": layer == self.penultimate,
                "n": int(sel.sum()),
                "ratio_median": _q(r0, 0.5),
                "ratio_mean": _mean(r0),
            }
            if self.stepped is not None:
                r1 = self.stepped.ratio(layer)[sel]
                per = r1 / r0.clamp_min(1e-30)
                row |= {
                    "ratio_step_median": _q(r1, 0.5),
                    "ratio_step_mean": _mean(r1),
                    "change": _mean(per),
                    "frac_increased": _mean((r1 > r0).double()),
                }
            out.append(row)
        return out

    def per_image(self) -> list[dict[str, Any]]:
        """Every image's ratio per layer (clean and stepped) for the CSV."""
        rows = []
        for i in range(len(self.clean.loss)):
            r: dict[str, Any] = {
                "image": i,
                "label": int(self.clean.labels[i]),
                "correct": bool(self.clean.correct[i]),
                "loss": float(self.clean.loss[i]),
            }
            for layer in self.layers:
                r[f"ratio[{layer}]"] = float(self.clean.ratio(layer)[i])
                if self.stepped is not None:
                    r[f"ratio_step[{layer}]"] = float(self.stepped.ratio(layer)[i])
            rows.append(r)
        return rows


def gradient_norm_ratios(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] | None = None,
    step: float | None = 0.1,
    n_images: int | None = None,
    batch_size: int = 256,
) -> RatioResult:
    """Per-image ``||dL/dh(x)||_2 / ||dL/dx||_2`` at every layer, clean and after one step.

    Theorem 1 says the probability that a random-search attacker is misled grows with
    ``(2 nu / mu) * ||dL/dh||^2 / ||dL/dx||^2``; this ratio is the model-dependent half of it, and
    Figure 1 shows it rising at deep layers once the image is moved toward the boundary.

    Args:
        model: a classifier on [0, 1] images.
        data: a loader of ``(x, y[, index])`` batches or an ``(x, y)`` pair of tensors.
        layers: layer names (``None``: all of ``rfd.feature_layers``); the input is always added
            (its ratio is 1: input noise is added to the very x the gradient is taken at).
        step: Linf size of the signed gradient step (``None``: clean only). The default 0.1 is
            the usual Fashion-MNIST Linf radius; use the attack's eps for other data.
        n_images: use at most this many images.
        batch_size: images per forward/backward.
    """
    names = analysis_layers(model, layers)
    clean, stepped = dataset_gradients(model, data, names, n_images, batch_size, step)
    return RatioResult(clean, stepped, step, penultimate_name(model, names))


# --------------------------------------------------------------------------- Figure 2 / Sec. 3.5


@dataclass
class MagnitudeResult:
    """The "magnitude of robustness" per layer (paper Figure 2 and Section 3.5).

    For correctly classified images, ``L / ||dL/dh||`` is the distance to the boundary measured in
    units of feature noise; its ``quantile`` q sets the noise std that costs that fraction of clean
    accuracy. ``q * ||dL/dh||`` is then the standard deviation of the noise that the defense
    induces on the attacker's loss at equal clean drop: the larger, the more an attacker's
    comparisons are drowned in noise. It is in loss units, so it is comparable across layers.

    Attributes:
        layers: ``"input"`` then hidden layers.
        quantile: the fraction used (the clean-accuracy drop aimed at, e.g. 0.01).
        q: layer -> the quantile of ``L / ||dL/dh||`` over correctly classified images.
        magnitude: layer -> ``q * ||dL/dh||`` per correctly classified image.
        nu_pred: layer -> :func:`predicted_nu` at ``quantile`` (absolute std, rfd convention).
        loss, correct, grad_norm: the underlying per-image values (all images).
    """

    layers: list[str]
    quantile: float
    q: dict[str, float]
    magnitude: dict[str, Tensor]
    nu_pred: dict[str, float]
    grads: LayerGradients
    penultimate: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for layer in self.layers:
            mag = self.magnitude[layer]
            out.append(
                {
                    "layer": layer,
                    "penultimate": layer == self.penultimate,
                    "n": len(mag),
                    "q_ratio": self.q[layer],
                    "nu_pred": self.nu_pred[layer],
                    "magnitude_median": _q(mag, 0.5),
                    "magnitude_mean": _mean(mag),
                    "magnitude_p10": _q(mag, 0.1),
                    "magnitude_p90": _q(mag, 0.9),
                }
            )
        return out


def robustness_magnitude(
    model: nn.Module,
    data: Data,
    layers: str | Sequence[str] | None = None,
    quantile: float = 0.01,
    n_images: int | None = None,
    batch_size: int = 256,
    grads: LayerGradients | None = None,
) -> MagnitudeResult:
    """Distribution of the robustness magnitude ``q_l * ||dL/dh_l||`` per layer (Figure 2).

    Args:
        model: a classifier on [0, 1] images.
        data: a loader or an ``(x, y)`` pair; the paper uses the whole test set.
        layers: layer names (``None``: all); the input is always added.
        quantile: the clean-accuracy drop the noise is sized for (paper: 1 %, "top 99 %").
        n_images: use at most this many images.
        batch_size: images per forward/backward.
        grads: reuse already computed clean gradients instead of recomputing them.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    names = analysis_layers(model, layers) if grads is None else grads.layers
    if grads is None:
        grads, _ = dataset_gradients(model, data, names, n_images, batch_size)
    sel = grads.correct & (grads.loss > 0)
    if not bool(sel.any()):
        raise ValueError("no correctly classified image: the robustness magnitude is undefined")
    q, mag, nu = {}, {}, {}
    for layer in names:
        g = grads.grad_norm[layer]
        ratio = grads.loss[sel] / g[sel].clamp_min(1e-30)
        q[layer] = float(torch.quantile(ratio.double(), quantile))
        mag[layer] = q[layer] * g[sel]
        nu[layer] = predicted_nu(grads.loss, g, quantile)
    return MagnitudeResult(names, quantile, q, mag, nu, grads, penultimate_name(model, names))
