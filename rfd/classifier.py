"""Fine-tuning as a LightningModule, with optional adversarial or Gaussian-augmentation training.

The network (an ``ImageClassifier``) is kept apart from this training class, as Lightning's style
guide recommends: defenses and attacks take the bare network, and checkpoints written here load
back into it with ``rfd.create_model(..., checkpoint=...)``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from rfd.checks import check_int, check_positive
from rfd.models import ImageClassifier, create_model

AdvMode = Literal["none", "pgd", "fast", "free"]
ADV_MODES = ("none", "pgd", "fast", "free")


def pgd_linf(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
) -> torch.Tensor:
    """Linf PGD on cross-entropy (Madry et al. 2018); ``steps=1`` with random start is Fast-AT.

    Fast-AT (Wong, Rice & Kolter 2020) is FGSM from a uniform random start with step 1.25·eps;
    the random start is what keeps single-step training from catastrophic overfitting.
    Returns adversarial images in [0, 1] within the eps-ball, detached.
    """
    x = x.detach()
    if random_start:
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta += alpha * grad.sign()
            delta.clamp_(-eps, eps)
            delta.copy_((x + delta).clamp(0, 1) - x)
    return (x + delta).detach()


class ClassifierModule(L.LightningModule):
    """Fine-tunes a timm model on [0, 1] images.

    Args:
        model_name: timm model name.
        num_classes: classes of the new head.
        pretrained: start from timm's ImageNet weights (the paper's setting).
        in_chans: input channels.
        img_size: input size for models that need it at build time (ViT/DeiT).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. a local weights file via
            ``pretrained_cfg_overlay: {file: ...}``).
        optimizer: ``adamw`` (transformers) or ``sgd`` (CNNs, momentum 0.9, nesterov).
        lr: peak learning rate.
        weight_decay: decoupled for AdamW, L2 for SGD.
        warmup_epochs: linear warm-up before the cosine decay (fractions allowed).
        label_smoothing: cross-entropy label smoothing.
        adv_training: ``none``, ``pgd`` (PGD-AT, Madry et al.), ``fast`` (FGSM with random init,
            Wong et al.) or ``free`` (Free-AT, Shafahi et al.: every minibatch replayed
            ``free_replays`` times, each replay one parameter step and one perturbation step from
            the same backward pass; give it ``max_epochs / free_replays`` epochs for the cost of
            standard training).
        adv_eps: Linf radius of the training attack, in [0, 1] pixel units.
        adv_steps: PGD steps (ignored by ``fast`` and ``free``).
        adv_alpha: PGD step size; default 2.5·eps/steps (PGD) or 1.25·eps (Fast-AT).
        free_replays: Free-AT's m (replays per minibatch).
        gaussian_sigma: std of Gaussian noise added to inputs during training (RND-GF); 0 = off.
        robust_val_steps: when > 0, validation also measures PGD robust accuracy at ``adv_eps``
            with this many steps (``val/robust_acc``) on the first ``robust_val_images`` validation
            images, and that is what selects ``best.ckpt``: adversarial training overfits
            robustly (Rice et al. 2020), so the best robust epoch is kept, not the last.
        robust_val_images: validation images attacked per epoch for ``val/robust_acc``.
        early_stop_patience: stop when the monitored validation metric has not improved for this
            many epochs (0 = never).
    """

    def __init__(
        self,
        model_name: str = "test_resnet",
        num_classes: int = 10,
        pretrained: bool = False,
        in_chans: int = 3,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        adv_training: AdvMode = "none",
        adv_eps: float = 8 / 255,
        adv_steps: int = 7,
        adv_alpha: float | None = None,
        gaussian_sigma: float = 0.0,
        free_replays: int = 4,
        robust_val_steps: int = 0,
        robust_val_images: int = 1000,
        early_stop_patience: int = 0,
    ) -> None:
        super().__init__()
        if adv_training not in ADV_MODES:
            raise ValueError(f"adv_training={adv_training!r}; allowed: {', '.join(ADV_MODES)}")
        counts = {"free_replays": (free_replays, 1), "robust_val_steps": (robust_val_steps, 0),
                  "robust_val_images": (robust_val_images, 1),
                  "early_stop_patience": (early_stop_patience, 0)}  # fmt: skip
        for name, (v, low) in counts.items():
            check_int(v, name, low)
        if gaussian_sigma < 0 or adv_eps < 0:
            raise ValueError("gaussian_sigma and adv_eps must be >= 0")
        # checked here, at train.py's entry, rather than by the optimizer once the run has started
        positive = {"lr": lr, "num_classes": num_classes, "adv_steps": adv_steps}
        for name, v in positive.items():
            check_positive(v, name)
        non_negative = {"weight_decay": weight_decay, "warmup_epochs": warmup_epochs}
        for name, v in non_negative.items():
            check_positive(v, name, allow_zero=True)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1) (got {label_smoothing!r})")
        self.save_hyperparameters()
        self.model: ImageClassifier = create_model(
            model_name,
            num_classes=num_classes,
            pretrained=pretrained,
            in_chans=in_chans,
            img_size=img_size,
            **(model_kwargs or {}),
        )
        self.model.train()
        # Free-AT takes its own optimizer steps (m per minibatch), so Lightning must not
        self.automatic_optimization = adv_training != "free"
        self._free_delta: torch.Tensor | None = None
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_robust_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._robust_seen = 0

    @property
    def monitor(self) -> tuple[str, str]:
        """What ``best.ckpt`` maximizes (read by train.py): robust accuracy when it is measured."""
        return ("val/robust_acc", "max") if self.hparams.robust_val_steps else ("val/acc", "max")

    def configure_callbacks(self) -> list[Any]:
        if not self.hparams.early_stop_patience:
            return []
        from lightning.pytorch.callbacks import EarlyStopping

        metric, mode = self.monitor
        return [EarlyStopping(metric, mode=mode, patience=self.hparams.early_stop_patience)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training inputs: adversarial (AT), noisy (RND-GF) or clean."""
        hp = self.hparams
        if hp.adv_training != "none":
            fast = hp.adv_training == "fast"
            steps = 1 if fast else hp.adv_steps
            alpha = hp.adv_alpha or (1.25 * hp.adv_eps if fast else 2.5 * hp.adv_eps / steps)
            # Generate in eval mode so BatchNorm statistics are not updated by attack iterates.
            self.model.eval()
            with torch.enable_grad():
                x = pgd_linf(self.model, x, y, hp.adv_eps, alpha, steps, random_start=True)
            self.model.train()
        if hp.gaussian_sigma > 0:
            x = x + hp.gaussian_sigma * torch.randn_like(x)
        return x

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        if self.hparams.adv_training == "free":
            return self._free_step(x, y)
        x = self._perturb(x, y)
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def _free_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Free-AT (Shafahi et al. 2019): m replays of the minibatch; each backward pass gives
        both the parameter gradient (one optimizer step) and the input gradient (one FGSM step of
        size eps on a perturbation carried over to the next replay and the next minibatch)."""
        hp = self.hparams
        opt, sched = self.optimizers(), self.lr_schedulers()
        delta = self._free_delta
        if delta is None or delta.shape != x.shape:  # first or last (smaller) batch: start at 0
            delta = torch.zeros_like(x)
        for _ in range(hp.free_replays):
            delta = delta.detach().requires_grad_(True)
            logits = self.model((x + delta).clamp(0, 1))
            loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                delta = (delta + hp.adv_eps * delta.grad.sign()).clamp(-hp.adv_eps, hp.adv_eps)
        self._free_delta = delta.detach()
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss.detach()

    def on_validation_epoch_start(self) -> None:
        self._robust_seen = 0

    def _eval_step(self, batch: Any, metric: MulticlassAccuracy, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self.model(x)
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")
        hp = self.hparams
        if hp.robust_val_steps and self._robust_seen < hp.robust_val_images:
            x, y = batch[0], batch[1]
            keep = hp.robust_val_images - self._robust_seen
            x, y = x[:keep], y[:keep]
            self._robust_seen += x.shape[0]
            alpha = 2.5 * hp.adv_eps / hp.robust_val_steps
            with torch.enable_grad(), torch.inference_mode(False):
                x_adv = pgd_linf(self.model, x.clone(), y.clone(), hp.adv_eps, alpha,
                                 hp.robust_val_steps)  # fmt: skip
            self.val_robust_acc(self.model(x_adv), y)
            self.log("val/robust_acc", self.val_robust_acc, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(batch[0]).argmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "adamw":
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        elif hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, nesterov=True)
        else:
            raise ValueError(f"optimizer={hp.optimizer!r}; allowed: adamw, sgd")
        total = int(self.trainer.estimated_stepping_batches)
        if hp.adv_training == "free":  # m optimizer steps per minibatch
            total *= hp.free_replays
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(int(hp.warmup_epochs * steps_per_epoch), max(0, total - 1))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(1.0, progress))).item())

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
