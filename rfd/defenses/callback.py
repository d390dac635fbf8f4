"""``NoiseDefense``: the defense as a Lightning callback, so evaluation code stays defense-agnostic.

Noise at test time is behaviour orthogonal to the network, which Lightning puts in callbacks. The
callback swaps ``pl_module.<attr>`` (``model`` by default) for the defended wrapper when testing or
predicting starts and puts the original back when it ends (or fails), so ``self.model(x)`` in
``test_step`` is defended and nothing outlives the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl

from rfd.defenses.api import calibrate_report, protect
from rfd.defenses.base import DEFENSES, Defense
from rfd.defenses.calibration import Calibration


class NoiseDefense(pl.Callback):
    """Attach ``rfd.protect(model, defense, ...)`` around ``trainer.test`` / ``trainer.predict``.

    Args:
        defense: a name in ``rfd.defenses.DEFENSES``.
        layers: layer name(s), as in ``rfd.protect``.
        nu: noise standard deviation; ``None`` with ``target_drop`` calibrates it first.
        target_drop: clean-accuracy drop to calibrate nu for (fraction, 0.02 = 2 points).
        seed: seed of the defense's own generator.
        n_calibration: calibration images, a random subset of the datamodule's validation
            split (``val_calibration_dataloader(n, seed)``): ``trainer.test`` reports on the
            whole test split, so no test image may tune nu.
        calibration_seed: seed of the calibration subset and of the calibration noise.
        n_passes: noisy passes per calibration evaluation.
        cache_dir: calibration cache folder (default ``~/.cache/rfd/calibration``).
        attr: the ``pl_module`` attribute holding the classifier.
        options: extra ``rfd.protect`` options (``dist``, ``scale``, AAA settings).
    """

    def __init__(
        self,
        defense: str = "feature",
        layers: str | list[str] = "penultimate",
        nu: float | list[float] | None = None,
        target_drop: float | None = None,
        seed: int | None = 0,
        n_calibration: int = 1000,
        calibration_seed: int = 0,
        n_passes: int = 5,
        cache_dir: str | None = None,
        attr: str = "model",
        options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if defense not in DEFENSES:
            raise ValueError(f"unknown defense {defense!r}; valid defenses: {', '.join(DEFENSES)}")
        self.cls = DEFENSES[defense]
        if self.cls.calibrated and nu is None and target_drop is None:
            raise ValueError(f"defense {defense!r} needs nu or target_drop")
        self.defense, self.layers, self.nu, self.target_drop = defense, layers, nu, target_drop
        self.seed, self.n_calibration, self.calibration_seed = seed, n_calibration, calibration_seed
        self.n_passes, self.cache_dir, self.attr = n_passes, cache_dir, attr
        self.options = dict(options or {})
        self.calibration: Calibration | None = None
        self.defended: Defense | None = None
        self._original: Any = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.attach(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.detach(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.detach(pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Defense:
        """Calibrate if asked, then put the defended wrapper in place of ``pl_module.<attr>``."""
        if self.defended is not None:
            self.detach(pl_module)
        model = getattr(pl_module, self.attr)
        nu: float | Sequence[float] | None = self.nu
        layers = self.layers
        if nu is None and self.target_drop is not None and self.cls.calibrated:
            self.calibration = calibrate_report(
                model,
                self.defense,
                self.layers,
                data=self._calibration_data(trainer),
                target_drop=self.target_drop,
                n_passes=self.n_passes,
                seed=self.calibration_seed,
                cache_dir=self.cache_dir,
                **self.options,
            )
            nu = self.calibration.nu
            if self.calibration.chosen is not None:  # "auto" resolved once, at the target drop
                layers = self.calibration.chosen
        opts = dict(self.options)
        if self.cls.needs_data(layers, opts) and "data" not in opts:
            opts["data"] = self._calibration_data(trainer)
        self.defended = protect(
            model, self.defense, layers, nu=0.0 if nu is None else nu, seed=self.seed, **opts
        )
        self._original = model
        setattr(pl_module, self.attr, self.defended)
        return self.defended

    def detach(self, pl_module: pl.LightningModule) -> None:
        """Put the original model back; safe to call twice."""
        if self.defended is None:
            return
        setattr(pl_module, self.attr, self._original)
        self.defended.remove()
        self.defended, self._original = None, None

    def _calibration_data(self, trainer: pl.Trainer) -> Any:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "val_calibration_dataloader"):
            raise ValueError(
                "calibrating nu needs a datamodule with val_calibration_dataloader(n, seed); "
                "or give nu explicitly"
            )
        return dm.val_calibration_dataloader(self.n_calibration, seed=self.calibration_seed)
