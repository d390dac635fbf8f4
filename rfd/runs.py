"""The one loader of a trained model and its data, for evaluate, analysis and benchmarks.

A training run lives in ``<run_root>/<run_name>/`` (written by train.py: ``config.yaml``,
``best.ckpt``, ...). :func:`load_run` finds the model and its data module from a training config,
a checkpoint, or both, and turns every problem with them (missing or corrupt checkpoint, a config
that is not a mapping, an unsupported data class, weights that do not fit the model) into one
:class:`rfd.settings.UsageError` line.

    run = load_run("cifar10_vit.yaml")                  # runs/cifar10_vit/best.ckpt
    run = load_run(checkpoint="runs/x/best.ckpt")       # runs/x/config.yaml, else its hparams
    run = load_run(train_if_missing=True)               # the embedded default, trained if needed
    run.model, run.datamodule, run.display
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from rfd.classifier import ClassifierModule
from rfd.data import CIFAR10DataModule, FashionMNISTDataModule
from rfd.models import ImageClassifier, checkpoint_hparams, create_model
from rfd.settings import (
    CONFIG_DIR,
    REPO_ROOT,
    UsageError,
    first_line,
    read_yaml_mapping,
    resolve_config_args,
    resolve_config_path,
)

__all__ = [
    "CONFIG_DIR",
    "DATA_CLASSES",
    "DEFAULT_CONFIG",
    "REPO_ROOT",
    "LoadedRun",
    "display_name",
    "load_run",
    "resolve_config_args",
    "resolve_config_path",
]

DEFAULT_CONFIG = CONFIG_DIR / "fmnist_default.yaml"
FMNIST = "rfd.data.FashionMNISTDataModule"
DATA_CLASSES: dict[str, type[L.LightningDataModule]] = {
    FMNIST: FashionMNISTDataModule,
    "rfd.data.CIFAR10DataModule": CIFAR10DataModule,
}
_MODEL_DEFAULTS = {
    k: p.default for k, p in inspect.signature(ClassifierModule.__init__).parameters.items()
}


@dataclass
class LoadedRun:
    """A trained model with its data.

    Attributes:
        name: the run name (``run_name`` of the config, else its run folder or config name).
        display: the paper-style model name for tables (:func:`display_name`).
        model: the classifier in eval mode, weights loaded with ``weights_only=True``.
        datamodule: its data module, set up (evaluation: no augmentation).
        checkpoint: the weights file.
        config: the training config as data (built from the checkpoint's hyperparameters when
            there is no config file).
        config_path: the training config file, ``None`` when built from the hyperparameters.
    """

    name: str
    display: str
    model: ImageClassifier
    datamodule: L.LightningDataModule
    checkpoint: Path
    config: dict[str, Any]
    config_path: Path | None


def display_name(model_name: str, data_class: str) -> str:
    """Paper-style model names, so tables line up with the paper's."""
    base = model_name.split(".")[0]
    for prefix, shown in (
        ("vgg19", "VGG19"),
        ("resnet50", "ResNet50"),
        ("vit_base", "ViT"),
        ("deit_base", "DeiT"),
    ):
        if base.startswith(prefix):
            return shown
    return f"{base} (FMNIST)" if data_class == FMNIST else base


def load_run(
    config: str | Path | None = None,
    checkpoint: str | Path | None = None,
    *,
    train_if_missing: bool = False,
    stage: str | None = "test",
) -> LoadedRun:
    """Load a trained model and its data module.

    Args:
        config: a training config (bare names resolve under configs/); its checkpoint defaults
            to ``<run_root>/<run_name>/best.ckpt``.
        checkpoint: the weights. Given alone, the model and data come from the ``config.yaml``
            beside it (train.py writes one), else from its stored hyperparameters with
            Fashion-MNIST data.
        train_if_missing: with neither given (the embedded default, ``fmnist_default.yaml``) and
            its checkpoint missing, train it first instead of failing.
        stage: passed to ``datamodule.setup``.

    Raises:
        UsageError: missing/corrupt checkpoint, unreadable config, unsupported data class,
            unknown model, weights that do not fit; one line.
        rfd.data.DataMissingError: the data set is not installed (the message says how).
    """
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if config is None and ckpt is not None:
        if not ckpt.is_file():
            raise UsageError(f"checkpoint not found: {ckpt}")
        beside = ckpt.parent / "config.yaml"
        if beside.is_file():
            cfg_path, cfg = beside, read_yaml_mapping(beside, "training config")
        else:
            cfg_path, cfg = None, {"model": _hparams(ckpt), "data": {"class_path": FMNIST}}
        name = _string(cfg, "run_name", cfg_path) or ckpt.parent.name
    else:
        cfg_path = Path(resolve_config_path(config if config is not None else DEFAULT_CONFIG))
        cfg = read_yaml_mapping(cfg_path, "training config")
        name = _string(cfg, "run_name", cfg_path) or cfg_path.stem
        if ckpt is None:
            ckpt = Path(_string(cfg, "run_root", cfg_path) or "runs") / name / "best.ckpt"
            if not ckpt.is_file() and train_if_missing and _is_default(cfg_path):
                _train(cfg_path)
        if not ckpt.is_file():
            raise UsageError(
                f"checkpoint not found: {ckpt} (train it with `python train.py --config "
                f"{cfg_path.name}` or pass --checkpoint)"
            )
    where = str(cfg_path or ckpt)
    model_cfg = _section(cfg, "model", where)
    data_cfg = _section(cfg, "data", where)
    model = _model(model_cfg, ckpt, where)
    class_path = data_cfg.get("class_path", FMNIST)
    dm = _datamodule(class_path, _section(data_cfg, "init_args", where), where)
    dm.setup(stage)
    display = display_name(str(model_cfg["model_name"]), class_path)
    return LoadedRun(name, display, model, dm, ckpt, cfg, cfg_path)


def _is_default(cfg_path: Path) -> bool:
    return cfg_path.resolve() == DEFAULT_CONFIG.resolve()


def _train(cfg_path: Path) -> None:
    from rfd.cli import train_main

    print(f"the embedded default is not trained yet: training it first ({cfg_path.name})")
    train_main(["--config", str(cfg_path), "--wandb", "disabled"])


def _string(cfg: Mapping[str, Any], key: str, where: Path | None) -> str | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{key} in {where} must be a string (got {value!r})")
    return value


def _section(cfg: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{key} in {where} must be a mapping (got {value!r})")
    return dict(value)


def _hparams(ckpt: Path) -> dict[str, Any]:
    try:
        hp = checkpoint_hparams(ckpt)
    except Exception as e:  # torch.load's pickle/zip errors on a file that is no checkpoint
        raise UsageError(f"corrupt or unreadable checkpoint {ckpt} ({type(e).__name__})") from None
    if not hp.get("model_name"):
        raise UsageError(
            f"{ckpt} stores no model hyperparameters and has no config.yaml beside it: pass "
            "--config (the training config of this model)"
        )
    return hp


def _model(model_cfg: dict[str, Any], ckpt: Path, where: str) -> ImageClassifier:
    """The ``model:`` section (ClassifierModule's arguments) built with the checkpoint's weights."""
    name = model_cfg.get("model_name")
    if not isinstance(name, str):
        raise UsageError(f"model.model_name in {where} must name a timm model (got {name!r})")
    arg = {k: model_cfg.get(k, _MODEL_DEFAULTS[k]) for k in ("num_classes", "in_chans", "img_size")}
    kwargs = _section(model_cfg, "model_kwargs", where)
    kwargs.pop("pretrained_cfg_overlay", None)  # local pretrained weights: replaced by ckpt
    try:
        return create_model(name, checkpoint=ckpt, **arg, **kwargs)
    except (ValueError, TypeError) as e:  # unknown model, bad kwargs, corrupt or unfit weights
        raise UsageError(first_line(e)) from None


def _datamodule(class_path: Any, init_args: dict[str, Any], where: str) -> L.LightningDataModule:
    """The data module for evaluation: augmentation off where the class has it."""
    if not isinstance(class_path, str) or class_path not in DATA_CLASSES:
        raise UsageError(
            f"data class {class_path!r} in {where} is not supported; allowed: "
            f"{', '.join(DATA_CLASSES)}"
        )
    cls = DATA_CLASSES[class_path]
    if "augment" in inspect.signature(cls.__init__).parameters:
        init_args["augment"] = False
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as e:  # an init_arg the class does not take, or refuses
        raise UsageError(f"data.init_args in {where}: {first_line(e)}") from None
