"""Defense-GAN: answer every query on the projection of the image onto a GAN's range.

Samangouei, Kabkab, Chellappa. "Defense-GAN: Protecting Classifiers Against Adversarial Attacks
Using Generative Models." ICLR 2018; broken by BPDA in Athalye, Carlini, Wagner, ICML 2018.

A generator G is trained on clean images only. A query x is replaced by G(z*), z* = argmin_z
||G(z) - x||^2 found by gradient descent from R random starts (L steps each), so that whatever an
attacker added to x survives only as far as G can draw it. The projection is an inner optimization
with random starts: the defense is randomized (two identical queries may get different answers)
and non-differentiable as written, so white-box attacks use BPDA with the identity in its place.

Train the generator with ``python train.py --config fmnist_defensegan``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rfd.checks import check_int, check_positive
from rfd.defenses.base import Defense
from rfd.models import eval_mode, load_part, model_device
from rfd.rng import KeyedRNG, row_keys

DEFAULT_CHECKPOINT = "runs/fmnist_defensegan/best.ckpt"
TRAIN_HINT = "python train.py --config fmnist_defensegan"
CHUNK = 128  # latent rows per descent (see project)


class Generator(nn.Module):
    """DCGAN-style: z -> (2w, s, s) -> (w, 2s, 2s) -> (in_chans, 4s, 4s) in [0, 1] (sigmoid),
    s = img_size / 4. The last upsampling is nearest-neighbour + 3x3 conv rather than a strided
    transposed conv: no checkerboard in the pixels the projection must match, at a cost of under
    5% of a generator pass. BatchNorm runs in eval mode during projection: rows never interact."""

    def __init__(self, latent_dim: int = 32, width: int = 32, in_chans: int = 1,
                 img_size: int = 28) -> None:  # fmt: skip
        super().__init__()
        self.latent_dim, self.in_chans, self.img_size = latent_dim, in_chans, img_size
        self.s = img_size // 4
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * self.s**2), nn.BatchNorm1d(2 * width * self.s**2),
            nn.ReLU(),
        )  # fmt: skip
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(width, in_chans, 3, 1, 1), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.up(self.fc(z).view(z.shape[0], -1, self.s, self.s))


class Discriminator(nn.Module):
    """Two strided convolutions (LeakyReLU 0.2, BatchNorm on the second, as in DCGAN) and a
    linear logit: real vs generated."""

    def __init__(self, width: int = 32, in_chans: int = 1, img_size: int = 28) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_chans, width, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(2 * width * (img_size // 4) ** 2, 1),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(1)


def project(generator: nn.Module, x: Tensor, restarts: int, steps: int, lr: float,
            rng: KeyedRNG) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Defense-GAN's projection: z* = argmin_z mean((G(z) - x)^2) per row, best of ``restarts``.

    Rows x restarts descend together in (rows * R, d) latent tensors with Adam, whose step
    size decays exponentially from ``lr`` to ``lr / 10`` (the paper also decays its step). Each
    row's loss is its own mean squared error and the batch loss their sum, and Adam is
    elementwise, so a row's trajectory does not depend on the other rows. Restart r of a row
    starts at ``rng.stream("restart", r).normal(d)``: the same start whatever R is, so more
    restarts can only lower the error. Every iterate z_0..z_L is scored and the best kept, so
    more steps can only lower it too. Works under ``no_grad`` and ``inference_mode`` and never
    differentiates back to ``x`` (x is detached): the answer is a constant in x.

    Returns:
        ``x_hat = G(z*)`` (x's shape and dtype), ``z*`` (N, d) and its error per row (N,).
    """
    n, d = x.shape[0], int(generator.latent_dim)
    p = next(generator.parameters())
    # At most CHUNK latent rows at a time: bigger activations are mmapped and page-faulted anew on
    # every step (measured: 100 images x 10 restarts took 12 s in one tensor, 5.4 s in chunks)
    size = max(1, CHUNK // restarts)
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(generator):
        tgt = x.detach().clone().to(p.device, p.dtype)
        starts = [rng.stream("restart", r).normal((d,)) for r in range(restarts)]
        z0 = torch.stack(starts, 1).to(p.device, p.dtype)  # (N, R, d)
        parts = [_descend(generator, tgt[i : i + size], z0[i : i + size], steps, lr)
                 for i in range(0, n, size)]  # fmt: skip
    x_hat, z, err = (torch.cat(t) for t in zip(*parts, strict=True))
    return x_hat.to(x.device, x.dtype), z.to(x.device), err.to(x.device)


def _descend(generator: nn.Module, x: Tensor, z0: Tensor, steps: int,
             lr: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``project`` for rows ``x`` (n, ...) from starts ``z0`` (n, R, d): best (x_hat, z, err)."""
    n, restarts, d = z0.shape
    tgt = x.repeat_interleave(restarts, dim=0)
    z = z0.reshape(n * restarts, d).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    best = torch.full((n * restarts,), math.inf, device=z.device, dtype=z.dtype)
    best_x, best_z = torch.empty_like(tgt), torch.empty_like(z.detach())
    for t in range(steps + 1):
        xg = generator(z)
        if t == 0 and xg.shape[1:] != tgt.shape[1:]:
            got, want = tuple(xg.shape[1:]), tuple(tgt.shape[1:])
            raise ValueError(f"the generator makes {got} images but the queries are {want}")
        err = (xg - tgt).square().flatten(1).mean(1)
        with torch.no_grad():
            better = err < best
            best = torch.where(better, err, best)
            best_x[better], best_z[better] = xg[better], z[better]
        if t == steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr * 0.1 ** (t / max(steps - 1, 1))
        (z.grad,) = torch.autograd.grad(err.sum(), z)  # z only: G's weights get no .grad
        opt.step()
    pick = best.view(n, restarts).argmin(1) + torch.arange(n, device=z.device) * restarts
    return best_x[pick], best_z[pick], best[pick]


class GANModule(L.LightningModule):
    """Trains the generator (and its discriminator) on the data module's images; labels unused.

    Non-saturating GAN loss (Goodfellow et al. 2014) with DCGAN's Adam(2e-4, betas (0.5, 0.999)),
    one discriminator and one generator step per batch (manual optimization). Validation and test
    log ``recon``: the mean squared error of a short projection (``val_restarts`` x
    ``val_steps``) of held-out images, the quantity Defense-GAN relies on (how well G's range
    covers real images); ``best.ckpt`` is the epoch with the lowest ``val/recon``.
    """

    monitor = ("val/recon", "min")

    def __init__(self, latent_dim: int = 32, width: int = 32, in_chans: int = 1,
                 image_size: int = 28, lr: float = 2e-4, val_restarts: int = 1,
                 val_steps: int = 30, val_lr: float = 0.05) -> None:  # fmt: skip
        super().__init__()
        (
            check_int(latent_dim, "latent_dim", 1),
            check_int(width, "width", 1),
            check_int(in_chans, "in_chans", 1),
        )
        if check_int(image_size, "image_size", 4) % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        (
            check_positive(lr, "lr"),
            check_int(val_restarts, "val_restarts", 1),
            check_int(val_steps, "val_steps", 0),
        )
        check_positive(val_lr, "val_lr")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, width, in_chans, image_size)
        self.discriminator = Discriminator(width, in_chans, image_size)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas),
        ]

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        opt_g, opt_d = self.optimizers()
        fake = self.generator(torch.randn(x.shape[0], self.hparams.latent_dim, device=x.device))
        real_logit, fake_logit = self.discriminator(x), self.discriminator(fake.detach())
        d_loss = F.binary_cross_entropy_with_logits(
            real_logit, torch.ones_like(real_logit)
        ) + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_logit = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"train/g_loss": g_loss, "train/d_loss": d_loss}, prog_bar=True)

    def _recon(self, batch: Any, batch_idx: int, stage: str) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        ids = torch.arange(x.shape[0], device=x.device) + batch_idx * x.shape[0]
        h, rng = self.hparams, KeyedRNG(row_keys(0, ids))  # the same starts every epoch
        _, _, err = project(self.generator, x, h.val_restarts, h.val_steps, h.val_lr, rng)
        self.log(f"{stage}/recon", err.mean(), prog_bar=True, batch_size=x.shape[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._recon(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._recon(batch, batch_idx, "test")


def load_generator(path: str | os.PathLike) -> Generator:
    """The trained generator of a ``GANModule`` checkpoint (relative paths also tried from the
    repository root), frozen, in eval mode on the CPU."""
    gen = load_part(GANModule, path, TRAIN_HINT).generator
    return gen.requires_grad_(False).eval()


class DefenseGAN(Defense):
    """Classify ``G(z*)``, the projection of each query onto the generator's range.

    Args:
        model: the classifier.
        seed: seed of the defense's own generator (the restarts' random starts).
        generator: a ``GANModule`` checkpoint path or a generator ``nn.Module`` with a
            ``latent_dim`` attribute mapping (N, latent_dim) to images shaped like the queries.
        restarts: random restarts R per query (paper: 10).
        steps: descent steps L per restart (paper: 200).
        lr: Adam's first step size on z (decayed to lr / 10 by the last step); z ~ N(0, I), so
            0.5 crosses the latent space in a few steps (best of 0.02..1.0 on Fashion-MNIST).
    """

    name = "defensegan"
    parts = ("generator",)
    title = "Defense-GAN"
    order = 70
    differentiable = False  # an inner argmin: BPDA passes the identity (Athalye et al. 2018)

    def __init__(self, model: nn.Module, seed: int | None = None,
                 generator: str | os.PathLike | nn.Module = DEFAULT_CHECKPOINT, restarts: int = 10,
                 steps: int = 200, lr: float = 0.5) -> None:  # fmt: skip
        super().__init__(model, seed)
        self.restarts, self.steps = check_int(restarts, "restarts", 1), check_int(steps, "steps", 1)
        self.lr = check_positive(lr, "lr")
        if isinstance(generator, (str, os.PathLike)):
            generator = load_generator(generator)
        if not isinstance(generator, nn.Module):
            raise ValueError(
                f"generator must be a checkpoint path or an nn.Module, got {generator!r}"
            )
        if not isinstance(getattr(generator, "latent_dim", None), int):
            raise ValueError("generator must have an integer attribute latent_dim")
        device = model_device(model)
        self.gan = generator if model_device(generator) == device else generator.to(device)
        self.layers = ["input"]

    @property
    def randomized(self) -> bool:
        return True

    @property
    def forwards_per_query(self) -> float:
        """Generator forward+backward passes per query: R * L descent steps, + 1 for the
        classifier's forward (the R final generator forwards that score z_L are not counted)."""
        return float(self.restarts * self.steps + 1)

    def row_input(self, x: Tensor, rng: KeyedRNG) -> Tensor:
        x_hat = project(self.gan, x, self.restarts, self.steps, self.lr, rng)[0]
        if torch.is_grad_enabled() and x.requires_grad:
            # differentiated as written (--no-bpda) the answer is a constant in x: a zero
            # gradient, the masking BPDA removes, rather than an error for an unused input
            return x_hat + 0 * x
        return x_hat

    def extra_repr(self) -> str:
        return f"defense={self.name!r}, restarts={self.restarts}, steps={self.steps}, lr={self.lr}"
