"""Defense-GAN: the projection (restarts, steps, keyed starts), the registry contract, training.

Everything runs on tiny untrained generators (8x8 images): the properties tested here hold for
any generator, so no trained checkpoint is needed.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rfd
from rfd.defenses import DEFENSES, RowForward, defensegan
from rfd.defenses.defensegan import DefenseGAN, GANModule, Generator, project
from rfd.models import load_part
from rfd.rng import KeyedRNG, row_keys


def _gen(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(latent_dim=8, width=4, in_chans=1, img_size=8).eval()


def _images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _rng(n: int) -> KeyedRNG:
    return KeyedRNG(row_keys(3, torch.arange(n)))


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10)).eval()


def test_more_restarts_and_steps_never_raise_the_error(one_thread: None) -> None:
    g, x = _gen(), _images()
    errs = [project(g, x, r, 10, 0.05, _rng(6))[2] for r in (1, 2, 4, 8)]
    for fewer, more in zip(errs, errs[1:], strict=False):
        assert bool((more <= fewer + 1e-6).all()), (fewer, more)  # restart r starts alike for any R
    assert float(errs[-1].mean()) < float(errs[0].mean())
    by_steps = [project(g, x, 2, s, 0.05, _rng(6))[2].mean() for s in (1, 5, 30)]
    assert by_steps[0] > by_steps[1] > by_steps[2]
    x_hat, z, err = project(g, x, 2, 5, 0.05, _rng(6))
    assert x_hat.shape == x.shape and z.shape == (6, 8) and err.shape == (6,)
    with torch.no_grad():  # the returned error is the error of the returned image
        assert torch.allclose(g(z), x_hat, atol=1e-6)
    assert torch.allclose((x_hat - x).square().flatten(1).mean(1), err, atol=1e-6)


def test_rows_do_not_depend_on_their_batch(one_thread: None, monkeypatch) -> None:
    g, x = _gen(), _images(6)
    full = project(g, x, 3, 8, 0.05, _rng(6))
    keys = row_keys(3, torch.arange(6))
    order = torch.tensor([4, 1])
    with torch.inference_mode():  # the attack engine's mode (inference tensors in and out)
        xi, ki = x[order].clone(), keys[order].clone()
        part = project(g, xi, 3, 8, 0.05, KeyedRNG(ki))
    for a, b in zip(full, part, strict=True):
        assert torch.allclose(a[order], b, atol=1e-6)
    monkeypatch.setattr(defensegan, "CHUNK", 3)  # one row (x 3 restarts) per descent
    for a, b in zip(full, project(g, x, 3, 8, 0.05, _rng(6)), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    other = project(g, x, 3, 8, 0.05, KeyedRNG(row_keys(4, torch.arange(6))))[0]
    assert not torch.allclose(other, full[0])  # the keys decide the starts


def test_x_gets_no_graph_and_generator_no_grad(one_thread: None) -> None:
    g, x = _gen(), _images(2).requires_grad_(True)
    x_hat = project(g, x, 2, 3, 0.05, _rng(2))[0]
    assert not x_hat.requires_grad
    assert all(p.grad is None for p in g.parameters())
    assert not g.training  # left in the mode it came in
    with pytest.raises(ValueError, match="generator makes"):
        project(g, torch.rand(2, 3, 8, 8), 1, 1, 0.05, _rng(2))


def test_registry_contract(one_thread: None) -> None:
    model, x = _classifier(), _images(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        clean = model(x)
        net = rfd.protect(model, "defensegan", generator=_gen(), restarts=2, steps=3, seed=0)
        a = net(x)
        b = rfd.protect(model, "defensegan", generator=_gen(), restarts=2, steps=3, seed=0)(x)
        c = rfd.protect(model, "defensegan", generator=_gen(), restarts=2, steps=3, seed=1)(x)
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert not torch.allclose(a, clean)
        assert net.remove() is model
        assert torch.equal(model(x), clean)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(net, DefenseGAN) and net.randomized and not net.differentiable
    assert net.forwards_per_query == 2 * 3 + 1
    assert DEFENSES["defensegan"].title == "Defense-GAN" and not DEFENSES["defensegan"].calibrated
    with pytest.raises(RuntimeError, match="removed"):
        net(x)


def test_bpda_passes_the_identity_and_no_bpda_a_zero_gradient(one_thread: None) -> None:
    model = _classifier()
    net = rfd.protect(model, "defensegan", generator=_gen(), restarts=1, steps=2, seed=0)
    keys, plan = row_keys(0, torch.arange(3)), torch.zeros(3, dtype=torch.long)
    grads = []
    for bpda in (True, False):
        x = _images(3).requires_grad_(True)
        RowForward(model, [net])(x, plan, keys, bpda=bpda).sum().backward()
        grads.append(x.grad)
    with torch.no_grad():  # BPDA: the classifier's gradient, taken at G(z*)
        x_hat = net.row_input(_images(3), KeyedRNG(keys).stream("input"))
    xh = x_hat.clone().requires_grad_(True)
    model(xh).sum().backward()
    assert torch.allclose(grads[0], xh.grad, atol=1e-6)
    assert torch.equal(grads[1], torch.zeros_like(grads[1]))


@pytest.mark.parametrize(
    "opts,match",
    [
        ({"restarts": 0}, "restarts"),
        ({"steps": 2.5}, "steps"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"generator": 42}, "generator"),
        ({"generator": nn.Linear(2, 2)}, "latent_dim"),
    ],
)
def test_bad_options_raise_one_line_errors(opts: dict, match: str) -> None:
    kw = {"generator": _gen(), **opts}
    with pytest.raises(ValueError, match=match) as e:
        rfd.protect(_classifier(), "defensegan", **kw)
    assert "\n" not in str(e.value)


def test_missing_checkpoint_names_the_training_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="python train.py --config fmnist_defensegan"):
        rfd.protect(_classifier(), "defensegan", generator=tmp_path / "none.ckpt")
    with pytest.raises(ValueError, match="multiple of 4"):
        GANModule(image_size=30)


def test_gan_module_trains_and_its_checkpoint_loads_back(tmp_path, one_thread: None) -> None:
    L.seed_everything(0, verbose=False)
    data = TensorDataset(torch.rand(32, 1, 8, 8), torch.zeros(32, dtype=torch.long))
    loader = DataLoader(data, batch_size=8)
    module = GANModule(latent_dim=8, width=4, image_size=8, val_steps=2)
    start = {k: v.clone() for k, v in module.generator.state_dict().items()}
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor=GANModule.monitor[0], mode=GANModule.monitor[1]
    )
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False,
                        callbacks=[ckpt], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, loader, loader)
    metrics = trainer.callback_metrics
    assert {"train/g_loss", "train/d_loss", "val/recon"} <= set(metrics)
    assert all(torch.isfinite(metrics[k]) for k in ("train/g_loss", "train/d_loss", "val/recon"))
    trained = module.generator.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in start.items())
    loaded = load_part(GANModule, tmp_path / "best.ckpt")
    assert all(torch.equal(loaded.generator.state_dict()[k], v) for k, v in trained.items())
    net = rfd.protect(_classifier(), "defensegan", generator=tmp_path / "best.ckpt", steps=1)
    with torch.no_grad():
        assert net(torch.rand(2, 1, 8, 8)).shape == (2, 10)
