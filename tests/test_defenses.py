"""Defenses: where the noise goes, how big it is, that it leaves no trace, AAA, calibration, callback.

Noise statistics are checked against nu with 5-sigma bounds computed from the number of noise
elements, so the tests hold for any seed rather than for a tuned one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import rfd
from rfd.defenses import (
    DEFENSES,
    Calibration,
    Defended,
    NoiseDefense,
    aaa_logits,
    calibrate_report,
    channel_std,
    protect,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "defense"


@dataclass
class Family:
    name: str
    model: nn.Module
    x: torch.Tensor
    penultimate: str  # the module path "penultimate" must resolve to
    deeper: str  # another hookable layer name


def _seq_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _tiny_vgg() -> nn.Module:
    vgg = timm.models.vgg.VGG(
        [8, "M", 16, "M", 16, "M", 16, "M", 16, "M"], num_classes=10, mlp_ratio=0.01
    )
    return rfd.models.ImageClassifier(vgg)


BUILDERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str, str]] = {
    "resnet": (
        lambda: rfd.create_model("test_resnet", 10),
        (16, 3, 32, 32),
        "net.global_pool",
        "layer2",
    ),
    "vgg": (_tiny_vgg, (16, 3, 32, 32), "net.pre_logits", "features.7"),
    "vit": (
        lambda: rfd.create_model("test_vit", 10),
        (4, 3, 160, 160),
        "net.head_drop",
        "blocks.1",
    ),
    "deit": (
        lambda: rfd.create_model(
            "deit_tiny_patch16_224",
            10,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
        ),
        (16, 3, 32, 32),
        "net.head_drop",
        "blocks.0",
    ),
    "sequential": (_seq_cnn, (16, 1, 28, 28), "6", "3"),
}


@pytest.fixture(scope="module", params=list(BUILDERS))
def fam(request: pytest.FixtureRequest) -> Family:
    build, shape, pen, deeper = BUILDERS[request.param]
    torch.manual_seed(0)
    model = build().eval()
    if request.param == "vit":  # test_vit's native size, as its pretrained config says
        assert tuple(model.net.pretrained_cfg["input_size"]) == shape[1:]
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    return Family(request.param, model, x, pen, deeper)


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks) for m in model.modules()
    )


def _injected(net: Defended, path: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise added at module ``path``, that module's input) in one defended forward.

    The defense's hook runs first, so a later hook sees the noisy output; recomputing the module
    on the same input (``module.forward`` skips hooks) gives the clean output of that very call.
    """
    rec: dict[str, torch.Tensor] = {}

    def grab(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        rec["noise"] = (out - module.forward(*args)).detach().clone()
        rec["input"] = args[0].detach().clone()

    h = net.base.get_submodule(path).register_forward_hook(grab)
    try:
        with torch.no_grad():
            net(x)
    finally:
        h.remove()
    return rec["noise"], rec["input"]


def _assert_noise_stats(noise: torch.Tensor, nu: float) -> None:
    n = noise.numel()
    assert abs(float(noise.mean())) < 5 * nu / math.sqrt(n)
    assert abs(float(noise.std()) / nu - 1) < 5 / math.sqrt(2 * n) + 1e-3


# --------------------------------------------------------------------------- feature / input noise


@pytest.mark.parametrize("layer", ["penultimate", "deeper"])
def test_feature_noise_sits_on_the_named_module_with_std_nu(fam: Family, layer: str) -> None:
    name = fam.deeper if layer == "deeper" else "penultimate"
    net = protect(fam.model, "feature", layers=name, nu=0.3, seed=0)
    path = net.layers[0]
    if layer == "penultimate":
        assert path == fam.penultimate
    noise, noisy_input = _injected(net, path, fam.x)
    _assert_noise_stats(noise, 0.3)
    # nothing upstream is perturbed: the module's input is the clean one
    _, clean_input = _injected(protect(fam.model, "feature", layers=name, nu=0.0), path, fam.x)
    assert torch.equal(noisy_input, clean_input)
    with torch.no_grad():
        assert not torch.equal(net(fam.x), fam.model(fam.x))
    assert _no_hooks(fam.model)


@pytest.mark.parametrize("defense", ["feature", "input"])
def test_identical_queries_differ_and_repeats_get_independent_draws(
    fam: Family, defense: str
) -> None:
    net = protect(fam.model, defense, nu=0.1, seed=0)
    assert net.randomized
    with torch.no_grad():
        assert not torch.equal(net(fam.x), net(fam.x))
        out = net(fam.x[:1].expand(6, *fam.x.shape[1:]))
    dist = torch.cdist(out, out)
    assert bool((dist + torch.eye(6) > 0).all()), "two copies of one image got the same noise"


@pytest.mark.parametrize("defense", DEFENSES)
def test_removal_leaves_the_model_bit_identical_and_hook_free(fam: Family, defense: str) -> None:
    with torch.no_grad():
        before = fam.model(fam.x)
        with protect(fam.model, defense, nu=0.2, seed=0, **_fast(defense, fam.x)) as net:
            assert net.base is fam.model and net.defense == defense
            net(fam.x)
            assert _no_hooks(fam.model)  # hooks live only inside the defended forward
            assert torch.equal(fam.model(fam.x), before)  # direct calls stay undefended
        assert torch.equal(fam.model(fam.x), before)
    assert _no_hooks(fam.model)
    with pytest.raises(RuntimeError, match="removed"):
        net(fam.x)


def _fast(defense: str, x: torch.Tensor | None = None) -> dict:
    """Options that build each registered defense cheaply: trained parts replaced by untrained
    modules of the right shape, no calibration data."""
    if defense == "magnet":  # an untrained autoencoder, a fixed threshold: no checkpoint, no data
        from rfd.defenses.magnet import Autoencoder

        return {"autoencoder": Autoencoder(x.shape[1]), "threshold": 1.0}
    if defense == "defensegan":  # an untrained generator of the queries' shape, a short search
        from rfd.defenses.defensegan import Generator

        gen = Generator(latent_dim=8, width=4, in_chans=x.shape[1], img_size=x.shape[-1])
        return {"generator": gen, "restarts": 2, "steps": 2}
    return {"aaa": {"steps": 10}, "smoothing": {"n": 8}}.get(defense, {})


@pytest.mark.parametrize("defense", DEFENSES)
def test_fixed_seed_reproduces_and_ignores_the_global_rng(fam: Family, defense: str) -> None:
    opts = _fast(defense, fam.x)
    with torch.no_grad():
        torch.manual_seed(0)
        a = protect(fam.model, defense, nu=0.2, seed=7, **opts)(fam.x)
        torch.manual_seed(12345)  # an attacker reseeding the global RNG must not matter
        state = torch.get_rng_state()
        net = protect(fam.model, defense, nu=0.2, seed=7, **opts)
        b = net(fam.x)
        assert torch.equal(torch.get_rng_state(), state), "defense noise consumed the global RNG"
        c = protect(fam.model, defense, nu=0.2, seed=8, **opts)(fam.x)
    assert torch.equal(a, b)
    # another seed, other noise (smoothing's vote shares on these untrained models are unanimous,
    # whatever the noise: tests/test_smoothing.py checks its seeding on a model with close votes)
    if net.randomized and defense != "smoothing":
        assert not torch.equal(a, c)
    assert net.generator.device == next(fam.model.parameters()).device


@pytest.mark.parametrize("defense", ["feature", "input"])
def test_zero_nu_equals_the_undefended_model(fam: Family, defense: str) -> None:
    net = protect(fam.model, defense, nu=0.0, seed=0)
    assert not net.randomized
    with torch.no_grad():
        assert torch.equal(net(fam.x), fam.model(fam.x))


def test_input_noise_is_added_to_pixels_before_normalization() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    x = torch.rand(8, 3, 32, 32)
    seen: dict[str, torch.Tensor] = {}
    h = model.normalize.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].clone()))
    try:
        with torch.no_grad():
            protect(model, "input", nu=0.25, seed=0)(x)
    finally:
        h.remove()
    _assert_noise_stats(seen["x"] - x, 0.25)  # in pixel units, unclipped (RND)
    assert float(seen["x"].min()) < 0 < float(seen["x"].max()) - 1


def test_list_of_layers_gets_one_nu_each() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    x = torch.rand(16, 3, 32, 32)
    net = protect(model, "feature", layers=["layer2", "penultimate"], nu=[0.2, 0.05], seed=0)
    assert net.layers == ["net.layer2", "net.global_pool"] and net.nu == [0.2, 0.05]
    for path, nu in zip(net.layers, [0.2, 0.05], strict=True):
        _assert_noise_stats(_injected(net, path, x)[0], nu)
    assert protect(model, "feature", layers=["layer1", "layer3"], nu=0.1).nu == [0.1, 0.1]
    with pytest.raises(ValueError, match="2 values for 3 layer"):
        protect(model, "feature", layers=["layer1", "layer2", "layer3"], nu=[0.1, 0.2])
    with pytest.raises(ValueError):
        protect(model, "feature", layers="layer1", nu=[0.1])
    with pytest.raises(ValueError, match="duplicate"):
        protect(model, "feature", layers=["penultimate", "global_pool"], nu=0.1)


def test_laplace_noise_has_the_same_std_and_heavier_tails() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    x = torch.rand(8, 3, 64, 64)
    # kurtosis 3 (Gaussian) vs 6 (Laplace); sample-kurtosis variance is 24/n resp. 2484/n
    for dist, kurt, var in (("gaussian", 3.0, 24.0), ("laplace", 6.0, 2484.0)):
        net = protect(model, "feature", layers="layer1", nu=0.5, seed=0, dist=dist)
        noise = _injected(net, net.layers[0], x)[0]
        _assert_noise_stats(noise, 0.5)
        k = float(((noise / noise.std()) ** 4).mean())
        assert abs(k - kurt) < 5 * math.sqrt(var / noise.numel()), (dist, k)


def test_channel_scale_uses_each_channels_clean_std() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    data = [(torch.rand(16, 3, 32, 32), torch.zeros(16)) for _ in range(2)]
    feats = []
    h = model.net.layer2.register_forward_hook(lambda m, a, o: feats.append(o.detach()))
    with torch.no_grad():
        for xb, _ in data:
            model(xb)
    h.remove()
    expected = torch.cat(feats).transpose(0, 1).reshape(feats[0].shape[1], -1).std(1)
    (measured,) = channel_std(model, ["net.layer2"], data)
    assert torch.allclose(measured, expected, rtol=1e-4, atol=1e-6)

    net = protect(model, "feature", layers="layer2", nu=0.5, seed=0, scale="channel", data=data)
    noise = _injected(net, "net.layer2", data[0][0])[0]
    live = expected > 1e-3 * expected.max()
    _assert_noise_stats((noise / expected.view(1, -1, 1, 1))[:, live], 0.5)
    with pytest.raises(ValueError, match="data"):
        protect(model, "feature", layers="layer2", scale="channel")


def test_bad_arguments_raise_clear_errors() -> None:
    model = _seq_cnn()
    with pytest.raises(ValueError, match="'gaussian_blur'.*none, input, feature, aaa"):
        protect(model, "gaussian_blur")
    for defense in ("feature", "input"):
        with pytest.raises(ValueError, match="nu"):
            protect(model, defense, nu=-0.1)
        with pytest.raises(ValueError, match="nu"):
            protect(model, defense, nu=float("nan"))
    with pytest.raises(ValueError, match="unknown layer 'layer9'.*penultimate"):
        protect(model, "feature", layers="layer9")
    with pytest.raises(ValueError, match="laplace"):
        protect(model, "feature", dist="cauchy")
    with pytest.raises(ValueError, match="one nu"):
        protect(model, "input", nu=[0.1, 0.2])


def test_defended_module_is_a_drop_in_for_the_model() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    net = protect(model, "feature", nu=0.1)
    assert net.num_classes == 10 and net.in_chans == 3  # read through to the base model
    assert isinstance(net, nn.Module) and net.training is False
    assert {protect(model, d).randomized for d in ("none", "aaa")} == {False}
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    protect(model, "feature", nu=0.1)(x).sum().backward()  # differentiable (white-box PGD)
    assert x.grad is not None and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- AAA


def _margin(z: torch.Tensor) -> torch.Tensor:
    v = z.topk(2, dim=1).values
    return v[:, 0] - v[:, 1]


def test_aaa_keeps_the_label_and_moves_margins_toward_the_attractor() -> None:
    z0 = 4 * torch.randn(1000, 10, generator=torch.Generator().manual_seed(0))
    z = aaa_logits(z0)
    assert torch.equal(z.argmax(1), z0.argmax(1))
    m0, m = _margin(z0), _margin(z)
    attractor = (torch.floor(m0 / 6) + 0.5) * 6
    target = attractor - (m0 - attractor)
    away = (m0 - attractor).abs() > 0.1  # margins already on the attractor have nowhere to go
    assert bool((torch.sign(m - m0) == torch.sign(attractor - m0))[away].all())
    assert bool(((m - target).abs() < (m0 - target).abs())[away].all())
    # on average more than halfway to the mirrored target (the calibration term holds it back),
    # and most margins end up past the attractor: the attacker's loss runs backwards there
    assert float((m - target).abs().mean()) < 0.5 * float((m0 - target).abs().mean())
    assert float(((m - attractor) * (m0 - attractor) < 0).float().mean()) > 0.5
    # deterministic, and each row independent of the rest of the batch
    assert torch.equal(aaa_logits(z0), z) and torch.equal(aaa_logits(z0[:7]), z[:7])


def test_aaa_model_keeps_argmax_in_any_grad_mode() -> None:
    model = rfd.create_model("test_resnet", 10).eval()
    x = torch.rand(32, 3, 32, 32)
    net = protect(model, "aaa", seed=0)
    assert net.layers == ["logits"] and not net.randomized
    with torch.no_grad():
        ref = model(x)
        out = net(x)
    with torch.inference_mode():
        out_inf = net(x)
    assert torch.equal(out.argmax(1), ref.argmax(1))
    assert torch.equal(out, out_inf) and not torch.equal(out, ref)
    assert _no_hooks(model)


# --------------------------------------------------------------------------- calibration


@pytest.fixture(scope="session")
def calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibration")


def _noisy_drop(model: nn.Module, defense: str, nu: float, data, passes: int, seed: int) -> float:
    """An independent measurement: other seed, more passes, written without calibration code."""
    batches = [(b[0], b[1]) for b in data]
    n = sum(len(y) for _, y in batches)
    with torch.inference_mode():
        clean = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / n
        net = protect(model, defense, nu=nu, seed=seed)
        noisy = [
            sum(int((net(x).argmax(1) == y).sum()) for x, y in batches) / n for _ in range(passes)
        ]
    return clean - sum(noisy) / passes


# Noise makes the measured drop itself random: one pass over 1000 images spreads by ~0.4 points
# at a 1% drop and ~0.8 points at 4%. The calibration averages 20 passes, the independent check 40
# more with another seed, and the 4% case uses 2000 images, which keeps the std of their
# difference near 0.15 points, a third of the +-0.5-point tolerance.
@pytest.mark.parametrize(("target", "n_images"), [(0.01, 1000), (0.04, 2000)])
def test_calibration_hits_the_target_drop(
    trained_fmnist, calibration_cache: Path, target: float, n_images: int
) -> None:
    data = trained_fmnist.datamodule.calibration_dataloader(n_images, seed=0, batch_size=1000)
    rep = calibrate_report(
        trained_fmnist.model,
        "feature",
        data=data,
        target_drop=target,
        n_passes=20,
        cache_dir=calibration_cache,
        checkpoint=trained_fmnist.checkpoint,
    )
    assert rep.nu > 0 and abs(rep.drop - target) <= 0.001 and rep.drop_std > 0
    assert rep.n_samples == n_images and len(rep.history) <= 12
    remeasured = _noisy_drop(trained_fmnist.model, "feature", rep.nu, data, passes=40, seed=999)
    assert abs(remeasured - target) <= 0.005, (rep, remeasured)


def test_calibration_is_cached_on_disk_and_keyed(trained_fmnist, tmp_path: Path) -> None:
    data = trained_fmnist.datamodule.calibration_dataloader(200, seed=0)
    kw = dict(data=data, target_drop=0.03, n_passes=2, cache_dir=tmp_path)
    first = calibrate_report(trained_fmnist.model, "input", **kw)
    assert isinstance(first, Calibration) and not first.cached
    assert len(list(tmp_path.glob("input-*.json"))) == 1
    again = calibrate_report(trained_fmnist.model, "input", **kw)
    assert again.cached and again.nu == first.nu and again.drop == first.drop
    nu = rfd.calibrate(trained_fmnist.model, "input", **{**kw, "target_drop": 0.05})
    assert isinstance(nu, float) and nu > first.nu
    assert len(list(tmp_path.glob("input-*.json"))) == 2
    with pytest.raises(ValueError, match="aaa"):
        rfd.calibrate(trained_fmnist.model, "aaa", **kw)


# --------------------------------------------------------------------------- Lightning callback


class _Probe(L.LightningModule):
    """Records, inside test_step / predict_step, what ``self.model`` is and whether it is noisy."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[tuple[bool, bool]] = []

    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.seen.append((isinstance(self.model, Defended), not torch.equal(out, self.model(x))))
        return out

    def test_step(self, batch, batch_idx):
        return self._probe(batch[0])

    def predict_step(self, batch, batch_idx):
        return self._probe(batch[0])


def quiet_trainer(**kw) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary (also used by other
    test modules)."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_callback_attaches_around_test_and_predict_then_detaches() -> None:
    model = _seq_cnn().eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        before = model(x)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(8)), batch_size=4
    )
    probe = _Probe(model)
    cb = NoiseDefense(defense="feature", nu=0.5, seed=0)
    quiet_trainer(callbacks=[cb]).test(probe, dataloaders=loader, verbose=False)
    quiet_trainer(callbacks=[cb]).predict(probe, dataloaders=loader)
    assert probe.seen == [(True, True)] * 4
    assert probe.model is model and _no_hooks(model) and cb.defended is None
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_callback_calibrates_from_the_datamodule(trained_fmnist, calibration_cache: Path) -> None:
    probe = _Probe(trained_fmnist.model)
    cb = NoiseDefense(
        defense="feature", target_drop=0.02, n_calibration=500, cache_dir=str(calibration_cache)
    )
    quiet_trainer(callbacks=[cb], limit_test_batches=1).test(
        probe, datamodule=trained_fmnist.datamodule, verbose=False
    )
    assert cb.calibration is not None and cb.calibration.n_samples == 500
    assert abs(cb.calibration.drop - 0.02) <= 0.002
    assert probe.seen == [(True, True)] and probe.model is trained_fmnist.model
    assert _no_hooks(trained_fmnist.model)


@pytest.mark.parametrize("name", ["none", "input", "feature", "aaa"])
def test_defense_configs_build_the_callback(name: str) -> None:
    """Each YAML instantiates through jsonargparse exactly as a LightningCLI callback list would."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.pytorch.Callback])
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    (cb,) = parser.instantiate_classes(parser.parse_object({"callbacks": [cfg]})).callbacks
    assert isinstance(cb, NoiseDefense) and cb.defense == name
    if name in ("input", "feature"):
        assert cb.nu is None and cb.target_drop == 0.02
    net = cb.attach(_StubTrainer(), _Probe(_seq_cnn())) if name in ("none", "aaa") else None
    assert net is None or net.defense == name


class _StubTrainer:
    datamodule = None


def test_a_module_run_twice_in_one_forward_gets_fresh_noise_each_time():
    """Noise is fresh per call, as Theorem 1's variance term assumes (independent draws): a
    shared block that runs twice in one forward must not repeat its first draw."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.zeros(x.shape[0], 4)
            return torch.cat([self.shared(z), self.shared(z)], 1)  # the same input twice

    net = Twice().eval()
    x = torch.rand(3, 1, 2, 2)
    with rfd.protect(net, "feature", layers="shared", nu=1.0, seed=0) as d, torch.no_grad():
        out = d(x)
    first, second = out[:, :4], out[:, 4:]
    assert not torch.allclose(first, second)


def test_jpeg_tables_follow_libjpeg_and_the_round_trip_matches_pil():
    """libjpeg's integer quality scaling with baseline tables (1..255, what PIL writes), and the
    defense's round trip within a grey level of PIL's on average."""
    import io

    import numpy as np
    from PIL import Image

    from rfd.defenses.jpeg import jpeg, quant_table

    assert quant_table(30)[0, 7] == (61 * (5000 // 30) + 50) // 100  # 101; float scaling: 102
    assert quant_table(5).max() == 255 and quant_table(100).min() == 1
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(3, 1, 7, 7, generator=g), size=28, mode="bilinear")
    x = ((0.8 * x + 0.2 * torch.rand(3, 1, 28, 28, generator=g)) * 255).round() / 255
    for q in (75, 30, 5):
        ours, gaps = jpeg(x, q), []
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8), "L").save(
                buf, "JPEG", quality=q
            )
            ref = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255)
            gaps.append(float((ours[i, 0] - ref).abs().mean()) * 255)  # grey levels
        # PIL rounds its output to 8 bits and uses integer DCTs: about 0.3 levels on average
        assert sum(gaps) / len(gaps) < 0.8 and max(gaps) < 2.0, (q, gaps)
