"""MagNet (Meng & Chen, CCS 2017): an autoencoder that detects and reforms adversarial inputs.

MagNet learns the manifold of clean images with a denoising autoencoder and uses it twice. The
*detector* flags an input whose reconstruction error is larger than clean images ever show: the
threshold is the ``1 - fpr`` quantile of the error on clean calibration images, so a clean input
is flagged with probability ``fpr``. The *reformer* replaces every input by its reconstruction,
pulling small off-manifold perturbations back towards the clean images before the classifier
sees them. rfd's queries go through the reformer (``row_input``); the detector is exposed as
:meth:`MagNet.detect` for the evaluation to apply to each final adversarial example.

The autoencoder is MagNet's Fashion/MNIST "autoencoder I": 3x3 convolutions with sigmoid
activations, ``conv, avgpool, conv | conv, upsample, conv, conv(out)``, trained with MSE on inputs
carrying Gaussian noise of std 0.1, clipped to [0, 1] (MagNet's "noise volume"). Train it with
``python train.py --config fmnist_magnet`` (:class:`AutoencoderModule`).

Both parts are differentiable, and Carlini & Wagner (2017) break MagNet by differentiating through
them. The defense still declares ``differentiable = False`` so that both white-box attacks are
one flag away: ``--bpda`` (the default) passes the identity in place of the reformer (the usual
BPDA attack on input purifiers), ``--no-bpda`` differentiates through the autoencoder as
implemented. Here the exact gradient is the STRONGER attack (embedded default, 100 images, Linf
0.1: PGD-20 leaves 31% robust with BPDA and 7% through the autoencoder), so read MagNet's
white-box robustness as the lower of the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rfd.checks import check_int, check_positive
from rfd.defenses.base import Defense
from rfd.models import eval_mode, input_channels, load_part, model_device
from rfd.rng import KeyedRNG

DEFAULT_CHECKPOINT = "runs/fmnist_magnet/best.ckpt"
TRAIN_HINT = "python train.py --config fmnist_magnet"
NORMS = (1, 2)


def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class Autoencoder(nn.Module):
    """MagNet's small convolutional autoencoder for [0, 1] images (sigmoid output).

    3x3 convolutions, each followed by a sigmoid: ``conv, avgpool2, conv | conv, upsample, conv,
    conv(channels)`` (MagNet's ``[3, "average", 3]`` structure). Upsampling (nearest) to the
    input's own size rather than x2 keeps odd image sizes working.

    Args:
        channels: image channels (1 for Fashion-MNIST, 3 for colour images).
        hidden: channels of the hidden convolutions (MagNet: 3).
    """

    def __init__(self, channels: int = 1, hidden: int = 3) -> None:
        super().__init__()
        if isinstance(channels, bool) or channels not in (1, 3):
            raise ValueError(f"autoencoder channels must be 1 or 3, got {channels!r}")
        check_int(hidden, "autoencoder hidden")

        def conv(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.Sigmoid()]

        self.channels, self.hidden = channels, hidden
        h = hidden
        self.encoder = nn.Sequential(*conv(channels, h), nn.AvgPool2d(2), *conv(h, h), *conv(h, h))
        self.decoder = nn.Sequential(*conv(h, h), *conv(h, channels))

    def forward(self, x: Tensor) -> Tensor:
        z = F.interpolate(self.encoder(x), size=x.shape[-2:], mode="nearest")
        return self.decoder(z)


class AutoencoderModule(L.LightningModule):
    """Trains :class:`Autoencoder` as MagNet does: MSE to the clean image from a noisy input.

    Labels are ignored. The training input is ``clip(x + noise * N(0, I), 0, 1)``; validation and
    test losses are the clean reconstruction MSE, the quantity the detector thresholds, so the
    checkpoint ``train.py`` keeps (``monitor``) is the best clean reconstructor.

    Args:
        channels: image channels (1 or 3).
        hidden: hidden convolution channels.
        noise: std of the training noise on [0, 1] pixels (MagNet's volume 0.1); 0 = plain AE.
        lr: Adam learning rate.
        weight_decay: Adam L2 weight decay.
    """

    monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")

    def __init__(
        self,
        channels: int = 1,
        hidden: int = 3,
        noise: float = 0.1,
        lr: float = 1e-2,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive(noise, "noise", allow_zero=True)
        check_positive(weight_decay, "weight_decay", allow_zero=True)
        check_positive(lr, "lr")
        self.save_hyperparameters()
        self.net = Autoencoder(channels, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = _images(batch)
        noisy = (x + self.hparams.noise * torch.randn_like(x)).clamp(0.0, 1.0)
        loss = F.mse_loss(self.net(noisy), x)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> None:
        x = _images(batch)
        self.log(f"{stage}/loss", F.mse_loss(self.net(x), x), prog_bar=True, sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.Adam(self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


def load_autoencoder(source: nn.Module | str | os.PathLike) -> nn.Module:
    """The reformer network: a module as given, or the one in an ``AutoencoderModule`` checkpoint.

    Raises:
        FileNotFoundError: the checkpoint is missing (the message names the training command).
        ValueError: the file is not an ``AutoencoderModule`` checkpoint, or ``source`` has a
            wrong type.
    """
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"magnet autoencoder must be a checkpoint path or an nn.Module, got {source!r}"
        )
    return load_part(AutoencoderModule, source, TRAIN_HINT).net.requires_grad_(False)


class MagNet(Defense):
    """MagNet's reformer on every query, and its reconstruction-error detector as :meth:`detect`.

    The error of an input ``x`` is ``mean(|x - AE(x)|^norm)`` over its pixels (MagNet's
    ``AEDetector`` mark): ``norm=2`` is the MSE, ``norm=1`` the mean absolute error. Default 2:
    MagNet's code pairs the reformer's autoencoder (I) with the L2 detector and uses L1 for its
    second autoencoder, which rfd does not train. Deterministic; ``seed`` is unused.

    Args:
        model: the classifier on [0, 1] images.
        seed: accepted for a uniform interface; unused.
        autoencoder: an ``AutoencoderModule`` checkpoint (default ``runs/fmnist_magnet/best.ckpt``,
            relative to the working directory, else the repository) or a built ``nn.Module`` mapping images to images
            (used as given, in eval mode during each call).
        fpr: the detector's false-positive rate on clean data, in (0, 1).
        norm: 1 or 2, the power of the per-pixel reconstruction error.
        data: clean calibration batches ``x`` or ``(x, y, ...)``; the threshold is the
            ``1 - fpr`` quantile of their errors. Needed unless ``threshold`` is given.
        threshold: a fixed detector threshold (skips the calibration, and ``data``).

    Attributes:
        threshold: the detector's threshold on the reconstruction error.
        autoencoder: the reformer network (a submodule, so it follows ``.to()``).
    """

    name = "magnet"
    parts = ("autoencoder",)
    title = "MagNet"
    order = 60
    # The reformer IS differentiable; declaring it not makes --bpda (the default) attack through
    # the identity surrogate and --no-bpda through the autoencoder itself (module docstring).
    differentiable = False

    def __init__(
        self,
        model: nn.Module,
        seed: int | None = None,
        autoencoder: nn.Module | str | os.PathLike = DEFAULT_CHECKPOINT,
        fpr: float = 0.01,
        norm: int = 2,
        data: Iterable[Any] | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__(model, seed=0)
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
            raise ValueError(f"magnet fpr must be a number in (0, 1), got {fpr!r}")
        if isinstance(norm, bool) or norm not in NORMS:
            raise ValueError(f"magnet norm must be 1 or 2, got {norm!r}")
        if threshold is not None:
            threshold = check_positive(threshold, "magnet threshold", allow_zero=True)
        elif data is None:
            raise ValueError(
                "magnet needs data=<clean calibration loader> to set its detector threshold "
                "(or threshold=<float>)"
            )
        self.fpr, self.norm = float(fpr), int(norm)
        self.layers = ["input"]
        self.autoencoder = load_autoencoder(autoencoder).to(model_device(model))
        ours, theirs = input_channels(self.autoencoder), input_channels(model)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(
                f"the magnet autoencoder takes {ours} channels but the model takes {theirs}"
            )
        self.threshold = threshold if threshold is not None else self.calibrate(data)

    @classmethod
    def needs_data(cls, layers: Any = None, options: dict[str, Any] | None = None) -> bool:
        return (options or {}).get("threshold") is None

    # -- the reformer ------------------------------------------------------------------------
    def reform(self, x: Tensor) -> Tensor:
        """The autoencoder's reconstruction of ``x``, clipped to [0, 1] (MagNet's ``heal``)."""
        with eval_mode(self.autoencoder):
            out = self.autoencoder(x)
        if out.shape != x.shape:
            raise ValueError(
                f"the magnet autoencoder maps {tuple(x.shape)} to {tuple(out.shape)}; it must "
                "return images of the input's shape (check its channels)"
            )
        return out.clamp(0.0, 1.0)

    def row_input(self, x: Tensor, rng: KeyedRNG) -> Tensor:
        return self.reform(x)

    # -- the detector ------------------------------------------------------------------------
    def errors(self, x: Tensor) -> Tensor:
        """Per-row reconstruction error ``mean(|x - AE(x)|^norm)``, shape (rows,)."""
        d = (x - self.reform(x)).abs()
        return (d if self.norm == 1 else d.square()).flatten(1).mean(1)

    @torch.no_grad()
    def detect(self, x: Tensor) -> Tensor:
        """Which rows of ``x`` the detector flags as adversarial (bool, shape (rows,)): their
        reconstruction error exceeds :attr:`threshold`, which clean inputs do with rate ``fpr``."""
        x = x.to(model_device(self.autoencoder))
        return self.errors(x) > self.threshold

    @torch.no_grad()
    def calibrate(self, data: Iterable[Any]) -> float:
        """The ``1 - fpr`` quantile of the clean reconstruction errors over ``data``."""
        device = model_device(self.autoencoder)
        errs = [self.errors(_images(b).to(device)) for b in data]
        if not errs:
            raise ValueError("magnet data yielded no batches: cannot set the detector threshold")
        return float(torch.quantile(torch.cat(errs).double().cpu(), 1.0 - self.fpr))

    def extra_repr(self) -> str:
        return f"defense='magnet', fpr={self.fpr}, norm={self.norm}, threshold={self.threshold:.4g}"
