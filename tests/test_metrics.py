"""rfd.metrics (per-image records → one set of metric names) and rfd.paper (published numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DistributedSampler

from rfd import metrics, paper
from rfd.metrics import IndexedMean, summarize


def rec(index: int, correct: bool, success: bool, fooled_at: int, queries: int) -> dict:
    return {
        "index": index, "label": 0, "clean_correct": correct, "defended_correct": float(correct),
        "attack_clean_correct": correct, "success": success, "queries": queries,
        "verify_queries": 9 if success else 0, "fooled_at": fooled_at, "probe_queries": 1,
    }  # fmt: skip


RECORDS = [
    rec(0, True, True, 10, 12),  # fooled early (queries may run past fooled_at by a step)
    rec(1, True, True, 500, 500),  # fooled late
    rec(2, True, False, -1, 1000),  # survived
    rec(3, False, False, -1, 1),  # misclassified before the attack
]
STATS = {"forwards": 4, "fill_sum": 3.0, "rows": 300, "seconds": 2.0}


def test_robust_accuracy_is_read_from_the_trajectory_with_inclusive_budgets() -> None:
    at = metrics.robust_accuracy_at
    assert at(RECORDS, 1000) == pytest.approx(1 / 4)
    assert at(RECORDS, 500) == pytest.approx(1 / 4)  # fooled at exactly the budget: fooled
    assert at(RECORDS, 499) == pytest.approx(2 / 4)
    assert at(RECORDS, 10) == pytest.approx(2 / 4)
    assert at(RECORDS, 9) == pytest.approx(3 / 4)
    assert at(RECORDS, None) == pytest.approx(1 / 4)  # the whole run
    assert math.isnan(at([], 100))


def test_detector_verdicts_count_detected_adversarial_examples_as_defended() -> None:
    flagged = [dict(r, detected=bool(r["success"] and r["index"] == 1)) for r in RECORDS]
    s = summarize(flagged, [1000])
    fooled = sum(bool(r["attack_clean_correct"] and r["success"]) for r in RECORDS)
    assert s["detection_rate"] == pytest.approx(1 / fooled)
    assert s["robust_acc_detect"] == pytest.approx(s["robust_acc"] + 1 / len(RECORDS))


def test_summarize_names_and_values() -> None:
    s = summarize(RECORDS + [rec(0, False, False, -1, 5)], [100, 1000])  # duplicate: first wins
    # no detector (no record has "detected"): its two metrics are NaN
    assert math.isnan(s.pop("detection_rate")) and math.isnan(s.pop("robust_acc_detect"))
    assert s == {
        "n_images": 4,
        "clean_acc": pytest.approx(0.75),
        "defended_clean_acc": pytest.approx(0.75),
        "attack_clean_acc": pytest.approx(0.75),
        "robust_acc": pytest.approx(0.25),
        "robust_acc_at": {"100": pytest.approx(0.5), "1000": pytest.approx(0.25)},
        "success_rate": pytest.approx(2 / 3),  # over images the attack found correct
        "failure_rate": pytest.approx(1 / 3),
        "mean_queries_success": pytest.approx(255.0),  # fooled_at, not queries
        "median_queries_success": pytest.approx(255.0),
        "mean_queries": pytest.approx((12 + 500 + 1000 + 1) / 4),
        "charged_queries": 1513,
        "verify_queries": 18,
        "probe_queries": 4,
    }
    assert summarize(RECORDS, [1000, 100])["robust_acc"] == pytest.approx(0.25)  # largest budget
    assert (
        summarize(RECORDS)["robust_acc"] == pytest.approx(0.25)
        and not summarize(RECORDS)["robust_acc_at"]
    )


def test_summarize_is_nan_where_undefined() -> None:
    none_correct = summarize([rec(0, False, False, -1, 1)], [10])
    for k in ("success_rate", "failure_rate", "mean_queries_success", "median_queries_success"):
        assert math.isnan(none_correct[k]), k
    assert none_correct["robust_acc"] == 0.0 and none_correct["clean_acc"] == 0.0
    no_success = summarize([rec(0, True, False, -1, 10)], [10])
    assert no_success["failure_rate"] == 1.0 and math.isnan(no_success["mean_queries_success"])
    empty = summarize([], [10], stats={})
    assert empty["n_images"] == 0 and empty["charged_queries"] == 0
    for k in ("clean_acc", "robust_acc", "mean_queries", "batch_fill", "queries_per_second"):
        assert math.isnan(empty[k]), k


def test_dedupe_keeps_the_first_record_of_each_index_sorted() -> None:
    rows = [{"index": 2, "v": "a"}, {"index": 1, "v": "b"}, {"index": 2, "v": "c"}]
    assert metrics.dedupe(rows) == [{"index": 1, "v": "b"}, {"index": 2, "v": "a"}]
    assert metrics.dedupe([{"i": 1}, {"i": 1}], key="i") == [{"i": 1}]


def test_engine_stats_give_batch_fill_and_throughput_and_sum_over_resumed_runs() -> None:
    s = summarize(RECORDS, [1000], stats=STATS)
    assert s["batch_fill"] == pytest.approx(0.75)
    assert s["queries_per_second"] == pytest.approx(1513 / 2.0)
    assert s["seconds"] == 2.0 and s["forwards"] == 4
    half = {"forwards": 2, "fill_sum": 1.5, "rows": 150, "seconds": 1.0}
    assert metrics.merge_stats([half, half]) == STATS
    assert summarize(RECORDS, [1000], stats=[half, half]) == s
    assert metrics.merge_stats([]) == {"forwards": 0, "fill_sum": 0.0, "rows": 0, "seconds": 0.0}
    with pytest.raises(ValueError, match="fill"):
        metrics.merge_stats([{"fill": 1.0}])


def test_concurrent_ranks_count_their_seconds_once() -> None:
    """Two ranks that ran side by side for 2 s each took 2 wall seconds, not 4: queries/s is the
    grid's rate; a resumed segment run by one process adds its own seconds."""
    rank = {"forwards": 2, "fill_sum": 1.5, "rows": 150, "seconds": 2.0, "ranks": 2}
    assert metrics.merge_stats([rank, rank]) == STATS
    s = summarize(RECORDS, [1000], stats=[rank, rank])
    assert s["queries_per_second"] == pytest.approx(1513 / 2.0)
    later = {"forwards": 1, "fill_sum": 1.0, "rows": 10, "seconds": 0.5}
    assert metrics.merge_stats([rank, rank, later])["seconds"] == pytest.approx(2.5)
    with pytest.raises(ValueError, match="ranks"):
        metrics.merge_stats([{**rank, "ranks": 0}])


def test_metrics_documents_every_summary_key() -> None:
    with_stats = summarize(RECORDS, [1000], stats=STATS)
    assert set(with_stats) == set(metrics.METRICS)
    assert set(summarize(RECORDS, [1000])) == set(metrics.METRICS) - set(metrics.STATS_METRICS)
    assert all(isinstance(d, str) and d for d in metrics.METRICS.values())


def test_records_from_tensors_match_hand_built_records() -> None:
    recs = metrics.records_from_tensors(
        index=torch.arange(4),
        label=torch.zeros(4, dtype=torch.long),
        clean_correct=torch.tensor([True, True, True, False]),
        defended_correct=torch.tensor([1.0, 1.0, 1.0, 0.0]),
        attack_clean_correct=torch.tensor([True, True, True, False]),
        success=torch.tensor([True, True, False, False]),
        queries=torch.tensor([12, 500, 1000, 1]),
        verify_queries=[9, 9, 0, 0],
        fooled_at=torch.tensor([10, 500, -1, -1]),
        probe_queries=1,  # a scalar: every image
    )
    assert recs == RECORDS and type(recs[0]["success"]) is bool
    assert summarize(recs, [100, 1000]) == summarize(RECORDS, [100, 1000])
    # what an AttackResult knows: no dataset index, no undefended or defended clean accuracy
    bare = metrics.records_from_tensors(
        label=torch.zeros(2), attack_clean_correct=torch.tensor([True, True]),
        success=torch.tensor([True, False]), queries=torch.tensor([5, 9]),
        fooled_at=torch.tensor([5, -1]),
    )  # fmt: skip
    assert [r["index"] for r in bare] == [0, 1] and bare[0]["clean_correct"] is None
    s = summarize(bare, [9])
    assert math.isnan(s["clean_acc"]) and s["robust_acc"] == 0.5 and s["verify_queries"] == 0
    with pytest.raises(ValueError, match="missing"):
        metrics.records_from_tensors(label=[0], success=[True])
    with pytest.raises(ValueError, match="unknown"):
        metrics.records_from_tensors(labels=[0])
    with pytest.raises(ValueError, match="length"):
        metrics.records_from_tensors(label=[0, 1], success=[True])


def test_records_written_before_probe_queries_existed_still_summarize() -> None:
    old = [{k: v for k, v in r.items() if k != "probe_queries"} for r in RECORDS]
    assert summarize(old, [1000])["probe_queries"] == 0


def test_indexed_mean_dedupes_distributed_sampler_padding() -> None:
    """Two simulated ranks: DistributedSampler pads 5 samples to 6; the padded one counts once."""
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    ranks = []
    for rank in range(2):
        idx = torch.tensor(
            list(DistributedSampler(range(5), num_replicas=2, rank=rank, shuffle=False))
        )
        m = IndexedMean()
        m.update(values[idx], idx)
        ranks.append((m, idx))
    assert sum(len(i) for _, i in ranks) == 6  # one duplicate
    merged = ranks[0][0]
    merged.merge_state(ranks[1][0])
    assert merged.compute().item() == pytest.approx(values.mean().item())
    naive = torch.cat([values[i] for _, i in ranks]).mean().item()
    assert naive != pytest.approx(values.mean().item())
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(IndexedMean().compute().item())


def test_paper_values_with_their_tables() -> None:
    v = paper.paper_value
    assert v("VGG19", "Feature", "Square 1k") == 61.0  # Table 2
    assert v("ResNet50", "Base", "RayS") == 0.1  # Table 5
    assert v("VGG19", "AAA", "SignFlip") == 5.7
    assert v("ViT", "Input", "SignHunt 10k") == 33.3
    assert v("ResNet50", "Input", "Acc") == 95.98  # Table 2's ≈2% Acc over Table 5's 93.52
    assert v("ResNet50", "Input", "Acc 4%") == 93.42
    assert v("ResNet50", "AAA", "Acc") == 97.70  # only Table 5 has AAA
    assert v("VGG19", "Input", "Square 5k", eot=5) == 10.5  # Table 7
    assert v("ResNet50", "Input", "Square 1k", eot=1) == 50.5  # Table 2, not Table 7's 52.9
    assert v("ResNet20", "Feature+AT", "NES 1k") == 80.6  # Table 4
    assert v("VGG19", "Feature", "C&W") == 34.93  # Table 13
    for unknown in (
        ("DeiT", "Base", "RayS"),  # not in the paper
        ("VGG19", "Base", "Square 5k"),
        ("VGG19", "Feature", "Square 1k", 3),
        ("vgg19", "Feature", "Square 1k"),
        ("VGG19", "feature", "Square 1k"),
    ):
        assert v(*unknown) is None, unknown
    assert {c.table for c in paper.CELLS} == {2, 4, 5, 7, 13}
    assert len(paper.cells(table=7)) == 2 * 3 * 2 * 5  # models × attacks × methods × (M, QC)
    keys = [(c.table, c.model, c.method, c.column, c.eot) for c in paper.CELLS]
    assert len(keys) == len(set(keys))
    with pytest.raises(ValueError, match="unknown"):
        paper.cells(tabel=2)
    assert "ICLR" in paper.PAPER_CITATION and "Nguyen" in paper.PAPER_CITATION
