"""The training front end (train.py): LightningCLI with run=False, one run folder per run.

A run lives in one folder, ``<run_root>/<run_name>/``: ``config.yaml`` (the resolved config),
``best.ckpt`` / ``last.ckpt``, ``csv/metrics.csv``, the offline W&B run, and ``result.json`` once the
run has finished. A rerun of an unfinished run resumes from ``last.ckpt`` when its settings are the
run's (``config.yaml``; only where and how it logs may differ, :data:`NOT_TRAINING_KEYS`); a
finished run, or an unfinished one under other settings, is never overwritten unless
``--overwrite true`` is given.

Bad input (an unknown config, a flag of the wrong type, a finished run, an unfinished run with
other settings) raises
:class:`rfd.settings.UsageError`; ``run_cli`` prints it as one line with exit status 2. The config
helpers and ``run_cli`` live in :mod:`rfd.settings` and are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from rfd.classifier import ClassifierModule
from rfd.settings import (
    CONFIG_DIR,
    REPO_ROOT,
    UsageError,
    check_machine,
    check_writable,
    first_line,
    read_yaml_mapping,
    resolve_config_args,
    resolve_config_path,
    run_cli,
)

__all__ = [
    "CONFIG_DIR",
    "NOT_TRAINING_KEYS",
    "REPO_ROOT",
    "TrainCLI",
    "UsageError",
    "make_train_cli",
    "resolve_config_args",
    "resolve_config_path",
    "run_cli",
    "train_main",
]


# Keys of a train run's config.yaml (dotted, as the flags name them) that say where a run lives, how
# it logs and what it shows or tests after fitting, not what it trains: a rerun may change them and
# still resume the run's last.ckpt. Every other key must equal the run's, or the resumed run would
# mix settings (a changed optimizer even crashed in the optimizer state: KeyError 'momentum').
NOT_TRAINING_KEYS = frozenset(
    {
        "config",
        "run_root",
        "run_name",
        "wandb",
        "wandb_project",
        "overwrite",
        "test_after_fit",
        "trainer.logger",
        "trainer.default_root_dir",
        "trainer.enable_progress_bar",
        "trainer.enable_model_summary",
        "trainer.log_every_n_steps",
        "trainer.profiler",
        "trainer.limit_test_batches",
    }
)


def make_loggers(run_dir: Path, wandb_mode: str, project: str, name: str) -> list[Logger]:
    """CSV always; W&B offline by default (``wandb sync`` uploads later), online on request.

    A resumed run keeps the metrics it logged before: Lightning's CSV writer deletes an existing
    ``csv/metrics.csv``, so that file is first renamed ``metrics.before-resume<N>.csv``.
    """
    old = run_dir / "csv" / "metrics.csv"
    if old.is_file() and rank_zero_only.rank == 0:  # DDP: one process keeps it
        n = 1
        while (kept := old.with_name(f"metrics.before-resume{n}.csv")).exists():
            n += 1
        old.rename(kept)
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
        trainer_cfg = cfg.get("trainer") or {}
        devices = trainer_cfg.get("devices", "auto")
        if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
            devices = int(devices)
        if isinstance(devices, int) and devices < 1:
            raise ValueError(f"trainer.devices must be a positive integer or auto (got {devices})")
        check_machine(str(trainer_cfg.get("accelerator", "auto")), devices)
        check_writable(run_dir, "--run_root/--run_name")
        self.check_run_folder(run_dir)
        kwargs["default_root_dir"] = str(run_dir)
        if kwargs.get("logger") in (None, True):
            kwargs["logger"] = make_loggers(
                run_dir, cfg["wandb"], cfg["wandb_project"], run_dir.name
            )
        callbacks = list(kwargs.get("callbacks") or [])
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            # a module may name what "best" means (robust accuracy for AT, loss for an autoencoder)
            monitor, mode = getattr(self.model, "monitor", ("val/acc", "max"))
            callbacks.append(
                ModelCheckpoint(
                    dirpath=str(run_dir),
                    filename="best",
                    monitor=monitor,
                    mode=mode,
                    save_top_k=1,
                    enable_version_counter=False,
                )
            )
            # last.ckpt from its own callback: with save_last=True on the monitored one, Lightning
            # 2.6 rewrote last.ckpt only in epochs that improved best.ckpt (a Defense-GAN run
            # ended at epoch 5 with last.ckpt at epoch 4), so a resume would repeat epochs
            callbacks.append(
                ModelCheckpoint(dirpath=str(run_dir), filename="last", enable_version_counter=False)
            )
        if kwargs["logger"] and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def check_run_folder(self, run_dir: Path) -> None:
        """Refuse a run folder this command must not train in, before the Trainer exists.

        Called from :meth:`instantiate_trainer` ahead of ``Trainer(...)``, which prints Lightning's
        hardware banner and tips: a refusal is then the only line the user sees, and nothing has
        been written. Refused without ``--overwrite true``: a finished run (``result.json``), and
        an unfinished one (``last.ckpt``) whose ``config.yaml`` differs from this command's settings
        in a key outside :data:`NOT_TRAINING_KEYS`: resuming would continue the checkpoint under
        other settings and rewrite ``config.yaml`` so that it no longer describes the checkpoint.

        Raises:
            UsageError: naming the run folder, the differing keys (old -> new) and the way out.
        """
        if self.config.get("overwrite"):
            return
        if (run_dir / "result.json").exists():
            raise UsageError(
                f"{run_dir} holds a finished run; pass --run_name NEW or --overwrite true to "
                "replace it"
            )
        saved = run_dir / "config.yaml"
        if not (run_dir / "last.ckpt").exists() or not saved.is_file():
            return  # nothing to resume (or nothing to compare with): the run starts afresh
        old = _flatten(read_yaml_mapping(saved, "run config"))
        new = _flatten(yaml.safe_load(self.parser.dump(self.config, skip_validation=True)) or {})
        missing = "(unset)"
        changed = [
            f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}"
            for k in sorted(old.keys() | new.keys())
            if k not in NOT_TRAINING_KEYS and old.get(k, missing) != new.get(k, missing)
        ]
        if changed:
            shown = "; ".join(changed[:8]) + (
                f"; {len(changed) - 8} more" if len(changed) > 8 else ""
            )
            raise UsageError(
                f"{run_dir} holds an unfinished run with other settings ({shown}); rerun with its "
                "settings to resume it, or pass --run_name NEW or --overwrite true"
            )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"model.lr": 0.003, "data.init_args.batch_size": 128, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def make_train_cli(argv: list[str]) -> TrainCLI:
    """Parse ``argv`` (config names resolved under configs/) and build trainer, model and data.

    Raises:
        UsageError: a bad flag or value, or a run folder this command must not train in (a
            finished run, an unfinished one with other settings), refused before the Trainer is
            built (:meth:`TrainCLI.check_run_folder`).
    """
    # We pass the (rewritten) command line explicitly; Lightning warns when sys.argv also has args.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    # "Seed set to N" would precede a one-line error; the seed is in the saved config.yaml
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    args = resolve_config_args(argv)
    # A config whose model names a class_path trains that LightningModule (a defense's part: the
    # MagNet autoencoder, the Defense-GAN generator); the others fine-tune a ClassifierModule.
    part = _names_model_class(args)
    try:
        return TrainCLI(
            L.LightningModule if part else ClassifierModule,
            L.LightningDataModule,
            subclass_mode_model=part,
            subclass_mode_data=True,
            run=False,
            save_config_callback=None,
            args=args,
            parser_kwargs={"exit_on_error": False},  # raise, so the error becomes one line
        )
    except argparse.ArgumentError as e:
        raise UsageError(one_line_parse_error(str(e))) from None
    except (ValueError, MisconfigurationException) as e:  # a constructor refused a value
        raise UsageError(_constructor_error(e)) from None


def _names_model_class(args: list[str]) -> bool:
    """Whether a ``--config`` file (or ``--model``) gives the model section a ``class_path``."""
    found = False
    for i, a in enumerate(args):
        path = a.split("=", 1)[1] if a.startswith("--config=") else None
        if a == "--config" and i + 1 < len(args):
            path = args[i + 1]
        if path and Path(path).is_file():
            model = read_yaml_mapping(path, "config").get("model")
            found = found or (isinstance(model, dict) and "class_path" in model)
        if a.startswith("--model=") or (a == "--model" and i + 1 < len(args)):
            found = True
    return found


def _constructor_error(e: Exception) -> str:
    """The reason a model/data/trainer constructor gave, without jsonargparse's union wrapper
    ("Does not validate against any of the Union subtypes ... Errors: - <reason>")."""
    text = str(e)
    if "Errors:" in text:
        reasons = [ln.strip()[2:] for ln in text.split("Errors:", 1)[1].splitlines()
                   if ln.strip().startswith("- ") and "NoneType" not in ln]  # fmt: skip
        if reasons:
            return reasons[0]
    return first_line(e)


def one_line_parse_error(message: str) -> str:
    """jsonargparse's multi-line parse error as one line: the key, what it takes, the value."""
    lines = [ln.strip().lstrip("- ").strip() for ln in message.splitlines()]
    lines = [ln for ln in lines if ln]
    key = re.match(r'Parser key "([^"]+)"', lines[0]) if lines else None
    if key is None:
        return " ".join(lines)
    skip = ("Does not validate", "Subtypes:", "Errors:", "Given value type:", "Expected a path")
    given, expected, problems = None, [], []
    for ln in lines[1:]:
        exp = re.match(r"Expected an? (.+?)(?:\. Got value: (.*))?$", ln)
        if ln.startswith("Given value:"):
            given = ln.split(":", 1)[1].strip()
        elif exp and "NoneType" not in exp.group(1) and not ln.startswith(skip):
            expected.append(_type_name(exp.group(1)))
            given = exp.group(2) if exp.group(2) is not None else given
        elif not exp and not ln.startswith(skip):
            problems.append(ln)
    if problems:
        return f"{key.group(1)}: {' '.join(problems)}"
    return f"{key.group(1)}: expected {' or '.join(expected) or 'another value'} (got {given!r})"


def _type_name(t: str) -> str:
    t = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", t)
    return re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", t)


def train_main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Entry point of train.py: fit, then test the best checkpoint, and write result.json."""
    # building the CLI refuses a finished run or one with other settings (check_run_folder)
    cli = make_train_cli(list(sys.argv[1:] if argv is None else argv))
    run_dir = cli.run_dir()
    result_path = run_dir / "result.json"
    last = run_dir / "last.ckpt"
    if cli.config["overwrite"]:
        for f in ("best.ckpt", "last.ckpt", "result.json"):
            (run_dir / f).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cli.parser.save(cli.config, str(run_dir / "config.yaml"), overwrite=True, skip_validation=True)
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
        tested = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
        result["test_acc"] = tested.get("test/acc")
        result["test"] = tested
    for logger in cli.trainer.loggers:  # close the W&B run so a later one (evaluate) starts fresh
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    if cli.trainer.is_global_zero:
        result_path.write_text(json.dumps(result, indent=2))
        tested = " | ".join(f"{k}: {v:.4f}" for k, v in result.get("test", {}).items())
        print(
            f"training time: {train_s:.1f} s | {tested or 'not tested'} | checkpoint: "
            f"{result['best_checkpoint']}"
        )
    return result
