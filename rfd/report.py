"""Results: per-image records (JSONL, appended per batch), summaries, paper-layout tables, plots.

One evaluation "cell" is (model, defense, attack, norm, eps, budget, criterion, eot). Each attacked
image becomes one JSON line; everything else (robust accuracy at any budget up to the one attacked
with, failure rate, query statistics) is derived from those lines, so an interrupted run that is
resumed gives exactly the table an uninterrupted one would.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ATTACK_TITLES = {
    "square": "Square",
    "nes": "NES",
    "signhunter": "SignHunt",
    "rays": "RayS",
    "signflip": "SignFlip",
}
DEFENSE_TITLES = {"none": "Base", "input": "Input", "feature": "Feature", "aaa": "AAA"}

# Paper numbers (robust accuracy %, PAPER.md): Table 2 (score-based, 1k/10k queries) and Table 5
# (decision-based). Keys: (model, method) -> column -> value. "Acc" holds the ~2% drop accuracy.
PAPER = {
    ("ResNet50", "Base"): {"Acc": 97.66, "Square 1k": 0.8, "Square 10k": 0.1, "NES 1k": 71.7, "NES 10k": 21.7, "SignHunt 1k": 3.7, "SignHunt 10k": 0.2, "RayS": 0.1, "SignFlip": 20.5},
    ("ResNet50", "Input"): {"Acc": 95.98, "Square 1k": 50.5, "Square 10k": 48.8, "NES 1k": 93.1, "NES 10k": 85.4, "SignHunt 1k": 26.8, "SignHunt 10k": 26.0, "RayS": 12.0, "SignFlip": 85.5},
    ("ResNet50", "Feature"): {"Acc": 95.95, "Square 1k": 54.9, "Square 10k": 52.8, "NES 1k": 93.2, "NES 10k": 86.2, "SignHunt 1k": 32.5, "SignHunt 10k": 30.6, "RayS": 14.4, "SignFlip": 82.5},
    ("ResNet50", "AAA"): {"RayS": 0.1, "SignFlip": 20.4},
    ("VGG19", "Base"): {"Acc": 96.28, "Square 1k": 0.6, "Square 10k": 0.1, "NES 1k": 68.8, "NES 10k": 16.6, "SignHunt 1k": 3.2, "SignHunt 10k": 0.3, "RayS": 0.0, "SignFlip": 6.4},
    ("VGG19", "Input"): {"Acc": 94.92, "Square 1k": 30.6, "Square 10k": 27.1, "NES 1k": 89.5, "NES 10k": 58.0, "SignHunt 1k": 22.7, "SignHunt 10k": 21.8, "RayS": 8.1, "SignFlip": 86.0},
    ("VGG19", "Feature"): {"Acc": 94.93, "Square 1k": 61.0, "Square 10k": 58.4, "NES 1k": 92.2, "NES 10k": 77.9, "SignHunt 1k": 43.2, "SignHunt 10k": 42.4, "RayS": 15.4, "SignFlip": 76.5},
    ("DeiT", "Base"): {"Acc": 98.40, "Square 1k": 3.2, "Square 10k": 0.0, "NES 1k": 81.9, "NES 10k": 34.2, "SignHunt 1k": 7.9, "SignHunt 10k": 0.2},
    ("DeiT", "Input"): {"Acc": 96.59, "Square 1k": 66.9, "Square 10k": 67.6, "NES 1k": 95.2, "NES 10k": 90.0, "SignHunt 1k": 40.2, "SignHunt 10k": 39.2},
    ("DeiT", "Feature"): {"Acc": 96.29, "Square 1k": 69.1, "Square 10k": 67.9, "NES 1k": 94.1, "NES 10k": 88.3, "SignHunt 1k": 45.7, "SignHunt 10k": 43.4},
    ("ViT", "Base"): {"Acc": 97.86, "Square 1k": 5.1, "Square 10k": 0.0, "NES 1k": 84.8, "NES 10k": 43.6, "SignHunt 1k": 6.1, "SignHunt 10k": 0.0},
    ("ViT", "Input"): {"Acc": 95.80, "Square 1k": 63.0, "Square 10k": 61.2, "NES 1k": 93.5, "NES 10k": 87.0, "SignHunt 1k": 34.8, "SignHunt 10k": 33.3},
    ("ViT", "Feature"): {"Acc": 95.96, "Square 1k": 63.9, "Square 10k": 62.7, "NES 1k": 93.7, "NES 10k": 85.6, "SignHunt 1k": 42.5, "SignHunt 10k": 40.7},
}  # fmt: skip


def budget_label(q: int) -> str:
    """1000 -> '1k', 10000 -> '10k', 500 -> '500' (the paper's column headers)."""
    return f"{q // 1000}k" if q >= 1000 and q % 1000 == 0 else str(q)


# --------------------------------------------------------------------------- records


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows and fsync: a killed process loses at most the batch being written."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    with p.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read rows, ignoring a torn last line left by a process killed mid-write."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def dedupe(rows: Iterable[dict[str, Any]], key: str = "index") -> list[dict[str, Any]]:
    """One row per dataset index (first wins): removes DDP sampler padding and resume overlap."""
    seen: dict[Any, dict[str, Any]] = {}
    for r in rows:
        seen.setdefault(r[key], r)
    return [seen[k] for k in sorted(seen)]


# --------------------------------------------------------------------------- summaries


def robust_accuracy_at(rows: Sequence[dict[str, Any]], budget: int) -> float:
    """Robust accuracy over all evaluated images at a query budget (the paper's metric).

    An image counts as robust when it was correctly classified before the attack and the attack
    had not (verifiably) fooled it within ``budget`` charged queries.
    """
    if not rows:
        return float("nan")
    ok = sum(
        1
        for r in rows
        if r["attack_clean_correct"] and not (0 <= r["fooled_at"] <= budget and r["success"])
    )
    return ok / len(rows)


def summarize(rows: Sequence[dict[str, Any]], budgets: Sequence[int]) -> dict[str, Any]:
    """Every metric of one cell from its per-image rows."""
    rows = dedupe(rows)
    n = len(rows)
    correct = [r for r in rows if r["attack_clean_correct"]]
    succ = [r for r in correct if r["success"]]
    q_succ = np.array([r["queries"] for r in succ], dtype=float)
    out: dict[str, Any] = {
        "n_images": n,
        "clean_acc": _mean(r["clean_correct"] for r in rows),
        "defended_clean_acc": _mean(r["defended_correct"] for r in rows),
        "attack_clean_acc": _mean(r["attack_clean_correct"] for r in rows),
        "robust_acc": {str(b): robust_accuracy_at(rows, b) for b in budgets},
        "failure_rate": (len(correct) - len(succ)) / len(correct) if correct else float("nan"),
        "mean_queries_success": float(q_succ.mean()) if len(q_succ) else float("nan"),
        "median_queries_success": float(np.median(q_succ)) if len(q_succ) else float("nan"),
        "charged_queries": int(sum(r["queries"] for r in rows)),
        "verify_queries": int(sum(r["verify_queries"] for r in rows)),
        "attack_seconds": float(sum(r.get("seconds", 0.0) for r in rows)),
    }
    return out


def _mean(values: Iterable[Any]) -> float:
    v = [float(x) for x in values]
    return sum(v) / len(v) if v else float("nan")


def robust_curve(rows: Sequence[dict[str, Any]], max_queries: int, points: int = 50) -> tuple:
    """(budgets, robust accuracy) on a log grid up to ``max_queries`` for the queries plot."""
    rows = dedupe(rows)
    grid = np.unique(np.geomspace(1, max_queries, points).astype(int))
    return grid, np.array([robust_accuracy_at(rows, int(b)) for b in grid])


# --------------------------------------------------------------------------- tables


def pct(x: float) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def paper_table(
    summaries: Sequence[dict[str, Any]], with_paper: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Rows in the paper's layout: Model | Method | Acc | Square 1k | Square 10k | NES 1k | ...

    Args:
        summaries: one dict per cell with keys model, defense, attack, budgets, and summarize()'s.
        with_paper: put the paper's number in parentheses beside ours where PAPER.md has one.
    """
    attacks: list[str] = []
    columns: list[tuple[str, int]] = []
    for s in summaries:
        if s["attack"] not in attacks:
            attacks.append(s["attack"])
    for a in attacks:
        budgets = sorted({int(b) for s in summaries if s["attack"] == a for b in s["robust_acc"]})
        columns += [(a, b) for b in budgets]
    header = ["Model", "Method", "Acc"] + [
        f"{ATTACK_TITLES.get(a, a)} {budget_label(b)}" for a, b in columns
    ]
    rows: list[list[str]] = []
    for model, defense in dict.fromkeys((s["model"], s["defense"]) for s in summaries):
        cells = [s for s in summaries if s["model"] == model and s["defense"] == defense]
        method = DEFENSE_TITLES.get(defense, defense)
        paper = PAPER.get((model, method), {}) if with_paper else {}
        acc = _mean(c["defended_clean_acc"] for c in cells)
        row = [model, method, _with_paper(pct(acc), paper.get("Acc"))]
        for a, b in columns:
            cell = next((c for c in cells if c["attack"] == a and str(b) in c["robust_acc"]), None)
            title = f"{ATTACK_TITLES.get(a, a)} {budget_label(b)}"
            ref = paper.get(title, paper.get(ATTACK_TITLES.get(a, a)))
            row.append(_with_paper(pct(cell["robust_acc"][str(b)]) if cell else "—", ref))
        rows.append(row)
    return header, rows


def _with_paper(ours: str, paper: float | None) -> str:
    return ours if paper is None else f"{ours} ({paper:.1f})"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    """The table on the terminal with rich (plain Markdown when rich is unavailable)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency
        print(markdown(header, rows))
        return
    table = Table(title=title or None)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    import sys

    # Off a terminal (logs, CI) rich assumes 80 columns and truncates headers; give it room.
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def write_summary_files(out_dir: Path, summaries: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """results.json (everything), results.csv (one row per cell and budget), table.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "table.md",
    }
    paths["json"].write_text(json.dumps(list(summaries), indent=2, default=float))
    fields = [
        "model", "defense", "attack", "norm", "eps", "criterion", "eot", "budget", "n_images",
        "clean_acc", "defended_clean_acc", "robust_acc", "failure_rate", "mean_queries_success",
        "median_queries_success", "verify_queries", "nu", "layers",
    ]  # fmt: skip
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for s in summaries:
            for b, acc in s["robust_acc"].items():
                w.writerow({**s, "budget": int(b), "robust_acc": acc})
    header, rows = paper_table(summaries, with_paper=any(s.get("paper") for s in summaries))
    paths["markdown"].write_text(markdown(header, rows))
    return paths


# --------------------------------------------------------------------------- plots


def plot_robust_vs_queries(
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], path: Path
) -> Path:
    """One panel per attack, one line per defense: robust accuracy against the query budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    for ax, (attack, lines) in zip(axes[0], curves.items(), strict=False):
        for defense, (x, y) in lines.items():
            ax.plot(x, 100 * y, label=DEFENSE_TITLES.get(defense, defense))
        ax.set_xscale("log")
        ax.set_title(ATTACK_TITLES.get(attack, attack))
        ax.set_xlabel("queries")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("robust accuracy (%)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_clean_vs_nu(calibrations: dict[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Clean accuracy against the noise std ν for each calibrated defense (the calibration curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    for name, pts in calibrations.items():
        pts = sorted(pts)
        if pts:
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=name, ms=3)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("noise std ν")
    ax.set_ylabel("clean accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
