"""Per-layer gradients of the attacker's margin loss: the quantities Theorem 1 is written in.

This module sits low in the package (it imports only torch and ``rfd.models``) because two layers
use it: the defenses, whose ``layers="auto"`` rule (:mod:`rfd.defenses.autolayer`) scores layers
by these gradients, and :mod:`rfd.analysis`, which reports them (Figures 1 and 2, Theorem 1).

Everything here is computed with autograd in ONE forward and ONE backward per batch: forward hooks
keep each chosen layer's output ``h_l(x)``, and ``torch.autograd.grad`` of the summed margin loss
with respect to ``[x, h_1(x), ..., h_k(x)]`` returns every gradient at once. Summing over the batch
is exact per image because, in eval mode, images do not interact (BatchNorm uses running
statistics), so d(sum_j L_j)/d h(x_i) = dL_i/d h(x_i).

The noise scale convention: rfd's ``nu`` is the noise STANDARD DEVIATION (delta ~ N(0, nu^2 I)),
while the paper's Theorem 1 writes delta ~ N(0, nu I) with nu a variance. Functions here that
return a noise scale return rfd's standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rfd.models import PENULTIMATE, eval_mode, feature_layers, model_device, resolve_layer

INPUT = "input"  # the pseudo-layer "noise on the [0, 1] pixels" (RND), ratio 1 by definition

Data = Iterable[Any] | tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- loss and data


def margin_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The attacker's objective ``z_y - max_{i != y} z_i`` per row (negative: misclassified).

    This is the loss of the paper (and of Square, NES and SignHunter); Theorem 1 is stated for it.
    """
    zy = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
    return zy - other


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per row: the loss PGD (Madry et al.) and APGD-CE ascend."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference of Logits Ratio per row (Croce & Hein, ICML 2020), to be ascended:
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)`` with ``z_pi`` the sorted logits. Invariant to
    shifting and rescaling the logits, so a defense cannot hide behind their scale. Needs at
    least three classes."""
    z = logits.float()
    srt = z.sort(dim=1).values
    zy = z.gather(1, labels.view(-1, 1)).squeeze(1)
    top_is_y = z.argmax(1) == labels
    other = torch.where(top_is_y, srt[:, -2], srt[:, -1])
    return -(zy - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


# The losses a gradient query can differentiate: name -> per-row loss of (logits, labels). CE and
# DLR are ascended by the attacks; the margin (negative once misclassified) is descended.
LOSSES = {"ce": cross_entropy_loss, "margin": margin_loss, "dlr": dlr_loss}


def iter_batches(
    data: Data, batch_size: int = 256, n_images: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches from a DataLoader yielding ``(x, y[, index])`` or from an ``(x, y)`` pair.

    Stops after ``n_images`` images (the last batch is cut), so callers can bound run time
    without building a new loader.
    """
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x_all, y_all = data
        source: Iterable[Any] = zip(x_all.split(batch_size), y_all.split(batch_size), strict=True)
    else:
        source = data
    seen = 0
    for batch in source:
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise ValueError("data must yield (x, y) or (x, y, index) batches")
        x, y = batch[0], torch.as_tensor(batch[1])
        if n_images is not None:
            x, y = x[: n_images - seen], y[: n_images - seen]
        if len(y) == 0:
            break
        seen += len(y)
        yield x, y
        if n_images is not None and seen >= n_images:
            break


def collect(data: Data, n_images: int | None = None) -> tuple[Tensor, Tensor]:
    """All ``(x, y)`` of ``data`` (up to ``n_images``) as two tensors."""
    batches = list(iter_batches(data, n_images=n_images))
    if not batches:
        raise ValueError("data yielded no images")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


# --------------------------------------------------------------------------- layers


def analysis_layers(model: nn.Module, layers: str | Sequence[str] | None = None) -> list[str]:
    """User-facing layer names to analyse, shallow to deep, with ``"input"`` first.

    ``None`` means every layer of ``rfd.feature_layers(model)``; the ``"penultimate"`` alias is
    dropped when it resolves to a module that is already listed under its own name (ResNet's
    ``global_pool``), so no layer is measured twice. Unknown names raise ``ValueError``.
    """
    if layers is None:
        # feature_layers lists the alias first; measure it under its own module name instead,
        # and keep the alias only when no listed layer is the penultimate one (it is the deepest).
        names = feature_layers(model)
        names = [n for n in names if n != PENULTIMATE] + [PENULTIMATE]
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
    out: list[str] = [INPUT]
    seen: set[str] = set()
    for n in names:
        if n == INPUT:
            continue
        path = resolve_layer(model, n)  # raises ValueError listing the valid names
        if path not in seen:
            seen.add(path)
            out.append(n)
    return out


def penultimate_name(model: nn.Module, layers: Sequence[str]) -> str | None:
    """The entry of ``layers`` that is the penultimate layer (for labelling tables)."""
    try:
        pen = resolve_layer(model, PENULTIMATE)
    except Exception:  # locating it traces a dummy forward, which an odd input shape can break;
        return None  # the label is cosmetic, so no analysis should fail over it
    for n in layers:
        if n != INPUT and resolve_layer(model, n) == pen:
            return n
    return None


@dataclass
class LayerGradients:
    """Margin loss and its gradient norms at the input and at hidden layers, per image.

    Attributes:
        layers: ``"input"`` followed by the hidden layers, as given.
        loss: margin loss per image (N,).
        correct: whether the (undefended) model classifies the image correctly (N,).
        grad_norm: layer -> ``||dL/dh(x)||_2`` per image (N,); ``"input"`` is ``||dL/dx||_2`` in
            [0, 1] pixel units (before the model's normalization, where input noise is added).
        input_grad: ``dL/dx`` per image when requested, else ``None``.
        labels: the labels used (N,).
    """

    layers: list[str]
    loss: Tensor
    correct: Tensor
    grad_norm: dict[str, Tensor]
    labels: Tensor
    input_grad: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ratio(self, layer: str) -> Tensor:
        """``||dL/dh|| / ||dL/dx||`` per image: the gradient-norm ratio of Figure 1."""
        return self.grad_norm[layer] / self.grad_norm[INPUT].clamp_min(1e-30)

    @staticmethod
    def cat(parts: Sequence[LayerGradients]) -> LayerGradients:
        """Concatenate per-batch results."""
        if not parts:
            raise ValueError("no gradients to concatenate")
        first = parts[0]
        grads = [p.input_grad for p in parts]
        return LayerGradients(
            layers=list(first.layers),
            loss=torch.cat([p.loss for p in parts]),
            correct=torch.cat([p.correct for p in parts]),
            grad_norm={k: torch.cat([p.grad_norm[k] for p in parts]) for k in first.layers},
            labels=torch.cat([p.labels for p in parts]),
            input_grad=torch.cat(grads) if all(g is not None for g in grads) else None,
        )


class _Keep:
    """Forward hooks that keep each layer's output for ``autograd.grad``.

    The kept tensor is the module's own output; the hook hands a clone to the rest of the
    network, so a later in-place op (ResNet ``x += shortcut``, inplace ReLU) can never modify the
    kept tensor and silently change which quantity the gradient is taken with respect to. A module
    called several times in one forward keeps every output; noise added at each call is
    independent, so Theorem 1's variance term uses the sum of the squared gradient norms.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]) -> None:
        self.outputs: dict[str, list[Tensor]] = {n: [] for n in layers}
        self.handles = [
            model.get_submodule(resolve_layer(model, n)).register_forward_hook(
                partial(self._hook, n)
            )
            for n in layers
        ]

    def _hook(self, name: str, module: nn.Module, args: Any, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"layer {name!r} returns {type(out).__name__}, not a tensor")
        self.outputs[name].append(out)
        return out.clone()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def layer_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    layers: Sequence[str],
    keep_input_grad: bool = False,
    keep_layer_grads: bool = False,
) -> LayerGradients:
    """Margin loss and gradient norms at the input and ``layers`` for one batch, one backward.

    Args:
        model: a classifier on [0, 1] images; measured in eval mode (modes restored afterwards).
        x: images (B, C, H, W) in [0, 1].
        y: labels (B,).
        layers: user-facing layer names (``"input"`` may be included; it is always measured).
        keep_input_grad: also return ``dL/dx`` (needed for a gradient step or Theorem-1 probes).
        keep_layer_grads: also return ``dL/dh`` of every hidden layer (called once per forward)
            in ``extra["layer_grad"]`` (first-order error of the feature noise).

    Returns:
        A :class:`LayerGradients` on the CPU.
    """
    hidden = [n for n in layers if n != INPUT]
    device = model_device(model)
    x = x.detach().to(device).requires_grad_(True)
    y = y.to(device)
    keep = _Keep(model, hidden)
    try:
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
            loss = margin_loss(logits, y)
            kept = [t for n in hidden for t in keep.outputs[n]]
            grads = torch.autograd.grad(loss.sum(), [x, *kept], allow_unused=True)
    finally:
        keep.remove()
    norms: dict[str, Tensor] = {INPUT: _norm(grads[0], x)}
    layer_grad: dict[str, Tensor] = {}
    i = 1
    for n in hidden:
        k = len(keep.outputs[n])
        if k == 0:
            raise ValueError(f"layer {n!r} did not run in the forward pass")
        sq = sum(
            _norm(g, t).square() for g, t in zip(grads[i : i + k], keep.outputs[n], strict=True)
        )
        norms[n] = sq.sqrt()
        if keep_layer_grads and k == 1:
            g = grads[i]
            layer_grad[n] = (g if g is not None else torch.zeros_like(kept[i - 1])).detach().cpu()
        i += k
    return LayerGradients(
        layers=[INPUT, *hidden],
        loss=loss.detach().cpu(),
        correct=(logits.argmax(1) == y).cpu(),
        grad_norm={k: v.detach().cpu() for k, v in norms.items()},
        labels=y.cpu(),
        input_grad=grads[0].detach().cpu() if keep_input_grad else None,
        extra={"layer_grad": layer_grad} if keep_layer_grads else {},
    )


def _norm(grad: Tensor | None, like: Tensor) -> Tensor:
    # A layer the loss does not depend on (e.g. a branch the prediction ignores) has gradient 0.
    if grad is None:
        return like.new_zeros(like.shape[0])
    return grad.detach().flatten(1).norm(dim=1)


def dataset_gradients(
    model: nn.Module,
    data: Data,
    layers: Sequence[str],
    n_images: int | None = None,
    batch_size: int = 256,
    step: float | None = None,
) -> tuple[LayerGradients, LayerGradients | None]:
    """:func:`layer_gradients` over a dataset, clean and (optionally) after one gradient step.

    The step is the attacker's first move toward the decision boundary (paper Section 3.3): one
    signed gradient-descent step on the margin loss, ``x' = clip(x - step * sign(dL/dx), 0, 1)``,
    i.e. the vertex of the Linf ball where Square and SignHunter query. It reuses the clean
    pass's input gradient, so each point costs one forward and one backward.

    Returns:
        ``(clean, stepped)``; ``stepped`` is ``None`` when ``step`` is ``None``.
    """
    clean_parts, step_parts = [], []
    for x, y in iter_batches(data, batch_size, n_images):
        g = layer_gradients(model, x, y, layers, keep_input_grad=step is not None)
        if step is not None:
            x_step = gradient_step(x, g.input_grad, step)
            g.input_grad = None  # not needed any more; keeps memory flat on large sets
            step_parts.append(layer_gradients(model, x_step, y, layers))
        clean_parts.append(g)
    if not clean_parts:
        raise ValueError("data yielded no images")
    clean = LayerGradients.cat(clean_parts)
    return clean, LayerGradients.cat(step_parts) if step is not None else None


def gradient_step(x: Tensor, grad: Tensor, step: float) -> Tensor:
    """``clip(x - step * sign(grad), 0, 1)``: one signed descent step on the margin loss."""
    return (x.detach().cpu() - step * grad.sign()).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- Sec. 3.5


def predicted_nu(loss: Tensor, grad_norm: Tensor, target_drop: float) -> float:
    """Noise std whose clean-accuracy drop the first-order model predicts to be ``target_drop``.

    Section 3.5 linearizes ``L(g(h + delta)) ~ L + dL/dh . delta``; with delta ~ N(0, nu^2 I) the
    noisy margin of image i is N(L_i, nu^2 ||dL/dh_i||^2), so image i is classified correctly
    with probability Phi(L_i / (nu ||dL/dh_i||)). The predicted drop is
    ``mean_i 1[L_i > 0] - mean_i Phi(L_i / (nu g_i))``, increasing in nu; it is solved by bisection
    in log nu. The paper's shortcut (nu proportional to the ``target_drop`` quantile of
    ``L / ||dL/dh||``) ranks layers the same way but has no absolute scale; this gives one, in
    rfd's convention (standard deviation, feature units; pixel units for the input).

    Returns:
        ``nan`` when the target cannot be reached (e.g. no correctly classified image).
    """
    loss, g = loss.double(), grad_norm.double().clamp_min(1e-30)
    clean = float((loss > 0).double().mean())
    m = loss / g  # the "robustness" ratio L / ||grad||: distance to the boundary in noise units

    def drop(nu: float) -> float:
        return clean - float(torch.special.ndtr(m / nu).mean())

    if not 0 < target_drop < clean:
        return math.nan
    lo, hi = 1e-12, max(float(m.abs().max()), 1e-6)
    while drop(hi) < target_drop:
        hi *= 4
        if hi > 1e12:
            return math.nan
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if drop(mid) < target_drop else (lo, mid)
        if hi / lo < 1 + 1e-9:
            break
    return math.sqrt(lo * hi)


# --------------------------------------------------------------------------- helpers


def _q(t: Tensor, q: float) -> float:
    t = t[torch.isfinite(t)]
    return float(torch.quantile(t.double(), q)) if t.numel() else math.nan


def _mean(t: Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.double().mean()) if t.numel() else math.nan
