"""Results: per-image records (JSONL, appended per batch), paper-layout tables, plots.

One evaluation "cell" is (model, defense, attack, norm, eps, budget, criterion, eot). Each attacked
image becomes one JSON line; every metric (``rfd.metrics``: robust accuracy at any budget up to
the one attacked with, failure rate, query statistics) is derived from those lines, so an
interrupted run that is resumed gives exactly the table an uninterrupted one would. Row and column
titles come from the registries (``title`` of the classes in ``rfd.attacks.ATTACKS`` and
``rfd.defenses.DEFENSES``); the paper's numbers from ``rfd.paper``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rfd import metrics
from rfd.paper import paper_value

# TODO(engine): remove; rfd/runner.py still calls report.summarize and report.robust_curve.
summarize = metrics.summarize
robust_curve = metrics.robust_curve


def budget_label(q: int) -> str:
    """1000 -> '1k', 10000 -> '10k', 500 -> '500' (the paper's column headers)."""
    return f"{q // 1000}k" if q >= 1000 and q % 1000 == 0 else str(q)


def attack_title(name: str) -> str:
    """An attack's title in tables ("Square"): its registered class's ``title``, else the name."""
    from rfd.attacks import ATTACKS

    return _title(ATTACKS, name)


def defense_title(name: str) -> str:
    """A defense's title in tables ("Feature"): its registered class's ``title``, else the name."""
    from rfd.defenses import DEFENSES

    return _title(DEFENSES, name)


def method_title(defense: str, tag: str | None = None) -> str:
    """The Method column: the defense's title, joined to the model's training ``tag`` when the
    model has one (Table 4: an adversarially trained model's rows are "AT", "Feature+AT")."""
    title = defense_title(defense)
    if not tag:
        return title
    return tag if defense == "none" else f"{title}+{tag}"


def unique_displays(
    displays: Sequence[str], tags: Sequence[str | None], run_names: Sequence[str]
) -> list[str]:
    """Each model's name in tables and plots: its display name, with its run name appended where
    another model of the grid has the same display name and tag.

    Table rows, robust-vs-queries curves and calibration curves are keyed by (display name, tag):
    two such models (``fmnist_default`` and ``fmnist_gauss025`` are both "test_resnet (FMNIST)")
    would share one row averaging both, and one plot line overwriting the other.
    """
    pairs = list(zip(displays, tags, strict=True))
    return [f"{d} ({r})" if pairs.count((d, t)) > 1 else d
            for (d, t), r in zip(pairs, run_names, strict=True)]  # fmt: skip


def _title(registry: Any, name: str) -> str:
    # A registry maps names to classes; rfd.defenses.DEFENSES is still a tuple of names for now.
    cls = registry.get(name) if isinstance(registry, Mapping) else None
    return getattr(cls, "title", name)


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


# --------------------------------------------------------------------------- tables


def pct(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def paper_table(
    summaries: Sequence[dict[str, Any]], with_paper: bool = False
) -> tuple[list[str], list[list[str]]]:
    """Rows in the paper's layout: Model | Method | Acc | Square 1k | Square 10k | NES 1k | ...

    Args:
        summaries: one dict per cell with keys model, defense, attack, tag, run_name and eot
            (the last three optional) and ``rfd.metrics.summarize``'s (``robust_acc_at``,
            ``defended_clean_acc``).
        with_paper: put the paper's number (``rfd.paper.paper_value``) in parentheses beside ours
            where the paper has one; decision attacks fall back to the bare attack title's column.
    """
    columns: list[tuple[str, int]] = []
    titles: dict[tuple[str, int], str] = {}
    for a in dict.fromkeys(s["attack"] for s in summaries):
        first = next(s for s in summaries if s["attack"] == a)
        fixed = _fixed_column(first)
        budgets = {int(b) for s in summaries if s["attack"] == a for b in s["robust_acc_at"]}
        if fixed is not None:  # white-box attacks: steps and EOT name the column, not a budget
            budgets = {max(budgets)}
        for b in sorted(budgets):
            columns.append((a, b))
            titles[(a, b)] = fixed or f"{attack_title(a)} {budget_label(b)}"
    header = ["Model", "Method", "Acc"] + [titles[c] for c in columns]
    ref = paper_value if with_paper else _no_paper
    rows: list[list[str]] = []
    for key in dict.fromkeys(map(_row_key, summaries)):
        model, _, tag, defense = key
        cells = [s for s in summaries if _row_key(s) == key]
        method = method_title(defense, tag)
        acc = sum(c["defended_clean_acc"] for c in cells) / len(cells)
        row = [model, method, _with_paper(pct(acc), ref(model, method, "Acc"))]
        for a, b in columns:
            cell = next(
                (c for c in cells if c["attack"] == a and str(b) in c["robust_acc_at"]), None
            )
            eot = int(cell.get("eot") or 1) if cell else 1
            title = attack_title(a)
            paper = ref(model, method, f"{title} {budget_label(b)}", eot)
            if paper is None:  # decision attacks: the paper's column names no budget
                paper = ref(model, method, title, eot)
            row.append(_with_paper(pct(cell["robust_acc_at"][str(b)]) if cell else "—", paper))
        rows.append(row)
    return header, rows


def _row_key(summary: dict[str, Any]) -> tuple[Any, ...]:
    """A table row: one model (its run name too, so equal display names never merge) and method."""
    return summary["model"], summary.get("run_name"), summary.get("tag"), summary["defense"]


def _fixed_column(summary: dict[str, Any]) -> str | None:
    """The column title an attack chooses for itself (white-box: "PGD-20 EOT10"), if any."""
    from rfd.attacks import ATTACKS, make_attack

    name = summary["attack"]
    if name not in ATTACKS or "attack_params" not in summary:
        return None
    try:
        atk = make_attack(name, summary.get("norm", "linf"), **summary["attack_params"])
    except ValueError:
        return None
    return atk.column(int(summary.get("eot") or 1))


def details_lines(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """The terminal's "cell details": a header line, then one line per cell."""
    lines = [
        "cell details: failure rate | mean/median queries of successes | verification queries | "
        "ν | clean → defended accuracy | batch fill | charged queries/s"
    ]
    for s in summaries:
        q = "/".join(_number(s[k]) for k in ("mean_queries_success", "median_queries_success"))
        lines.append(
            f"  {s['model']:>18} {method_title(s['defense'], s.get('tag')):>10} "
            f"{attack_title(s['attack']):>10}: "
            f"fail {_percent(s['failure_rate'])} | q {q} | verify {s['verify_queries']} | "
            f"ν {_nu(s.get('nu'))} | clean {_percent(s['clean_acc'])} → defended "
            f"{_percent(s['defended_clean_acc'])} | fill {_percent(s.get('batch_fill'))} | "
            f"{_number(s.get('queries_per_second'))} q/s" + _extra(s)
        )
    return lines


def _extra(s: dict[str, Any]) -> str:
    """What only some defenses have: a detector's verdicts, a defender's cost above one forward."""
    out = ""
    rate = s.get("detection_rate")
    if isinstance(rate, float) and not math.isnan(rate):
        out += (f" | detected {_percent(rate)} of fooled → robust+detect "
                f"{_percent(s.get('robust_acc_detect'))}")  # fmt: skip
    cost = s.get("defense_forwards_per_query")
    if isinstance(cost, int | float) and cost != 1:
        out += f" | defender {cost:g} forwards/query"
    return out


def _percent(x: float | None) -> str:
    p = pct(x)
    return p if p == "—" else f"{p}%"


def _number(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.0f}"


def _nu(nu: Any) -> str:
    if isinstance(nu, int | float):
        return f"{nu:.4g}"
    if isinstance(nu, Sequence) and not isinstance(nu, str) and nu:
        return ",".join(_nu(v) for v in nu)
    return "—"


def _no_paper(*_: Any) -> None:
    return None


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


def caption(summaries: Sequence[dict[str, Any]]) -> str:
    """What the numbers of a table mean: the images, the threat model and the two counting rules
    (criterion and success rule), which move robust accuracy by several points (README)."""

    def values(key: str, fmt: Any = str) -> str:
        seen = dict.fromkeys(fmt(s[key]) for s in summaries if s.get(key) is not None)
        return "/".join(seen) or "?"

    return (
        f"robust accuracy (%), {values('n_images')} images, {values('norm')} eps "
        f"{values('eps', lambda e: f'{e:g}')}, criterion {values('criterion')}, success "
        f"{values('success_rule')}"
    )


def _strict(value: Any) -> Any:
    """``value`` as JSON data: numbers JSON cannot hold natively (NumPy or torch scalars) as
    floats, and every non-finite number (nested in dicts and lists) as None."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if value is None or isinstance(value, (str, int)):  # bool is an int
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return value  # not a number: json.dumps names its type
    return number if math.isfinite(number) else None


def write_summary_files(out_dir: Path, summaries: Sequence[dict[str, Any]]) -> dict[str, Path]:
    """results.json (everything), results.csv (one row per cell and budget), table.md.

    ``summaries``: one dict per cell, ``rfd.metrics.summarize``'s plus the cell's settings.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "results.json",
        "csv": out_dir / "results.csv",
        "markdown": out_dir / "table.md",
    }
    # strict JSON: a metric that does not apply (no detector, no success) is null, not NaN,
    # which jq, JavaScript and most JSON parsers refuse
    rows = [_strict(dict(s)) for s in summaries]
    paths["json"].write_text(json.dumps(rows, indent=2, allow_nan=False))
    fields = [
        "model", "tag", "run_name", "defense", "attack", "norm", "eps", "criterion", "success_rule",
        "eot", "budget", "n_images",
        "clean_acc", "defended_clean_acc", "robust_acc", "failure_rate", "mean_queries_success",
        "median_queries_success", "verify_queries", "batch_fill", "queries_per_second", "nu",
        "layers", "detection_rate", "robust_acc_detect", "defense_forwards_per_query",
    ]  # fmt: skip
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for s in summaries:  # one row per budget: robust_acc is the accuracy at that budget
            for b, acc in s["robust_acc_at"].items():
                w.writerow({**s, "budget": int(b), "robust_acc": acc})
    header, rows = paper_table(summaries, with_paper=any(s.get("paper") for s in summaries))
    paths["markdown"].write_text(f"{caption(summaries)}\n\n{markdown(header, rows)}")
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
            ax.plot(x, 100 * y, label=defense_title(defense))
        ax.set_xscale("log")
        ax.set_title(attack_title(attack))
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
