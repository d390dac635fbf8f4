"""``rfd.protect``: one entry point that turns a classifier into a defended one.

Also the public ``rfd.calibrate`` / ``calibrate_report``: they resolve ``layers="auto"`` here, above
both the core search (:mod:`rfd.defenses.calibration`) and the rule that uses it
(:mod:`rfd.defenses.autolayer`), so neither has to import the other's caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from rfd.defenses import calibration
from rfd.defenses.autolayer import auto_layer
from rfd.defenses.base import DEFENSES, Defense
from rfd.defenses.calibration import AUTO, Calibration


def protect(
    model: nn.Module,
    defense: str = "feature",
    layers: str | Sequence[str] = "penultimate",
    nu: float | Sequence[float] = 0.5,
    seed: int | None = None,
    **opts: Any,
) -> Defense:
    """Wrap ``model`` in a defense without touching the model itself.

    ``nu`` is the noise standard deviation: delta ~ N(0, nu^2 I). The wrapper is an ``nn.Module``
    used exactly like the model; ``.remove()`` or leaving a ``with`` block retires it, and the
    original model never carries hooks, so it keeps answering bit-identically.

    Args:
        model: a classifier on [0, 1] images (``rfd.create_model``) or any ``nn.Module``.
        defense: a name in ``DEFENSES``: ``"feature"`` (the paper's method), ``"input"`` (RND),
            ``"aaa"``, ``"none"``, or any other registered defense.
        layers: for ``"feature"``: ``"penultimate"``, a name from ``rfd.feature_layers(model)``,
            a list of names (then ``nu`` may be a list with one std per layer), or ``"auto"``
            (needs ``data=<calibration loader>``; the layer ``rfd.analysis.auto_layer`` picks).
        nu: noise standard deviation (pixel units for ``"input"``, feature units for
            ``"feature"``); ignored by defenses without a noise level (``calibrated=False``).
        seed: seed of the defense's own ``torch.Generator``; ``None`` draws one from the OS.
            Attack seeds never touch it.
        **opts: defense options: ``dist="laplace"``; for ``"feature"`` also ``scale="channel"``
            with ``data=loader``; for ``"aaa"`` ``tau``, ``kappa``, ``weight``, ``lr``, ``steps``.

    Returns:
        The defended module, with ``.defense``, ``.nu``, ``.layers``, ``.generator``,
        ``.randomized`` and ``.base`` (the undefended model).

    Raises:
        ValueError: unknown defense or layer, or a negative / non-finite ``nu``.
    """
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; valid defenses: {', '.join(DEFENSES)}")
    cls = DEFENSES[defense]
    if cls.layered and layers == AUTO:
        layers = _auto_layer(model, opts)
    return cls.build(model, nu=nu, layers=layers, seed=seed, **opts)


def _auto_layer(model: nn.Module, opts: dict[str, Any]) -> str:
    """Resolve ``layers="auto"`` with the calibration data in ``opts["data"]``."""
    data = opts.get("data")
    if data is None:
        raise ValueError('layers="auto" needs data=<calibration DataLoader> to choose the layer')
    if opts.get("scale") != "channel":
        opts.pop("data")
    return auto_layer(model, data)


def calibrate(
    model: nn.Module,
    defense: str = "feature",
    layers: str | Sequence[str] = "penultimate",
    data: Iterable[Any] | None = None,
    target_drop: float = 0.02,
    n_passes: int = 5,
    tol: float = 1e-3,
    **kwargs: Any,
) -> float:
    """The noise std whose clean-accuracy drop is ``target_drop``; see :func:`calibrate_report`."""
    return calibrate_report(model, defense, layers, data, target_drop, n_passes, tol, **kwargs).nu


def calibrate_report(
    model: nn.Module,
    defense: str = "feature",
    layers: str | Sequence[str] = "penultimate",
    data: Iterable[Any] | None = None,
    target_drop: float = 0.02,
    n_passes: int = 5,
    tol: float = 1e-3,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    checkpoint: str | os.PathLike | None = None,
    nu_start: float | None = None,
    max_evals: int = 40,
    **opts: Any,
) -> Calibration:
    """Find nu (a standard deviation) whose mean clean-accuracy drop is ``target_drop``.

    The drop at a given nu is itself a noisy measurement: one pass over 1000 images spreads by
    about 0.4 points at a 1% drop and 0.8 points at 4% (``drop_std`` reports it), so the found nu
    is as precise as ``drop_std / sqrt(n_passes)``; more passes or images tighten it.

    Args:
        model: the undefended classifier; measured in eval mode, its modes restored afterwards.
        defense: ``"feature"`` or ``"input"``.
        layers: as in ``rfd.protect``; with several layers one common nu is calibrated. For
            ``"feature"``, ``"auto"`` first picks the layer with
            :func:`rfd.defenses.autolayer.auto_layer` on ``data`` at ``target_drop``.
        data: the calibration split (never attacked images): a DataLoader yielding ``(x, y)`` or
            ``(x, y, index)``. It is read once and held in memory, so every evaluation sees the
            same images in the same order.
        target_drop: wanted accuracy drop as a fraction (0.02 = 2 points).
        n_passes: noisy passes per evaluation; the drop is their mean.
        tol: stop when the measured drop is within ``tol`` of the target (at least half of one
            flip, ``0.5 / (n_images * n_passes)``: the drop cannot be measured finer).
        seed: noise seed restarted at every evaluation (common random numbers).
        cache_dir: folder for the JSON cache (default :func:`rfd.defenses.default_cache_dir`).
        use_cache: read and write the cache.
        checkpoint: the model's checkpoint file; its hash keys the cache (else the weights' hash).
        nu_start: first nu tried (default: 0.05 pixel units for input noise, a quarter of the
            feature's spread for feature noise).
        max_evals: give up after this many evaluations.
        **opts: passed to ``rfd.protect`` (``dist``, ``scale``); ``scale="channel"`` measures the
            channel spread on ``data`` itself.

    Raises:
        ValueError: bad arguments, or a defense with nothing to calibrate.
        RuntimeError: the target drop cannot be reached.
    """
    chosen = None
    if layers == AUTO and defense in DEFENSES and DEFENSES[defense].layered:
        data = calibration.read_calibration_data(defense, data, target_drop, n_passes)
        layers = chosen = auto_layer(model, data, target_drop=target_drop, cache_dir=cache_dir)
    cal = calibration.calibrate_report(
        model, defense, layers, data, target_drop, n_passes, tol, seed, cache_dir, use_cache,
        checkpoint, nu_start, max_evals, **opts,
    )  # fmt: skip
    return replace(cal, chosen=chosen) if chosen is not None else cal
