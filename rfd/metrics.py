"""One set of metric names for every layer: per-image records, per-cell summaries, engine stats.

A **record** is one attacked image (one JSON line of a cell's ``records.*.jsonl``) with exactly
the keys of :data:`RECORD_KEYS`:

- ``index`` (int): dataset index; ``label`` (int): true label.
- ``clean_correct`` (bool): the undefended model classifies the clean image correctly.
- ``defended_correct`` (float): mean correctness over the defended model's noisy clean passes.
- ``attack_clean_correct`` (bool): the attack's own charged clean query said correct, under the
  success criterion (only such images are attacked).
- ``success`` (bool): verified fooled; ``fooled_at`` (int): the charged-query count at the first
  verified fooling query, -1 if never.
- ``queries`` (int): charged queries spent; ``verify_queries`` (int): uncharged majority-vote
  re-queries; ``probe_queries`` (int): uncharged randomness-probe forwards.

Optional (:data:`OPTIONAL_RECORD_KEYS`): ``detected`` (bool), written only under a defense with a
detector (MagNet): whether the detector flags the image's final adversarial example (False for
images the attack did not fool).

**Engine statistics** of one cell (:data:`STATS_KEYS`; several add up when a run is resumed, see
:func:`merge_stats`): ``forwards`` (forwards the cell took part in), ``fill_sum`` (sum over those
forwards of rows used ÷ batch size), ``rows`` (forward rows the cell used), ``seconds`` (wall
seconds attributed to the cell by its share of each forward's cost: rows × the defense's
``forwards_per_query``), and optionally ``ranks`` (how many processes attacked side by side when
the statistics were taken, default 1: their seconds overlap in wall time, so each rank's count as
``seconds / ranks`` when summed, which is the mean over those ranks, the wall time when they
share the work evenly, and a cell's queries/s is the grid's, not one process's).

:func:`summarize` turns records (plain dicts, e.g. read back from JSONL, or
:func:`records_from_tensors` of an attack's per-image tensors) and optional statistics into the
names of :data:`METRICS`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

RECORD_KEYS = (
    "index",
    "label",
    "clean_correct",
    "defended_correct",
    "attack_clean_correct",
    "success",
    "queries",
    "verify_queries",
    "fooled_at",
    "probe_queries",
)
OPTIONAL_RECORD_KEYS = ("detected",)
# Python types of the record values that are not int.
_RECORD_TYPES = {"clean_correct": bool, "attack_clean_correct": bool, "success": bool,
                 "defended_correct": float}  # fmt: skip
STATS_KEYS = ("forwards", "fill_sum", "rows", "seconds", "ranks")
_STATS_TYPES = {"forwards": int, "fill_sum": float, "rows": int, "seconds": float}

METRICS: dict[str, str] = {
    "n_images": "distinct images evaluated (records de-duplicated by dataset index)",
    "clean_acc": "accuracy of the undefended model on the clean images",
    "defended_clean_acc": "accuracy of the defended model on the clean images (mean over noisy passes)",
    "attack_clean_acc": "fraction the attack's charged clean query found correct (the attacked images)",
    "robust_acc": "robust accuracy over all images at the largest budget (the paper's metric)",
    "robust_acc_at": "robust accuracy over all images at each budget: {str(budget): fraction}",
    "success_rate": "verified-fooled images ÷ images the attack found clean-correct",
    "failure_rate": "1 - success_rate: the attack's failure rate (RND's metric)",
    "mean_queries_success": "mean charged-query count at the fooling query, over successes (fooled_at)",
    "median_queries_success": "median charged-query count at the fooling query, over successes",
    "mean_queries": "mean charged queries per image, over all images",
    "charged_queries": "charged queries spent, all images together",
    "verify_queries": "uncharged majority-vote re-queries, all images together",
    "probe_queries": "uncharged randomness-probe forwards, all images together",
    "detection_rate": "fooled images whose adversarial example the defense's detector flags ÷ "
    "fooled images (NaN without a detector; null in results.json)",
    "robust_acc_detect": "robust accuracy counting a detected adversarial example as defended "
    "(NaN without a detector; null in results.json)",
    "batch_fill": "mean fraction of the batch rows used in the forwards this cell took part in",
    "queries_per_second": "charged queries per wall second attributed to this cell",
    "seconds": "wall seconds attributed to this cell (its share of each forward: rows × forwards "
    "per query; the seconds of concurrent ranks count once, divided by the number of ranks)",
    "forwards": "model forwards this cell took part in",
}
STATS_METRICS = ("batch_fill", "queries_per_second", "seconds", "forwards")  # only with stats


def dedupe(records: Iterable[Mapping[str, Any]], key: str = "index") -> list[Mapping[str, Any]]:
    """One record per dataset index (first wins), sorted by index: removes DDP sampler padding
    and the overlap of a resumed run."""
    seen: dict[Any, Mapping[str, Any]] = {}
    for r in records:
        seen.setdefault(r[key], r)
    return [seen[k] for k in sorted(seen)]


def _fooled_by(r: Mapping[str, Any], budget: int | None) -> bool:
    return bool(r["success"]) and (budget is None or 0 <= r["fooled_at"] <= budget)


def robust_accuracy_at(records: Sequence[Mapping[str, Any]], budget: int | None) -> float:
    """Robust accuracy over all images at a query budget (the paper's metric).

    An image counts as robust when the attack's clean query found it correct and the attack had
    not verifiably fooled it within ``budget`` charged queries (``None``: within the whole run).
    ``records`` are one per image (see :func:`dedupe`); NaN without records.
    """
    if not records:
        return math.nan
    ok = sum(1 for r in records if r["attack_clean_correct"] and not _fooled_by(r, budget))
    return ok / len(records)


def robust_curve(
    records: Sequence[Mapping[str, Any]], max_queries: int, points: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """(budgets, robust accuracy) on a log grid up to ``max_queries``, for the queries plot."""
    records = dedupe(records)
    grid = np.unique(np.geomspace(1, max_queries, points).astype(int))
    return grid, np.array([robust_accuracy_at(records, int(b)) for b in grid])


def merge_stats(stats: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum engine statistics (of the ranks of a run, and of the runs of a resumed cell); missing
    keys count 0. Seconds of a statistic taken with ``ranks`` concurrent processes count
    ``1 / ranks``: the ranks ran side by side, so the sum is wall time, not process time. The
    result has no ``ranks`` key (its seconds are wall seconds already).

    Raises:
        ValueError: a key that is not one of :data:`STATS_KEYS`, or ``ranks`` below 1.
    """
    out: dict[str, Any] = {k: t(0) for k, t in _STATS_TYPES.items()}
    for s in stats:
        unknown = set(s) - set(STATS_KEYS)
        if unknown:
            raise ValueError(f"unknown engine statistic(s) {sorted(unknown)}; known: {STATS_KEYS}")
        ranks = int(s.get("ranks", 1))
        if ranks < 1:
            raise ValueError(f"engine statistic ranks must be >= 1, got {ranks}")
        for k, v in s.items():
            if k != "ranks":
                out[k] += _STATS_TYPES[k](v) / ranks if k == "seconds" else _STATS_TYPES[k](v)
    return out


def _mean(values: Iterable[Any]) -> float:
    """Mean of the measured values (None: not measured); NaN when there are none."""
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def summarize(
    records: Iterable[Mapping[str, Any]],
    budgets: Sequence[int] = (),
    stats: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every metric of one cell, under the names of :data:`METRICS`.

    Args:
        records: per-image records (dicts with :data:`RECORD_KEYS`), de-duplicated by index here.
            ``clean_correct`` / ``defended_correct`` may be None (not measured: the accuracy is
            the mean over the measured images, NaN if none); a missing ``probe_queries`` counts 0
            (records written before the key existed).
        budgets: charged-query budgets for ``robust_acc_at``; ``robust_acc`` is at the largest,
            or over the whole run when there are none.
        stats: the cell's engine statistics (one dict or several to sum); adds
            :data:`STATS_METRICS`.

    Returns:
        A dict with the keys of :data:`METRICS` (without :data:`STATS_METRICS` when ``stats`` is
        None). Rates over no images and query statistics over no successes are NaN.
    """
    rows = dedupe(records)
    correct = [r for r in rows if r["attack_clean_correct"]]
    fooled = [r for r in correct if r["success"]]
    at = np.array([r["fooled_at"] for r in fooled], dtype=float)
    robust_at = {str(b): robust_accuracy_at(rows, int(b)) for b in budgets}
    charged = int(sum(r["queries"] for r in rows))
    out: dict[str, Any] = {
        "n_images": len(rows),
        "clean_acc": _mean(r["clean_correct"] for r in rows),
        "defended_clean_acc": _mean(r["defended_correct"] for r in rows),
        "attack_clean_acc": _ratio(len(correct), len(rows)),
        "robust_acc": robust_accuracy_at(rows, max(budgets) if budgets else None),
        "robust_acc_at": robust_at,
        "success_rate": _ratio(len(fooled), len(correct)),
        "failure_rate": _ratio(len(correct) - len(fooled), len(correct)),
        "mean_queries_success": float(at.mean()) if len(at) else math.nan,
        "median_queries_success": float(np.median(at)) if len(at) else math.nan,
        "mean_queries": _ratio(charged, len(rows)),
        "charged_queries": charged,
        "verify_queries": int(sum(r["verify_queries"] for r in rows)),
        "probe_queries": int(sum(r.get("probe_queries", 0) for r in rows)),
    }
    has_detector = bool(rows) and all("detected" in r for r in rows)
    flagged = sum(bool(r["detected"]) for r in fooled) if has_detector else 0
    out["detection_rate"] = _ratio(flagged, len(fooled)) if has_detector else math.nan
    out["robust_acc_detect"] = (
        _ratio(len(correct) - len(fooled) + flagged, len(rows)) if has_detector else math.nan
    )
    if stats is not None:
        s = merge_stats([stats] if isinstance(stats, Mapping) else stats)
        out.update(
            batch_fill=_ratio(s["fill_sum"], s["forwards"]),
            queries_per_second=_ratio(charged, s["seconds"]),
            seconds=s["seconds"],
            forwards=s["forwards"],
        )
    return out


def records_from_tensors(**per_image: Any) -> list[dict[str, Any]]:
    """Per-image records (plain Python values) from per-image tensors, arrays or sequences.

    Each keyword is a key of :data:`RECORD_KEYS` with one value per image, or a scalar that every
    image shares. ``index`` defaults to 0..N-1, ``verify_queries`` and ``probe_queries`` to 0,
    ``clean_correct`` and ``defended_correct`` to None (not measured); the others are required.
    For an :class:`rfd.attacks.AttackResult` ``res``::

        records_from_tensors(label=res.labels, attack_clean_correct=res.clean_correct,
                             success=res.success, queries=res.queries, fooled_at=res.fooled_at,
                             verify_queries=res.verify_queries)

    Raises:
        ValueError: an unknown or missing key, or per-image values of different lengths.
    """
    unknown = set(per_image) - set(RECORD_KEYS)
    if unknown:
        raise ValueError(f"unknown record key(s) {sorted(unknown)}; known: {RECORD_KEYS}")
    lengths = {len(c) for c in map(_as_list, per_image.values()) if c is not None}
    if len(lengths) != 1:
        raise ValueError(f"need per-image values of one length, got lengths {sorted(lengths)}")
    n = lengths.pop()
    values = {"index": range(n), "verify_queries": 0, "probe_queries": 0,
              "clean_correct": None, "defended_correct": None, **per_image}  # fmt: skip
    missing = [k for k in RECORD_KEYS if k not in values]
    if missing:
        raise ValueError(f"missing record key(s) {missing}")
    columns = {}
    for k in RECORD_KEYS:
        col = _as_list(values[k])
        cast = _RECORD_TYPES.get(k, int)
        columns[k] = [
            None if v is None else cast(v) for v in (col if col is not None else [values[k]] * n)
        ]
    return [{k: columns[k][i] for k in RECORD_KEYS} for i in range(n)]


def _as_list(v: Any) -> list[Any] | None:
    """Per-image values as a Python list; None for a scalar shared by every image."""
    if isinstance(v, torch.Tensor | np.ndarray):
        return None if v.ndim == 0 else v.tolist()
    if isinstance(v, Sequence) and not isinstance(v, str):
        return list(v)
    return None


class IndexedMean(Metric):
    """Mean of per-sample values, counting each dataset index once across all ranks.

    DistributedSampler pads the last batch by repeating samples so that every rank gets the same
    number; a plain mean would count those twice. Keeping (index, value) pairs and de-duplicating
    at ``compute`` gives the mean over distinct images.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("value", default=[], dist_reduce_fx="cat")

    def update(self, value: torch.Tensor, index: torch.Tensor) -> None:
        self.index.append(index.detach().long().flatten())
        self.value.append(value.detach().float().flatten())

    def compute(self) -> torch.Tensor:
        if len(self.index) == 0:  # an empty list, before any update or sync
            return torch.tensor(float("nan"))
        idx, val = dim_zero_cat(self.index), dim_zero_cat(self.value)
        if idx.numel() == 0:  # only empty updates (every job was already on disk)
            return torch.tensor(float("nan"))
        uniq, inverse = torch.unique(idx, return_inverse=True)
        order = torch.arange(len(idx), device=idx.device)
        first = torch.full((len(uniq),), len(idx), device=idx.device, dtype=torch.long)
        first = first.scatter_reduce(0, inverse, order, reduce="amin")
        return val[first].mean()
