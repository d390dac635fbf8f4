"""Write analysis results: Markdown + CSV + JSON tables, PNG plots (matplotlib Agg), optional W&B.

W&B is used only when a run is already active (``wandb.run``); nothing here starts one, and
nothing fails without it, so tests and offline machines never need W&B.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from rfd.analysis.gradients import INPUT, MagnitudeResult, RatioResult  # noqa: E402
from rfd.analysis.theorem import FirstOrderResult, Theorem1Result  # noqa: E402


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v)
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    cols = list(columns or _columns(rows))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def write_table(
    rows: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    name: str,
    title: str = "",
    notes: str = "",
    meta: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """``<name>.md`` (title, table, notes), ``<name>.csv`` and ``<name>.json`` (rows + meta)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = (f"## {title}\n\n" if title else "") + markdown_table(rows)
    if notes:
        md += "\n" + notes.strip() + "\n"
    paths = {"md": out / f"{name}.md", "csv": out / f"{name}.csv", "json": out / f"{name}.json"}
    paths["md"].write_text(md)
    write_csv(rows, paths["csv"])
    paths["json"].write_text(
        json.dumps({"meta": _jsonable(dict(meta or {})), "rows": _jsonable(list(rows))}, indent=1)
    )
    log_wandb_table(name, rows)
    return paths


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    cols = _columns(rows)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: _jsonable(v) for k, v in r.items()})
    return p


# --------------------------------------------------------------------------- W&B (optional)


def _wandb_run() -> Any:
    wandb = sys.modules.get("wandb")  # only if the caller imported it; never import it here
    return getattr(wandb, "run", None) if wandb is not None else None


def log_wandb_table(name: str, rows: Sequence[Mapping[str, Any]]) -> None:
    run = _wandb_run()
    if run is None or not rows:
        return
    wandb = sys.modules["wandb"]
    cols = _columns(rows)
    data = [[_jsonable(r.get(c)) for c in cols] for r in rows]
    run.log({f"analysis/{name}": wandb.Table(columns=cols, data=data)})


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save a figure as PNG (and to the active W&B run), then close it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    plt.close(fig)
    run = _wandb_run()
    if run is not None:
        run.log({f"analysis/{p.stem}": sys.modules["wandb"].Image(str(p))})
    return p


# --------------------------------------------------------------------------- plots


def _label(layer: str, penultimate: str | None) -> str:
    return f"{layer}\n(penult.)" if layer == penultimate and layer != "penultimate" else layer


def plot_ratios(result: RatioResult, path: str | Path) -> Path:
    """Figure 1: per-layer boxes of ``||dL/dh|| / ||dL/dx||`` before and after one step (log y)."""
    layers = [n for n in result.layers if n != INPUT]
    sel = result.clean.correct
    fig, ax = plt.subplots(figsize=(1.3 * len(layers) + 2, 4))
    pos = np.arange(len(layers), dtype=float)
    width = 0.35 if result.stepped is not None else 0.6
    clean = [result.clean.ratio(n)[sel].numpy() for n in layers]
    _boxes(ax, clean, pos - (width / 2 if result.stepped is not None else 0), width, "C0")
    handles = [plt.Rectangle((0, 0), 1, 1, color="C0", alpha=0.5, label="clean")]
    if result.stepped is not None:
        step = [result.stepped.ratio(n)[sel].numpy() for n in layers]
        _boxes(ax, step, pos + width / 2, width, "C3")
        handles.append(
            plt.Rectangle(
                (0, 0), 1, 1, color="C3", alpha=0.5, label=f"after one step ({result.step:g})"
            )
        )
    ax.set_yscale("log")
    ax.set_xticks(pos, [_label(n, result.penultimate) for n in layers], fontsize=8)
    ax.set_ylabel("||∇_h L|| / ||∇_x L||")
    ax.set_title("Gradient-norm ratio per layer (correctly classified images)")
    ax.legend(handles=handles, fontsize=8)
    return save_figure(fig, path)


def _boxes(ax: Any, data: list[np.ndarray], pos: np.ndarray, width: float, color: str) -> None:
    data = [d[np.isfinite(d) & (d > 0)] for d in data]
    bp = ax.boxplot(data, positions=pos, widths=width, showfliers=False, patch_artist=True)
    for b in bp["boxes"]:
        b.set(facecolor=color, alpha=0.5)
    for m in bp["medians"]:
        m.set(color="k")


def plot_magnitude(result: MagnitudeResult, path: str | Path) -> Path:
    """Figure 2: per-layer distribution of the robustness magnitude ``q * ||dL/dh||`` (log y)."""
    layers = result.layers
    fig, ax = plt.subplots(figsize=(1.2 * len(layers) + 2, 4))
    data = [result.magnitude[n].numpy() for n in layers]
    _boxes(ax, data, np.arange(len(layers), dtype=float), 0.6, "C2")
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)), [_label(n, result.penultimate) for n in layers], fontsize=8)
    ax.set_ylabel(f"q{result.quantile:g}(L/||∇_h L||) · ||∇_h L||")
    ax.set_title(f"Robustness magnitude per layer (noise sized for a {result.quantile:.0%} drop)")
    return save_figure(fig, path)


def plot_theorem1(results: Sequence[Theorem1Result], path: str | Path) -> Path:
    """Scatter of Theorem 1's predicted flip probability against the measured one, per image."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, r in enumerate(results):
        ax.scatter(
            r.p_theorem.numpy(),
            r.p_measured.numpy(),
            s=10,
            alpha=0.6,
            color=f"C{i}",
            label=f"{r.label}: MAD {r.mad:.3f}",
        )
    ax.plot([0, 0.5], [0, 0.5], "k--", lw=1)
    ax.set_xlim(-0.01, 0.52)
    ax.set_ylim(-0.01, 0.52)
    ax.set_xlabel("predicted P(flip) (Theorem 1)")
    ax.set_ylabel("measured P(flip) (Monte Carlo)")
    r0 = results[0]
    ax.set_title(f"Theorem 1 at {r0.layer}, ν={r0.nu:.3g} (std)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


def plot_layer_sweep(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Robust accuracy per noised layer (bars) beside the auto-layer score (line, right axis)."""
    base = [r for r in rows if r["layer"] == "none"]
    rows = [r for r in rows if r["layer"] != "none"]
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    pos = np.arange(len(rows))
    ax.bar(pos, [100 * r["robust_acc"] for r in rows], color="C0", alpha=0.7)
    if base:
        ax.axhline(100 * base[0]["robust_acc"], color="k", ls=":", label="undefended")
    ax.set_xticks(pos, [r["layer"] + (" *" if r.get("auto") else "") for r in rows], fontsize=8)
    ax.set_ylabel("robust accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(pos, [r["score"] for r in rows], "C3o-", label="auto-layer score")
    ax2.set_yscale("log")
    ax2.set_ylabel("score (ν̂ · ||∇_h L|| / ||∇_x L||)", color="C3")
    if base:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Noise at one layer, equal clean drop (* = layers='auto' pick)", fontsize=10)
    return save_figure(fig, path)


def plot_strength(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Table 3 as curves: robust accuracy against each attack's probe size, one line per defense."""
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 3.5), squeeze=False)
    for ax, a in zip(axes[0], attacks, strict=True):
        sub = [r for r in rows if r["attack"] == a]
        for i, d in enumerate(dict.fromkeys(r["defense"] for r in sub)):
            pts = sorted((r["value"], 100 * r["robust_acc"]) for r in sub if r["defense"] == d)
            ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i}", label=d)
        ax.set_xscale("log")
        ticks = sorted({r["value"] for r in sub})
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(sub[0]["param"])
        ax.set_ylabel("robust accuracy (%)")
        ax.set_title(a)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_first_order(result: FirstOrderResult, path: str | Path) -> Path:
    """Figure 3: histograms of log10 |first-order error|, with the signal |grad . u| dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (src, err) in enumerate(result.errors.items()):
        e = np.log10(err.clamp_min(1e-12).numpy())
        s = np.log10(result.signals[src].clamp_min(1e-12).numpy())
        ax.hist(e, bins=40, histtype="stepfilled", alpha=0.4, color=f"C{i}", label=f"error {src}")
        ax.hist(s, bins=40, histtype="step", ls="--", color=f"C{i}", label=f"|∇·u| {src}")
    ax.set_xlabel("log10 |L(x+u) − L(x) − ∇L·u|  (dashed: log10 |∇L·u|)")
    ax.set_ylabel("count")
    ax.set_title("First-order approximation error")
    ax.legend(fontsize=6)
    return save_figure(fig, path)
