"""Command-line plumbing shared by train.py and evaluate.py (LightningCLI with run=False).

A run lives in one folder, ``<run_root>/<run_name>/``: ``config.yaml`` (the resolved config),
``best.ckpt`` / ``last.ckpt``, ``csv/metrics.csv``, the offline W&B run, and ``result.json`` once the
run has finished. A rerun of an unfinished run resumes from ``last.ckpt``; a finished run is never
overwritten unless ``--overwrite true`` is given.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from rfd.classifier import ClassifierModule

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


def resolve_config_path(value: str) -> str:
    """A config given as a bare name (``cifar10_vit.yaml`` or ``cifar10_vit``) resolves under configs/."""
    p = Path(value)
    if p.is_file():
        return str(p)
    for cand in (CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml", Path("configs") / value):
        if cand.is_file():
            return str(cand)
    names = sorted(q.name for q in CONFIG_DIR.glob("*.yaml"))
    raise UsageError(f"config {value!r} not found; available in configs/: {', '.join(names)}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """Rewrite every ``--config X`` / ``--config=X`` so bare names find configs/X."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config" and i + 1 < len(argv):
            out += [a, resolve_config_path(argv[i + 1])]
            next(it, None)
        elif a.startswith("--config="):
            out.append("--config=" + resolve_config_path(a.split("=", 1)[1]))
        else:
            out.append(a)
    return out


def make_loggers(run_dir: Path, wandb_mode: str, project: str, name: str) -> list[Logger]:
    """CSV always; W&B offline by default (``wandb sync`` uploads later), online on request."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="csv")]
    if wandb_mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        loggers.append(
            WandbLogger(
                project=project,
                name=name,
                save_dir=str(run_dir),
                offline=wandb_mode == "offline",
            )
        )
    return loggers


class TrainCLI(LightningCLI):
    """``python train.py --config NAME.yaml [--trainer.devices N] [--model.lr ...]``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--run_root", default="runs", help="folder holding run folders")
        parser.add_argument("--run_name", default=None, help="run folder name (default: config)")
        parser.add_argument(
            "--wandb",
            default="offline",
            choices=["offline", "online", "disabled"],
            help="W&B logging mode (offline writes a local run for `wandb sync`)",
        )
        parser.add_argument("--wandb_project", default="rfd")
        parser.add_argument("--overwrite", type=bool, default=False, help="replace a finished run")
        parser.add_argument("--test_after_fit", type=bool, default=True)

    def run_dir(self) -> Path:
        cfg = self.config
        name = cfg.get("run_name")
        if not name:
            configs = cfg.get("config") or []
            name = Path(str(configs[-1])).stem if configs else "run"
        return Path(cfg.get("run_root", "runs")) / name

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        run_dir = self.run_dir()
        cfg = self.config
        kwargs["default_root_dir"] = str(run_dir)
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = make_loggers(
                run_dir, cfg["wandb"], cfg["wandb_project"], run_dir.name
            )
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(
                ModelCheckpoint(
                    dirpath=str(run_dir),
                    filename="best",
                    monitor="val/acc",
                    mode="max",
                    save_top_k=1,
                    save_last=True,
                    enable_version_counter=False,
                )
            )
        if kwargs["logger"] and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


def make_train_cli(argv: list[str]) -> TrainCLI:
    """Parse ``argv`` (config names resolved under configs/) and build trainer, model and data."""
    # We pass the (rewritten) command line explicitly; Lightning warns when sys.argv also has args.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    return TrainCLI(
        ClassifierModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=resolve_config_args(argv),
    )


def train_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of train.py: fit, then test the best checkpoint, and write result.json."""
    cli = make_train_cli(list(sys.argv[1:] if argv is None else argv))
    run_dir = cli.run_dir()
    result_path = run_dir / "result.json"
    last = run_dir / "last.ckpt"
    if result_path.exists() and not cli.config["overwrite"]:
        raise UsageError(
            f"{run_dir} holds a finished run; pass --run_name NEW or --overwrite true to replace it"
        )
    if cli.config["overwrite"]:
        for f in ("best.ckpt", "last.ckpt", "result.json"):
            (run_dir / f).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, str(run_dir / "config.yaml"), overwrite=True, skip_check=True)
    resume = str(last) if last.exists() else None
    if resume:
        print(f"resuming unfinished run from {resume}")
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=resume)
    train_s = time.perf_counter() - t0
    result: dict[str, Any] = {"train_seconds": round(train_s, 1), "run_dir": str(run_dir)}
    best = run_dir / "best.ckpt"
    result["best_checkpoint"] = str(best) if best.exists() else None
    if cli.config["test_after_fit"]:
        ckpt = str(best) if best.exists() else None
        metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
        result["test_acc"] = float(metrics[0]["test/acc"]) if metrics else None
    for logger in cli.trainer.loggers:  # close the W&B run so a later one (evaluate) starts fresh
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    if cli.trainer.is_global_zero:
        result_path.write_text(json.dumps(result, indent=2))
        print(
            f"training time: {train_s:.1f} s | test accuracy: "
            f"{result.get('test_acc', float('nan')):.4f} | checkpoint: {result['best_checkpoint']}"
        )
    return result


def run_cli(main: Any, argv: list[str] | None = None) -> int:
    """Run ``main`` and turn usage/data errors into one line on stderr with exit code 2."""
    from rfd.data import DataMissingError

    try:
        main(argv)
    except (UsageError, DataMissingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
