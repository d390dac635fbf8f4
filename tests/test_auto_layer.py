"""layers="auto" in rfd.protect / rfd.calibrate picks the layer rfd.analysis.auto_layer ranks first."""

from __future__ import annotations

import pytest

import rfd
from rfd.analysis import auto_layer
from rfd.defenses import calibration
from rfd.models import resolve_layer


def test_protect_and_calibrate_accept_auto(trained_fmnist, tmp_path) -> None:
    model = trained_fmnist.model
    data = trained_fmnist.datamodule.calibration_dataloader(200, seed=0, batch_size=100)
    chosen = auto_layer(model, data, n_images=200, cache_dir=str(tmp_path))
    assert chosen in rfd.feature_layers(model)
    net = rfd.protect(model, "feature", layers="auto", nu=0.3, seed=0, data=data)
    assert net.layers == [resolve_layer(model, chosen)]
    net.remove()
    nu = rfd.calibrate(
        model, "feature", layers="auto", data=data, target_drop=0.04, cache_dir=str(tmp_path)
    )
    assert nu > 0
    # the public report resolves "auto" as rfd.calibrate does; the core search refuses it
    report = rfd.defenses.calibrate_report(
        model, "feature", layers="auto", data=data, target_drop=0.04, cache_dir=str(tmp_path)
    )
    again = auto_layer(model, data, target_drop=0.04, cache_dir=str(tmp_path))
    assert report.nu == nu and report.layers == [resolve_layer(model, again)]
    assert report.chosen == again  # what a caller then builds the defense at
    with pytest.raises(ValueError, match="concrete layer"):
        calibration.calibrate_report(model, "feature", "auto", data=data)
    with pytest.raises(ValueError, match='layers="auto" needs data'):
        rfd.protect(model, "feature", layers="auto", nu=0.3)


def test_the_callback_builds_the_defense_at_the_layer_calibration_chose(monkeypatch) -> None:
    """layers="auto" is resolved once, by the calibration at the target drop asked for; the
    defense is then built at that layer, not re-resolved at protect's default drop."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from rfd.defenses import callback
    from rfd.defenses.calibration import Calibration

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    picked = Calibration(nu=0.1, drop=0.04, drop_std=0.0, clean_acc=1.0, noisy_acc=0.96,
                         target_drop=0.04, defense="feature", layers=["2"], n_samples=10,
                         n_passes=1, seed=0, chosen="2")  # fmt: skip
    monkeypatch.setattr(callback, "calibrate_report", lambda *a, **k: picked)
    cb = rfd.defenses.NoiseDefense("feature", layers="auto", target_drop=0.04)
    module = SimpleNamespace(model=net)
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(val_calibration_dataloader=lambda n, seed: [])
    )
    defended = cb.attach(trainer, module)
    assert defended.layers == [resolve_layer(net, "2")] and defended.nu == 0.1
    assert torch.isfinite(defended(torch.rand(3, 1, 2, 2))).all()
    cb.detach(module)
