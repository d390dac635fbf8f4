"""``rfd.protect``: one entry point that turns a classifier into a defended one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from rfd.defenses.aaa import AAA
from rfd.defenses.base import Defended, NoDefense, check_nu
from rfd.defenses.noise import FeatureNoise, InputNoise

DEFENSES = ("none", "input", "feature", "aaa")


def protect(
    model: nn.Module,
    defense: str = "feature",
    layers: str | Sequence[str] = "penultimate",
    nu: float | Sequence[float] = 0.5,
    seed: int | None = None,
    **opts: Any,
) -> Defended:
    """Wrap ``model`` in a defense without touching the model itself.

    ``nu`` is the noise standard deviation: delta ~ N(0, nu^2 I). The wrapper is an ``nn.Module``
    used exactly like the model; ``.remove()`` or leaving a ``with`` block retires it, and the
    original model never carries hooks, so it keeps answering bit-identically.

    Args:
        model: a classifier on [0, 1] images (``rfd.create_model``) or any ``nn.Module``.
        defense: ``"feature"`` (the paper's method), ``"input"`` (RND), ``"aaa"`` or ``"none"``.
        layers: for ``"feature"``: ``"penultimate"``, a name from ``rfd.feature_layers(model)``,
            a list of names (then ``nu`` may be a list with one std per layer), or ``"auto"``
            (needs ``data=<calibration loader>``; the layer ``rfd.analysis.auto_layer`` picks).
        nu: noise standard deviation (pixel units for ``"input"``, feature units for
            ``"feature"``); ignored by ``"aaa"`` and ``"none"``.
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
    for v in nu if isinstance(nu, (list, tuple)) else [nu]:
        check_nu(v)
    if defense == "feature":
        if layers == "auto":
            layers = _auto_layer(model, opts)
        return FeatureNoise(model, layers=layers, nu=nu, seed=seed, **opts)
    if isinstance(nu, (list, tuple)):
        raise ValueError(f"defense {defense!r} takes one nu, got a list {list(nu)}")
    if defense == "input":
        return InputNoise(model, nu=nu, seed=seed, **opts)
    if defense == "aaa":
        return AAA(model, **opts)
    return NoDefense(model, seed=seed, **opts)


def _auto_layer(model: nn.Module, opts: dict[str, Any]) -> str:
    """Resolve ``layers="auto"`` with the calibration data in ``opts["data"]``."""
    from rfd.analysis import auto_layer

    data = opts.get("data")
    if data is None:
        raise ValueError('layers="auto" needs data=<calibration DataLoader> to choose the layer')
    if opts.get("scale") != "channel":
        opts.pop("data")
    return auto_layer(model, data)
