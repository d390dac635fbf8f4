"""``python evaluate.py``: grids of defenses × attacks on one or more trained models.

Settings come from ``configs/eval.yaml`` (or ``--eval-config FILE``, e.g. a paper grid under
configs/grid/), then attack and defense defaults from ``configs/attack/<name>.yaml`` and
``configs/defense/<name>.yaml``, then command-line flags. YAML is read with ``yaml.safe_load`` and
every key is checked against the known ones: configs are data.

A run folder holds ``spec.json`` (the resolved settings that decide the numbers), one
``cells/<model>__<defense>__<attack>/records.rank<r>.jsonl`` per cell, and the reports. A rerun with
the same settings resumes; different settings in the same folder are refused unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from rfd.cli import CONFIG_DIR, UsageError, resolve_config_path

DEFENSES = ("none", "input", "feature", "aaa")
DATA_CLASSES = ("rfd.data.FashionMNISTDataModule", "rfd.data.CIFAR10DataModule")
DEFAULT_EVAL = CONFIG_DIR / "eval.yaml"
SQUARE_NOTE = (
    "note: robust accuracy at smaller budgets is read from one run's trajectory; Square's p "
    "schedule is rescaled to the total budget, so a shorter run of its own can differ slightly."
)


@dataclass
class EvalSettings:
    """Everything that decides an evaluation. Field names are the YAML keys."""

    models: list[dict[str, Any]] = field(
        default_factory=lambda: [{"config": "fmnist_default.yaml"}]
    )
    defense: list[str] = field(default_factory=lambda: ["none", "input", "feature"])
    attack: list[str] = field(default_factory=lambda: ["square"])
    n_images: int = 100
    batch_size: int = 100
    queries: list[int] = field(default_factory=lambda: [1000])
    norm: str = "linf"
    eps: float | None = None
    eot: int = 1
    criterion: str = "vote"
    nu: float | None = None
    target_drop: float | None = 0.02
    layers: str | list[str] = "penultimate"
    seed: int = 0
    n_calibration: int = 1000
    n_clean_passes: int = 5
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper: bool = False
    # how, not what: excluded from the spec fingerprint
    run_dir: str | None = None
    wandb: str = "offline"
    accelerator: str = "auto"
    devices: int | str = 1
    overwrite: bool = False
    train_if_missing: bool = True

    NON_SEMANTIC = ("run_dir", "wandb", "accelerator", "devices", "overwrite", "train_if_missing")


def _split(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Attack defended models and report robust accuracy in the paper's layout.",
    )
    ap.add_argument(
        "--eval-config", "--grid", dest="eval_config", help="eval YAML (default configs/eval.yaml)"
    )
    ap.add_argument(
        "--config", help="training config of the model (bare names resolve in configs/)"
    )
    ap.add_argument("--checkpoint", help="model weights (default: runs/<run_name>/best.ckpt)")
    ap.add_argument("--defense", help=f"one, several (comma) or all of: {', '.join(DEFENSES)}")
    ap.add_argument("--attack", help="one, several (comma) or all of the registered attacks")
    ap.add_argument("--n-images", type=int, help="class-balanced test images (paper: 1000)")
    ap.add_argument("--batch-size", type=int, help="images attacked together")
    ap.add_argument("--queries", help="budget(s), e.g. 1000 or 1000,10000")
    ap.add_argument("--norm", choices=["linf", "l2"])
    ap.add_argument("--eps", type=float, help="perturbation budget ([0,1] pixels; default by data)")
    ap.add_argument("--eot", type=int, help="EOT samples per query (each charged)")
    ap.add_argument("--criterion", choices=["vote", "single", "none"])
    ap.add_argument("--nu", type=float, help="noise std (skips calibration)")
    ap.add_argument("--target-drop", type=float, help="calibrate nu to this clean-accuracy drop")
    ap.add_argument("--layers", help="layer name(s) for feature noise (comma)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--n-calibration", type=int, help="calibration images (disjoint from eval)")
    ap.add_argument(
        "--attack-param",
        action="append",
        default=[],
        metavar="[ATTACK.]KEY=VALUE",
        help="attack hyperparameter override, e.g. square.p_init=0.1 or p_init=0.1",
    )
    ap.add_argument("--run-dir", help="run folder (default: runs/eval/<name>-<settings hash>)")
    ap.add_argument("--wandb", choices=["offline", "online", "disabled"])
    ap.add_argument("--accelerator")
    ap.add_argument("--devices", help="devices per node (GPUs: DDP spreads images)")
    ap.add_argument("--overwrite", action="store_true", help="replace results of other settings")
    ap.add_argument("--paper", action="store_true", help="put the paper's numbers beside ours")
    return ap


def load_settings(argv: list[str]) -> EvalSettings:
    """Defaults ← eval YAML ← flags; validated, with one clear error for any bad value."""
    args = build_parser().parse_args(argv)
    s = EvalSettings()
    path = Path(resolve_config_path(args.eval_config)) if args.eval_config else DEFAULT_EVAL
    if path.is_file():
        _apply_yaml(s, path)
    if args.config or args.checkpoint:
        s.models = [
            {"config": args.config or s.models[0].get("config"), "checkpoint": args.checkpoint}
        ]
    for name in ("defense", "attack", "layers"):
        v = getattr(args, name)
        if v is not None:
            setattr(s, name, _split(v) if name != "layers" or "," in v else v)
    if args.queries is not None:
        s.queries = [int(q) for q in _split(args.queries)]
    for name in ("n_images", "batch_size", "norm", "eps", "eot", "criterion", "nu", "target_drop",
                 "seed", "n_calibration", "run_dir", "wandb", "accelerator"):  # fmt: skip
        v = getattr(args, name)
        if v is not None:
            setattr(s, name, v)
    if args.nu is not None:
        s.target_drop = None
    if args.devices is not None:
        s.devices = int(args.devices) if args.devices.isdigit() else args.devices
    s.overwrite = s.overwrite or args.overwrite
    s.paper = s.paper or args.paper
    for item in args.attack_param:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--attack-param {item!r}: expected [ATTACK.]KEY=VALUE")
        attack, _, param = key.rpartition(".")
        s.attack_params.setdefault(attack or "*", {})[param] = yaml.safe_load(value)
    validate(s)
    return s


def _apply_yaml(s: EvalSettings, path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    allowed = [f.name for f in fields(EvalSettings)]
    for key, value in data.items():
        if key not in allowed:
            raise UsageError(f"unknown key {key!r} in {path}; allowed keys: {', '.join(allowed)}")
        if key in ("defense", "attack") and isinstance(value, str):
            value = _split(value)
        setattr(s, key, value)


def validate(s: EvalSettings) -> None:
    from rfd.attacks import ATTACKS, CRITERIA

    if s.defense == ["all"]:
        s.defense = list(DEFENSES)
    if s.attack == ["all"]:
        s.attack = list(ATTACKS)
    for d in s.defense:
        if d not in DEFENSES:
            raise UsageError(f"unknown defense {d!r}; valid defenses: {', '.join(DEFENSES)}, all")
    for a in s.attack:
        if a not in ATTACKS:
            raise UsageError(f"unknown attack {a!r}; valid attacks: {', '.join(ATTACKS)}, all")
        if s.norm not in ATTACKS[a].norms:
            raise UsageError(
                f"attack {a!r} does not support norm {s.norm!r}; it supports {', '.join(ATTACKS[a].norms)}"
            )
    if s.eps is not None and not s.eps > 0:
        raise UsageError(f"eps must be > 0 (got {s.eps})")
    if s.criterion not in CRITERIA:
        raise UsageError(f"unknown criterion {s.criterion!r}; valid: {', '.join(CRITERIA)}")
    if s.eot < 1:
        raise UsageError(f"eot must be >= 1 (got {s.eot})")
    if not s.queries or min(s.queries) <= 0:
        raise UsageError(f"queries must be positive integers (got {s.queries})")
    if s.n_images <= 0 or s.batch_size <= 0:
        raise UsageError("n_images and batch_size must be positive")
    if s.nu is not None and s.nu < 0:
        raise UsageError(f"nu must be >= 0 (got {s.nu})")
    if s.nu is None and s.target_drop is not None and not 0 < s.target_drop < 1:
        raise UsageError(f"target_drop must be in (0, 1) (got {s.target_drop})")
    if s.wandb not in ("offline", "online", "disabled"):
        raise UsageError(f"wandb must be offline, online or disabled (got {s.wandb!r})")
    for a, params in s.attack_params.items():
        if a != "*" and a not in ATTACKS:
            raise UsageError(
                f"--attack-param for unknown attack {a!r}; valid: {', '.join(ATTACKS)}"
            )
        if not isinstance(params, dict):
            raise UsageError(f"attack_params[{a!r}] must be a mapping of hyperparameters")
    for m in s.models:
        unknown = set(m) - {"config", "checkpoint", "name"}
        if unknown:
            raise UsageError(
                f"unknown model key(s) {sorted(unknown)}; allowed: config, checkpoint, name"
            )


def spec_of(s: EvalSettings) -> dict[str, Any]:
    d = asdict(s)
    for k in EvalSettings.NON_SEMANTIC:
        d.pop(k)
    return d


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]


# --------------------------------------------------------------------------- models and data


@dataclass
class LoadedModel:
    name: str
    display: str
    model: Any
    datamodule: Any
    checkpoint: Path


def display_name(model_name: str, data_class: str) -> str:
    """Paper-style model names, so tables line up with PAPER.md's."""
    base = model_name.split(".")[0]
    for prefix, shown in (
        ("vgg19", "VGG19"),
        ("resnet50", "ResNet50"),
        ("vit_base", "ViT"),
        ("deit_base", "DeiT"),
    ):
        if base.startswith(prefix):
            return shown
    return f"{base} (FMNIST)" if data_class.endswith("FashionMNISTDataModule") else base


def load_model(entry: dict[str, Any], s: EvalSettings) -> LoadedModel:
    """Build model + data from a training config and its checkpoint (training it if it is the
    embedded default and missing)."""
    import rfd

    cfg_path = Path(resolve_config_path(entry.get("config") or "fmnist_default.yaml"))
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    model_cfg, data_cfg = cfg.get("model", {}), cfg.get("data", {})
    run_name = cfg.get("run_name") or cfg_path.stem
    ckpt = Path(
        entry.get("checkpoint") or Path(cfg.get("run_root", "runs")) / run_name / "best.ckpt"
    )
    if not ckpt.is_file():
        if cfg_path.stem == "fmnist_default" and s.train_if_missing and not entry.get("checkpoint"):
            from rfd.cli import train_main

            print(
                f"{ckpt} is missing: training the embedded default first (configs/fmnist_default.yaml)"
            )
            train_main(["--config", str(cfg_path), "--wandb", "disabled"])
        else:
            raise UsageError(
                f"checkpoint not found: {ckpt} (train it with `python train.py --config {cfg_path.name}` or pass --checkpoint)"
            )
    class_path = data_cfg.get("class_path", "rfd.data.FashionMNISTDataModule")
    if class_path not in DATA_CLASSES:
        raise UsageError(
            f"data class {class_path!r} not supported; allowed: {', '.join(DATA_CLASSES)}"
        )
    module, cls = class_path.rsplit(".", 1)
    dm = getattr(importlib.import_module(module), cls)(**(data_cfg.get("init_args") or {}))
    dm.setup("test")
    kwargs = dict(model_cfg.get("model_kwargs") or {})
    kwargs.pop("pretrained_cfg_overlay", None)
    model = rfd.create_model(
        model_cfg.get("model_name", "test_resnet"), num_classes=int(model_cfg.get("num_classes", 10)),
        in_chans=int(model_cfg.get("in_chans", 3)), img_size=model_cfg.get("img_size"),
        checkpoint=ckpt, **kwargs,
    )  # fmt: skip
    name = entry.get("name") or display_name(model_cfg.get("model_name", "test_resnet"), class_path)
    return LoadedModel(run_name, name, model, dm, ckpt)


def eval_datamodule(dm: Any, n_images: int, seed: int, batch_size: int) -> Any:
    """The evaluation subset as ``test_dataloader`` plus the disjoint ``calibration_dataloader``
    that ``NoiseDefense`` calibrates on."""
    import lightning as L

    class EvalData(L.LightningDataModule):
        def test_dataloader(self):
            return dm.eval_dataloader(n_images, seed=seed, batch_size=batch_size)

        def calibration_dataloader(self, n: int, seed: int = seed):
            return dm.calibration_dataloader(n, seed=seed, batch_size=256, n_eval=n_images)

    return EvalData()


# --------------------------------------------------------------------------- the grid


def run(s: EvalSettings) -> list[dict[str, Any]]:
    """Evaluate every (model, defense, attack) cell; returns one summary per cell."""
    import lightning as L

    from rfd import report
    from rfd.defenses import NoiseDefense
    from rfd.evaluation import RobustnessEvaluation
    from rfd.models import resolve_layer

    spec = spec_of(s)
    models = [load_model(m, s) for m in s.models]
    for lm in models:  # fail on bad layer names before anything is computed
        for layer in [s.layers] if isinstance(s.layers, str) else s.layers:
            if "feature" in s.defense:
                resolve_layer(lm.model, layer)
        if s.n_images % lm.datamodule.num_classes:
            raise UsageError(
                f"n_images={s.n_images} must be a multiple of the {lm.datamodule.num_classes} classes"
            )
    for a in s.attack:  # unknown hyperparameters fail here too
        attack_params(a, s)
    run_dir = Path(
        s.run_dir or Path("runs/eval") / f"{'+'.join(m.name for m in models)}-{spec_hash(spec)}"
    )
    _claim_run_dir(run_dir, spec, s.overwrite)
    logger = _wandb_logger(run_dir, s, spec)
    budget = max(s.queries)
    if any(a == "square" for a in s.attack) and len(s.queries) > 1:
        print(SQUARE_NOTE)
    summaries: list[dict[str, Any]] = []
    curves: dict[str, dict[str, Any]] = {}
    calib_curves: dict[str, list[tuple[float, float]]] = {}
    t_start = time.perf_counter()
    for lm in models:
        data = eval_datamodule(lm.datamodule, s.n_images, s.seed, s.batch_size)
        for defense in s.defense:
            needs_nu = defense in ("input", "feature")
            cb_nu = s.nu if needs_nu else None
            cb = NoiseDefense(**defense_args(defense, s))
            for attack in s.attack:
                cell = f"{lm.name}__{defense}__{attack}"
                params = attack_params(attack, s)
                module = RobustnessEvaluation(
                    lm.model, attack=attack, norm=s.norm, eps=s.eps, max_queries=budget,
                    criterion=s.criterion, eot=s.eot, seed=s.seed, attack_params=params,
                    records_dir=run_dir / "cells" / cell, n_clean_passes=s.n_clean_passes,
                )  # fmt: skip
                trainer = L.Trainer(
                    accelerator=s.accelerator, devices=s.devices, inference_mode=False,
                    logger=False, callbacks=[cb], enable_model_summary=False,
                    enable_progress_bar=sys.stderr.isatty(),
                )  # fmt: skip
                print(
                    f"[{lm.display}] defense={defense} attack={attack} ({s.n_images} images, {budget} queries)"
                )
                trainer.test(module, datamodule=data, verbose=False)
                if not trainer.is_global_zero:
                    continue
                rows = module.existing_records() or module.records
                summary = report.summarize(rows, s.queries)
                eps = s.eps
                if eps is None:
                    from rfd.attacks import default_eps

                    x0 = lm.datamodule.test_set[0][0]
                    eps = default_eps(int(x0.shape[-1]), s.norm)
                calib = cb.calibration
                summary.update(
                    model=lm.display, defense=defense, attack=attack, norm=s.norm, eps=eps,
                    criterion=s.criterion, eot=s.eot, max_queries=budget, paper=s.paper,
                    nu=(calib.nu if calib else cb_nu), layers=s.layers if defense == "feature" else None,
                    calibration=(
                        {"target_drop": calib.target_drop, "drop": calib.drop, "drop_std": calib.drop_std,
                         "clean_acc": calib.clean_acc} if calib else None
                    ),
                    attack_params=params,
                )  # fmt: skip
                summaries.append(summary)
                curves.setdefault(f"{lm.display} {attack}", {})[defense] = report.robust_curve(
                    rows, budget
                )
                if calib:
                    pts = [(nu, calib.clean_acc - drop) for nu, drop in calib.history]
                    calib_curves[f"{lm.display} {defense}"] = pts
    if not summaries:
        return summaries
    wall = time.perf_counter() - t_start
    paths = report.write_summary_files(run_dir, summaries)
    plot_q = report.plot_robust_vs_queries(curves, run_dir / "robust_vs_queries.png")
    plot_nu = (
        report.plot_clean_vs_nu(calib_curves, run_dir / "clean_vs_nu.png") if calib_curves else None
    )
    header, rows = report.paper_table(summaries, with_paper=s.paper)
    report.print_table(
        header, rows, title=f"robust accuracy (%), {s.n_images} images, criterion {s.criterion}"
    )
    _print_extra(summaries)
    if logger is not None:
        logger.log_table("results", columns=header, data=rows)
        logger.log_image("robust_vs_queries", images=[str(plot_q)])
        if plot_nu:
            logger.log_image("clean_vs_nu", images=[str(plot_nu)])
        logger.experiment.finish()
    (run_dir / "timing.json").write_text(json.dumps({"wall_seconds": round(wall, 1)}))
    print(
        f"results: {paths['markdown']} {paths['json']} {paths['csv']} | plots: {plot_q}"
        + (f" {plot_nu}" if plot_nu else "")
    )
    if logger is not None:
        print(
            f"W&B run ({s.wandb}): {run_dir / 'wandb'}"
            + (
                "  (upload: wandb sync " + str(run_dir / "wandb") + "/offline-run-*)"
                if s.wandb == "offline"
                else ""
            )
        )
    return summaries


def _yaml(path: Path) -> dict[str, Any]:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def attack_params(attack: str, s: EvalSettings) -> dict[str, Any]:
    """configs/attack/<attack>.yaml[norm] ← attack_params['*'] ← attack_params[attack].

    A ``*`` override applies to the attacks that take that hyperparameter; a named one must fit.
    """
    import inspect

    from rfd.attacks import ATTACKS

    accepted = inspect.signature(ATTACKS[attack].__init__).parameters
    params = dict(_yaml(CONFIG_DIR / "attack" / f"{attack}.yaml").get(s.norm) or {})
    params.update({k: v for k, v in s.attack_params.get("*", {}).items() if k in accepted})
    for k, v in s.attack_params.get(attack, {}).items():
        if k not in accepted:
            valid = ", ".join(p for p in accepted if p not in ("self", "norm"))
            raise UsageError(f"attack {attack!r} has no hyperparameter {k!r}; valid: {valid}")
        params[k] = v
    return params


def defense_args(defense: str, s: EvalSettings) -> dict[str, Any]:
    """NoiseDefense arguments: configs/defense/<defense>.yaml's init_args ← the eval settings."""
    args = dict(_yaml(CONFIG_DIR / "defense" / f"{defense}.yaml").get("init_args") or {})
    args.update(
        defense=defense, seed=s.seed, n_calibration=s.n_calibration, calibration_seed=s.seed
    )
    if defense == "feature":
        args["layers"] = s.layers
    if defense in ("input", "feature"):
        args["nu"] = s.nu
        args["target_drop"] = s.target_drop if s.nu is None else None
    return args


def _claim_run_dir(run_dir: Path, spec: dict[str, Any], overwrite: bool) -> None:
    spec_file = run_dir / "spec.json"
    if spec_file.exists():
        old = json.loads(spec_file.read_text())
        if old != json.loads(json.dumps(spec, default=str)):
            if not overwrite:
                diff = sorted(
                    k
                    for k in set(old) | set(spec)
                    if old.get(k) != json.loads(json.dumps(spec.get(k), default=str))
                )
                raise UsageError(
                    f"{run_dir} holds results of other settings (differ in: {', '.join(diff)}); use another --run-dir or --overwrite"
                )
            shutil.rmtree(run_dir / "cells", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2, default=str))


def _wandb_logger(run_dir: Path, s: EvalSettings, spec: dict[str, Any]) -> Any:
    if s.wandb == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        project="rfd", name=run_dir.name, save_dir=str(run_dir), offline=s.wandb == "offline"
    )
    logger.log_hyperparams(spec)
    return logger


def _print_extra(summaries: list[dict[str, Any]]) -> None:
    from rfd.report import pct

    print(
        "cell details: failure rate | mean/median queries of successes | verification queries | ν"
    )
    for x in summaries:
        nu = f"{x['nu']:.4g}" if isinstance(x.get("nu"), float) else "—"
        print(
            f"  {x['model']:>18} {x['defense']:>8} {x['attack']:>10}: fail {pct(x['failure_rate'])}% | "
            f"q {x['mean_queries_success']:.0f}/{x['median_queries_success']:.0f} | "
            f"verify {x['verify_queries']} | ν {nu} | clean {pct(x['clean_acc'])}% → defended {pct(x['defended_clean_acc'])}%"
        )


def evaluate_main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    return run(load_settings(list(sys.argv[1:] if argv is None else argv)))
