"""Randomized defenses: Gaussian (or Laplace) noise on hidden features or on the input pixels.

``nu`` is always the noise STANDARD DEVIATION: the defense adds ``nu * z`` with ``z`` of unit
variance, i.e. delta ~ N(0, nu^2 I). The paper writes N(0, nu I); rfd uses one convention for
input and feature noise alike, RND's ``x + nu * N(0, I)``, so that a nu means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from rfd.defenses.base import Defense, check_dist, check_nu
from rfd.defenses.rows import NoiseSpec, unit_noise
from rfd.models import eval_mode, model_device, resolve_layer
from rfd.rng import KeyedRNG

SCALES = (None, "none", "channel")


class InputNoise(Defense):
    """Random Noise Defense (Qin et al., NeurIPS 2021): query ``model(x + nu * z)``.

    Noise is added to [0, 1] pixels before the model's own normalization and is not clipped, as in
    RND, so that nu is comparable with the RND paper's values.

    Args:
        model: a classifier on [0, 1] images.
        nu: noise standard deviation in pixel units.
        seed: seed of the defense's own generator (``None``: fresh OS entropy).
        dist: ``"gaussian"`` or ``"laplace"`` (same standard deviation).
    """

    name = "input"
    title = "Input"
    calibrated = True
    order = 10

    def __init__(
        self, model: nn.Module, nu: float = 0.05, seed: int | None = None, dist: str = "gaussian"
    ) -> None:
        super().__init__(model, seed)
        self.nu = nu
        self.dist = check_dist(dist)
        self.layers = ["input"]

    @property
    def nu(self) -> float:
        return self._nu

    @nu.setter
    def nu(self, value: float) -> None:
        if isinstance(value, (list, tuple)):
            raise ValueError(f"defense 'input' takes one nu, got a list {list(value)}")
        self._nu = check_nu(value)

    @property
    def randomized(self) -> bool:
        return self._nu > 0

    def row_input(self, x: torch.Tensor, rng: KeyedRNG) -> torch.Tensor:
        if self._nu == 0:
            return x
        return x + self._nu * unit_noise(rng, x.shape[1:], self.dist, x.dtype)


class FeatureNoise(Defense):
    """Randomized feature defense (Nguyen et al., ICLR 2024): ``g(h(x) + delta)`` at named layers.

    A forward hook on each chosen module adds fresh noise to its output on every call, for every
    sample, so a batch holding one image R times gets R independent draws (majority-vote checks
    and EOT rely on this). Hooks are registered when a defended forward starts and removed when
    it ends; the model itself therefore never carries a hook between calls, and calling it
    directly, even while protected, gives the undefended answer. The hooks are put first in the
    module's hook order, so any other hook on the same module (feature extraction, analysis)
    sees the noisy feature the rest of the network sees.

    Args:
        model: the classifier (an ``rfd.ImageClassifier`` or any ``nn.Module``).
        layers: ``"penultimate"``, a name from ``rfd.feature_layers(model)``, or a list of names.
        nu: noise standard deviation; with a list of layers, one value per layer (or one value for
            all).
        seed: seed of the defense's own generator (``None``: fresh OS entropy).
        dist: ``"gaussian"`` or ``"laplace"`` (same standard deviation).
        scale: ``"channel"`` multiplies nu by each channel's standard deviation measured on clean
            ``data`` (the paper's diagonal Sigma), making nu relative to the feature's own spread
            so that one nu transfers between layers and models. Channels are dim 1 of ``(B, C)``
            and ``(B, C, H, W)`` features and the last dim of ``(B, N, D)`` token sequences.
        data: batches ``x`` or ``(x, y, ...)`` of clean images, needed by ``scale="channel"``.
        max_batches: stop measuring the channel spread after this many batches.
    """

    name = "feature"
    title = "Feature"
    calibrated = True
    layered = True
    order = 20

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] = "penultimate",
        nu: float | Sequence[float] = 0.5,
        seed: int | None = None,
        dist: str = "gaussian",
        scale: str | None = None,
        data: Iterable[Any] | None = None,
        max_batches: int | None = None,
    ) -> None:
        super().__init__(model, seed)
        self._single = isinstance(layers, str)
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError("layers must name at least one layer")
        self.layers = [resolve_layer(model, n) for n in names]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers resolve to duplicate modules: {self.layers}")
        self.nu = nu
        self.dist = check_dist(dist)
        if scale not in SCALES:
            raise ValueError(f"unknown scale {scale!r}; valid: None, 'channel'")
        self.scale = "channel" if scale == "channel" else None
        self.channel_std: list[torch.Tensor | None] = [None] * len(self.layers)
        if self.scale == "channel":
            if data is None:
                raise ValueError("scale='channel' measures each channel's std: pass data=loader")
            self.channel_std = list(channel_std(model, self.layers, data, max_batches))

    @classmethod
    def needs_data(cls, layers: Any = None, options: dict[str, Any] | None = None) -> bool:
        return layers == "auto" or (options or {}).get("scale") == "channel"

    @classmethod
    def nu_guess(cls, model: nn.Module, layers: list[str], batches: list, options: dict) -> float:
        # Feature units differ by orders of magnitude between layers and models: start at a
        # quarter of the feature's own spread (or of 1 when nu is relative to it already).
        if options.get("scale") == "channel":
            return 0.25
        spread = float(torch.cat(channel_std(model, layers, batches, max_batches=1)).mean())
        return 0.25 * spread if spread > 0 else 1.0

    @property
    def nu(self) -> float | list[float]:
        return self._nus[0] if self._single else list(self._nus)

    @nu.setter
    def nu(self, value: float | Sequence[float]) -> None:
        k = len(self.layers)
        if isinstance(value, (list, tuple)):
            if self._single or len(value) != k:
                raise ValueError(f"nu has {len(value)} values for {k} layer(s) {self.layers}")
            self._nus = [check_nu(v) for v in value]
        else:
            self._nus = [check_nu(value)] * k

    @property
    def randomized(self) -> bool:
        return any(v > 0 for v in self._nus)

    def row_noise(self) -> list[NoiseSpec]:
        return [
            NoiseSpec(path, nu, self.dist, std)
            for path, nu, std in zip(self.layers, self._nus, self.channel_std, strict=True)
        ]


def _channel_dim(t: torch.Tensor) -> int:
    return -1 if t.ndim == 3 else 1


@torch.no_grad()
def channel_std(
    model: nn.Module, layers: Sequence[str], data: Iterable[Any], max_batches: int | None = None
) -> list[torch.Tensor]:
    """Per-channel standard deviation of each layer's clean output over ``data`` (float32, CPU).

    Accumulates in float64 over samples and positions, so it does not depend on the batch size.
    """
    sums: dict[int, list[torch.Tensor]] = {}

    def grab(i: int, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        dim = _channel_dim(out) % out.ndim
        flat = out.detach().double().movedim(dim, -1).reshape(-1, out.shape[dim])
        s = [flat.new_tensor(flat.shape[0]), flat.sum(0), flat.square().sum(0)]
        sums[i] = s if i not in sums else [a + b for a, b in zip(sums[i], s, strict=True)]

    device = model_device(model)
    handles = [
        model.get_submodule(p).register_forward_hook(partial(grab, i)) for i, p in enumerate(layers)
    ]
    try:
        with eval_mode(model):
            for b, batch in enumerate(data):
                if max_batches is not None and b >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    if len(sums) != len(layers):
        raise ValueError("data yielded no batches: cannot measure channel std")
    out = []
    for i in range(len(layers)):
        n, s1, s2 = sums[i]
        var = (s2 / n - (s1 / n).square()).clamp_min(0) * n / (n - 1).clamp_min(1)
        out.append(var.sqrt().float().cpu())
    return out
