"""``python evaluate.py``: grids of defenses × attacks on trained models, one engine per model.

Settings come from :mod:`rfd.settings` (defaults ← ``configs/eval.yaml`` or ``--eval-config`` ←
flags, every value validated where it enters), models and data from :func:`rfd.runs.load_run`.
For each model, the whole grid runs as one :class:`rfd.evaluation.GridEvaluation` under one
Lightning ``Trainer``: all cells share the engine's forwards. A run folder holds ``spec.json``
(what decides the numbers, :func:`run_spec`: the settings, each model's files with its
checkpoint's content hash, the attack and defense parameters as resolved),
``cells/<model>__<defense>__<attack>/records.rank<r>.jsonl`` and ``stats.rank<r>.jsonl`` per
cell, and the reports. A rerun with the same spec resumes with the jobs that are left; a different
one in the same folder is refused unless ``--overwrite``.
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

from rfd.models import LEGACY_HASH_BYTES, file_hash, part_path
from rfd.runs import LoadedRun, load_run
from rfd.settings import (
    EvalSettings,
    UsageError,
    attack_params_for,
    check_machine,
    check_writable,
    defense_config,
    defense_defaults,
    first_line,
    load_eval_settings,
    repo_path,
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
    return {"precision": resolve_precision(s, cuda), "channels_last": s.channels_last,
            "compile": s.compile}  # fmt: skip


def resolve_precision(s: EvalSettings, cuda: bool | None = None) -> str:
    """``--precision`` as the forwards will use it: the automatic choice (no ``--precision``)
    depends on the device, so the spec records the resolved value (``cuda`` None: predicted
    from ``--accelerator`` and this machine, as Lightning will choose)."""
    if s.precision:
        return s.precision
    if cuda is None:
        import torch

        cuda = s.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16" if cuda else "32"


# --------------------------------------------------------------------------- the grid
class _ModelGrid:
    """Builds one model's cells on its device: defenses (calibrated), attacks, records folders.

    ``key`` names the model's cell folders: its run name, made unique within the grid
    (:func:`_model_keys`), so two models never share records.
    """

    def __init__(self, lr: LoadedRun, s: EvalSettings, attacks: dict[str, Any], eps: float,
                 run_dir: Path, key: str | None = None) -> None:  # fmt: skip
        self.lr, self.s, self.attacks, self.eps, self.run_dir = lr, s, attacks, eps, run_dir
        self.key = key or lr.name
        self.calibrations: dict[str, Any] = {}
        self.nus: dict[str, Any] = {}
        self.layers: dict[str, str] = {}

    def cell_dir(self, defense: str, attack: str) -> Path:
        return self.run_dir / "cells" / f"{self.key}__{defense}__{attack}"

    def calibration_data(self, s: EvalSettings, n: int) -> Any:
        return self.lr.datamodule.calibration_dataloader(
            n, seed=s.seed, batch_size=256, n_eval=s.n_images
        )

    def defense(self, name: str, model: Any) -> Any:
        from rfd.defenses import calibrate_report, protect
        from rfd.defenses.calibration import TargetUnreachable

        s = self.s
        cls, layers, opts, cfg = defense_setup(s, name)
        nu = s.nu
        if cls.calibrated and nu is None:
            try:
                cal = calibrate_report(
                    model, name, layers, data=self.calibration_data(s, s.n_calibration),
                    target_drop=s.target_drop, n_passes=int(cfg.get("n_passes", 5)), seed=s.seed,
                    cache_dir=cfg.get("cache_dir"), checkpoint=self.lr.checkpoint, **opts,
                )  # fmt: skip
            except TargetUnreachable as e:
                raise UsageError(
                    f"target_drop {e.target} cannot be reached by defense {name} on {self.key}: "
                    f"the strongest noise tried (nu={e.nu:.4g}) drops accuracy by {e.drop:.4f}; "
                    "use a smaller --target-drop or a fixed --nu"
                ) from None
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


# spec.json's layout: 2 = models as resolved files with the checkpoint's hash, attack and defense
# parameters as the cells use them (1, unmarked: the settings as given)
SPEC_VERSION = 2


def run_spec(s: EvalSettings, runs: list[LoadedRun], attacks: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's numbers, as spec.json records it: :func:`rfd.settings.spec_of`'s
    settings, with each model as the files it was loaded from (config and checkpoint paths in
    one spelling, :func:`rfd.settings.repo_path`, and the checkpoint's content hash) and the
    attack and defense parameters as the cells use them (config files, overrides and class
    defaults resolved).

    The settings alone do not identify the numbers: a checkpoint retrained in place, or an edited
    ``configs/attack/<name>.yaml``, leaves them unchanged, and a resumed run would then mix old
    records with new ones. Each checkpoint is hashed once here, not per cell.
    """
    spec = spec_of(s)
    spec["models"] = [
        {**m, "config": repo_path(lr.config_path) if lr.config_path else None,
         "checkpoint": repo_path(lr.checkpoint), "checkpoint_hash": file_hash(lr.checkpoint)}
        for m, lr in zip(s.models, runs, strict=True)
    ]  # fmt: skip
    spec["attack_params"] = {a: dict(attacks[a].params) for a in s.attack}
    defenses = {}
    for d in s.defense:
        cls, _, opts, cfg = defense_setup(s, d)
        defenses[d] = {**defense_defaults(d), **opts}
        for k in cls.parts:  # a trained part is its file's content, not only its name
            v = defenses[d].get(k)
            path = part_path(v) if isinstance(v, (str, os.PathLike)) else None
            if path is not None and path.is_file():
                defenses[d][f"{k}_hash"] = file_hash(path)
        if cls.calibrated and s.nu is None:  # the passes of each calibration step decide nu
            defenses[d]["calibration_passes"] = int(cfg.get("n_passes", 5))
    spec["defense_params"] = defenses
    # the automatic precision is fp32 on CPU and bf16 on CUDA: a folder started on one and
    # resumed on the other would mix records of two precisions under one unchanged setting
    spec["forward_precision"] = resolve_precision(s)
    spec["spec_version"] = SPEC_VERSION
    return spec


def prefix_hashed_models(spec: dict[str, Any], runs: list[LoadedRun]) -> list[Any] | None:
    """``spec``'s models as a folder recorded them when checkpoints were hashed by their first
    16 MiB (:func:`rfd.models.file_hash`), or None when no checkpoint is larger (the hashes are
    then the same)."""
    big = [lr.checkpoint is not None and Path(lr.checkpoint).stat().st_size > LEGACY_HASH_BYTES
           for lr in runs]  # fmt: skip
    if not any(big):
        return None
    return [
        {**m, "checkpoint_hash": file_hash(lr.checkpoint, LEGACY_HASH_BYTES)} if b else m
        for m, lr, b in zip(spec["models"], runs, big, strict=True)
    ]


def _accept_new_part_hashes(old: dict[str, Any], new: dict[str, Any]) -> None:
    """A folder written before trained parts' hashes were recorded (``Defense.parts``) resumes
    as it did then: the hashes it lacks are taken from ``new``, which records them from now on."""
    from rfd.defenses import DEFENSES

    was_all, now_all = old.get("defense_params"), new.get("defense_params")
    if not isinstance(was_all, dict) or not isinstance(now_all, dict):
        return
    for d, now in now_all.items():
        was = was_all.get(d)
        if d in DEFENSES and isinstance(was, dict) and isinstance(now, dict):
            for k in DEFENSES[d].parts:
                if f"{k}_hash" in now and f"{k}_hash" not in was:
                    was[f"{k}_hash"] = now[f"{k}_hash"]


def _as_json(spec: dict[str, Any]) -> Any:
    return json.loads(json.dumps(spec, default=str))


def _read_spec(run_dir: Path, overwrite: bool) -> dict[str, Any] | None:
    """The folder's spec.json as a mapping; None if there is none, or (with ``overwrite``) if it
    cannot be read: it is replaced either way."""
    spec_file = run_dir / "spec.json"
    if not spec_file.exists():
        return None
    try:
        old = json.loads(spec_file.read_text())
        problem = None if isinstance(old, dict) else f"a JSON {type(old).__name__}, not a mapping"
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        problem = first_line(e)
    if problem is None:
        return old
    if overwrite:
        return {}
    raise UsageError(
        f"run dir {run_dir}: spec.json is unreadable ({problem}); use --overwrite or another "
        "--run-dir"
    )


def _claim_run_dir(
    run_dir: Path, spec: dict[str, Any], overwrite: bool, legacy: dict[str, Any] | None = None,
    prefix_models: list[Any] | None = None,
) -> None:  # fmt: skip
    """Take ``run_dir`` for ``spec``: resume when its spec.json says the same, else refuse (or,
    with ``overwrite``, remove the old cells and reports); then write the spec.

    Args:
        legacy: the spec as it was written before :data:`SPEC_VERSION` 2 (the settings alone,
            :func:`rfd.settings.spec_of`). A folder written then recorded no checkpoint hash or
            resolved parameters, so it is compared on what it recorded, and resumes when that
            agrees (its spec is then rewritten in full, and checked in full from then on).
        prefix_models: the models as recorded when checkpoints were hashed by their first 16 MiB
            (:func:`prefix_hashed_models`): a folder that recorded those resumes as it did then,
            and its spec is rewritten with the whole-file hashes.
    """
    spec_file = run_dir / "spec.json"
    old = _read_spec(run_dir, overwrite)
    if old is not None:
        new = _as_json(legacy if legacy is not None and "spec_version" not in old else spec)
        if old:  # ({} is an unreadable spec that --overwrite replaces)
            # a setting added after the folder was written held its default there (defaults
            # keep the earlier behaviour), so a spec without it still describes the same numbers
            defaults = _as_json(spec_of(EvalSettings()))
            old = {**{k: v for k, v in defaults.items() if k in new}, **old}
            # a folder written before the resolved precision was recorded cannot say which one
            # its records used: it resumes as it did then
            if "forward_precision" not in old and "forward_precision" in new:
                old["forward_precision"] = new["forward_precision"]
            if prefix_models is not None and old.get("models") == _as_json(prefix_models):
                old["models"] = new["models"]
            _accept_new_part_hashes(old, new)
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
    # atomically: a process killed mid-write, or another DDP rank writing the same spec, must
    # never leave a torn spec.json that refuses every later run
    tmp = run_dir / f".spec.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(spec, indent=2, default=str))
    os.replace(tmp, spec_file)


def _release_run_dir(run_dir: Path, created: bool) -> None:
    """After a run that failed on bad input: while no cell has a record, remove the spec.json it
    claimed (and the folder, if this run created it and it is empty), so that the corrected
    command is not refused as "other settings" by a folder that holds no results."""
    from rfd.evaluation import read_cell

    cells = run_dir / "cells"
    if cells.is_dir():
        if any(read_cell(c)[0] for c in cells.iterdir() if c.is_dir()):
            return
        shutil.rmtree(cells, ignore_errors=True)  # statistics without records describe nothing
    (run_dir / "spec.json").unlink(missing_ok=True)
    if created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _model_keys(runs: list[LoadedRun]) -> list[str]:
    """Each model's name in cell folders: its run name, with ``~2``, ``~3``... on the later ones
    when several models share it (one config, two checkpoints), so they never share records."""
    keys: list[str] = []
    for lr in runs:
        key, n = lr.name, 1
        while key in keys:
            n += 1
            key = f"{lr.name}~{n}"
        keys.append(key)
    return keys


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
    """Evaluate every (model, defense, attack) cell; returns one summary per cell.

    Everything that can be checked without running the grid is checked before the run folder is
    claimed; what only calibration finds (a target drop beyond reach) releases the folder again
    while it holds no record.
    """
    from rfd import report
    from rfd.attacks import make_attack

    runs = [load_run(m.get("config"), m.get("checkpoint"), train_if_missing=s.train_if_missing)
            for m in s.models]  # fmt: skip
    keys = _model_keys(runs)
    displays = report.unique_displays(
        [m.get("name") or lr.display for m, lr in zip(s.models, runs, strict=True)],
        [m.get("tag") for m in s.models], keys,
    )  # fmt: skip
    _check_models(s, runs)
    check_machine(s.accelerator, s.devices)
    attacks = {a: make_attack(a, s.norm, **attack_params_for(s, a)) for a in s.attack}
    spec = run_spec(s, runs, attacks)
    run_dir = Path(s.run_dir or Path("runs/eval") / f"{'+'.join(keys)}-{spec_hash(spec)}")
    check_writable(run_dir, "--run-dir")
    created = not run_dir.exists()
    _claim_run_dir(run_dir, spec, s.overwrite, legacy=spec_of(s),
                   prefix_models=prefix_hashed_models(spec, runs))  # fmt: skip
    try:
        return _run_grids(s, runs, keys, displays, attacks, run_dir, spec)
    except UsageError:  # e.g. a target drop no noise reaches: found once calibration ran
        _release_run_dir(run_dir, created)
        raise


def _run_grids(
    s: EvalSettings, runs: list[LoadedRun], keys: list[str], displays: list[str],
    attacks: dict[str, Any], run_dir: Path, spec: dict[str, Any],
) -> list[dict[str, Any]]:  # fmt: skip
    """Every model's grid in the claimed ``run_dir``, then the reports; one summary per cell."""
    import lightning as L
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from rfd import report
    from rfd.evaluation import GridEvaluation, quiet_lightning, read_cell
    from rfd.metrics import robust_curve, summarize

    logger = _wandb_logger(run_dir, s, spec)
    budget = max(s.queries)
    if "square" in s.attack and len(s.queries) > 1:
        print(SQUARE_NOTE)
    summaries: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    calib_curves: dict[str, list[tuple[float, float]]] = {}
    t_start = time.perf_counter()
    for m, lr, key, display in zip(s.models, runs, keys, displays, strict=True):
        eps = _eps(s, lr)
        tag = m.get("tag")
        grid = _ModelGrid(lr, s, attacks, eps, run_dir, key)
        n_jobs = len(s.defense) * len(s.attack) * s.n_images
        bar = _Bar(n_jobs, display)
        used_forward: dict[str, Any] = {}

        def forward(device: Any, used: dict[str, Any] = used_forward) -> dict[str, Any]:
            used.update(forward_settings(s, device))
            if used["precision"] != spec["forward_precision"]:  # Lightning chose another device
                raise UsageError(
                    f"the run resolved precision {spec['forward_precision']} for "
                    f"--accelerator {s.accelerator}, but runs on {device}; name --precision"
                )
            return dict(used)

        module = GridEvaluation(lr.model, grid, s.batch_size, s.n_clean_passes, forward, bar,
                                bpda=s.bpda)  # fmt: skip
        loader = lr.datamodule.eval_dataloader(s.n_images, seed=s.seed, batch_size=s.n_images)
        if rank_zero_only.rank == 0:  # DDP children run this script too: one header
            print(f"[{display}] {len(s.defense)} defenses × {len(s.attack)} attacks, "
                  f"{s.n_images} images, {budget} queries, batch {s.batch_size}")  # fmt: skip
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
                model=display, tag=tag, run_name=key, defense=cell.defense,
                attack=cell.attack_name, norm=s.norm, eps=eps, criterion=s.criterion,
                success_rule=s.success, eot=s.eot, max_queries=budget, paper=s.paper,
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
        for name, cal in grid.calibrations.items():  # labelled as the table's rows are
            calib_curves[f"{display} {report.method_title(name, tag)}"] = [
                (nu, cal.clean_acc - d) for nu, d in cal.history
            ]
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
