"""MagNet: the detector keeps its false-positive rate, the reformer is what the classifier sees,
the registry contract holds, and the autoencoder trains and round-trips through a checkpoint."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
import yaml
from test_defenses import quiet_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import rfd
from rfd.defenses import DEFENSES, RowForward
from rfd.defenses.magnet import Autoencoder, AutoencoderModule, MagNet
from rfd.models import load_part

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _images(loader: DataLoader) -> torch.Tensor:
    return torch.cat([b[0] for b in loader])


@pytest.fixture(scope="module")
def fmnist_ae(fmnist_dm) -> nn.Module:
    """An autoencoder briefly trained on 2048 Fashion-MNIST training images (about 4 s)."""
    torch.manual_seed(0)
    x = torch.stack([fmnist_dm.train_set[i][0] for i in range(2048)])
    module = AutoencoderModule(channels=1, lr=0.03)
    quiet_trainer(max_steps=120).fit(
        module, DataLoader(TensorDataset(x), batch_size=64, shuffle=True)
    )
    return module.net.eval()


def _classifier() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def test_detector_keeps_its_false_positive_rate_on_held_out_clean_images(fmnist_dm, fmnist_ae):
    fpr = 0.05
    calib = fmnist_dm.calibration_dataloader(500, seed=0, batch_size=250, n_eval=1000)
    held = fmnist_dm.eval_dataloader(1000, seed=0, batch_size=250)
    assert not set(calib.dataset.indices) & set(held.dataset.indices)  # disjoint test images
    net = rfd.protect(_classifier(), "magnet", autoencoder=fmnist_ae, fpr=fpr, data=calib)
    assert net.detect(_images(calib)).float().mean().item() == pytest.approx(fpr, abs=0.004)
    rate = net.detect(_images(held)).float().mean().item()
    # spread of the held-out rate: the 1000-image binomial plus the quantile's own estimation
    # error from 500 images (its true rate is ~Beta with variance fpr(1-fpr)/500)
    sd = math.sqrt(fpr * (1 - fpr) * (1 / 1000 + 1 / 500))
    assert abs(rate - fpr) < 3.5 * sd, f"held-out false-positive rate {rate:.3f} vs fpr {fpr}"
    # MagNet's premise on this autoencoder: noise off the image manifold is flagged
    noisy = (_images(held)[:200] + 0.3 * torch.randn(200, 1, 28, 28)).clamp(0, 1)
    assert net.detect(noisy).float().mean().item() > 0.5


def test_classifier_sees_the_reformed_image_and_gradients_follow_bpda(fmnist_ae):
    model, x = _classifier(), torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    net = rfd.protect(model, "magnet", autoencoder=fmnist_ae, threshold=0.05)
    with torch.no_grad():
        reformed = fmnist_ae(x)
        assert torch.allclose(net(x), model(reformed), atol=1e-6)
        assert not torch.allclose(net(x), model(x), atol=1e-3)
        assert torch.equal(net.detect(x), ((x - reformed) ** 2).flatten(1).mean(1) > 0.05)
    assert not net.randomized and not MagNet.differentiable

    def grad(bpda: bool) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        z = RowForward(model, [net])(xg, torch.zeros(6, dtype=torch.long), torch.arange(6), bpda)
        (g,) = torch.autograd.grad(F.cross_entropy(z, torch.arange(6)), xg)
        return g

    r = fmnist_ae(x).detach().requires_grad_(True)  # BPDA: the gradient at the reformed image
    (g_identity,) = torch.autograd.grad(F.cross_entropy(model(r), torch.arange(6)), r)
    xg = x.clone().requires_grad_(True)  # no BPDA: through the autoencoder
    (g_through,) = torch.autograd.grad(F.cross_entropy(model(fmnist_ae(xg)), torch.arange(6)), xg)
    assert torch.allclose(grad(True), g_identity, atol=1e-6)
    assert torch.allclose(grad(False), g_through, atol=1e-6)


def test_registry_contract_and_clear_errors(tmp_path: Path):
    assert "magnet" in DEFENSES and DEFENSES["magnet"].title == "MagNet"
    assert list(DEFENSES).index("magnet") > list(DEFENSES).index("jpeg")
    assert MagNet.needs_data(None, {}) and not MagNet.needs_data(None, {"threshold": 0.1})
    model, ae = _classifier(), Autoencoder(1)
    x = torch.rand(4, 1, 28, 28)
    data = DataLoader(TensorDataset(torch.rand(40, 1, 28, 28)), batch_size=16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        with rfd.protect(model, "magnet", autoencoder=ae, data=data, fpr=0.1) as net:
            assert net.base is model and net.threshold > 0
            net(x)
            assert torch.equal(model(x), before)
        assert net.remove() is model and torch.equal(model(x), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="removed"):
        net(x)
    bad = [
        ({"fpr": 0.0}, "fpr"),
        ({"fpr": 1.0}, "fpr"),
        ({"fpr": True}, "fpr"),
        ({"norm": 3}, "norm must be 1 or 2"),
        ({"norm": "l2"}, "norm must be 1 or 2"),
        ({"threshold": -1.0}, "threshold"),
        ({"autoencoder": 5}, "checkpoint path or an nn.Module"),
    ]
    for opts, msg in bad:
        with pytest.raises(ValueError, match=msg):
            rfd.protect(model, "magnet", **{"autoencoder": ae, "data": data, **opts})
    with pytest.raises(ValueError, match="needs data="):
        rfd.protect(model, "magnet", autoencoder=ae)
    with pytest.raises(FileNotFoundError, match="train.py --config fmnist_magnet"):
        rfd.protect(model, "magnet", autoencoder=tmp_path / "missing.ckpt", data=data)
    with pytest.raises(ValueError, match="autoencoder takes 3 channels but the model takes 1"):
        rfd.protect(model, "magnet", autoencoder=Autoencoder(3), data=data)
    with pytest.raises(ValueError, match="must return images of the input's shape"):
        rfd.protect(model, "magnet", autoencoder=nn.AvgPool2d(2), data=data)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        AutoencoderModule(channels=2)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        AutoencoderModule(lr=0)
    # every option the defense config names is a constructor argument
    cfg = yaml.safe_load((CONFIGS / "defense" / "magnet.yaml").read_text())
    assert set(cfg["init_args"]["options"]) <= set(inspect.signature(MagNet).parameters)


def test_autoencoder_module_learns_and_round_trips_through_a_checkpoint(tmp_path: Path):
    torch.manual_seed(0)
    # smooth dark images, far from the initial grey (~0.5) output
    x = 0.5 * F.interpolate(torch.rand(64, 1, 3, 3), size=(12, 12), mode="bilinear")
    loader = DataLoader(TensorDataset(x), batch_size=32)
    module = AutoencoderModule(channels=1, lr=0.02)
    assert module.monitor == ("val/loss", "min")
    before = F.mse_loss(module(x), x).item()
    trainer = quiet_trainer(default_root_dir=tmp_path, max_steps=30)
    trainer.fit(module, loader, loader)
    after = F.mse_loss(module(x), x).item()
    assert after < 0.9 * before, f"loss {before:.4f} -> {after:.4f}"
    assert "val/loss" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics
    trainer.save_checkpoint(tmp_path / "ae.ckpt")
    loaded = load_part(AutoencoderModule, tmp_path / "ae.ckpt")
    assert not loaded.training and loaded.hparams.lr == 0.02
    with torch.no_grad():
        assert torch.equal(loaded(x), module.eval()(x))
    net = rfd.protect(_classifier(), "magnet", autoencoder=tmp_path / "ae.ckpt", threshold=0.1)
    assert torch.equal(net.reform(x[:2]), loaded(x[:2]).clamp(0, 1))
