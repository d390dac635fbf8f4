"""Randomized smoothing: the certificate holds on linear models, abstentions carry no radius, the
Clopper-Pearson bound matches closed forms, noise is keyed (batch-size free), the query defense.

Linear models make the smoothed classifier's geometry known: for two classes its decision
boundary is the base model's hyperplane, so a certified radius can be checked against the exact
distance, and moving toward any other class's boundary is the worst direction.
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rfd
from rfd.defenses.rows import RowForward
from rfd.defenses.smoothing import (
    binom_test_two_sided,
    certify,
    clopper_pearson_lower,
    predict,
    vote_counts,
)
from rfd.rng import KeyedRNG

SIGMA = 0.25


def _linear(k: int, seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(16, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, 16, generator=g))
        lin.bias.copy_(torch.randn(k, generator=g))
    return nn.Sequential(nn.Flatten(), lin).eval()


def _at_distance(model: nn.Sequential, d: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """(len(d), 1, 4, 4) inputs at signed L2 distance ``d`` from a 2-class linear boundary
    (positive: class 0 side)."""
    w, b = model[1].weight, model[1].bias
    dw, db = w[0] - w[1], b[0] - b[1]
    x = torch.rand(len(d), 16, generator=torch.Generator().manual_seed(seed))
    margin = x @ dw + db
    x = x + ((d * dw.norm() - margin) / dw.norm() ** 2)[:, None] * dw
    return x.view(-1, 1, 4, 4).detach()


# --------------------------------------------------------------------------- statistics


def test_clopper_pearson_matches_closed_forms_and_the_beta_quantile() -> None:
    n, alpha = 20, 0.01
    bound = clopper_pearson_lower(torch.tensor([n, 1, 0]), n, alpha)
    assert bound[0].item() == pytest.approx(alpha ** (1 / n), abs=1e-12)  # p^n = alpha
    assert bound[1].item() == pytest.approx(1 - (1 - alpha) ** (1 / n), abs=1e-12)
    assert bound[2].item() == 0.0
    # the textbook value: 5 of 10 at 95% one-sided (the 90% two-sided interval's lower end)
    assert clopper_pearson_lower(torch.tensor([5]), 10, 0.05).item() == pytest.approx(
        0.22244, abs=5e-5
    )
    # an independent route: the Beta(k, n-k+1) CDF, integrated numerically, is alpha there
    for k, n, alpha in ((30, 100, 0.01), (990, 1000, 0.001)):
        p = clopper_pearson_lower(torch.tensor([k]), n, alpha).item()
        t = torch.linspace(0, p, 200_001, dtype=torch.float64)[1:]
        log_pdf = (
            (k - 1) * t.log()
            + (n - k) * torch.log1p(-t)
            - (math.lgamma(k) + math.lgamma(n - k + 1) - math.lgamma(n + 1))
        )
        cdf = torch.trapezoid(log_pdf.exp(), t).item()
        assert cdf == pytest.approx(alpha, rel=1e-4)


def test_two_sided_binomial_test() -> None:
    pval = binom_test_two_sided(torch.tensor([7, 3, 5, 10, 0]), torch.tensor([10] * 5))
    assert pval.tolist() == pytest.approx([0.34375, 0.34375, 1.0, 2 / 1024, 2 / 1024])


# --------------------------------------------------------------------------- certificates


def test_abstentions_never_carry_a_radius() -> None:
    model = _linear(2)
    on_boundary = _at_distance(model, torch.zeros(6))  # votes split 50/50
    pred, radius = certify(model, on_boundary, SIGMA, n0=50, n=500, alpha=0.001)
    assert (pred == -1).all() and (radius == 0).all()
    assert (predict(model, on_boundary, SIGMA, n=500, alpha=0.001) == -1).all()
    far = _at_distance(model, torch.full((4,), 5.0))  # every vote for class 0
    pred, radius = certify(model, far, SIGMA, n0=1, n=1, alpha=0.001)  # p_A bound = alpha
    assert (pred == -1).all() and (radius == 0).all()
    mixed = torch.cat([on_boundary, far, _at_distance(model, torch.tensor([0.3, -1.0]))])
    pred, radius = certify(model, mixed, SIGMA, n0=50, n=500, alpha=0.001)
    assert (pred != -1).any() and (pred == -1).any()
    assert (radius[pred == -1] == 0).all() and (radius[pred != -1] > 0).all()


def test_two_class_linear_radius_is_sound_and_nearly_exact() -> None:
    # For two classes the smoothed boundary is the hyperplane itself: the exact robust radius is
    # the distance to it, and Cohen's radius sigma * Phi^-1(p_A) approaches it as n grows.
    model = _linear(2, seed=3)
    d = torch.tensor([0.5, 1.0, 1.5, 2.0, -0.75, -1.25]) * SIGMA
    pred, radius = certify(model, _at_distance(model, d), SIGMA, n0=100, n=4000, alpha=0.001)
    assert pred.tolist() == [0, 0, 0, 0, 1, 1]
    assert (radius <= d.abs()).all()
    assert (radius >= 0.7 * d.abs()).all()


def test_certificate_holds_inside_the_radius_on_a_linear_model() -> None:
    model = _linear(4, seed=5)
    x = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(6)) * 0.6
    pred, radius = certify(model, x, SIGMA, n0=100, n=1000, alpha=0.001)
    ok = (pred != -1).nonzero()[:, 0]
    assert len(ok) >= 4, "too few certified images for a meaningful check"
    w = model[1].weight.detach()
    g = torch.Generator().manual_seed(7)
    for i in ok.tolist():
        c = int(pred[i])
        dirs = [(w[c] - w[b]) / -(w[c] - w[b]).norm() for b in range(4) if b != c]  # worst
        dirs += list(torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1))
        step = 0.95 * float(radius[i])
        moved = torch.stack([x[i] + step * u.view(1, 4, 4) for u in dirs])
        assert ((moved - x[i]).flatten(1).norm(dim=1) < radius[i]).all()
        got = predict(model, moved, SIGMA, n=2000, alpha=0.001, seed=i + 1)
        assert set(got.tolist()) <= {c, -1}, f"image {i}: prediction changed inside the radius"
        counts = vote_counts(moved, KeyedRNG(torch.arange(len(moved))), SIGMA, 4000, model, 4096)
        assert (counts.argmax(1) == c).all()


def test_results_are_reproducible_and_batch_size_free() -> None:
    model = _linear(4, seed=5)
    x = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(8)) * 0.6
    ids = torch.arange(100, 106)
    a = certify(model, x, SIGMA, n0=30, n=300, alpha=0.01, batch_size=7, seed=3, ids=ids)
    b = certify(model, x, SIGMA, n0=30, n=300, alpha=0.01, batch_size=1000, seed=3, ids=ids)
    part = certify(model, x[2:5], SIGMA, 30, 300, 0.01, batch_size=64, seed=3, ids=ids[2:5])
    other = certify(model, x, SIGMA, n0=30, n=300, alpha=0.01, seed=4, ids=ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(part[1], a[1][2:5])  # an image's noise is its own, whatever the batch
    assert not torch.equal(a[1], other[1])
    p = [predict(model, x, SIGMA, 300, 0.01, batch_size=bs, seed=3) for bs in (5, 900)]
    assert torch.equal(*p)


# --------------------------------------------------------------------------- the query defense


def _implied_counts(logits: torch.Tensor, n: int) -> torch.Tensor:
    k = logits.shape[1]
    return logits.exp() * (n + 0.5 * k) - 0.5


def test_defense_answers_the_monte_carlo_majority() -> None:
    model = _linear(4, seed=5)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(9)) * 0.6
    net = rfd.protect(model, "smoothing", sigma=SIGMA, n=60, seed=0)
    assert net.randomized and net.forwards_per_query == 61 and net.calibrated is False
    keys = torch.arange(5, dtype=torch.long) * 7919
    with torch.no_grad():
        out = RowForward(model, [None, net])(x, torch.tensor([0, 1, 1, 0, 1]), keys)
        votes = vote_counts(x, KeyedRNG(keys).stream("model"), SIGMA, 60, model, 1000)
        assert torch.equal(out[[0, 3]], model(x[[0, 3]]))  # other rows untouched
        implied = _implied_counts(out[[1, 2, 4]], 60)
        assert torch.allclose(implied, votes[[1, 2, 4]].float(), atol=1e-3)
        assert torch.equal(out[[1, 2, 4]].argmax(1), votes[[1, 2, 4]].argmax(1))
        a, b = net(x), net(x)  # fresh noise per query
        c = rfd.protect(model, "smoothing", sigma=SIGMA, n=60, seed=0, batch_size=7)(x)
        d = rfd.protect(model, "smoothing", sigma=SIGMA, n=60, seed=0)(x)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    assert torch.equal(c, d)  # chunking does not move a draw
    assert torch.allclose(_implied_counts(a, 60).sum(1), torch.full((5,), 60.0), atol=1e-3)


def test_defense_under_grad_is_the_soft_smoothed_classifier() -> None:
    model = _linear(4, seed=5)
    x = (torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.6).requires_grad_()
    net = rfd.protect(model, "smoothing", sigma=SIGMA, n=40, seed=0)
    out = net(x)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # log mean softmax
    out[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_defense_leaves_the_model_untouched_and_checks_its_options() -> None:
    model = _linear(4)
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        before = model(x)
        net = rfd.protect(model, "smoothing", sigma=0.5, n=10, seed=1)
        net(x)
        assert net.remove() is model and torch.equal(model(x), before)
    with pytest.raises(RuntimeError, match="removed"):
        net(x)
    for bad in (0, -0.1, math.nan, math.inf, True, "0.25"):
        with pytest.raises(ValueError, match="sigma"):
            rfd.protect(model, "smoothing", sigma=bad)
    for bad in (0, 2.5, True, -3):
        with pytest.raises(ValueError, match="smoothing n must be an integer >= 1"):
            rfd.protect(model, "smoothing", n=bad)
    with pytest.raises(ValueError, match="alpha"):
        certify(model, x, SIGMA, 10, 10, alpha=1.5)


# --------------------------------------------------------------------------- the analysis


def test_certify_subcommand_writes_the_table(tmp_path) -> None:
    from rfd.analysis import certify as plugin
    from rfd.analysis.cli import build_parser

    model = _linear(2, seed=3)
    d = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0, 3.0, -0.3, 1.5]) * SIGMA
    x, y = _at_distance(model, d), (d < 0).long()
    y[5] = 1  # one confidently wrong image: never counted as certified
    data = TensorDataset(x, y, torch.arange(len(y)))
    dm = SimpleNamespace(eval_dataloader=lambda n, seed, batch_size: DataLoader(data, 3))
    loaded = SimpleNamespace(model=model, datamodule=dm, name="lin")
    args = build_parser().parse_args(
        ["certify", "--n0", "20", "--n", "400", "--radii", "0,0.1,0.3", "--out", str(tmp_path)]
    )
    files = plugin.run(args, loaded, len(y), {"command": "certify"})
    assert {"md", "csv", "json", "per_image", "png"} <= set(files)
    assert all(p.exists() for p in files.values())
    out = json.loads(files["json"].read_text())
    acc = [r["certified_acc"] for r in out["rows"]]
    assert acc == sorted(acc, reverse=True) and 0 < acc[0] <= 6 / 8
    assert acc[0] == pytest.approx(out["meta"]["smoothed_clean_acc"])
    assert 0 < out["meta"]["abstain_rate"] < 1
    cap = SIGMA * NormalDist().inv_cdf(0.001 ** (1 / 400))  # all 400 votes for one class
    assert out["meta"]["max_certifiable_radius"] == pytest.approx(cap)
    radii = [float(line.split(",")[3]) for line in files["per_image"].read_text().split()[1:]]
    assert len(radii) == 8 and 0 < max(radii) <= cap
