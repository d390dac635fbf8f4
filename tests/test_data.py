"""Data: [0,1] tensors, balanced seeded subsets, HF datasets path on a dataset written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfd.data import (
    CIFAR10DataModule,
    DataMissingError,
    FashionMNISTDataModule,
    _write_idx,
    balanced_indices,
    load_fashion_mnist,
    read_idx,
    timm_transforms,
)


def test_balanced_indices_are_balanced_seeded_and_disjoint() -> None:
    labels = np.repeat(np.arange(10), 50)
    a = balanced_indices(labels, 100, seed=3)
    assert len(a) == 100 and len(set(a)) == 100
    assert np.bincount(labels[a], minlength=10).tolist() == [10] * 10
    assert np.array_equal(a, balanced_indices(labels, 100, seed=3))
    assert not np.array_equal(a, balanced_indices(labels, 100, seed=4))
    b = balanced_indices(labels, 200, seed=3, exclude=a)
    assert not set(a) & set(b)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        balanced_indices(labels, 15)


def test_idx_round_trip(tmp_path) -> None:
    arr = np.random.default_rng(0).integers(0, 255, size=(5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x-idx3-ubyte", arr)
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte"), arr)


def test_fashion_mnist_module(fmnist_dm: FashionMNISTDataModule) -> None:
    x, y = fmnist_dm.test_set[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0 and isinstance(y, int)
    ev = fmnist_dm.eval_dataset(100, seed=0)
    cal = fmnist_dm.calibration_dataset(200, seed=0, n_eval=100)
    assert not set(ev.indices) & set(cal.indices)
    labels = fmnist_dm.test_labels()
    assert np.bincount(labels[ev.indices]).tolist() == [10] * 10
    xb, yb, ib = next(iter(fmnist_dm.eval_dataloader(100, seed=0, batch_size=20)))
    assert xb.shape == (20, 1, 28, 28) and torch.equal(yb, torch.as_tensor(labels[ib.numpy()]))


def test_fashion_mnist_resize_and_channel_repeat(fmnist_dm: FashionMNISTDataModule) -> None:
    dm = FashionMNISTDataModule(data_dir=fmnist_dm.data_dir, img_size=32, channels=3)
    dm.setup()
    x, _ = dm.test_set[1]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2]) and 0 <= x.min() <= x.max() <= 1


def test_missing_data_says_how_to_get_it(tmp_path) -> None:
    with pytest.raises(DataMissingError, match="make data"):
        load_fashion_mnist(tmp_path)


def test_transforms_follow_the_timm_pretrained_config() -> None:
    from PIL import Image

    vgg = timm_transforms("vgg19.tv_in1k", 224, training=False)
    resize = vgg.transforms[0]
    assert resize.size == 256 and resize.interpolation.value == "bilinear"  # 256 -> crop 224
    assert "bicubic" in str(timm_transforms("resnet50.a1_in1k", 224, training=False))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    out = vgg(img)
    assert out.shape == (3, 224, 224) and 0 <= out.min() and out.max() <= 1  # no normalization
    train = timm_transforms("vit_base_patch16_224", 64, training=True)(img)
    assert train.shape == (3, 64, 64)


def _tiny_cifar(path, n_train: int = 30, n_test: int = 20) -> None:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)

    def split(n: int) -> datasets.Dataset:
        imgs = [
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)
        ]
        feats = datasets.Features(
            {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        )
        return datasets.Dataset.from_dict({"img": imgs, "label": [i % 10 for i in range(n)]}, feats)

    datasets.DatasetDict({"train": split(n_train), "test": split(n_test)}).save_to_disk(str(path))


def test_cifar10_through_hf_datasets_on_disk(tmp_path) -> None:
    _tiny_cifar(tmp_path / "cifar")
    dm = CIFAR10DataModule(
        data_source=str(tmp_path / "cifar"),
        model_name="vgg19",
        img_size=32,
        batch_size=4,
        val_size=5,
        num_workers=0,
    )
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) == 25 and len(dm.val_set) == 5 and len(dm.test_set) == 20
    x, y = dm.test_set[0]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and 0 <= y < 10
    xb, yb, ib = next(iter(dm.eval_dataloader(10, seed=0, batch_size=10)))
    assert sorted(yb.tolist()) == list(range(10)) and len(set(ib.tolist())) == 10


def test_cifar10_missing_source_is_a_clear_error(tmp_path) -> None:
    dm = CIFAR10DataModule(data_source=str(tmp_path / "nowhere"), num_workers=0)
    with pytest.raises(DataMissingError, match="cannot load dataset"):
        dm.setup()
