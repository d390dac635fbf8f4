"""Training: configs build, a training step runs, AT / Gaussian augmentation change the loss,
and a train -> save -> load round trip reproduces test accuracy exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch

import rfd
from rfd.classifier import ClassifierModule, pgd_linf
from rfd.cli import CONFIG_DIR, UsageError, make_train_cli, run_cli, train_main
from rfd.data import CIFAR10DataModule, FashionMNISTDataModule

TRAIN_CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.yaml") if p.name != "eval.yaml")


def test_the_four_paper_configs_exist() -> None:
    for name in ("vgg19", "resnet50", "vit", "deit"):
        assert f"cifar10_{name}.yaml" in TRAIN_CONFIGS
    assert "fmnist_default.yaml" in TRAIN_CONFIGS


@pytest.mark.parametrize("config", TRAIN_CONFIGS)
def test_every_config_parses_and_builds(config: str, tmp_path: Path) -> None:
    import yaml

    part = "class_path" in (yaml.safe_load((CONFIG_DIR / config).read_text())["model"])
    cli = make_train_cli(
        [
            "--config",
            config,
            *([] if part else ["--model.pretrained", "false"]),  # parts have no hub weights
            "--wandb",
            "disabled",
            "--run_root",
            str(tmp_path),
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32",
        ]
    )
    assert isinstance(cli.datamodule, (CIFAR10DataModule, FashionMNISTDataModule))
    assert isinstance(cli.trainer, L.Trainer)
    if not isinstance(cli.model, ClassifierModule):  # a defense's part (autoencoder, GAN)
        assert isinstance(cli.model, L.LightningModule) and hasattr(cli.model, "monitor")
        return
    size = cli.model.hparams.img_size or 28
    x = torch.rand(1, cli.model.hparams.in_chans, size, size)
    with torch.no_grad():
        assert cli.model.eval()(x).shape == (1, 10)


def test_bare_config_name_and_cli_override(tmp_path: Path) -> None:
    cli = make_train_cli(
        [
            "--config",
            "fmnist_default",
            "--model.lr",
            "0.5",
            "--wandb",
            "disabled",
            "--run_root",
            str(tmp_path),
        ]
    )
    assert cli.model.hparams.lr == 0.5
    with pytest.raises(UsageError, match="available in configs/"):
        make_train_cli(["--config", "no_such_config.yaml"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trainer.max_epochs", "abc"], "error: trainer.max_epochs: expected int (got 'abc')"),
        (["--model.lr", "abc"], "error: model.lr: expected float (got 'abc')"),
        (["--model.adv_training", "trades"], "expected one of 'none', 'pgd', 'fast'"),
        (["--data.init_args.bogus", "1"], "Option 'bogus' is not accepted"),
        (["--wandb", "nope"], "invalid choice: 'nope'"),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--model.gaussian_sigma", "-1"], "error: gaussian_sigma and adv_eps must be >= 0"),
        (["--model.lr", "-1"], "error: lr must be a finite number > 0 (got -1.0)"),
        (["--model.label_smoothing", "1.5"], "error: label_smoothing must be in [0, 1)"),
        (["--data.batch_size", "0"], "error: batch_size must be an integer >= 1 (got 0)"),
        (["--data.channels", "2"], "error: channels must be 1 or 3 (got 2)"),
        (["--trainer.devices", "0"], "error: trainer.devices must be a positive integer or auto"),
        (["--trainer.devices", "999"], "but this machine allows at most"),
    ],
)
def test_bad_training_flags_are_one_line_exit_2(flags, message, tmp_path: Path, capsys) -> None:
    argv = ["--config", "fmnist_default", "--run_root", str(tmp_path), "--wandb", "disabled"]
    assert run_cli(train_main, [*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


def test_fast_dev_run_training_step(fmnist_dm: FashionMNISTDataModule) -> None:
    module = ClassifierModule(model_name="test_resnet", in_chans=1)
    trainer = L.Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False)
    before = module.model.net.fc.weight.detach().clone()
    trainer.fit(module, datamodule=fmnist_dm)
    assert not torch.equal(before, module.model.net.fc.weight)


def test_round_trip_reproduces_test_accuracy_exactly(trained_fmnist) -> None:
    """The checkpoint loaded by rfd.create_model gives the accuracy the Trainer measured."""
    dm = trained_fmnist.datamodule
    correct = 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            correct += (trained_fmnist.model(x).argmax(-1) == y).sum().item()
    assert correct / len(dm.test_set) == pytest.approx(trained_fmnist.test_acc, abs=1e-6)
    assert trained_fmnist.test_acc > 0.7  # it learned something: 2 short epochs on 20k images


def _batch(dm: FashionMNISTDataModule, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(dm.test_set[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys)


def test_pgd_stays_in_ball_and_raises_the_loss(trained_fmnist) -> None:
    x, y = _batch(trained_fmnist.datamodule)
    model = trained_fmnist.model
    adv = pgd_linf(model, x, y, eps=0.1, alpha=0.025, steps=5)
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert ce(model(adv), y) > ce(model(x), y) + 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(adv_training="pgd", adv_eps=0.1, adv_steps=3),
        dict(adv_training="fast", adv_eps=0.1),
        dict(gaussian_sigma=0.3),
    ],
)
def test_robust_training_modes_change_the_loss(trained_fmnist, kwargs: dict) -> None:
    x, y = _batch(trained_fmnist.datamodule)
    clean = ClassifierModule(model_name="test_resnet", in_chans=1)
    robust = ClassifierModule(model_name="test_resnet", in_chans=1, **kwargs)
    for m in (clean, robust):
        m.model.load_state_dict(trained_fmnist.model.state_dict())
        m.model.eval()  # fixed BatchNorm statistics so the two losses are comparable
    torch.manual_seed(0)
    loss_clean = clean.training_step((x, y), 0)
    loss_robust = robust.training_step((x, y), 0)
    assert loss_robust > loss_clean + 0.05
    loss_robust.backward()
    assert robust.model.net.fc.weight.grad is not None


def test_bad_training_options() -> None:
    with pytest.raises(ValueError, match="allowed: none, pgd, fast, free"):
        ClassifierModule(adv_training="trades")
    for bad in ({"free_replays": 0}, {"robust_val_steps": -1}, {"early_stop_patience": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ClassifierModule(**bad)


def _robust_acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    model.eval()
    x_adv = pgd_linf(model, x, y, eps, 2.5 * eps / 10, 10)
    with torch.no_grad():
        return float((model(x_adv).argmax(-1) == y).float().mean())


@pytest.mark.slow
def test_free_at_raises_robust_accuracy_over_standard_training(fmnist_dm, one_thread) -> None:
    """The same tiny run (3000 images, 2 epochs) with and without Free-AT (m=4, eps 0.1): PGD-10
    robust accuracy at eps 0.1 on 200 test images. best.ckpt follows val/robust_acc under AT."""
    from torch.utils.data import DataLoader, Subset

    train = DataLoader(Subset(fmnist_dm.train_set, range(3000)), batch_size=100, shuffle=True)
    pairs = [fmnist_dm.test_set[i] for i in range(200)]
    x, y = torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
    acc = {}
    for mode in ("none", "free"):
        L.seed_everything(0, verbose=False)
        m = ClassifierModule(model_name="test_resnet", in_chans=1, lr=3e-3, adv_training=mode,
                             adv_eps=0.1, free_replays=4)  # fmt: skip
        assert m.automatic_optimization == (mode != "free")
        L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(m, train)  # fmt: skip
        acc[mode] = _robust_acc(m.model, x, y, 0.1)
    assert acc["free"] > acc["none"] + 0.2, acc


def test_robust_validation_selects_the_checkpoint_and_can_stop_early() -> None:
    m = ClassifierModule(adv_training="pgd", robust_val_steps=5, early_stop_patience=2)
    assert m.monitor == ("val/robust_acc", "max")
    (stop,) = m.configure_callbacks()
    assert stop.monitor == "val/robust_acc" and stop.patience == 2
    assert (
        ClassifierModule().monitor == ("val/acc", "max")
        and not ClassifierModule().configure_callbacks()
    )


def test_train_cli_end_to_end_writes_run_and_refuses_overwrite(tmp_path: Path, capsys) -> None:
    args = [
        "--config",
        "fmnist_default",
        "--trainer.max_epochs",
        "1",
        "--wandb",
        "offline",
        "--data.init_args.train_subset",
        "512",
        "--run_root",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.limit_test_batches",
        "2",
    ]
    result = train_main(args)
    run = tmp_path / "fmnist_default"
    for f in ("best.ckpt", "last.ckpt", "config.yaml", "result.json", "csv/metrics.csv"):
        assert (run / f).is_file(), f
    assert list((run / "wandb").glob("offline-run-*")), "offline W&B run written"
    assert json.loads((run / "result.json").read_text())["test_acc"] == result["test_acc"]
    assert "model_name: test_resnet" in (run / "config.yaml").read_text()
    model = rfd.create_model("test_resnet", 10, in_chans=1, checkpoint=run / "best.ckpt")
    assert model(torch.rand(1, 1, 28, 28)).shape == (1, 10)
    before = (run / "best.ckpt").read_bytes()
    with pytest.raises(UsageError, match="holds a finished run"):
        train_main(args)
    assert (run / "best.ckpt").read_bytes() == before


def test_train_refuses_a_gpu_it_does_not_have_and_a_file_as_run_root(tmp_path: Path, capsys):
    argv = ["--config", "fmnist_default", "--wandb", "disabled"]
    if not torch.cuda.is_available():
        flags = [*argv, "--run_root", str(tmp_path), "--trainer.accelerator", "gpu"]
        assert run_cli(train_main, flags) == 2
        assert "this machine has no CUDA GPU" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert run_cli(train_main, [*argv, "--run_root", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and err.count("\n") == 1
    assert afile.read_text() == "x"


def _tiny_train_args(run_root: Path) -> list[str]:
    """A training command that fits 2 batches of 256 images and tests 1: about a second."""
    return [
        "--config", "fmnist_default", "--run_root", str(run_root), "--wandb", "disabled",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--data.init_args.train_subset", "256", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_unfinished_run_resumes_only_under_its_own_settings(tmp_path: Path, capsys) -> None:
    """A run stopped after its last checkpoint, rerun with another optimizer or lr, is refused
    before anything is written (it used to resume: mixed settings, or KeyError 'momentum' with
    config.yaml already rewritten); where and how it logs may change, and then it resumes."""
    args = _tiny_train_args(tmp_path)
    assert run_cli(train_main, [*args, "--test_after_fit", "false"]) == 0
    run = tmp_path / "fmnist_default"
    (run / "result.json").unlink()  # unfinished: as if SIGTERM came after the last checkpoint
    files = ("config.yaml", "last.ckpt", "best.ckpt")
    before = {f: (run / f).read_bytes() for f in files}
    capsys.readouterr()
    assert run_cli(train_main, [*args, "--model.optimizer", "sgd", "--model.lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "model.lr: 0.003 -> 0.05; model.optimizer: adamw -> sgd" in err
    assert "--run_name NEW or --overwrite true" in err
    assert run_cli(train_main, [*args, "--model.lr", "0.05"]) == 2  # a changed lr alone too
    assert "(model.lr: 0.003 -> 0.05)" in capsys.readouterr().err
    assert {f: (run / f).read_bytes() for f in files} == before  # nothing rewritten
    logging_only = ["--run_root", str(tmp_path / "."), "--wandb_project", "other",
                    "--trainer.log_every_n_steps", "1", "--trainer.limit_test_batches", "2",
                    "--test_after_fit", "true"]  # fmt: skip
    assert run_cli(train_main, [*args, *logging_only]) == 0
    assert "resuming unfinished run" in capsys.readouterr().out
    assert (run / "result.json").is_file() and "wandb_project: other" in (
        run / "config.yaml"
    ).read_text()


def test_refusing_a_finished_run_prints_only_the_error_line(tmp_path: Path) -> None:
    """The refusal comes before the Trainer exists, so Lightning's banner and tips ("GPU
    available: ...", "TPU available: ...", "Tip: ...") do not precede it on stderr."""
    import subprocess
    import sys

    from rfd.settings import REPO_ROOT

    run = tmp_path / "fmnist_default"
    run.mkdir()
    (run / "result.json").write_text("{}")
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), "--config", "fmnist_default",
           "--run_root", str(tmp_path), "--wandb", "disabled"]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "holds a finished run" in done.stderr and done.stdout == ""
    assert sorted(p.name for p in run.iterdir()) == ["result.json"]  # nothing written


def test_a_resumed_run_keeps_the_metrics_it_logged_before(tmp_path: Path) -> None:
    """Lightning's CSV writer deletes an existing metrics.csv; the loggers of a resumed run move
    it aside first, so no epoch's metrics are lost."""
    from rfd.cli import make_loggers

    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.parent.mkdir()
    for n in (1, 2):
        metrics.write_text(f"epoch,val_acc\n{n},0.5\n")
        (logger,) = make_loggers(tmp_path, "disabled", "p", "n")
        logger.log_metrics({"val_acc": 0.9}, step=0)
        logger.save()
        assert (tmp_path / "csv" / f"metrics.before-resume{n}.csv").read_text() == (
            f"epoch,val_acc\n{n},0.5\n"
        )
    assert "0.9" in metrics.read_text()
