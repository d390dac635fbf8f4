"""Records on disk, paper-layout tables with the paper's numbers, summary files, details, plots."""

from __future__ import annotations

import importlib
import json

import pytest

from rfd import report
from rfd.metrics import records_from_tensors, summarize

TITLES = {"square": "Square", "nes": "NES", "signhunter": "SignHunt", "rays": "RayS",
          "signflip": "SignFlip", "none": "Base", "input": "Input", "feature": "Feature",
          "aaa": "AAA"}  # fmt: skip


# four images: fooled early, fooled late, survived, misclassified before the attack
RECORDS = records_from_tensors(
    label=0,
    clean_correct=[True, True, True, False],
    defended_correct=[1.0, 1.0, 1.0, 0.0],
    attack_clean_correct=[True, True, True, False],
    success=[True, True, False, False],
    queries=[10, 500, 1000, 1],
    verify_queries=[9, 9, 0, 0],
    fooled_at=[10, 500, -1, -1],
    probe_queries=1,
)


@pytest.fixture()
def titled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registries of classes that carry their table titles, as rfd.attacks/rfd.defenses provide
    them (stand-ins, so these tests do not depend on the registries' other contents)."""
    registry = {n: type(n, (), {"title": t}) for n, t in TITLES.items()}
    monkeypatch.setattr(importlib.import_module("rfd.attacks"), "ATTACKS", registry)
    monkeypatch.setattr(importlib.import_module("rfd.defenses"), "DEFENSES", registry)


def cell(model: str, defense: str, attack: str, robust: dict, **extra) -> dict:
    return {"model": model, "defense": defense, "attack": attack, "defended_clean_acc": 0.96,
            "robust_acc_at": robust, **extra}  # fmt: skip


def test_titles_come_from_the_registries(titled) -> None:
    assert report.attack_title("signhunter") == "SignHunt"
    assert report.defense_title("none") == "Base"
    assert report.attack_title("mystery") == "mystery"  # unknown: the name itself


def test_titles_fall_back_to_names_without_a_title_attribute(monkeypatch) -> None:
    defenses = importlib.import_module("rfd.defenses")
    monkeypatch.setattr(defenses, "DEFENSES", ("none", "feature"))  # a registry of names
    assert report.defense_title("feature") == "feature"
    for name, cls in importlib.import_module("rfd.attacks").ATTACKS.items():
        assert report.attack_title(name) == getattr(cls, "title", name)


def test_jsonl_append_survives_a_torn_line(tmp_path) -> None:
    p = tmp_path / "r.jsonl"
    report.append_jsonl(p, RECORDS[:2])
    with p.open("a") as f:
        f.write('{"index": 7, "lab')  # a process killed mid-write
    assert [r["index"] for r in report.read_jsonl(p)] == [0, 1]


def test_paper_table_layout_and_paper_numbers(titled) -> None:
    summaries = [
        cell("VGG19", defense, attack, {"1000": acc, "10000": acc - 0.1})
        for defense, acc in (("none", 0.9), ("feature", 0.5))
        for attack in ("square", "nes")
    ]
    header, rows = report.paper_table(summaries, with_paper=True)
    assert header == ["Model", "Method", "Acc", "Square 1k", "Square 10k", "NES 1k", "NES 10k"]
    assert rows[0][:4] == ["VGG19", "Base", "96.0 (96.3)", "90.0 (0.6)"]
    assert rows[1][1] == "Feature" and rows[1][3] == "50.0 (61.0)"
    assert report.paper_table(summaries)[1][1][3] == "50.0"  # without the paper's numbers
    md = report.markdown(header, rows)
    assert md.count("\n") == 4 and "| VGG19 | Feature |" in md


def test_paper_table_decision_attacks_aaa_and_eot(titled) -> None:
    _, rows = report.paper_table(
        [cell("VGG19", "aaa", "rays", {"1000": 0.0}), cell("DeiT", "none", "rays", {"1000": 0.0})],
        with_paper=True,
    )
    assert rows[0][1:] == ["AAA", "96.0 (96.3)", "0.0 (0.1)"]  # Table 5, bare "RayS" column
    assert rows[1][1:] == ["Base", "96.0 (98.4)", "0.0"]  # the paper has no RayS for DeiT
    header, rows = report.paper_table(
        [cell("VGG19", "input", "square", {"1000": 0.2, "5000": 0.1}, eot=5)], with_paper=True
    )
    assert header[3:] == ["Square 1k", "Square 5k"]
    assert rows[0][3:] == ["20.0 (24.2)", "10.0 (10.5)"]  # Table 7, M = 5


def test_models_of_one_display_name_stay_apart(tmp_path, titled) -> None:
    """Two models shown alike (fmnist_default and fmnist_gauss025: "test_resnet (FMNIST)") keep
    their own rows, and the CSV says which run and tag each row is."""
    shown = "test_resnet (FMNIST)"
    names = report.unique_displays([shown, shown, shown, "VGG19"], [None, None, "AT", None],
                                   ["fmnist_default", "fmnist_gauss025", "fmnist_pgdat", "vgg"])  # fmt: skip
    assert names == [f"{shown} (fmnist_default)", f"{shown} (fmnist_gauss025)", shown, "VGG19"]
    # rows are keyed by run name too, so summaries that still share a display name never merge
    a = cell(shown, "none", "square", {"1000": 0.2}, run_name="fmnist_default")
    b = cell(shown, "none", "square", {"1000": 0.6}, run_name="fmnist_gauss025")
    _, rows = report.paper_table([a, b])
    assert [r[3] for r in rows] == ["20.0", "60.0"]
    paths = report.write_summary_files(tmp_path, [{**a, "tag": "AT", "n_images": 1}, b])
    lines = paths["csv"].read_text().splitlines()
    assert lines[1].startswith(f"{shown},AT,fmnist_default,none,square,")
    assert lines[2].startswith(f"{shown},,fmnist_gauss025,none,square,")


def test_summary_files_details_and_plots(tmp_path, titled) -> None:
    stats = {"forwards": 4, "fill_sum": 3.0, "rows": 300, "seconds": 2.0}
    s = summarize(RECORDS, [100, 1000], stats=stats)
    s.update(model="m", defense="none", attack="square", norm="linf", eps=0.1, criterion="vote",
             eot=1, nu=None)  # fmt: skip
    paths = report.write_summary_files(tmp_path, [s])
    data = json.loads(paths["json"].read_text())
    assert data[0]["robust_acc_at"]["1000"] == pytest.approx(0.25)
    assert data[0]["robust_acc"] == pytest.approx(0.25)
    lines = paths["csv"].read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("model,tag,run_name,defense,attack")
    header = lines[0].split(",")
    assert {"batch_fill", "queries_per_second", "robust_acc", "budget"} <= set(header)
    row = dict(zip(header, lines[1].split(","), strict=True))
    assert (row["budget"], row["robust_acc"], row["batch_fill"]) == ("100", "0.5", "0.75")
    assert float(row["queries_per_second"]) == pytest.approx(1511 / 2.0)  # charged ÷ seconds
    assert "| m | Base | 75.0 | 50.0 | 25.0 |" in paths["markdown"].read_text()

    details = report.details_lines([s, {**s, "defense": "feature", "nu": 0.25}])
    assert len(details) == 3 and details[0].startswith("cell details:")
    assert "Base" in details[1] and "Square" in details[1]
    for part in ("fail 33.3%", "q 255/255", "verify 18", "ν —", "clean 75.0% → defended 75.0%",
                 "fill 75.0%", "756 q/s"):  # fmt: skip
        assert part in details[1], part
    assert "ν 0.25" in details[2]
    bare = summarize(RECORDS[3:], [10])  # no stats, no successes
    bare.update(model="m", defense="none", attack="square")
    assert "fail — | q —/— |" in report.details_lines([bare])[1]
    assert report.details_lines([bare])[1].endswith("fill — | — q/s")

    x, y = report.robust_curve(RECORDS, 1000)
    assert y[0] == pytest.approx(0.75) and y[-1] == pytest.approx(0.25) and (y[:-1] >= y[1:]).all()
    png = report.plot_robust_vs_queries({"square": {"none": (x, y)}}, tmp_path / "q.png")
    png2 = report.plot_clean_vs_nu({"feature": [(0.0, 0.9), (0.5, 0.88)]}, tmp_path / "nu.png")
    assert png.stat().st_size > 1000 and png2.stat().st_size > 1000
