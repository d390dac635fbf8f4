"""``python evaluate.py``: grids of defenses × attacks on trained models, one engine per model.

Settings come from :mod:`rfd.settings` (defaults ← ``configs/eval.yaml`` or ``--eval-config`` ←
flags, every value validated where it enters), models and data from :func:`rfd.runs.load_run`.
For each model, the whole grid runs as one :class:`rfd.evaluation.GridEvaluation` under one
Lightning ``Trainer``: all cells share the engine's forwards. A run folder holds ``spec.json``
(the settings that decide the numbers), ``cells/<model>__<defense>__<attack>/records.rank<r>.jsonl``
and ``stats.rank<r>.jsonl`` per cell, and the reports. A rerun with the same settings resumes with
the jobs that are left; different settings in the same folder are refused unless ``--overwrite``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rfd.runs import LoadedRun, load_run
from rfd.settings import (
    CONFIG_DIR,
    EvalSettings,
    UsageError,
    attack_params_for,
    check_machine,
    check_writable,
    first_line,
    load_eval_settings,
    read_yaml_mapping,
    spec_hash,
    spec_of,
)

SQUARE_NOTE = (
    "note: robust accuracy at smaller budgets is read from one run's trajectory; Square's p "
    "schedule is rescaled to the total budget, so a shorter run of its own can differ slightly."
)


def evaluate_main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Entry point of evaluate.py: parse and validate, then run the grid."""
    return run(load_eval_settings(list(sys.argv[1:] if argv is None else argv)))


def defense_config(defense: str) -> dict[str, Any]:
    """The defaults of ``configs/defense/<defense>.yaml`` (a ``NoiseDefense`` callback config)."""
    path = CONFIG_DIR / "defense" / f"{defense}.yaml"
    return dict(read_yaml_mapping(path).get("init_args") or {}) if path.is_file() else {}


def defense_setup(s: EvalSettings, name: str) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Defense ``name``'s class, the layers it gets, its options (``configs/defense/<name>.yaml``'s
    overridden by ``--defense-param``) and that config: what building it asks for."""
    from rfd.defenses import DEFENSES

    cls, cfg = DEFENSES[name], defense_config(name)
    opts = {**(cfg.get("options") or {}), **s.defense_params.get(name, {})}
    return cls, s.layers if cls.layered else "penultimate", opts, cfg


def forward_settings(s: EvalSettings, device: Any) -> dict[str, Any]:
    """Precision, memory format and compilation of every forward on ``device``.

    Faithful on CPU (fp32). On CUDA the automatic choice is bf16 autocast: see the README for
    why, and for the measured effect of bf16 on robust accuracy.
    """
    cuda = getattr(device, "type", str(device)) == "cuda"
    precision = s.precision or ("bf16" if cuda else "32")
    return {"precision": precision, "channels_last": s.channels_last, "compile": s.compile}


# --------------------------------------------------------------------------- the grid
class _ModelGrid:
    """Builds one model's cells on its device: defenses (calibrated), attacks, records folders."""

    def __init__(self, lr: LoadedRun, s: EvalSettings, attacks: dict[str, Any], eps: float,
                 run_dir: Path) -> None:  # fmt: skip
        self.lr, self.s, self.attacks, self.eps, self.run_dir = lr, s, attacks, eps, run_dir
        self.calibrations: dict[str, Any] = {}
        self.nus: dict[str, Any] = {}
        self.layers: dict[str, str] = {}

    def cell_dir(self, defense: str, attack: str) -> Path:
        return self.run_dir / "cells" / f"{self.lr.name}__{defense}__{attack}"

    def calibration_data(self, s: EvalSettings, n: int) -> Any:
        return self.lr.datamodule.calibration_dataloader(
            n, seed=s.seed, batch_size=256, n_eval=s.n_images
        )

    def defense(self, name: str, model: Any) -> Any:
        from rfd.defenses import calibrate_report, protect

        s = self.s
        cls, layers, opts, cfg = defense_setup(s, name)
        nu = s.nu
        if cls.calibrated and nu is None:
            cal = calibrate_report(
                model, name, layers, data=self.calibration_data(s, s.n_calibration),
                target_drop=s.target_drop, n_passes=int(cfg.get("n_passes", 5)), seed=s.seed,
                cache_dir=cfg.get("cache_dir"), checkpoint=self.lr.checkpoint, **opts,
            )  # fmt: skip
            self.calibrations[name], nu = cal, cal.nu
            if cal.chosen is not None:  # "auto" resolved once, at the target drop asked for
                layers = cal.chosen
        if cls.needs_data(layers, opts):
            opts["data"] = self.calibration_data(s, s.n_calibration)
        d = protect(model, name, layers=layers, nu=0.0 if nu is None else nu, seed=s.seed, **opts)
        self.nus[name] = d.nu if cls.calibrated else None
        if cls.layered:  # as the user names them (--layers takes them back), "auto" resolved
            self.layers[name] = layers if isinstance(layers, str) else ",".join(layers)
        return d

    def __call__(self, model: Any) -> list[Any]:
        from rfd.evaluation import GridCell, read_cell

        s = self.s
        defenses = {d: self.defense(d, model) for d in s.defense}
        cells = []
        for d in s.defense:
            for a in s.attack:
                folder = self.cell_dir(d, a)
                done = {int(r["index"]) for r in read_cell(folder)[0]} if folder.is_dir() else set()
                cells.append(GridCell(
                    name=folder.name, defense=d, attack_name=a, model=defenses[d],
                    attack=self.attacks[a], eps=self.eps, max_queries=max(s.queries),
                    criterion=s.criterion, eot=s.eot, seed=s.seed, records_dir=folder, done=done,
                    success=s.success,
                ))  # fmt: skip
        return cells


def _check_models(s: EvalSettings, runs: list[LoadedRun]) -> None:
    """What can only be checked against a model: layer names, image counts, a default eps."""
    from rfd.attacks import check_eps
    from rfd.defenses import DEFENSES
    from rfd.models import resolve_layer

    for lr in runs:
        if any(DEFENSES[d].layered for d in s.defense):
            for layer in [s.layers] if isinstance(s.layers, str) else s.layers:
                if layer != "auto":
                    try:
                        resolve_layer(lr.model, layer)
                    except ValueError as e:
                        raise UsageError(str(e)) from None
        dm = lr.datamodule
        if s.n_images % dm.num_classes:
            raise UsageError(
                f"n_images={s.n_images} must be a multiple of the {dm.num_classes} classes"
            )
        n_test = len(dm.test_labels())
        if s.n_images + s.n_calibration > n_test:
            raise UsageError(
                f"n_images + n_calibration = {s.n_images + s.n_calibration} exceeds the "
                f"{n_test} test images of {lr.name}"
            )
        eps = _eps(s, lr)
        try:
            check_eps(eps, s.norm, tuple(dm.test_set[0][0].shape))
        except ValueError as e:
            raise UsageError(f"{e} (--eps)") from None
        _check_defense_options(s, lr)


def _check_defense_options(s: EvalSettings, lr: LoadedRun) -> None:
    """Build each defense that needs no data once with its options (and nu 0), so a bad option or
    a missing trained part is refused before the run folder is written, not minutes later."""
    from rfd.defenses import protect

    for name in s.defense:
        cls, layers, opts, _ = defense_setup(s, name)
        if cls.needs_data(layers, opts) or s.layers == "auto":
            continue
        try:
            protect(lr.model, name, layers=layers, nu=0.0, seed=s.seed, **opts).remove()
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise UsageError(f"defense {name}: {first_line(e)}") from None


def _eps(s: EvalSettings, lr: LoadedRun) -> float:
    from rfd.attacks import default_eps

    if s.eps is not None:
        return s.eps
    x0 = lr.datamodule.test_set[0][0]
    try:
        return default_eps(int(x0.shape[-1]), s.norm)
    except ValueError as e:
        raise UsageError(str(e)) from None


REPORT_FILES = (
    "results.json", "results.csv", "table.md", "robust_vs_queries.png", "clean_vs_nu.png",
    "timing.json",
)  # fmt: skip


def _claim_run_dir(run_dir: Path, spec: dict[str, Any], overwrite: bool) -> None:
    spec_file = run_dir / "spec.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        new = json.loads(json.dumps(spec, default=str))
        # a setting added after the folder was written held its default there (defaults keep
        # the earlier behaviour), so a spec without it still describes the same numbers
        defaults = json.loads(json.dumps(spec_of(EvalSettings()), default=str))
        old = {**{k: v for k, v in defaults.items() if k in new}, **old}
        if old != new:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise UsageError(
                    f"{run_dir} holds results of other settings (differ in: {', '.join(diff)}); "
                    "use another --run-dir or --overwrite"
                )
            shutil.rmtree(run_dir / "cells", ignore_errors=True)
            for stale in REPORT_FILES:  # the old reports must not sit beside the new spec
                (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2, default=str))


def _wandb_logger(run_dir: Path, s: EvalSettings, spec: dict[str, Any]) -> Any:
    if s.wandb == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    # one W&B run per run folder: a resumed evaluation continues its own run
    rid = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    logger = WandbLogger(project="rfd", name=run_dir.name, id=rid, resume="allow",
                         save_dir=str(run_dir), offline=s.wandb == "offline")  # fmt: skip
    logger.log_hyperparams(spec)
    return logger


class _Bar:
    """One progress bar for a grid: jobs done, charged queries/s and batch fill."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="job", disable=not sys.stderr.isatty(),
                        dynamic_ncols=True, leave=False)  # fmt: skip
        self.t = 0.0

    def __call__(self, p: Any) -> None:
        self.bar.n = p.jobs_done
        now = time.perf_counter()
        if now - self.t > 0.5 or p.jobs_done == p.jobs_total:
            self.t = now
            qps = p.charged / p.seconds if p.seconds else 0.0
            self.bar.set_postfix_str(f"{qps:,.0f} q/s, fill {p.fill:.2f}", refresh=True)

    def close(self) -> None:
        self.bar.close()


def run(s: EvalSettings) -> list[dict[str, Any]]:
    """Evaluate every (model, defense, attack) cell; returns one summary per cell."""
    import lightning as L

    from rfd import report
    from rfd.attacks import make_attack
    from rfd.evaluation import GridEvaluation, quiet_lightning, read_cell
    from rfd.metrics import robust_curve, summarize

    spec = spec_of(s)
    runs = [load_run(m.get("config"), m.get("checkpoint"), train_if_missing=s.train_if_missing)
            for m in s.models]  # fmt: skip
    displays = [m.get("name") or lr.display for m, lr in zip(s.models, runs, strict=True)]
    _check_models(s, runs)
    check_machine(s.accelerator, s.devices)
    attacks = {a: make_attack(a, s.norm, **attack_params_for(s, a)) for a in s.attack}
    run_dir = Path(
        s.run_dir or Path("runs/eval") / f"{'+'.join(r.name for r in runs)}-{spec_hash(spec)}"
    )
    check_writable(run_dir, "--run-dir")
    _claim_run_dir(run_dir, spec, s.overwrite)
    logger = _wandb_logger(run_dir, s, spec)
    budget = max(s.queries)
    if "square" in s.attack and len(s.queries) > 1:
        print(SQUARE_NOTE)
    summaries: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    calib_curves: dict[str, list[tuple[float, float]]] = {}
    t_start = time.perf_counter()
    for m, lr, display in zip(s.models, runs, displays, strict=True):
        eps = _eps(s, lr)
        tag = m.get("tag")
        grid = _ModelGrid(lr, s, attacks, eps, run_dir)
        n_jobs = len(s.defense) * len(s.attack) * s.n_images
        bar = _Bar(n_jobs, display)
        used_forward: dict[str, Any] = {}

        def forward(device: Any, used: dict[str, Any] = used_forward) -> dict[str, Any]:
            used.update(forward_settings(s, device))
            return dict(used)

        module = GridEvaluation(lr.model, grid, s.batch_size, s.n_clean_passes, forward, bar,
                                bpda=s.bpda)  # fmt: skip
        loader = lr.datamodule.eval_dataloader(s.n_images, seed=s.seed, batch_size=s.n_images)
        print(f"[{display}] {len(s.defense)} defenses × {len(s.attack)} attacks, {s.n_images} "
              f"images, {budget} queries, batch {s.batch_size}")  # fmt: skip
        with quiet_lightning():
            trainer = L.Trainer(
                accelerator=s.accelerator, devices=s.devices, inference_mode=False, logger=False,
                enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
            )  # fmt: skip
            trainer.test(module, dataloaders=loader, verbose=False)
        bar.close()
        if not trainer.is_global_zero:
            continue
        for cell in module.cells:
            records, stats = read_cell(cell.records_dir)
            cal = grid.calibrations.get(cell.defense)
            summary = summarize(records, s.queries, stats)
            summary.update(
                model=display, tag=tag, defense=cell.defense, attack=cell.attack_name, norm=s.norm,
                eps=eps, criterion=s.criterion, success_rule=s.success, eot=s.eot,
                max_queries=budget, paper=s.paper,
                nu=grid.nus.get(cell.defense), layers=grid.layers.get(cell.defense),
                calibration=({"target_drop": cal.target_drop, "drop": cal.drop,
                              "drop_std": cal.drop_std, "clean_acc": cal.clean_acc} if cal else None),
                attack_params=dict(cell.attack.params), bpda=s.bpda,
                defense_params=s.defense_params.get(cell.defense) or None,
                defense_forwards_per_query=cell.model.forwards_per_query, **used_forward,
            )  # fmt: skip
            summaries.append(summary)
            curves.setdefault(f"{display} {cell.attack_name}", {})[
                report.method_title(cell.defense, tag)
            ] = robust_curve(records, budget)
        for name, cal in grid.calibrations.items():
            calib_curves[f"{display} {name}"] = [(nu, cal.clean_acc - d) for nu, d in cal.history]
    if not summaries:
        return summaries
    wall = time.perf_counter() - t_start
    paths = report.write_summary_files(run_dir, summaries)
    plot_q = report.plot_robust_vs_queries(curves, run_dir / "robust_vs_queries.png")
    plot_nu = (
        report.plot_clean_vs_nu(calib_curves, run_dir / "clean_vs_nu.png") if calib_curves else None
    )
    header, rows = report.paper_table(summaries, with_paper=s.paper)
    report.print_table(header, rows, title=report.caption(summaries))
    print("\n".join(report.details_lines(summaries)))
    if logger is not None:
        logger.log_table("results", columns=header, data=rows)
        logger.log_image("robust_vs_queries", images=[str(plot_q)])
        if plot_nu:
            logger.log_image("clean_vs_nu", images=[str(plot_nu)])
        logger.experiment.finish()
    (run_dir / "timing.json").write_text(json.dumps({"wall_seconds": round(wall, 1)}))
    print(f"results: {paths['markdown']} {paths['json']} {paths['csv']} | plots: {plot_q}"
          + (f" {plot_nu}" if plot_nu else ""))  # fmt: skip
    if logger is not None and s.wandb == "offline":
        print(
            f"W&B run (offline): {run_dir / 'wandb'}  (upload: wandb sync {run_dir / 'wandb'}/offline-run-*)"
        )
    return summaries
