"""rfd.runs.load_run: the one loader of model + data, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rfd.cli
from rfd.classifier import ClassifierModule
from rfd.data import FashionMNISTDataModule
from rfd.runs import DEFAULT_CONFIG, LoadedRun, display_name, load_run
from rfd.settings import UsageError

TINY = {"model_name": "test_resnet", "num_classes": 10, "in_chans": 1}


@pytest.fixture(scope="module")
def module() -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(**TINY)


def save_checkpoint(module: ClassifierModule, path: Path, hparams: bool = True) -> Path:
    """A checkpoint in Lightning's layout ("model." keys, the module's hyperparameters)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model." + k: v for k, v in module.model.state_dict().items()}
    obj = {"state_dict": state, "hyper_parameters": dict(module.hparams)} if hparams else state
    torch.save(obj, path)
    return path


def write_config(path: Path, text: str = "") -> Path:
    path.write_text(
        "model: {model_name: test_resnet, num_classes: 10, in_chans: 1}\n"
        "data: {class_path: rfd.data.FashionMNISTDataModule, init_args: {batch_size: 64, augment: true}}\n"
        + text
    )
    return path


def assert_same_weights(run: LoadedRun, module: ClassifierModule) -> None:
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(run.model(x), module.model.eval()(x))
    assert not run.model.training


def test_config_finds_its_run_folder_checkpoint(tmp_path: Path, module: ClassifierModule):
    cfg = write_config(tmp_path / "tiny.yaml", f"run_root: {tmp_path / 'runs'}\nrun_name: mine\n")
    ckpt = save_checkpoint(module, tmp_path / "runs" / "mine" / "best.ckpt")
    run = load_run(str(cfg))
    assert (run.name, run.display, run.checkpoint, run.config_path) == (
        "mine", "test_resnet (FMNIST)", ckpt, cfg,
    )  # fmt: skip
    assert run.config["run_name"] == "mine" and run.config["model"]["in_chans"] == 1
    assert isinstance(run.datamodule, FashionMNISTDataModule)
    assert run.datamodule.augment is False  # evaluation never augments
    assert run.datamodule.batch_size == 64 and len(run.datamodule.test_set) == 10000
    assert_same_weights(run, module)


def test_config_with_an_explicit_checkpoint(tmp_path: Path, module: ClassifierModule):
    cfg = write_config(tmp_path / "tiny.yaml")  # no run_name: the config's name
    ckpt = save_checkpoint(module, tmp_path / "elsewhere.ckpt")
    run = load_run(cfg, ckpt)
    assert run.name == "tiny" and run.checkpoint == ckpt
    assert_same_weights(run, module)


def test_checkpoint_uses_the_config_yaml_beside_it(tmp_path: Path, module: ClassifierModule):
    folder = tmp_path / "run_x"
    ckpt = save_checkpoint(module, folder / "best.ckpt", hparams=False)  # plain state_dict
    write_config(folder / "config.yaml", "run_name: null\n")
    run = load_run(checkpoint=ckpt)
    assert run.config_path == folder / "config.yaml" and run.name == "run_x"
    assert_same_weights(run, module)


def test_checkpoint_alone_uses_its_hyperparameters(trained_fmnist):
    ckpt = trained_fmnist.checkpoint  # a real Lightning checkpoint, no config.yaml beside it
    assert not (ckpt.parent / "config.yaml").exists()
    run = load_run(checkpoint=str(ckpt))
    assert run.config_path is None and run.config["model"]["model_name"] == "test_resnet"
    assert run.config["data"]["class_path"] == "rfd.data.FashionMNISTDataModule"
    x = torch.stack([trained_fmnist.datamodule.test_set[i][0] for i in range(8)])
    with torch.no_grad():
        assert torch.equal(run.model(x), trained_fmnist.model(x))


def _one_line(match: str, **kwargs) -> str:
    with pytest.raises(UsageError, match=match) as e:
        load_run(**kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_checkpoint_says_how_to_make_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = write_config(tmp_path / "tiny.yaml", "run_name: gone\n")
    monkeypatch.chdir(tmp_path)
    msg = _one_line("checkpoint not found", config=str(cfg))
    assert msg == (
        f"checkpoint not found: {Path('runs/gone/best.ckpt')} (train it with `python train.py "
        "--config tiny.yaml` or pass --checkpoint)"
    )
    _one_line("checkpoint not found: nope.ckpt", checkpoint="nope.ckpt")
    # the embedded default is not trained behind the caller's back
    msg = _one_line("checkpoint not found", config=None)
    assert "python train.py --config fmnist_default.yaml" in msg


def test_embedded_default_is_trained_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: ClassifierModule, capsys
):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_train(argv):
        calls.append(argv)
        save_checkpoint(module, Path("runs/fmnist_default/best.ckpt"))

    monkeypatch.setattr(rfd.cli, "train_main", fake_train)
    run = load_run(train_if_missing=True)
    assert calls == [["--config", str(DEFAULT_CONFIG), "--wandb", "disabled"]]
    assert "training it first" in capsys.readouterr().out
    assert run.name == "fmnist_default" and run.config_path == DEFAULT_CONFIG
    load_run(train_if_missing=True)
    assert len(calls) == 1  # trained once


def test_corrupt_checkpoint_is_one_line(tmp_path: Path):
    bad = tmp_path / "run" / "best.ckpt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint\n" * 10)
    _one_line("corrupt or unreadable checkpoint", checkpoint=bad)  # through its hyperparameters
    cfg = write_config(tmp_path / "tiny.yaml")
    _one_line("corrupt or unreadable checkpoint", config=cfg, checkpoint=bad)  # through the weights


def test_weights_that_do_not_fit_the_model(tmp_path: Path, module: ClassifierModule):
    ckpt = save_checkpoint(module, tmp_path / "w.ckpt")
    cfg = tmp_path / "five.yaml"
    cfg.write_text("model: {model_name: test_resnet, num_classes: 5, in_chans: 1}\n")
    _one_line("does not match the model", config=cfg, checkpoint=ckpt)


def test_plain_state_dict_needs_a_config(tmp_path: Path, module: ClassifierModule):
    ckpt = save_checkpoint(module, tmp_path / "run" / "w.pt", hparams=False)
    _one_line("stores no model hyperparameters.*pass --config", checkpoint=ckpt)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "must hold a mapping of training config"),
        ("model: [1]\n", "model in .* must be a mapping"),
        ("model: {num_classes: 10}\n", "model.model_name in .* must name a timm model"),
        ("model: {model_name: no_such_net}\n", "unknown timm model 'no_such_net'"),
        ("model: {model_name: test_resnet, in_chans: 1}\ndata: {class_path: os.system}\n",
         "data class 'os.system' in .* is not supported; allowed: rfd.data.FashionMNISTDataModule"),
        ("model: {model_name: test_resnet, in_chans: 1}\ndata: {init_args: {bogus: 1}}\n",
         "data.init_args in .*bogus"),
        ("model: {model_name: test_resnet}\nrun_name: [x]\n", "run_name in .* must be a string"),
        ("model: {model_name: test_resnet\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_configs_are_one_line(tmp_path: Path, module, text: str, match: str):
    ckpt = save_checkpoint(module, tmp_path / "w.ckpt")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    _one_line(match, config=cfg, checkpoint=ckpt)


def test_unknown_config_name_lists_the_configs():
    _one_line("not found; available in configs/: .*fmnist_default.yaml", config="no_such")


def test_display_names_follow_the_paper():
    cifar = "rfd.data.CIFAR10DataModule"
    assert display_name("vgg19.tv_in1k", cifar) == "VGG19"
    assert display_name("resnet50.a1_in1k", cifar) == "ResNet50"
    assert display_name("vit_base_patch16_224.augreg2_in21k_ft_in1k", cifar) == "ViT"
    assert display_name("deit_base_patch16_224.fb_in1k", cifar) == "DeiT"
    assert display_name("test_resnet", "rfd.data.FashionMNISTDataModule") == "test_resnet (FMNIST)"
    assert display_name("resnet18", cifar) == "resnet18"
