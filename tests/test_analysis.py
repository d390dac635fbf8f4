"""rfd.analysis: closed forms on a two-layer linear model, invariants on tiny timm models, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import rfd
from rfd import analysis as A
from rfd.analysis import cli
from rfd.data import default_fmnist_dir

HAS_FMNIST = any(
    (default_fmnist_dir() / f"t10k-labels-idx1-ubyte{s}").exists() for s in ("", ".gz")
)


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny batches gain nothing from intra-op threads, and on a loaded 2-core machine spinning
    OpenMP threads made the attack loops here 20x slower (measured); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def linear_model(k_classes: int, d: int = 36, hidden: int = 8, seed: int = 0) -> nn.Sequential:
    """f(x) = W2 (W1 flatten(x) + b1) + b2 on (1, 6, 6) images; layer "1" is h(x) = W1 x + b1."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Linear(hidden, k_classes)).eval()


def closed_form(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """dL/dh = W2^T (e_y - e_j) and dL/dx = W1^T W2^T (e_y - e_j), j the runner-up class."""
    w1, w2 = model[1].weight.detach(), model[2].weight.detach()
    with torch.no_grad():
        z = model(x)
    j = z.scatter(1, y.view(-1, 1), float("-inf")).argmax(1)
    e = torch.eye(w2.shape[0])
    gh = (e[y] - e[j]) @ w2
    gx = gh @ w1
    return gh.norm(dim=1), gx.norm(dim=1)


def self_labelled(model: nn.Module, n: int, shape=(1, 28, 28), seed: int = 0):
    """Random images labelled by the model itself: 100 % clean accuracy, so noise has a drop."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return rfd.create_model("test_resnet", num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return rfd.create_model("test_vit", num_classes=10, in_chans=1, img_size=32)


# --------------------------------------------------------------------------- closed forms


def test_gradient_ratio_matches_closed_form_on_linear_model():
    model = linear_model(k_classes=10)
    x = torch.rand(16, 1, 6, 6)
    y = torch.randint(0, 10, (16,))
    g = A.layer_gradients(model, x, y, ["1"])
    gh, gx = closed_form(model, x, y)
    torch.testing.assert_close(g.grad_norm["1"], gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.grad_norm["input"], gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.ratio("1"), gh / gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g.ratio("input"), torch.ones(16))
    # the ratio depends on the image only through its runner-up class j
    assert len(torch.unique(g.ratio("1").round(decimals=5))) <= 10 * 9


def test_stepped_ratio_matches_closed_form_at_the_stepped_point():
    model = linear_model(k_classes=10, seed=1)
    x = torch.rand(12, 1, 6, 6)
    y = torch.randint(0, 10, (12,))
    res = A.gradient_norm_ratios(model, (x, y), layers=["1"], step=0.05, batch_size=5)
    g0 = A.layer_gradients(model, x, y, ["1"], keep_input_grad=True)
    x1 = A.gradient_step(x, g0.input_grad, 0.05)
    assert float((x1 - x).abs().max()) <= 0.05 + 1e-7 and x1.min() >= 0 and x1.max() <= 1
    gh, gx = closed_form(model, x1, y)
    torch.testing.assert_close(res.stepped.ratio("1"), gh / gx, rtol=1e-5, atol=1e-7)
    # one step of signed descent lowers the margin loss of a linear model
    assert bool((res.stepped.loss <= res.clean.loss + 1e-6).all())


def test_flip_probability_formula():
    p = A.flip_probability(torch.tensor([1e-12, 1.0, 1e12]))
    torch.testing.assert_close(
        p, torch.tensor([0.0, 0.25, 0.5], dtype=torch.float64), atol=1e-6, rtol=0
    )
    r = torch.logspace(-4, 4, 50)
    assert bool((A.flip_probability(r).diff() > 0).all())
    # nu is rfd's std: the paper's variance is nu**2
    ratio = A.theorem_ratio(0.1, 0.01, torch.tensor([3.0]), torch.tensor([2.0]))
    torch.testing.assert_close(
        ratio, torch.tensor([2 * 0.01 * 9 / (0.01 * 4)], dtype=torch.float64)
    )


@pytest.mark.parametrize("nu", [0.02, 0.1, 0.5])
def test_theorem1_matches_monte_carlo_on_linear_model(nu: float):
    # Two classes: the margin z_y - z_other is exactly linear, so Theorem 1 is exact and the
    # measured flip frequency must agree with the closed form up to Monte-Carlo error.
    model = linear_model(k_classes=2, seed=2)
    x = torch.rand(6, 1, 6, 6)
    y = torch.randint(0, 2, (6,))
    n = 4000
    res = A.theorem1_check(
        model, (x, y), layer="1", nu=nu, probe="gaussian", scale=0.05, n_draws=n, seed=3
    )
    gh, gx = closed_form(model, x, y)
    gamma = (2 * nu**2 * gh.double() ** 2 / (0.05**2 * gx.double() ** 2)).sqrt()
    expected = 0.5 - torch.atan(1 / gamma) / math.pi
    torch.testing.assert_close(res.p_theorem, expected, rtol=1e-5, atol=1e-6)
    se = 0.5 / math.sqrt(n)
    assert float((res.p_measured - expected).abs().max()) < 4 * se
    assert res.mad < 2 * se
    assert res.mad < 2.5 * res.mad_if_exact  # agreement within Monte-Carlo noise
    assert bool((res.sign_agree == 1).all())  # the noiseless difference is exactly linear
    assert float((res.p_linear - expected).abs().max()) < 2 * se


def test_theorem1_input_noise_ratio_is_nu_over_mu():
    model = linear_model(k_classes=2, seed=4)
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 2, (4,))
    res = A.theorem1_check(model, (x, y), layer="input", nu=0.03, scale=0.03, n_draws=3000)
    # grad_h = grad_x for input noise: ratio = 2 nu^2 / mu = 2, P = 1/2 - arctan(1/sqrt 2)/pi
    expected = 0.5 - math.atan(1 / math.sqrt(2)) / math.pi
    torch.testing.assert_close(res.p_theorem, torch.full((4,), expected, dtype=torch.float64))
    assert abs(float(res.p_measured.mean()) - expected) < 3 * 0.5 / math.sqrt(4 * 3000)


def test_predicted_nu_gives_the_target_drop_on_linear_model():
    # With two classes the noisy margin is exactly N(L, nu^2 |dL/dh|^2): the predicted nu must
    # produce the target clean-accuracy drop when the real defense is applied.
    model = linear_model(k_classes=2, seed=5)
    x = torch.rand(400, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:40] = 1 - y[:40]  # 90 % clean accuracy, misclassified images included
    g = A.layer_gradients(model, x, y, ["1"])
    nu = A.predicted_nu(g.loss, g.grad_norm["1"], 0.1)
    net = rfd.protect(model, "feature", layers="1", nu=nu, seed=0)
    with torch.no_grad():
        noisy = torch.stack([(net(x).argmax(1) == y).float().mean() for _ in range(200)]).mean()
    clean = (g.correct.float()).mean()
    assert abs(float(clean - noisy) - 0.1) < 0.01
    assert math.isnan(A.predicted_nu(g.loss, g.grad_norm["1"], 0.95))  # unreachable


def test_first_order_error_vanishes_on_linear_model():
    model = linear_model(k_classes=2, seed=6)
    x, y = torch.rand(5, 1, 6, 6), torch.randint(0, 2, (5,))
    res = A.first_order_error(model, (x, y), scales=(0.01, 0.1), n_draws=7, layer="1", nu=0.2)
    assert set(res.errors) == {"input s=0.01", "input s=0.1", "1 nu=0.2"}
    for src, err in res.errors.items():
        assert err.shape == (35,)
        assert float(err.max()) < 1e-5 * (1 + float(res.signals[src].max()))


# --------------------------------------------------------------------------- timm invariants


def test_batched_gradients_equal_per_image_gradients(tiny_resnet: nn.Module):
    # One backward of the summed loss gives exact per-image gradients in eval mode.
    x, y = self_labelled(tiny_resnet, 6)
    layers = A.analysis_layers(tiny_resnet)
    batched = A.layer_gradients(tiny_resnet, x, y, layers)
    for i in range(6):
        single = A.layer_gradients(tiny_resnet, x[i : i + 1], y[i : i + 1], layers)
        for n in layers:
            torch.testing.assert_close(
                single.grad_norm[n], batched.grad_norm[n][i : i + 1], rtol=1e-4, atol=1e-6
            )


def test_analysis_layers_dedupes_the_penultimate_alias(tiny_resnet: nn.Module):
    layers = A.analysis_layers(tiny_resnet)
    assert layers[0] == "input" and "penultimate" not in layers
    assert "global_pool" in layers  # ResNet's penultimate, under its own name
    assert A.analysis_layers(tiny_resnet, ["penultimate"]) == ["input", "penultimate"]
    with pytest.raises(ValueError, match="unknown layer"):
        A.analysis_layers(tiny_resnet, ["no_such_layer"])


@pytest.mark.parametrize("which", ["tiny_resnet", "tiny_vit"])
def test_ratios_magnitude_and_auto_layer_invariants(which: str, request: pytest.FixtureRequest):
    model = request.getfixturevalue(which)
    size = 28 if which == "tiny_resnet" else 32  # test_vit's 16px patches need 32 px
    x, y = self_labelled(model.eval(), 24, shape=(1, size, size))
    model.train()  # analyses must measure in eval mode and restore the caller's mode
    res = A.gradient_norm_ratios(model, (x, y), step=0.1, batch_size=10)
    assert model.training
    model.eval()
    rows = res.rows()
    assert [r["layer"] for r in rows] == res.layers
    for r in rows:
        assert r["n"] == 24
        assert r["ratio_mean"] > 0 and math.isfinite(r["ratio_step_mean"])
    assert rows[0]["ratio_mean"] == pytest.approx(1.0)
    assert len(res.per_image()) == 24
    mag = A.robustness_magnitude(model, (x, y), quantile=0.1, grads=res.clean)
    for r in mag.rows():
        assert r["q_ratio"] > 0 and r["magnitude_median"] > 0 and r["nu_pred"] > 0
    grads = (res.clean, res.stepped)
    scores = A.layer_scores(model, (x, y), target_drop=0.1, nu="predicted", grads=grads)
    assert scores.best in res.layers and scores.best != "input"
    assert scores.score[scores.best] == max(v for k, v in scores.score.items() if k != "input")
    assert A.auto_layer(model, (x, y), target_drop=0.1, nu="predicted") == scores.best
    rfd.protect(model, "feature", layers=scores.best, nu=0.1).remove()  # usable by protect


def test_auto_layer_with_calibrated_nu(tiny_resnet: nn.Module, tmp_path: Path):
    x, y = self_labelled(tiny_resnet, 50, seed=3)
    layers = ["layer2", "layer4"]
    scores = A.layer_scores(
        tiny_resnet, (x, y), layers, target_drop=0.1, n_passes=1, cache_dir=str(tmp_path)
    )
    assert scores.nu_source == "calibrated" and scores.layers == ["input", *layers]
    for n in scores.layers:  # the std used is rfd.calibrate's, which is what rfd.protect takes
        net = rfd.protect(tiny_resnet, "input" if n == "input" else "feature",
                          **({} if n == "input" else {"layers": n}), nu=scores.nu[n], seed=0)  # fmt: skip
        with torch.no_grad():
            acc = float((net(x).argmax(1) == y).float().mean())
        assert 0.8 <= acc < 1.0
    best = A.auto_layer(tiny_resnet, (x, y), layers, 0.1, n_passes=1, cache_dir=str(tmp_path))
    assert best == scores.best


def test_theorem1_check_on_timm_model(tiny_resnet: nn.Module):
    x, y = self_labelled(tiny_resnet, 4)
    for probe, scale in (("gaussian", 0.02), ("square", 0.1)):
        res = A.theorem1_check(
            tiny_resnet, (x, y), layer="layer3", nu=0.05, probe=probe, scale=scale, eps=0.1,
            n_draws=50,
        )  # fmt: skip
        for t in (res.p_theorem, res.p_linear, res.p_measured):
            assert t.shape == (4,) and bool(((t >= 0) & (t <= 1)).all())
        # both predictions are probabilities of a wrong comparison: at most 1/2
        assert bool((res.p_theorem <= 0.5).all() & (res.p_linear <= 0.5).all())
        assert bool((res.mu_eff > 0).all()) and math.isfinite(res.mad)
        assert res.summary()["n_images"] == 4 and len(res.per_image()) == 4
    with pytest.raises(ValueError, match="eps"):
        A.theorem1_check(tiny_resnet, (x, y), probe="square", scale=0.1)


def test_square_probe_is_one_window_of_plus_minus_eps():
    x = torch.full((50, 1, 10, 10), 0.5)
    xp = A.sample_probes(x, "square", 0.09, 0.1, torch.Generator().manual_seed(0))
    d = xp - x
    side = 3  # round(sqrt(0.09 * 100))
    assert bool(((d.abs() < 1e-7) | ((d.abs() - 0.1).abs() < 1e-6)).all())
    assert bool(((d != 0).flatten(1).sum(1) == side * side).all())
    assert A.probe_mu("square", 0.09, 0.1) == pytest.approx(0.09 * 0.01)


def test_layer_and_strength_sweeps(tiny_resnet: nn.Module, tmp_path: Path):
    x, y = self_labelled(tiny_resnet, 10, seed=1)
    calib = self_labelled(tiny_resnet, 60, seed=2)
    sweep = A.layer_sweep(
        tiny_resnet, (x, y), calib, layers=["layer3", "layer4"], target_drop=0.1,
        max_queries=40, n_images=10, n_calib=60, n_passes=2, cache_dir=str(tmp_path),
        use_cache=False,
    )  # fmt: skip
    assert [r["layer"] for r in sweep.rows] == ["none", "input", "layer3", "layer4"]
    for r in sweep.rows:
        assert 0 <= r["robust_acc"] <= r["attack_clean_acc"] <= 1
    for r in sweep.rows[1:]:
        assert r["nu"] > 0 and abs(r["clean_drop"] - 0.1) < 0.05
    hidden = sweep.rows[2:]  # auto: the highest score; best: the highest robust accuracy
    assert sweep.auto == max(hidden, key=lambda r: r["score"])["layer"]
    assert sweep.best == max(hidden, key=lambda r: r["robust_acc"])["layer"]

    strength = A.strength_sweep(
        tiny_resnet, (x, y), calib, attacks=["square", "signhunter"],
        values={"square": [0.05, 0.3], "signhunter": [0.05]}, target_drop=0.1, max_queries=30,
        n_images=10, n_calib=60, n_passes=2, cache_dir=str(tmp_path), use_cache=False,
    )  # fmt: skip
    assert len(strength.rows) == 3 * 2
    assert {r["defense"] for r in strength.rows} == {"input", "feature"}
    for r in strength.rows:
        assert 0 <= r["robust_acc"] <= 1 and r["mu"] > 0
    sh = [r for r in strength.rows if r["attack"] == "signhunter"]
    assert all(r["eps"] == 0.05 and r["mu"] == pytest.approx(0.05**2) for r in sh)
    with pytest.raises(ValueError, match="strength knob"):
        A.strength_sweep(tiny_resnet, (x, y), calib, attacks=["rays"])


def test_reports_write_tables_and_plots(tiny_resnet: nn.Module, tmp_path: Path):
    from rfd.analysis import report as R

    x, y = self_labelled(tiny_resnet, 12)
    res = A.gradient_norm_ratios(tiny_resnet, (x, y), step=0.1)
    paths = R.write_table(res.rows(), tmp_path, "ratios", title="t", meta={"a": 1})
    assert paths["md"].read_text().startswith("## t")
    assert json.loads(paths["json"].read_text())["meta"] == {"a": 1}
    assert paths["csv"].read_text().splitlines()[0].startswith("layer,")
    mag = A.robustness_magnitude(tiny_resnet, (x, y), quantile=0.1, grads=res.clean)
    th = A.theorem1_check(tiny_resnet, (x, y), layer="layer4", nu=0.05, n_draws=20, n_images=3)
    fo = A.first_order_error(tiny_resnet, (x, y), scales=(0.01,), n_draws=3, n_images=3)
    rows = [
        {"layer": "none", "robust_acc": 0.1},
        {"layer": "input", "robust_acc": 0.3, "score": 0.2, "auto": False},
        {"layer": "layer4", "robust_acc": 0.5, "score": 0.4, "auto": True},
    ]
    srows = [
        {"attack": "square", "param": "p_init", "value": v, "defense": d, "robust_acc": a}
        for v, d, a in ((0.05, "input", 0.2), (0.1, "input", 0.3), (0.05, "feature", 0.4))
    ]
    for p in (
        R.plot_ratios(res, tmp_path / "r.png"),
        R.plot_magnitude(mag, tmp_path / "m.png"),
        R.plot_theorem1([th], tmp_path / "t.png"),
        R.plot_first_order(fo, tmp_path / "f.png"),
        R.plot_layer_sweep(rows, tmp_path / "l.png"),
        R.plot_strength(srows, tmp_path / "s.png"),
    ):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- CLI


def _checkpoint(tmp_path: Path, model: nn.Module) -> Path:
    """A Lightning-style checkpoint (state_dict with the "model." prefix + hyperparameters)."""
    path = tmp_path / "best.ckpt"
    state = {"model." + k: v for k, v in model.state_dict().items()}
    hp = {"model_name": "test_resnet", "num_classes": 10, "in_chans": 1}
    torch.save({"state_dict": state, "hyper_parameters": hp}, path)
    return path


def _one_line_exit_2(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
    return err


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_resnet):
    assert "invalid choice" in _one_line_exit_2(capsys, ["bogus"])
    _one_line_exit_2(capsys, ["ratios", "--n-images", "0"])
    _one_line_exit_2(capsys, ["theorem1", "--n-draws", "-3"])
    missing = tmp_path / "missing" / "best.ckpt"
    assert "not found" in _one_line_exit_2(capsys, ["ratios", "--checkpoint", str(missing)])
    ckpt = _checkpoint(tmp_path, tiny_resnet)
    err = _one_line_exit_2(capsys, ["ratios", "--checkpoint", str(ckpt), "--layers", "nope"])
    assert "unknown layer" in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _one_line_exit_2(capsys, ["ratios", "--checkpoint", str(ckpt), "--out", str(afile)])
    assert "is a file, not a folder" in err and afile.read_text() == "x"
    (tmp_path / "bad.ckpt").write_bytes(b"\x80\x02garbage")
    err = _one_line_exit_2(capsys, ["ratios", "--checkpoint", str(tmp_path / "bad.ckpt")])
    assert "corrupt or unreadable checkpoint" in err


def test_cli_default_checkpoint_missing_says_how_to_make_it(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    err = _one_line_exit_2(capsys, ["magnitude"])
    assert "checkpoint not found" in err and "python train.py --config fmnist_default.yaml" in err


def test_cli_missing_data_is_a_usage_error(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_resnet
):
    monkeypatch.setenv("RFD_FMNIST_DIR", str(tmp_path / "empty"))
    ckpt = _checkpoint(tmp_path, tiny_resnet)
    err = _one_line_exit_2(capsys, ["ratios", "--checkpoint", str(ckpt)])
    assert "Fashion-MNIST IDX files not found" in err and "make data" in err


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_cli_config_names_the_model_of_a_plain_state_dict(tmp_path: Path, tiny_resnet):
    plain = tmp_path / "run" / "weights.pt"
    plain.parent.mkdir()
    torch.save(tiny_resnet.state_dict(), plain)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {model_name: test_resnet, num_classes: 10, in_chans: 1}\n")
    args = cli.build_parser().parse_args(
        ["ratios", "--config", str(cfg), "--checkpoint", str(plain)]
    )
    run = cli.load(args)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(run.model(x), tiny_resnet(x))
    with pytest.raises(cli.UsageError, match="stores no model hyperparameters"):
        cli.load(cli.build_parser().parse_args(["ratios", "--checkpoint", str(plain)]))


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_cli_ratios_end_to_end(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_resnet):
    ckpt = _checkpoint(tmp_path, tiny_resnet)
    out = tmp_path / "out"
    argv = ["ratios", "--checkpoint", str(ckpt), "--n-images", "20", "--out", str(out)]
    assert cli.main(argv) == 0
    assert "| layer |" in capsys.readouterr().out
    for name in ("ratios.md", "ratios.csv", "ratios.json", "ratios_per_image.csv", "ratios.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
@pytest.mark.parametrize("command", ["layer-sweep", "strength-sweep"])
def test_cli_sweeps_tune_nu_on_images_they_do_not_attack(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_resnet
):
    """The calibration split must exclude the images actually attacked (here 40), not only the
    default 1000-image evaluation subset: balanced subsets of different sizes are not nested."""
    from rfd.analysis import sweeps

    class Seen(BaseException):
        pass

    def spy(model, eval_data, calib, **kw):
        raise Seen(set(eval_data.dataset.indices), set(calib.dataset.indices))

    monkeypatch.setattr(sweeps, command.replace("-", "_"), spy)
    ckpt = _checkpoint(tmp_path, tiny_resnet)
    argv = [command, "--checkpoint", str(ckpt), "--n-images", "40", "--out", str(tmp_path / "o")]
    with pytest.raises(Seen) as seen:
        cli.main(argv)
    attacked, calibration = seen.value.args
    assert len(attacked) == 40 and calibration and not attacked & calibration


def test_reports_log_to_an_active_wandb_run_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import sys
    import types

    from rfd.analysis import report as R

    logged: list[dict] = []
    fake = types.SimpleNamespace(
        run=None,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    R.write_table([{"a": 1.0}], tmp_path, "t")
    assert logged == []  # no active run: nothing logged, nothing fails
    fake.run = types.SimpleNamespace(log=logged.append)
    R.write_table([{"a": 1.0, "b": "x"}], tmp_path, "t")
    assert logged == [{"analysis/t": ("table", ["a", "b"], [[1.0, "x"]])}]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--out", "AFILE"], "is a file, not a folder"),
        (["--checkpoint", "MISSING"], "checkpoint not found"),
        (["--layers", "nope"], "unknown layer"),
        (["--attack", "nope"], "nope"),
    ],
)
def test_cli_refuses_bad_input_before_wandb_starts(
    flags: list[str], message: str, capsys, tmp_path: Path, monkeypatch, tiny_resnet
):
    """`--wandb offline` with an --out that is a file used to start an offline W&B run (in
    /tmp/wandb, its fallback) and only then fail; now W&B starts only for a command that runs."""
    import sys
    import types

    started: list[dict] = []
    fake = types.SimpleNamespace(
        run=None, init=lambda **kw: started.append(kw) or types.SimpleNamespace(finish=lambda: None)
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    afile = tmp_path / "afile"
    afile.write_text("x")
    subs = {"AFILE": str(afile), "MISSING": str(tmp_path / "missing.ckpt")}
    flags = [subs.get(f, f) for f in flags]
    command = "layer-sweep" if "--attack" in flags else "ratios"
    argv = [command, "--checkpoint", str(_checkpoint(tmp_path, tiny_resnet)), "--n-images", "20",
            "--out", str(tmp_path / "out"), "--wandb", "offline", *flags]  # fmt: skip
    assert message in _one_line_exit_2(capsys, argv)
    assert started == [] and afile.read_text() == "x" and not (tmp_path / "out").exists()


@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST is not installed (make data)")
def test_cli_an_unreachable_target_drop_is_a_usage_error(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_resnet
):
    """Asking for more drop than noise gives is bad input (exit 2, one line), not a crash."""
    import rfd.defenses
    from rfd.defenses.calibration import TargetUnreachable

    def gives_up(*args, **kwargs):
        raise TargetUnreachable(1523.0, 0.76, 0.95)

    monkeypatch.setattr(rfd.defenses, "calibrate", gives_up)
    ckpt = _checkpoint(tmp_path, tiny_resnet)
    argv = ["theorem1", "--checkpoint", str(ckpt), "--n-images", "10", "--target-drop", "0.95",
            "--out", str(tmp_path / "o")]  # fmt: skip
    err = _one_line_exit_2(capsys, argv)
    assert "--target-drop: noise up to nu=1523 drops accuracy by 0.7600 < 0.95" in err
