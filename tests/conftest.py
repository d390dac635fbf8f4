"""Shared fixtures: a Fashion-MNIST model trained once per session through the real training path."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# a private calibration cache: tests neither read the user's (entries of other versions, other
# models) nor leave theirs behind; child processes (the CLI tests) inherit it
os.environ["RFD_CACHE_DIR"] = tempfile.mkdtemp(prefix="rfd-test-cache-")
atexit.register(shutil.rmtree, os.environ["RFD_CACHE_DIR"], True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "OMP_NUM_THREADS" not in os.environ:  # 2 cores on CI; respect an explicit setting
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from rfd.classifier import ClassifierModule  # noqa: E402
from rfd.data import FashionMNISTDataModule, default_fmnist_dir  # noqa: E402
from rfd.models import ImageClassifier, create_model  # noqa: E402

FMNIST_DIR = default_fmnist_dir()
HAS_FMNIST = any((FMNIST_DIR / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz"))


@pytest.fixture()
def one_thread():
    """One torch thread for the duration of a test: attack tests push batches of a few images
    through tiny models, where fanning out to threads costs more than it saves."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class TrainedModel:
    """A trained default-architecture model with its checkpoint and data."""

    model: ImageClassifier
    checkpoint: Path
    datamodule: FashionMNISTDataModule
    test_acc: float


@pytest.fixture(scope="session")
def fmnist_dm() -> FashionMNISTDataModule:
    if not HAS_FMNIST:
        pytest.fail(f"Fashion-MNIST is missing from {FMNIST_DIR}: run `make data`")
    dm = FashionMNISTDataModule(batch_size=256, train_subset=20000, num_workers=0)
    dm.setup()
    return dm


@pytest.fixture(scope="session")
def trained_fmnist(
    fmnist_dm: FashionMNISTDataModule, tmp_path_factory: pytest.TempPathFactory
) -> TrainedModel:
    """The fmnist_default architecture, trained 2 epochs on 20k images (~85% test accuracy).

    Trained through ClassifierModule + Trainer + ModelCheckpoint and loaded back with
    rfd.create_model(checkpoint=...), so every test using it also exercises that round trip.
    """
    L.seed_everything(0, verbose=False)
    out = tmp_path_factory.mktemp("fmnist_model")
    module = ClassifierModule(model_name="test_resnet", in_chans=1, lr=3e-3, warmup_epochs=0.2)
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=out, filename="best", monitor="val/acc", mode="max"
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        callbacks=[ckpt_cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=4,
    )
    trainer.fit(module, datamodule=fmnist_dm)
    ckpt = out / "best.ckpt"
    model = create_model("test_resnet", num_classes=10, in_chans=1, checkpoint=ckpt)
    acc = trainer.test(module, datamodule=fmnist_dm, ckpt_path=str(ckpt), verbose=False)
    return TrainedModel(
        model=model, checkpoint=ckpt, datamodule=fmnist_dm, test_acc=acc[0]["test/acc"]
    )
