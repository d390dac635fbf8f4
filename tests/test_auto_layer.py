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
    with pytest.raises(ValueError, match="concrete layer"):
        calibration.calibrate_report(model, "feature", "auto", data=data)
    with pytest.raises(ValueError, match='layers="auto" needs data'):
        rfd.protect(model, "feature", layers="auto", nu=0.3)
