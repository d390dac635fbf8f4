"""evaluate.py end to end on the session's trained tiny model: files, resume, errors, W&B, and
results that do not depend on how the engine packs the grid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rfd.metrics import STATS_METRICS
from rfd.runner import evaluate_main
from rfd.settings import REPO_ROOT, run_cli

# engine statistics differ between runs (wall time) and between packings (rows per forward)
TIMING = {*STATS_METRICS, "wall_seconds"}


def results(run_dir: Path) -> list[dict]:
    """results.json without the engine statistics: the numbers an evaluation decides."""
    return [
        {k: v for k, v in c.items() if k not in TIMING}
        for c in json.loads((run_dir / "results.json").read_text())
    ]


@pytest.fixture()
def model_args(trained_fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """--config/--checkpoint for the session model; calibration cache in a temp dir."""
    monkeypatch.setenv("RFD_CACHE_DIR", str(tmp_path / "cache"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "model: {model_name: test_resnet, num_classes: 10, in_chans: 1}\n"
        "data: {class_path: rfd.data.FashionMNISTDataModule, init_args: {batch_size: 256}}\n"
        "run_name: tiny\n"
    )
    return ["--config", str(cfg), "--checkpoint", str(trained_fmnist.checkpoint)]


def test_cli_grid_writes_table_json_csv_plots_that_agree(
    model_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # exercise the offline W&B run
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    summaries = evaluate_main(
        [*model_args, "--defense", "none,feature", "--attack", "square,rays", "--n-images", "20",
         "--batch-size", "10", "--queries", "50,100", "--target-drop", "0.04",
         "--n-calibration", "500", "--run-dir", str(run_dir), "--wandb", "offline"]
    )  # fmt: skip
    assert len(summaries) == 4
    for f in (
        "table.md",
        "results.json",
        "results.csv",
        "robust_vs_queries.png",
        "clean_vs_nu.png",
        "spec.json",
    ):
        assert (run_dir / f).is_file(), f

    def refuse(token: str) -> None:
        raise AssertionError(f"results.json is not strict JSON: {token}")

    data = json.loads((run_dir / "results.json").read_text(), parse_constant=refuse)
    assert all(c["detection_rate"] is None for c in data)  # no detector: null, not NaN
    csv_rows = (run_dir / "results.csv").read_text().splitlines()[1:]
    assert len(csv_rows) == 4 * 2  # cells × budgets
    table = (run_dir / "table.md").read_text()
    for cell in data:
        assert cell["n_images"] == 20
        r50, r100 = cell["robust_acc_at"]["50"], cell["robust_acc_at"]["100"]
        assert r100 == cell["robust_acc"]
        assert 0 < cell["batch_fill"] <= 1 and cell["queries_per_second"] > 0
        assert r100 <= r50 <= cell["attack_clean_acc"] + 1e-9
        assert f"{100 * r100:.1f}" in table
        assert any(
            line.startswith(f"{cell['model']},,tiny,{cell['defense']},{cell['attack']}")
            and ",100,20," in line
            for line in csv_rows
        )
        if cell["defense"] == "feature":
            assert cell["nu"] > 0 and abs(cell["calibration"]["drop"] - 0.04) < 0.02
            assert cell["layers"] == "penultimate"  # as --layers names it, not a module path
        else:
            assert cell["layers"] is None
    records = list((run_dir / "cells").glob("*/records.rank0.jsonl"))
    assert len(records) == 4 and all(len(p.read_text().splitlines()) == 20 for p in records)
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B run written"


def _cli(args: list[str], env: dict[str, str], session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "evaluate.py"), *args], env=env, cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=session,
    )  # fmt: skip


def test_resume_after_sigkill_gives_identical_results(model_args, tmp_path: Path) -> None:
    """Records are appended every few seconds as jobs finish; a killed run resumes with the jobs
    that are left and ends with exactly the results of an uninterrupted run."""
    args = [*model_args, "--defense", "none,feature", "--attack", "square,signflip",
            "--n-images", "40", "--batch-size", "32", "--queries", "600", "--nu", "0.3",
            "--wandb", "disabled"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "disabled"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _cli([*args, "--run-dir", str(killed)], env)
    records = killed / "cells"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if any(f.read_text() for f in records.glob("*/records.rank0.jsonl")):
            p.kill()
            break
        time.sleep(0.05)
    p.wait()
    done_before = sum(
        len(f.read_text().splitlines()) for f in records.glob("*/records.rank0.jsonl")
    )
    assert 1 <= done_before < 4 * 40, "killed mid-run"
    assert not (killed / "results.json").exists()
    # Resume and the uninterrupted reference both run as fresh processes, like the killed run,
    # so no in-process state (e.g. torch's thread count, which changes float rounding) differs.
    for run_dir in (killed, full):
        q = _cli([*args, "--run-dir", str(run_dir)], env)
        out, err = q.communicate(timeout=600)
        assert q.returncode == 0, err[-2000:]
    assert results(killed) == results(full)
    assert (killed / "table.md").read_text() == (full / "table.md").read_text()


def test_changed_settings_refuse_to_mix_unless_overwrite(model_args, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(base)
    before = (run_dir / "results.json").read_text()
    assert run_cli(evaluate_main, [*base, "--eps", "0.05"]) == 2
    assert (run_dir / "results.json").read_text() == before
    evaluate_main([*base, "--eps", "0.05", "--overwrite"])
    assert json.loads((run_dir / "results.json").read_text())[0]["eps"] == 0.05
    # a folder written before a setting existed held that setting's default: it still resumes
    spec = json.loads((run_dir / "spec.json").read_text())
    del spec["success"]
    (run_dir / "spec.json").write_text(json.dumps(spec))
    evaluate_main([*base, "--eps", "0.05"])
    assert json.loads((run_dir / "spec.json").read_text())["success"] == "any"
    assert run_cli(evaluate_main, [*base, "--eps", "0.05", "--success", "improved"]) == 2


BAD = {
    "unknown defense": (["--defense", "magic"], "unknown defense 'magic'; valid defenses"),
    "unknown attack": (["--attack", "boundary"], "unknown attack 'boundary'; valid attacks"),
    "unknown layer": (
        ["--defense", "feature", "--layers", "layer9", "--nu", "0.1"],
        "unknown layer 'layer9'; valid layers",
    ),
    "eps <= 0": (["--eps", "0"], "eps must be > 0"),
    "l2 decision attack": (["--attack", "rays", "--norm", "l2"], "does not support norm 'l2'"),
    "missing checkpoint": (["--checkpoint", "/nonexistent/model.ckpt"], "checkpoint not found"),
    "l2 eps beyond the diagonal": (["--norm", "l2", "--eps", "1000"], "eps must be < 28"),
    "too many devices": (["--devices", "999"], "but this machine allows at most"),
    "linf eps 1": (["--eps", "1"], "eps must be < 1 for norm linf"),
    # typed from the default (a float) before the run folder exists, not a TypeError later
    "attack param type": (["--attack-param", "apgd.rho=abc"], "apgd.rho must be a finite number"),
    "defense param type": (
        ["--defense", "aaa", "--defense-param", "aaa.steps=abc"],
        "aaa.steps must be an integer (got 'abc')",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, model_args, tmp_path, capsys
) -> None:
    extra, message = BAD[case]
    run_dir = tmp_path / "run"
    args = [
        *model_args,
        "--run-dir",
        str(run_dir),
        "--n-images",
        "10",
        "--wandb",
        "disabled",
        *extra,
    ]
    assert run_cli(evaluate_main, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not run_dir.exists()


def test_unknown_config_key_is_rejected(model_args, tmp_path, capsys) -> None:
    bad = tmp_path / "eval.yaml"
    bad.write_text("attack: [square]\nquerys: [1000]\n")
    assert run_cli(evaluate_main, ["--eval-config", str(bad), *model_args]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'querys'" in err and "allowed keys:" in err


EVAL_CONFIGS = sorted(
    str(p.relative_to(REPO_ROOT / "configs"))
    for p in [REPO_ROOT / "configs" / "eval.yaml", *(REPO_ROOT / "configs" / "grid").glob("*.yaml")]
)


@pytest.mark.parametrize("config", EVAL_CONFIGS)
def test_every_eval_and_grid_config_parses(config: str) -> None:
    from rfd.defenses import NoiseDefense
    from rfd.runner import defense_config
    from rfd.settings import attack_params_for, load_eval_settings

    s = load_eval_settings(["--eval-config", config])
    assert s.attack and s.defense and s.models
    for a in s.attack:
        attack_params_for(s, a)
    for d in s.defense:
        NoiseDefense(**{**defense_config(d), "defense": d})
    if config.startswith("grid/cifar10_"):  # the paper's grids: its image count
        assert s.n_images == 1000


def test_same_command_twice_and_any_batch_size_give_identical_results(model_args, tmp_path) -> None:
    """Randomness is keyed by (seed, image, query): a rerun reproduces every number, and so
    does a run whose forwards are packed differently (batch_size is not part of the spec)."""
    args = [*model_args, "--defense", "none,input,feature", "--attack", "square,nes,rays",
            "--n-images", "20", "--queries", "150", "--nu", "0.3", "--wandb", "disabled"]  # fmt: skip
    runs = {}
    for name, batch in (("a", "64"), ("b", "64"), ("c", "7")):
        runs[name] = tmp_path / name
        evaluate_main([*args, "--batch-size", batch, "--run-dir", str(runs[name])])
    assert results(runs["a"]) == results(runs["b"]) == results(runs["c"])
    cells = json.loads((runs["a"] / "results.json").read_text())
    assert {c["precision"] for c in cells} == {"32"}
    stats = {c["defense"] + c["attack"]: c["batch_fill"] for c in cells}
    assert all(0 < v <= 1 for v in stats.values())


def test_attack_param_overrides(model_args) -> None:
    from rfd.settings import UsageError, attack_params_for, load_eval_settings

    s = load_eval_settings(
        [*model_args, "--attack", "square,nes", "--attack-param", "square.p_init=0.2"]
    )
    assert attack_params_for(s, "square")["p_init"] == 0.2
    assert "p_init" not in attack_params_for(s, "nes")
    with pytest.raises(UsageError, match="bogus"):
        load_eval_settings([*model_args, "--attack", "square", "--attack-param", "square.bogus=1"])


def test_machine_and_folder_are_checked_before_anything_is_written(model_args, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = [*model_args, "--n-images", "10", "--wandb", "disabled"]
    assert run_cli(evaluate_main, [*base, "--run-dir", str(afile / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and afile.read_text() == "x"
    if not torch.cuda.is_available():
        run_dir = tmp_path / "run"
        assert (
            run_cli(evaluate_main, [*base, "--run-dir", str(run_dir), "--accelerator", "gpu"]) == 2
        )
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and err.count("\n") == 1 and not run_dir.exists()


def test_sigterm_exits_143_with_one_line_and_keeps_finished_work(model_args, tmp_path: Path):
    """A scheduler's SIGTERM is not a success: exit 143, one line saying how to resume, and every
    job finished before the signal is on disk (the buffered ones are flushed on the way out)."""
    import signal

    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "none,feature", "--attack", "square,signflip",
            "--n-images", "40", "--batch-size", "32", "--queries", "600", "--nu", "0.3",
            "--wandb", "disabled", "--run-dir", str(run_dir)]  # fmt: skip
    p = _cli(args, {**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if (run_dir / "cells").is_dir() and any((run_dir / "cells").glob("*/stats.rank0.jsonl")):
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0] and "resume" in lines[0], err
    assert not (run_dir / "results.json").exists()
    q = _cli(args, {**os.environ, "WANDB_MODE": "disabled"})
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-2000:]
    assert len(results(run_dir)) == 4


def test_overwrite_removes_the_old_reports_first(model_args, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(base)
    assert (run_dir / "table.md").exists()
    from rfd.runner import _claim_run_dir

    spec = json.loads((run_dir / "spec.json").read_text())
    _claim_run_dir(
        run_dir, {**spec, "eps": 0.05}, overwrite=True
    )  # as a killed overwrite leaves it
    assert not (run_dir / "table.md").exists() and not (run_dir / "results.json").exists()
    assert not (run_dir / "cells").exists()


def test_the_automatic_precision_is_recorded_and_checked_on_resume(model_args, tmp_path, capsys):
    """Without --precision the forwards run fp32 on CPU and bf16 on CUDA: spec.json records the
    resolved one, so a folder started on a GPU is not resumed in fp32 on a CPU (or back), which
    would mix records of two precisions; a folder from before the record resumes as it did."""
    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled",
            "--accelerator", "cpu"]  # fmt: skip
    assert run_cli(evaluate_main, args) == 0
    spec_file = run_dir / "spec.json"
    spec = json.loads(spec_file.read_text())
    assert spec["precision"] is None and spec["forward_precision"] == "32"
    spec_file.write_text(json.dumps({**spec, "forward_precision": "bf16"}))  # as a GPU wrote it
    results_before = (run_dir / "results.json").read_text()
    assert run_cli(evaluate_main, args) == 2
    assert "differ in: forward_precision" in capsys.readouterr().err
    assert (run_dir / "results.json").read_text() == results_before
    del spec["forward_precision"]  # written before the resolved precision was recorded
    spec_file.write_text(json.dumps(spec))
    assert run_cli(evaluate_main, args) == 0
    assert json.loads(spec_file.read_text())["forward_precision"] == "32"


# --------------------------------------------------------------------------- DDP (gloo, CPU)

DDP_ARGS = ["--defense", "none,feature", "--attack", "square,signflip", "--n-images", "30",
            "--queries", "300", "--nu", "0.3", "--wandb", "disabled", "--accelerator", "cpu"]  # fmt: skip


def _ddp(model_args: list[str], run_dir: Path, devices: int) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    args = [*model_args, *DDP_ARGS, "--devices", str(devices), "--run-dir", str(run_dir)]
    return _cli(args, env, session=True)  # its own process group: a kill reaches every rank


def _finish(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def test_core_handover_gives_a_finished_process_cores_to_the_others(tmp_path: Path) -> None:
    """Three processes of one thread: when one ends, the two left take 3 // 2 threads each; when
    this one ends it goes back to its own share and marks its end for the others."""
    from rfd.evaluation import CoreHandover

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        h = CoreHandover(rank=0, world=3, where=tmp_path, every=4)
        for _ in range(8):
            h.poll()
        assert torch.get_num_threads() == 1 and h.done == 0
        (tmp_path / "done.2").touch()
        for _ in range(3):  # looks only every 4 forwards
            h.poll()
        assert torch.get_num_threads() == 1
        h.poll()
        assert h.done == 1 and torch.get_num_threads() == 1  # 3 // 2: no whole core to share
        (tmp_path / "done.1").touch()
        seen: list[object] = []
        progress = h.wrap(seen.append)  # the engine's callback: poll, then the caller's own
        for k in range(4):
            progress(k)
        assert seen == [0, 1, 2, 3]
        assert h.done == 2 and torch.get_num_threads() == 3  # alone: every core
        h.finish()
        assert torch.get_num_threads() == 1 and (tmp_path / "done.0").exists()
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_ddp_with_2_and_3_processes_gives_the_results_of_one(model_args, tmp_path: Path) -> None:
    """Every random number is keyed by (seed, image, query): the rank an image lands on, and the
    images it shares a forward with, change nothing."""
    for d in (1, 2, 3):
        _finish(_ddp(model_args, tmp_path / f"d{d}", d))
    assert results(tmp_path / "d2") == results(tmp_path / "d1")
    assert results(tmp_path / "d3") == results(tmp_path / "d1")
    assert sorted((tmp_path / "d3" / "cells").glob("*/records.rank2.jsonl"))  # 3 ranks worked


@pytest.mark.slow
def test_ddp_resume_where_one_rank_has_no_work_left(model_args, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _finish(_ddp(model_args, run_dir, 2))
    reference = results(run_dir)
    cell = run_dir / "cells" / "tiny__feature__square"
    # both ranks attacked side by side: their seconds overlap (queries/s is the grid's)
    before = [json.loads(line) for line in (cell / "stats.rank0.jsonl").read_text().splitlines()]
    assert before and all(r["ranks"] == 2 for r in before)
    # rank 0 lost one cell's records (as if killed before its flush); rank 1 has nothing to do
    (cell / "records.rank0.jsonl").unlink()
    (run_dir / "results.json").unlink()
    _finish(_ddp(model_args, run_dir, 2))
    assert results(run_dir) == reference
    after = [json.loads(line) for line in (cell / "stats.rank0.jsonl").read_text().splitlines()]
    assert len(after) > len(before)
    assert all("ranks" not in r for r in after[len(before) :])  # rank 0 worked alone


@pytest.mark.slow
def test_ddp_kill_then_resume_gives_identical_results(model_args, tmp_path: Path) -> None:
    """A hard kill of every rank (a scheduler's timeout), then a resume with the same command."""
    import signal

    killed, full = tmp_path / "killed", tmp_path / "full"
    p = _ddp(model_args, killed, 2)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if any(f.read_text() for f in (killed / "cells").glob("*/records.rank*.jsonl")):
            break
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate(timeout=120)
    assert p.returncode != 0 and not (killed / "results.json").exists()
    _finish(_ddp(model_args, killed, 2))
    _finish(_ddp(model_args, full, 1))
    assert results(killed) == results(full)


def test_a_resumed_run_continues_its_own_wandb_run(
    model_args, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "run"
    base = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "offline"]  # fmt: skip
    evaluate_main(base)
    # W&B names an offline run's folder by its start second: a second start within the same
    # second (this tiny run takes less) would share the folder and hide the second run
    time.sleep(1.1)
    evaluate_main(base)  # everything is on disk: a resume that only reports
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({p.name.rsplit("-", 1)[-1] for p in runs}) == 1, runs


def test_defense_param_overrides_reach_the_defense_and_the_results(model_args, tmp_path) -> None:
    from rfd.settings import UsageError, load_eval_settings

    s = load_eval_settings([*model_args, "--defense", "jpeg", "--defense-param", "jpeg.quality=30"])
    assert s.defense_params == {"jpeg": {"quality": 30}}
    for bad, match in (("jpeg.qual=3", "unknown jpeg option 'qual'; allowed: quality"),
                       ("quality=3", "DEFENSE.KEY=VALUE"), ("nope.x=1", "unknown defense")):  # fmt: skip
        with pytest.raises(UsageError, match=match):
            load_eval_settings([*model_args, "--defense-param", bad])
    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "jpeg", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir)]  # fmt: skip
    (cell,) = evaluate_main([*args, "--defense-param", "jpeg.quality=30"])
    assert cell["defense_params"] == {"quality": 30} and cell["defense_forwards_per_query"] == 1.0
    # another option value is another experiment: the run folder refuses to mix them
    assert run_cli(evaluate_main, [*args, "--defense-param", "jpeg.quality=90"]) == 2
    # a value the defense refuses is caught before the run folder is written
    fresh = tmp_path / "fresh"
    bad = [*args[:-1], str(fresh), "--defense-param", "jpeg.quality=0"]
    assert run_cli(evaluate_main, bad) == 2 and not fresh.exists()


def test_a_detecting_defense_gets_its_verdict_on_every_fooled_image(model_args, tmp_path) -> None:
    from rfd.defenses import DEFENSES, Defense

    class FlagAll(Defense):
        """A detector that flags every image: all fooled images count as detected."""

        name = "flag_all_test"
        title = "FlagAll"

        def detect(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[0], dtype=torch.bool)

    try:
        (cell,) = evaluate_main(
            [*model_args, "--defense", "flag_all_test", "--attack", "square", "--n-images", "10",
             "--queries", "200", "--eps", "0.2", "--run-dir", str(tmp_path / "run")]
        )  # fmt: skip
    finally:
        DEFENSES.pop(FlagAll.name)
    assert cell["success_rate"] > 0  # something was fooled, so the detector had work
    assert cell["detection_rate"] == 1.0
    assert cell["robust_acc_detect"] == pytest.approx(cell["attack_clean_acc"])
    records = [r for p in (tmp_path / "run" / "cells").glob("*/records.*.jsonl")
               for r in map(json.loads, p.read_text().splitlines())]  # fmt: skip
    assert records and all(r["detected"] == r["success"] for r in records)


# --------------------------------------------------------------------------- what a run folder holds


def _tiny_config(tmp_path: Path, run_name: str) -> Path:
    cfg = tmp_path / f"{run_name}.yaml"
    cfg.write_text(
        "model: {model_name: test_resnet, num_classes: 10, in_chans: 1}\n"
        "data: {class_path: rfd.data.FashionMNISTDataModule, init_args: {batch_size: 256}}\n"
        f"run_name: {run_name}\n"
    )
    return cfg


def test_models_with_one_display_name_keep_their_own_rows_curves_and_calibrations(
    trained_fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two models that display alike (both "test_resnet (FMNIST)") get their run names appended,
    so neither the table, nor the plots, nor the CSV merge them; a tag alone keeps them apart."""
    from rfd import report

    plotted: dict[str, dict] = {}

    def capture(name: str):
        def plot(lines: dict, path: Path) -> Path:
            plotted[name] = lines
            return path

        return plot

    for name in ("plot_robust_vs_queries", "plot_clean_vs_nu"):
        monkeypatch.setattr(report, name, capture(name))
    ckpt = str(trained_fmnist.checkpoint)
    models = [{"config": str(_tiny_config(tmp_path, n)), "checkpoint": ckpt} for n in "ab"]
    models.append({**models[0], "tag": "AT"})  # Table 4's case: one config, rows by tag
    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({"models": models}))
    run_dir = tmp_path / "run"
    summaries = evaluate_main(
        ["--eval-config", str(grid), "--defense", "input", "--attack", "square", "--n-images",
         "10", "--queries", "20", "--target-drop", "0.04", "--n-calibration", "100",
         "--run-dir", str(run_dir), "--wandb", "disabled"]
    )  # fmt: skip
    shown = "test_resnet (FMNIST)"
    assert [(c["model"], c["tag"], c["run_name"]) for c in summaries] == [
        (f"{shown} (a)", None, "a"), (f"{shown} (b)", None, "b"), (shown, "AT", "a~2"),
    ]  # fmt: skip
    table = (run_dir / "table.md").read_text()
    for row in (f"| {shown} (a) | Input |", f"| {shown} (b) | Input |", f"| {shown} | Input+AT |"):
        assert row in table, table
    assert len(plotted["plot_robust_vs_queries"]) == 3  # one panel per model and attack
    assert len(plotted["plot_clean_vs_nu"]) == 3  # one calibration curve per model
    header = (run_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["model", "tag", "run_name", "defense", "attack"]
    cells = sorted(p.name for p in (run_dir / "cells").iterdir())
    assert cells == ["a__input__square", "a~2__input__square", "b__input__square"]


def _refusal(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert run_cli(evaluate_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_changed_checkpoint_or_attack_config_is_refused_on_resume(
    model_args, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settings alone do not decide the numbers: a checkpoint retrained in place and an
    edited configs/attack/<name>.yaml change them too, so spec.json records both (the
    checkpoint's content hash, the attack parameters as resolved) and a resume refuses to mix."""
    import shutil

    import rfd.settings

    configs = tmp_path / "configs"
    shutil.copytree(rfd.settings.CONFIG_DIR, configs)
    monkeypatch.setattr(rfd.settings, "CONFIG_DIR", configs)
    ckpt = tmp_path / "model.ckpt"
    shutil.copy(model_args[3], ckpt)
    run_dir = tmp_path / "run"
    args = [*model_args[:3], str(ckpt), "--defense", "none", "--attack", "square", "--n-images",
            "10", "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(args)
    spec = json.loads((run_dir / "spec.json").read_text())
    assert spec["models"][0]["checkpoint_hash"]
    assert spec["attack_params"]["square"]["p_init"] == 0.05  # configs/attack/square.yaml's
    evaluate_main(args)  # unchanged: resumes (nothing left to do)

    square = configs / "attack" / "square.yaml"
    original = square.read_text()
    square.write_text(original.replace("p_init: 0.05", "p_init: 0.1", 1))
    err = _refusal(capsys, args)
    assert "holds results of other settings (differ in: attack_params)" in err
    square.write_text(original)

    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # retrained in place
    weights = state["state_dict"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 1e-3
    torch.save(state, ckpt)
    err = _refusal(capsys, args)
    assert "holds results of other settings (differ in: models)" in err


def test_a_checkpoint_changed_beyond_its_first_16_mib_is_refused_on_resume(
    model_args, tmp_path: Path, capsys
) -> None:
    """The whole checkpoint is hashed: weights stored after 16 MiB of other tensors (a head
    retrained in place sits at the end of a large file) change the hash. A folder written when
    only the first 16 MiB were hashed resumes as it did then, and gets the whole-file hash."""
    from rfd.models import LEGACY_HASH_BYTES, file_hash

    state = torch.load(model_args[3], map_location="cpu", weights_only=True)
    state = {"padding": torch.zeros(5 << 20), **state}  # 20 MiB written before the weights
    ckpt = tmp_path / "big.ckpt"
    torch.save(state, ckpt)
    run_dir = tmp_path / "run"
    args = [*model_args[:3], str(ckpt), "--defense", "none", "--attack", "square", "--n-images",
            "10", "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(args)
    spec_file = run_dir / "spec.json"
    spec = json.loads(spec_file.read_text())
    assert spec["models"][0]["checkpoint_hash"] == file_hash(ckpt)

    prefix = file_hash(ckpt, LEGACY_HASH_BYTES)
    assert prefix != file_hash(ckpt)
    spec["models"][0]["checkpoint_hash"] = prefix  # as the older rule recorded it
    spec_file.write_text(json.dumps(spec))
    evaluate_main(args)  # resumes
    assert json.loads(spec_file.read_text())["models"][0]["checkpoint_hash"] == file_hash(ckpt)

    weights = state["state_dict"]
    key = next(k for k, v in weights.items() if v.is_floating_point())
    weights[key] = weights[key] + 1e-3
    torch.save(state, ckpt)
    assert file_hash(ckpt, LEGACY_HASH_BYTES) == prefix  # the older rule could not tell
    assert "holds results of other settings (differ in: models)" in _refusal(capsys, args)


def test_a_trained_defense_part_changed_in_place_is_refused_on_resume(
    model_args, tmp_path: Path, capsys
) -> None:
    """MagNet's autoencoder is named by a path: the spec records the file's hash too, so an
    autoencoder retrained in place is not mixed into a resumed run. A folder written before the
    hash was recorded resumes as it did then."""
    from test_defenses import quiet_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from rfd.defenses.magnet import AutoencoderModule
    from rfd.models import file_hash

    torch.manual_seed(0)
    images = DataLoader(TensorDataset(torch.rand(8, 1, 28, 28)), batch_size=8)
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=1)
    trainer.fit(AutoencoderModule(channels=1), images)
    ae = tmp_path / "ae.ckpt"
    trainer.save_checkpoint(ae)
    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "magnet", "--defense-param", f"magnet.autoencoder={ae}",
            "--attack", "square", "--n-images", "10", "--queries", "20", "--run-dir",
            str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(args)
    spec_file = run_dir / "spec.json"
    spec = json.loads(spec_file.read_text())
    assert spec["defense_params"]["magnet"]["autoencoder_hash"] == file_hash(ae)

    del spec["defense_params"]["magnet"]["autoencoder_hash"]  # as written before
    spec_file.write_text(json.dumps(spec))
    evaluate_main(args)  # resumes, and records the hash
    spec = json.loads(spec_file.read_text())
    assert spec["defense_params"]["magnet"]["autoencoder_hash"] == file_hash(ae)

    state = torch.load(ae, map_location="cpu", weights_only=True)  # retrained in place
    key = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][key] = state["state_dict"][key] + 1e-3
    torch.save(state, ae)
    assert "holds results of other settings (differ in: defense_params)" in _refusal(capsys, args)


def test_a_spec_written_before_the_checkpoint_hash_resumes_when_its_settings_agree(
    model_args, tmp_path: Path, capsys
) -> None:
    """A run folder from before spec.json held checkpoint hashes and resolved parameters (the
    settings alone) resumes when those agree, is then upgraded, and still refuses other ones."""
    from rfd.settings import load_eval_settings, spec_of

    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    evaluate_main(args)
    legacy = json.dumps(spec_of(load_eval_settings(args)))
    (run_dir / "spec.json").write_text(legacy)
    evaluate_main(args)
    assert json.loads((run_dir / "spec.json").read_text())["spec_version"] == 2
    (run_dir / "spec.json").write_text(legacy)
    assert "differ in: eps" in _refusal(capsys, [*args, "--eps", "0.05"])


def test_an_unreachable_target_drop_is_one_line_and_leaves_no_claim(model_args, tmp_path, capsys):
    """A target drop no noise reaches is found only by calibration, after the folder is claimed:
    exit 2 with the drop of the strongest noise tried, and the corrected command then runs in the
    same folder."""
    run_dir = tmp_path / "run"
    args = [*model_args, "--defense", "input", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--n-calibration", "50", "--run-dir", str(run_dir),
            "--wandb", "disabled"]  # fmt: skip
    err = _refusal(capsys, [*args, "--target-drop", "0.95"])
    assert "target_drop 0.95 cannot be reached by defense input" in err
    assert "the strongest noise tried (nu=" in err and ") drops accuracy by 0." in err
    assert not (run_dir / "spec.json").exists()
    (cell,) = evaluate_main([*args, "--target-drop", "0.04"])
    assert cell["calibration"]["target_drop"] == 0.04


@pytest.mark.parametrize("content", ["", "[1, 2]", '{"models": '])
def test_a_corrupt_spec_is_one_line_and_overwrite_replaces_it(
    content: str, model_args, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(content)
    args = [*model_args, "--defense", "none", "--attack", "square", "--n-images", "10",
            "--queries", "20", "--run-dir", str(run_dir), "--wandb", "disabled"]  # fmt: skip
    err = _refusal(capsys, args)
    assert f"run dir {run_dir}: spec.json is unreadable (" in err
    assert "use --overwrite or another --run-dir" in err
    evaluate_main([*args, "--overwrite"])
    assert json.loads((run_dir / "spec.json").read_text())["n_images"] == 10
    assert [p.name for p in run_dir.glob(".spec.json*")] == []  # written through a temp file


def test_equivalent_config_spellings_are_one_model_and_one_run_folder(
    trained_fmnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare name, the file name and the absolute path of one config are one model: the same
    default run folder (its name hashes the spec), which the other spellings resume."""
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/eval/..., lands here
    base = ["--checkpoint", str(trained_fmnist.checkpoint), "--defense", "none", "--attack",
            "square", "--n-images", "10", "--queries", "20", "--wandb", "disabled"]  # fmt: skip
    for spelling in ("fmnist_default", "fmnist_default.yaml",
                     str(REPO_ROOT / "configs" / "fmnist_default.yaml")):  # fmt: skip
        evaluate_main(["--config", spelling, *base])
    (folder,) = (tmp_path / "runs" / "eval").iterdir()
    model = json.loads((folder / "spec.json").read_text())["models"][0]
    assert model["config"] == "configs/fmnist_default.yaml"


def test_demo_adds_its_target_drop_only_when_the_extra_arguments_fix_neither() -> None:
    import importlib.util

    from rfd.settings import load_eval_settings

    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.demo_args([])[demo.demo_args([]).index("--target-drop") + 1] == "0.02"
    for extra in (["--nu", "0.1"], ["--nu=0.1"], ["--target-drop", "0.04"]):
        args = demo.demo_args(extra)
        assert args.count("--target-drop") == (extra[0] == "--target-drop"), args
        load_eval_settings(args)  # not "give --nu ... or --target-drop ..., not both"
    assert load_eval_settings(demo.demo_args(["--nu", "0.1"])).nu == 0.1
