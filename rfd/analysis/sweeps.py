"""Attack sweeps that test the theory: per layer (paper Tables 6 and 14) and per attacker strength
(Table 3), every defense calibrated to the same clean-accuracy drop.

Calibration always runs on the calibration split and the attacks on the evaluation split, so the
noise level is never tuned on attacked images. ``nu`` is rfd's standard deviation throughout.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rfd.analysis.autolayer import layer_scores
from rfd.analysis.gradients import (
    INPUT,
    Data,
    RatioResult,
    analysis_layers,
    collect,
    dataset_gradients,
    iter_batches,
    penultimate_name,
)

# Table 3's knobs: the attacker's probe size. SignHunter's probe IS its radius, so its "strength"
# is eps itself (paper Section 4.2, "Dynamic Analysis of Robustness").
STRENGTHS: dict[str, tuple[str, tuple[float, ...]]] = {
    "square": ("p_init", (0.05, 0.1, 0.2, 0.3)),
    "nes": ("fd_eta", (0.001, 0.01, 0.1)),
    "signhunter": ("eps", (0.05, 0.075, 0.1)),
}


def mu_equivalent(attack: str, value: float, eps: float) -> float:
    """The isotropic probe variance mu (Theorem 1) an attack setting corresponds to.

    Square: a window holding a fraction p of the pixels moves by eps, ``mu = p eps^2`` (from the
    clean image; twice that between vertices). NES: antithetic pairs ``x +- eta z`` give a signal
    ``2 eta grad.z``, ``mu = 4 eta^2``. SignHunter: the probe ``x + eps * sign``, ``mu = eps^2``.
    """
    if attack == "square":
        return value * eps**2
    if attack == "nes":
        return 4 * value**2
    if attack == "signhunter":
        return value**2
    return math.nan


def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 pairs."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan

    def ranks(v: Sequence[float]) -> Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        order = t.argsort()
        r[order] = torch.arange(len(t), dtype=torch.float64)
        for val in t.unique():  # average the ranks of ties
            m = t == val
            r[m] = r[m].mean()
        return r

    ra, rb = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def _img_size(x: Tensor) -> int:
    return int(x.shape[-1])


def _default_eps(x: Tensor, norm: str, eps: float | None) -> float:
    if eps is not None:
        return float(eps)
    from rfd.attacks import default_eps

    return default_eps(_img_size(x), norm)


def _calibrate(
    model: nn.Module,
    defense: str,
    layer: str,
    calib: list[tuple[Tensor, Tensor]],
    target_drop: float,
    n_passes: int,
    seed: int,
    cache_dir: str | None,
    use_cache: bool,
) -> Any:
    from rfd.defenses import calibrate_report

    return calibrate_report(
        model,
        defense,
        layers=layer if defense == "feature" else "penultimate",
        data=calib,
        target_drop=target_drop,
        n_passes=n_passes,
        seed=seed,
        cache_dir=cache_dir,
        use_cache=use_cache,
    )


def _attack(
    model: nn.Module,
    defense: str,
    layer: str,
    nu: float,
    x: Tensor,
    y: Tensor,
    attack: str,
    norm: str,
    eps: float,
    max_queries: int,
    criterion: str,
    seed: int,
    attack_kwargs: Mapping[str, Any],
) -> Any:
    from rfd.attacks import attack as run_attack
    from rfd.defenses import protect

    if defense == "feature":
        net = protect(model, "feature", layers=layer, nu=nu, seed=seed + 1)
    else:
        net = protect(model, defense, nu=nu, seed=seed + 1)
    try:
        return run_attack(
            net,
            x,
            y,
            attack=attack,
            norm=norm,
            eps=eps,
            max_queries=max_queries,
            criterion=criterion,
            seed=seed,
            **dict(attack_kwargs),
        )
    finally:
        net.remove()


def _result_cols(res: Any) -> dict[str, Any]:
    s = res.summary()  # rfd.metrics names
    return {
        k: s[k] for k in ("robust_acc", "attack_clean_acc", "success_rate", "mean_queries_success")
    }


Progress = Callable[[str], None] | None


# --------------------------------------------------------------------------- per-layer sweep


@dataclass
class LayerSweepResult:
    """Robust accuracy per noised layer at equal clean drop, beside the gradient indicators.

    Attributes:
        rows: one row per layer (plus ``"none"``, the undefended baseline, when run).
        auto: the layer :func:`rfd.analysis.auto_layer`'s rule picks (from calibration data).
        best: the hidden layer with the highest measured robust accuracy.
        spearman_score: rank correlation, over the noised layers (input included), between the
            auto-layer score and robust accuracy.
        spearman_ratio: the same for the mean clean gradient-norm ratio (Table 6's column).
        spearman_change: the same for the mean change of the ratio after one step (Table 14's).
        ratios: the gradient-norm ratios measured on the calibration images.
    """

    rows: list[dict[str, Any]]
    auto: str
    best: str
    spearman_score: float
    spearman_ratio: float
    spearman_change: float
    ratios: RatioResult
    settings: dict[str, Any]


def layer_sweep(
    model: nn.Module,
    eval_data: Data,
    calib_data: Data,
    layers: str | Sequence[str] | None = None,
    target_drop: float = 0.02,
    attack: str = "square",
    norm: str = "linf",
    eps: float | None = None,
    max_queries: int = 1000,
    criterion: str = "vote",
    n_images: int | None = 100,
    n_calib: int | None = 500,
    n_passes: int = 5,
    seed: int = 0,
    include_base: bool = True,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: Progress = None,
    **attack_kwargs: Any,
) -> LayerSweepResult:
    """Noise each layer alone at the same clean-accuracy drop, attack, and tabulate (Tables 6/14).

    For every layer (and the input, i.e. RND): ``rfd.calibrate`` finds the noise std costing
    ``target_drop`` on the calibration split, the defended model is attacked on the evaluation
    split, and the row holds robust accuracy beside the layer's mean gradient-norm ratio (clean
    and after one step of size eps), its change, and the ``auto_layer`` score, all measured on the
    calibration split. The ``auto`` pick is therefore made without looking at any attack.

    Args:
        model: a classifier on [0, 1] images.
        eval_data: attacked images (loader or ``(x, y)``), e.g. ``dm.eval_dataloader(n)``.
        calib_data: calibration images, disjoint from ``eval_data``.
        layers: layers to sweep (``None``: all of ``rfd.feature_layers``); the input is added.
        target_drop: the common clean-accuracy drop (0.02 = 2 points).
        attack, norm, eps, max_queries, criterion: as in ``rfd.attack`` (eps default: the
            literature's radius for the image size).
        n_images: attacked images.
        n_calib: calibration images (for nu and for the gradient indicators).
        n_passes: noisy passes per calibration evaluation.
        seed: attack seed; the defense noise uses ``seed + 1``.
        include_base: also attack the undefended model (the "none" row).
        cache_dir, use_cache: calibration cache (``rfd.defenses.calibrate_report``).
        progress: called with one line per finished row.
        **attack_kwargs: attack hyperparameters (e.g. ``p_init`` for Square).
    """
    names = analysis_layers(model, layers)
    x, y = collect(eval_data, n_images)
    eps_ = _default_eps(x, norm, eps)
    calib = list(iter_batches(calib_data, 256, n_calib))
    if not calib:
        raise ValueError("calibration data yielded no images")
    clean, stepped = dataset_gradients(model, calib, names, None, 256, step=eps_)
    ratios = RatioResult(clean, stepped, eps_, penultimate_name(model, names))
    ratio_rows = {r["layer"]: r for r in ratios.rows()}
    cals = {}
    for layer in names:
        defense = "input" if layer == INPUT else "feature"
        cals[layer] = _calibrate(
            model, defense, layer, calib, target_drop, n_passes, seed, cache_dir, use_cache
        )
    scores = layer_scores(
        model, calib, target_drop=target_drop, nus={n: c.nu for n, c in cals.items()},
        grads=(clean, stepped),
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    common = (x, y, attack, norm, eps_, max_queries, criterion, seed, attack_kwargs)
    if include_base:
        t = time.perf_counter()
        res = _attack(model, "none", "", 0.0, *common)
        rows.append(
            {"layer": "none", "defense": "none", "nu": 0.0, "clean_drop": 0.0}
            | _result_cols(res)
            | {"seconds": time.perf_counter() - t}
        )
        if progress:
            progress(_line(rows[-1]))
    for layer in names:
        t = time.perf_counter()
        defense = "input" if layer == INPUT else "feature"
        cal = cals[layer]
        res = _attack(model, defense, layer, cal.nu, *common)
        rr = ratio_rows[layer]
        rows.append(
            {
                "layer": layer,
                "defense": defense,
                "penultimate": layer == ratios.penultimate,
                "nu": cal.nu,
                "nu_pred": scores.nu_pred[layer],
                "clean_drop": cal.drop,
                "ratio_mean": rr["ratio_mean"],
                "ratio_step_mean": rr.get("ratio_step_mean", math.nan),
                "change": rr.get("change", math.nan),
                "score": scores.score[layer],
                "auto": layer == scores.best,
            }
            | _result_cols(res)
            | {"seconds": time.perf_counter() - t}
        )
        if progress:
            progress(_line(rows[-1]))
    noised = [r for r in rows if r["layer"] != "none"]
    acc = [r["robust_acc"] for r in noised]
    hidden = [r for r in noised if r["layer"] != INPUT]
    best = max(hidden, key=lambda r: r["robust_acc"])["layer"] if hidden else INPUT
    settings = {
        "attack": attack,
        "norm": norm,
        "eps": eps_,
        "max_queries": max_queries,
        "criterion": criterion,
        "target_drop": target_drop,
        "n_images": len(y),
        "n_calib": len(clean.loss),
        "n_passes": n_passes,
        "seed": seed,
        "attack_kwargs": dict(attack_kwargs),
    }
    return LayerSweepResult(
        rows=rows,
        auto=scores.best,
        best=best,
        spearman_score=_spearman([r["score"] for r in noised], acc),
        spearman_ratio=_spearman([r["ratio_mean"] for r in noised], acc),
        spearman_change=_spearman([r["change"] for r in noised], acc),
        ratios=ratios,
        settings=settings,
    )


def _line(row: Mapping[str, Any]) -> str:
    keys = ("attack", "value", "defense", "layer", "nu", "clean_drop", "robust_acc", "seconds")
    parts = []
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- strength sweep


@dataclass
class StrengthSweepResult:
    """Robust accuracy over the attacker's probe size for each defense at equal clean drop.

    ``rows`` has one row per (attack, value, defense) with the attack's knob (``param``), its
    value, the isotropic-equivalent probe variance ``mu`` (:func:`mu_equivalent`), the calibrated
    ``nu`` and clean drop, and the attack's robust accuracy.
    """

    rows: list[dict[str, Any]]
    calibrations: dict[str, dict[str, Any]]
    settings: dict[str, Any]


def check_strength_sweep(attacks: Sequence[str], defenses: Sequence[str]) -> None:
    """Refuse an attack without a strength knob or a defense the sweep does not compare; the
    CLI calls it before loading anything, the sweep again for library callers."""
    for a in attacks:
        if a not in STRENGTHS:
            raise ValueError(f"no strength knob for attack {a!r}; valid: {', '.join(STRENGTHS)}")
    for d in defenses:
        if d not in ("none", "input", "feature"):
            raise ValueError(f"unknown defense {d!r} for the sweep; valid: none, input, feature")


def strength_sweep(
    model: nn.Module,
    eval_data: Data,
    calib_data: Data,
    attacks: Sequence[str] = ("square", "nes", "signhunter"),
    values: Mapping[str, Sequence[float]] | None = None,
    defenses: Sequence[str] = ("input", "feature"),
    layer: str = "penultimate",
    target_drop: float = 0.02,
    norm: str = "linf",
    eps: float | None = None,
    max_queries: int = 1000,
    criterion: str = "vote",
    n_images: int | None = 100,
    n_calib: int | None = 500,
    n_passes: int = 5,
    seed: int = 0,
    cache_dir: str | None = None,
    use_cache: bool = True,
    progress: Progress = None,
) -> StrengthSweepResult:
    """Table 3: robust accuracy as the attacker's probe grows, input versus feature noise.

    Square's ``p_init``, NES's ``fd_eta`` and SignHunter's ``eps`` (its probe is the radius) are
    varied over ``values`` (default :data:`STRENGTHS`, the paper's grid); the other attacks keep
    ``eps`` (default: the literature's radius for the image size). Each defense is calibrated once
    to ``target_drop`` on the calibration split; ``"none"`` may be added as a baseline.

    Args:
        model: a classifier on [0, 1] images.
        eval_data: attacked images; calib_data: calibration images, disjoint from them.
        attacks: attack names (keys of :data:`STRENGTHS`).
        values: attack -> values of its knob (default: :data:`STRENGTHS`).
        defenses: among ``"none"``, ``"input"``, ``"feature"``.
        layer: the feature-noise layer.
        target_drop, norm, eps, max_queries, criterion, n_images, n_calib, n_passes, seed,
        cache_dir, use_cache, progress: as in :func:`layer_sweep`.
    """
    check_strength_sweep(attacks, defenses)
    if layer != INPUT:
        from rfd.models import resolve_layer

        resolve_layer(model, layer)
    x, y = collect(eval_data, n_images)
    eps_ = _default_eps(x, norm, eps)
    calib = list(iter_batches(calib_data, 256, n_calib))
    nus: dict[str, dict[str, Any]] = {}
    for d in defenses:
        if d == "none":
            nus[d] = {"nu": 0.0, "clean_drop": 0.0}
            continue
        cal = _calibrate(model, d, layer, calib, target_drop, n_passes, seed, cache_dir, use_cache)
        nus[d] = {"nu": cal.nu, "clean_drop": cal.drop, "clean_acc": cal.clean_acc}
    rows: list[dict[str, Any]] = []
    for a in attacks:
        param, default_values = STRENGTHS[a]
        for v in (values or {}).get(a, default_values):
            kwargs: dict[str, Any] = {} if param == "eps" else {param: float(v)}
            a_eps = float(v) if param == "eps" else eps_
            for d in defenses:
                t = time.perf_counter()
                res = _attack(
                    model, d, layer, nus[d]["nu"], x, y, a, norm, a_eps, max_queries,
                    criterion, seed, kwargs,
                )  # fmt: skip
                rows.append(
                    {
                        "attack": a,
                        "param": param,
                        "value": float(v),
                        "eps": a_eps,
                        "mu": mu_equivalent(a, float(v), a_eps),
                        "defense": d,
                        "layer": layer if d == "feature" else d,
                        "nu": nus[d]["nu"],
                        "clean_drop": nus[d]["clean_drop"],
                    }
                    | _result_cols(res)
                    | {"seconds": time.perf_counter() - t}
                )
                if progress:
                    progress(_line(rows[-1]))
    settings = {
        "norm": norm,
        "eps": eps_,
        "max_queries": max_queries,
        "criterion": criterion,
        "target_drop": target_drop,
        "n_images": len(y),
        "n_calib": sum(len(b[1]) for b in calib),
        "layer": layer,
        "seed": seed,
    }
    return StrengthSweepResult(rows, nus, settings)
