"""Data modules. Every image leaves here as a float tensor in [0, 1]; normalization is the model's.

Evaluation follows the paper's protocol: a class-balanced, seeded random subset of the test split
(the paper uses 1000 images), returned with each sample's dataset index so that results can be
de-duplicated across processes and resumed per batch, plus a disjoint calibration split on which
the noise scale is tuned (never on attacked images).
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from rfd.checks import check_int

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rfd" / "fashion-mnist"
)
FMNIST_HUB_ID = "zalando-datasets/fashion_mnist"
CIFAR10_HUB_ID = "uoft-cs/cifar10"
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class DataMissingError(FileNotFoundError):
    """The dataset is not on disk; the message says how to get it."""


# --------------------------------------------------------------------------- subsets


def balanced_indices(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n: int,
    seed: int = 0,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Pick ``n`` indices with ``n // num_classes`` per class, uniformly at random per class.

    Args:
        labels: the label of every sample in the split.
        n: total size; must be a multiple of the number of classes so the subset is exactly balanced.
        seed: the subset depends only on (labels, n, seed, exclude).
        exclude: indices that may not be picked (e.g. the evaluation subset, for calibration).

    Returns:
        Sorted dataset indices.
    """
    y = np.asarray(labels)
    classes = np.unique(y)
    if n <= 0 or n % len(classes):
        raise ValueError(f"n={n} must be a positive multiple of the {len(classes)} classes")
    per = n // len(classes)
    rng = np.random.default_rng(seed)
    banned = np.zeros(len(y), dtype=bool)
    if exclude is not None and len(exclude):
        banned[np.asarray(exclude)] = True
    out = []
    for c in classes:
        pool = np.flatnonzero((y == c) & ~banned)
        if len(pool) < per:
            raise ValueError(f"class {c} has {len(pool)} available samples, {per} needed")
        out.append(rng.choice(pool, size=per, replace=False))
    return np.sort(np.concatenate(out))


class IndexedSubset(Dataset):
    """``(image, label, dataset_index)`` for the chosen indices of a dataset."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        idx = self.indices[i]
        x, y = self.dataset[idx]
        return x, int(y), idx


class _EvalSplits:
    """Mixin: the standard loaders, the balanced evaluation subset and the disjoint calibration
    split of the test set."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    batch_size: int
    num_workers: int

    def test_labels(self) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _check_loader_args(batch_size: int, val_size: int, num_workers: int) -> None:
        """Refuse loader settings at construction (train.py's entry), not at the first batch."""
        check_int(batch_size, "batch_size")
        check_int(val_size, "val_size")
        check_int(num_workers, "num_workers", low=0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=True,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def eval_indices(self, n: int, seed: int = 0) -> np.ndarray:
        return balanced_indices(self.test_labels(), n, seed)

    def calibration_indices(self, n: int, seed: int = 0, n_eval: int = 1000) -> np.ndarray:
        """Calibration images, disjoint from the evaluation subset of size ``n_eval`` (same seed)."""
        labels = self.test_labels()
        n_eval = min(n_eval, len(labels) - n)
        n_eval -= n_eval % len(np.unique(labels))
        held_out = self.eval_indices(n_eval, seed) if n_eval > 0 else None
        return balanced_indices(labels, n, seed + 1, exclude=held_out)

    def eval_dataset(self, n: int, seed: int = 0) -> IndexedSubset:
        return IndexedSubset(self.test_set, self.eval_indices(n, seed))

    def calibration_dataset(self, n: int, seed: int = 0, n_eval: int = 1000) -> IndexedSubset:
        return IndexedSubset(self.test_set, self.calibration_indices(n, seed, n_eval))

    def eval_dataloader(self, n: int, seed: int = 0, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            self.eval_dataset(n, seed),
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
        )

    def calibration_dataloader(
        self, n: int, seed: int = 0, batch_size: int | None = None, n_eval: int = 1000
    ) -> DataLoader:
        return DataLoader(
            self.calibration_dataset(n, seed, n_eval),
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
        )

    def val_calibration_dataloader(
        self, n: int, seed: int = 0, batch_size: int | None = None
    ) -> DataLoader:
        """``n`` random validation images (at most all of them): calibration data for a run that
        reports on the whole test split, where no test image may tune the defense. The
        validation split is held out of training, so the model has not fit these images either."""
        m = len(self.val_set)
        order = np.random.default_rng(seed).permutation(m)[: min(n, m)]
        return DataLoader(
            Subset(self.val_set, np.sort(order).tolist()),
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
        )


def _split_train_val(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format Fashion-MNIST ships in."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{p} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    return None


def default_fmnist_dir() -> Path:
    """Where the embedded data lives: $RFD_FMNIST_DIR, the Debian package's folder, or our cache."""
    if os.environ.get("RFD_FMNIST_DIR"):
        return Path(os.environ["RFD_FMNIST_DIR"])
    for d in (Path(FMNIST_DIR), FMNIST_CACHE):
        if _find(d, "t10k-labels-idx1-ubyte"):
            return d
    return Path(FMNIST_DIR)


def download_fashion_mnist(dest: str | os.PathLike = FMNIST_CACHE) -> Path:
    """Fetch Fashion-MNIST through HF ``datasets`` and write it as IDX files (for non-Debian hosts)."""
    ds = load_hf_dataset(FMNIST_HUB_ID)
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        imgs = np.stack([np.asarray(im, dtype=np.uint8) for im in ds[split]["image"]])
        labels = np.asarray(ds[split]["label"], dtype=np.uint8)
        _write_idx(out / f"{prefix}-images-idx3-ubyte", imgs)
        _write_idx(out / f"{prefix}-labels-idx1-ubyte", labels)
    return out


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def load_fashion_mnist(root: str | os.PathLike | None = None, train: bool = True):
    """Fashion-MNIST as ``(images uint8 [N,28,28], labels int64 [N])`` from IDX files in ``root``."""
    r = Path(root) if root else default_fmnist_dir()
    prefix = "train" if train else "t10k"
    img = _find(r, f"{prefix}-images-idx3-ubyte")
    lab = _find(r, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise DataMissingError(
            f"Fashion-MNIST IDX files not found in {r}. Get them with `make data` "
            "(Debian: `apt-get install dataset-fashion-mnist`; elsewhere it downloads "
            f"{FMNIST_HUB_ID} through HF datasets), or pass data_dir=<folder with the IDX files>."
        )
    return torch.from_numpy(read_idx(img).copy()), torch.from_numpy(read_idx(lab).astype(np.int64))


class TensorImageDataset(Dataset):
    """uint8 images held in memory, turned into [0,1] floats (resized, channel-repeated) on access."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        img_size: int | None = None,
        channels: int = 1,
        augment: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.img_size, self.channels, self.augment = img_size, channels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if self.augment:  # light augmentation: flip + 2px translation, keeps pixel range
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            x = torch.roll(F.pad(x, (2, 2, 2, 2)), shifts=(dy, dx), dims=(1, 2))[:, 2:-2, 2:-2]
        if self.img_size is not None and x.shape[-1] != self.img_size:
            x = F.interpolate(
                x[None], size=(self.img_size, self.img_size), mode="bilinear", align_corners=False
            )[0].clamp_(0, 1)
        if self.channels != x.shape[0]:
            x = x.expand(self.channels, -1, -1).contiguous()
        return x, int(self.labels[i])


class FashionMNISTDataModule(_EvalSplits, L.LightningDataModule):
    """Fashion-MNIST from local IDX files: the embedded default that needs no network.

    Args:
        data_dir: folder with the four IDX files (gzipped or not); default: $RFD_FMNIST_DIR,
            /usr/share/datasets/fashion-mnist (Debian package), or ~/.cache/rfd/fashion-mnist.
        img_size: resize to this size (timm VGG needs >= 32 px); ``None`` keeps 28 px.
        channels: 1, or 3 to repeat the grey channel for models built with ``in_chans=3``.
        batch_size: training/evaluation batch size.
        val_size: images held out of the training split for validation/checkpoint selection.
        train_subset: train on only this many images (tests and quick runs).
        augment: flip + small translations during training.
        num_workers: DataLoader workers.
        seed: fixes the train/val split.
    """

    classes = FMNIST_CLASSES

    def __init__(
        self,
        data_dir: str | None = None,
        img_size: int | None = None,
        channels: int = 1,
        batch_size: int = 256,
        val_size: int = 5000,
        train_subset: int | None = None,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, val_size, num_workers)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 (got {channels!r})")
        self.save_hyperparameters()
        self.data_dir, self.img_size, self.channels = data_dir, img_size, channels
        self.batch_size, self.val_size, self.train_subset = batch_size, val_size, train_subset
        self.augment, self.num_workers, self.seed = augment, num_workers, seed
        self._loaded = False

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        xtr, ytr = load_fashion_mnist(self.data_dir, train=True)
        xte, yte = load_fashion_mnist(self.data_dir, train=False)
        tr_idx, va_idx = _split_train_val(len(ytr), self.val_size, self.seed)
        if self.train_subset:
            tr_idx = tr_idx[: self.train_subset]
        kw = dict(img_size=self.img_size, channels=self.channels)
        self.train_set = TensorImageDataset(xtr[tr_idx], ytr[tr_idx], augment=self.augment, **kw)
        self.val_set = TensorImageDataset(xtr[va_idx], ytr[va_idx], **kw)
        self.test_set = TensorImageDataset(xte, yte, **kw)
        self._test_labels = yte.numpy()
        self._loaded = True

    def test_labels(self) -> np.ndarray:
        self.setup()
        return self._test_labels


# --------------------------------------------------------------------------- CIFAR10


def timm_transforms(
    model_name: str | None,
    img_size: int | None,
    training: bool,
    interpolation: str | None = None,
    crop_pct: float | None = None,
) -> Callable[[Any], torch.Tensor]:
    """timm's eval/train transform for ``model_name``'s pretrained config, ending in [0,1] tensors.

    The pretrained config decides interpolation and crop (e.g. VGG19: bilinear, resize 256 then
    center-crop 224; ResNet50/ViT/DeiT: bicubic). ``normalize=False`` leaves normalization to the
    model, which owns it.
    """
    from timm.data import create_transform, resolve_data_config

    cfg: dict[str, Any] = {}
    if model_name:
        import timm

        try:
            pcfg = timm.models.get_pretrained_cfg(model_name)
            cfg = pcfg.to_dict() if pcfg is not None else {}
        except Exception:  # unknown tag: fall back to timm defaults
            cfg = {}
        cfg = resolve_data_config(args={}, pretrained_cfg=cfg) if cfg else {}
    size = img_size or (cfg.get("input_size", (3, 224, 224))[-1])
    kwargs: dict[str, Any] = dict(
        input_size=(3, size, size),
        interpolation=interpolation or cfg.get("interpolation", "bilinear"),
        crop_pct=crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875),
        normalize=False,
    )
    from torchvision.transforms import Compose
    from torchvision.transforms.v2 import ToDtype

    if training:
        kwargs.pop("crop_pct")
        tf = create_transform(is_training=True, scale=(0.35, 1.0), hflip=0.5, **kwargs)
    else:
        tf = create_transform(is_training=False, **kwargs)
    # Without normalization timm stops at uint8 tensors; scale to [0, 1] floats.
    return Compose([*tf.transforms, ToDtype(torch.float32, scale=True)])


class HFImageDataset(Dataset):
    """An HF ``datasets`` split of (PIL image, label) rows, transformed on access."""

    def __init__(self, split: Any, transform: Callable, image_key: str, label_key: str) -> None:
        self.split, self.transform = split, transform
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.split[int(i)]
        img = row[self.image_key]
        if hasattr(img, "convert"):
            img = img.convert("RGB")
        return self.transform(img), int(row[self.label_key])


def load_hf_dataset(source: str, cache_dir: str | None = None):
    """Load a ``DatasetDict`` from a hub id, a folder made by ``save_to_disk``, or a local dataset.

    Raises:
        DataMissingError: it cannot be loaded (no network, wrong path); says what to do.
    """
    import datasets

    p = Path(source)
    try:
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            return datasets.load_from_disk(str(p))
        return datasets.load_dataset(source, cache_dir=cache_dir)
    except Exception as e:
        raise DataMissingError(
            f"cannot load dataset {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Use a machine with internet access for the hub id, or pass data_source=<folder "
            "written by DatasetDict.save_to_disk>."
        ) from e


class CIFAR10DataModule(_EvalSplits, L.LightningDataModule):
    """CIFAR10 through HF ``datasets``, upsampled with the timm model's own transforms.

    Args:
        data_source: hub id (default ``uoft-cs/cifar10``), a ``save_to_disk`` folder, or any
            local dataset ``datasets.load_dataset`` reads.
        model_name: timm model whose pretrained config sets interpolation / crop.
        img_size: input resolution (224 as in the paper; 32 for native CIFAR10).
        batch_size: per-device batch size.
        val_size: images held out of the training split for validation.
        num_workers: DataLoader workers (image decoding + resize is the CPU bottleneck at 224 px).
        seed: fixes the train/val split.
        cache_dir: HF datasets cache folder.
        image_key: column holding the image.
        label_key: column holding the label.
    """

    classes = CIFAR10_CLASSES

    def __init__(
        self,
        data_source: str = CIFAR10_HUB_ID,
        model_name: str | None = None,
        img_size: int = 224,
        batch_size: int = 64,
        val_size: int = 5000,
        num_workers: int = 4,
        seed: int = 0,
        cache_dir: str | None = None,
        image_key: str = "img",
        label_key: str = "label",
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        self._check_loader_args(batch_size, val_size, num_workers)
        self.save_hyperparameters()
        self.data_source, self.model_name, self.img_size = data_source, model_name, img_size
        self.batch_size, self.val_size, self.num_workers = batch_size, val_size, num_workers
        self.seed, self.cache_dir = seed, cache_dir
        self.image_key, self.label_key, self.train_subset = image_key, label_key, train_subset
        self._loaded = False

    @property
    def num_classes(self) -> int:
        return 10

    def prepare_data(self) -> None:
        load_hf_dataset(self.data_source, self.cache_dir)  # download once, on rank 0

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        ds = load_hf_dataset(self.data_source, self.cache_dir)
        train_tf = timm_transforms(self.model_name, self.img_size, training=True)
        eval_tf = timm_transforms(self.model_name, self.img_size, training=False)
        train, test = ds["train"], ds["test"]
        val_size = min(self.val_size, len(train) // 5)
        tr_idx, va_idx = _split_train_val(len(train), val_size, self.seed)
        if self.train_subset:
            tr_idx = tr_idx[: self.train_subset]
        keys = (self.image_key, self.label_key)
        self.train_set = Subset(HFImageDataset(train, train_tf, *keys), tr_idx.tolist())
        self.val_set = Subset(HFImageDataset(train, eval_tf, *keys), va_idx.tolist())
        self.test_set = HFImageDataset(test, eval_tf, *keys)
        self._test_labels = np.asarray(test[self.label_key])
        self._loaded = True

    def test_labels(self) -> np.ndarray:
        self.setup()
        return self._test_labels


def _main(argv: list[str] | None = None) -> int:
    """``python -m rfd.data --check`` / ``--download``: used by ``make data``."""
    import argparse

    ap = argparse.ArgumentParser(description="Fashion-MNIST availability for the embedded default")
    ap.add_argument("--check", action="store_true", help="exit 0 when the IDX files are present")
    ap.add_argument(
        "--download", action="store_true", help=f"fetch {FMNIST_HUB_ID} via HF datasets"
    )
    args = ap.parse_args(argv)
    try:
        if args.download:
            print(f"Fashion-MNIST: downloading {FMNIST_HUB_ID} into {FMNIST_CACHE}")
            download_fashion_mnist()
        load_fashion_mnist(train=False)
        print(f"Fashion-MNIST: found in {default_fmnist_dir()}")
        return 0
    except DataMissingError as e:
        import sys

        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(_main())
