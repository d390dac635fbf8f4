"""Per-image records → metrics, DDP de-duplication, tables and plots."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DistributedSampler

from rfd import report
from rfd.evaluation import IndexedMean


def row(index: int, correct: bool, success: bool, fooled_at: int, queries: int) -> dict:
    return {
        "index": index, "label": 0, "clean_correct": correct, "defended_correct": float(correct),
        "attack_clean_correct": correct, "success": success, "queries": queries,
        "verify_queries": 9 if success else 0, "fooled_at": fooled_at, "seconds": 0.1,
    }  # fmt: skip


ROWS = [
    row(0, True, True, 10, 10),  # fooled early
    row(1, True, True, 500, 500),  # fooled late
    row(2, True, False, -1, 1000),  # survived
    row(3, False, False, -1, 1),  # misclassified before the attack
]


def test_robust_accuracy_at_budgets_is_read_from_the_trajectory() -> None:
    assert report.robust_accuracy_at(ROWS, 1000) == pytest.approx(1 / 4)
    assert report.robust_accuracy_at(ROWS, 100) == pytest.approx(2 / 4)
    assert report.robust_accuracy_at(ROWS, 5) == pytest.approx(3 / 4)


def test_summary_metrics() -> None:
    s = report.summarize(ROWS + [ROWS[0]], [100, 1000])  # duplicate index removed
    assert s["n_images"] == 4
    assert s["clean_acc"] == pytest.approx(0.75)
    assert s["robust_acc"] == {"100": pytest.approx(0.5), "1000": pytest.approx(0.25)}
    assert s["failure_rate"] == pytest.approx(1 / 3)  # over originally correct images
    assert s["mean_queries_success"] == pytest.approx(255.0)
    assert s["median_queries_success"] == pytest.approx(255.0)
    assert s["verify_queries"] == 18


def test_jsonl_append_survives_a_torn_line(tmp_path) -> None:
    p = tmp_path / "r.jsonl"
    report.append_jsonl(p, ROWS[:2])
    with p.open("a") as f:
        f.write('{"index": 7, "lab')  # a process killed mid-write
    assert [r["index"] for r in report.read_jsonl(p)] == [0, 1]


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


def test_paper_table_layout_and_paper_numbers() -> None:
    summaries = []
    for defense, acc in (("none", 0.9), ("feature", 0.5)):
        for attack in ("square", "nes"):
            summaries.append({
                "model": "VGG19", "defense": defense, "attack": attack, "defended_clean_acc": 0.96,
                "robust_acc": {"1000": acc, "10000": acc - 0.1},
            })  # fmt: skip
    header, rows = report.paper_table(summaries, with_paper=True)
    assert header == ["Model", "Method", "Acc", "Square 1k", "Square 10k", "NES 1k", "NES 10k"]
    assert rows[0][:4] == ["VGG19", "Base", "96.0 (96.3)", "90.0 (0.6)"]
    assert rows[1][1] == "Feature" and rows[1][3] == "50.0 (61.0)"
    md = report.markdown(header, rows)
    assert md.count("\n") == 4 and "| VGG19 | Feature |" in md


def test_summary_files_and_plots(tmp_path) -> None:
    s = report.summarize(ROWS, [100, 1000])
    s.update(
        model="m", defense="none", attack="square", norm="linf", eps=0.1, criterion="vote", eot=1
    )
    paths = report.write_summary_files(tmp_path, [s])
    data = json.loads(paths["json"].read_text())
    assert data[0]["robust_acc"]["1000"] == pytest.approx(0.25)
    lines = paths["csv"].read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("model,defense,attack")
    assert "| m | Base | 75.0 | 50.0 | 25.0 |" in paths["markdown"].read_text()
    x, y = report.robust_curve(ROWS, 1000)
    assert y[0] == pytest.approx(0.75) and y[-1] == pytest.approx(0.25) and (y[:-1] >= y[1:]).all()
    png = report.plot_robust_vs_queries({"square": {"none": (x, y)}}, tmp_path / "q.png")
    png2 = report.plot_clean_vs_nu({"feature": [(0.0, 0.9), (0.5, 0.88)]}, tmp_path / "nu.png")
    assert png.stat().st_size > 1000 and png2.stat().st_size > 1000
