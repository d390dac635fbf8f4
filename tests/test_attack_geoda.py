"""GeoDA (Rahmati et al., CVPR 2020): the query schedule, the subspace, the phase machine on a
linear boundary, validation, and the hard-label requirement on the trained default."""

from __future__ import annotations

import pytest
import torch
from test_attacks import success_on_trained

import rfd
from rfd.attacks import ATTACKS, Reply, View
from rfd.attacks.geoda import EST, GeoDA, dct_basis, schedule
from rfd.rng import KeyedRNG, offset_rows, row_keys


def drive(attack, oracle, x0, steps, eps=1e-3):
    """Step the attack's state machine by hand (one query per step), recording its state."""
    a = x0.shape[0]
    keys = row_keys(0, torch.arange(a))
    step = torch.zeros(a, dtype=torch.long)
    total = steps + 1
    state = attack.init(View(x0, eps, attack.norm, total, step + total - 1, step.clone(),
                             KeyedRNG(keys)))  # fmt: skip
    trace = []
    for _ in range(steps):
        rng = KeyedRNG(offset_rows(keys, step + 1))
        v = View(x0, eps, attack.norm, total, total - 1 - step, step.clone(), rng)
        q = attack.propose(v, state)
        assert q.shape == x0.shape  # one query per step
        state = attack.observe(v, state, Reply(oracle(q).unsqueeze(1), q.unsqueeze(1)))
        trace.append({k: t.clone() for k, t in state.items()})
        step += 1
    return state, trace


def published_schedule(nq, t, eta):
    """The authors' opt_query_iteration, verbatim in logic (recursive)."""
    coefs = [eta ** (-2 * i / 3) for i in range(t)]
    q = [round(nq * c / sum(coefs)) for c in coefs]
    if q[0] > 80:
        return published_schedule(nq, t + 1, eta)
    if q[0] < 50:
        return published_schedule(nq, t - 1, eta)
    return q


@pytest.mark.parametrize("total", [1000, 2000, 4000, 10000])
def test_schedule_is_the_published_one(total):
    it = round(total / 500)
    q = published_schedule(total - it * 25, it, 0.6)
    q = published_schedule(total - len(q) * 25, it, 0.6)
    assert list(schedule(total, 0.6)) == q
    assert 50 <= q[0] <= 80 and q == sorted(q)


def test_schedule_small_budgets_do_not_break():
    for total in (1, 2, 20, 60, 150, 300):
        q = schedule(total, 0.6)
        assert len(q) >= 1 and min(q) >= 1


def test_noise_lies_in_the_low_frequency_dct_subspace():
    b = dct_basis(28, 28, torch.device("cpu"), torch.float64)
    assert torch.allclose(b @ b.T, torch.eye(28, dtype=torch.float64), atol=1e-10)
    attack = GeoDA("l2")
    x0 = torch.rand(3, 1, 28, 28)
    z = torch.zeros(3, dtype=torch.long)
    v = View(x0, 2.0, "l2", 100, z + 50, z, KeyedRNG(row_keys(0, torch.arange(3))))
    noise = attack._noise(v).view(3, 1, 28, 28).double()
    coef = torch.einsum("kh,achw,lw->ackl", b, noise, b)  # 2-D DCT of each noise
    assert coef[..., :9, :9].abs().amax() > 0.1
    high = coef.clone()
    high[..., :9, :9] = 0
    assert high.abs().amax() < 1e-5


def linear(w, b):
    return lambda x: (x.flatten(1) @ w + b) > 0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_finds_the_nearest_point_of_a_linear_boundary(norm):
    torch.manual_seed(0)
    w = torch.randn(16)
    x0 = torch.full((2, 1, 4, 4), 0.5)
    dist = 0.15 if norm == "l2" else 0.02
    scale = w.norm() if norm == "l2" else w.abs().sum()
    b = float(-(0.5 * w.sum()) - dist * scale)
    attack = GeoDA(norm, sub_ratio=1.0)  # 4x4 images: the full space
    state, trace = drive(attack, linear(w, b), x0, 600)
    size = (lambda v: v.norm(dim=1)) if norm == "l2" else (lambda v: v.abs().amax(1))
    # the random start's boundary point is far; after the estimates it is the nearest one
    start = next(t["xb"] for t in trace if (t["phase"] == EST).all())
    assert (size(start - x0.flatten(1)) > 1.5 * dist).all()
    got = size(state["xb"] - x0.flatten(1))
    # (Linf: sign(grad) must match sign(w) on every coordinate, small ones are noisy)
    slack = 1.05 if norm == "l2" else 1.15
    assert (got >= dist * (1 - 1e-3)).all() and (got <= dist * slack).all()
    cos = torch.nn.functional.cosine_similarity(state["grad"], w.expand(2, -1))
    assert (cos > 0.8).all()  # the accumulated estimate is the boundary's normal


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sigma=0.0), "sigma, tol and init_step"),
        (dict(tol=-1.0), "sigma, tol and init_step"),
        (dict(mu=1.0), "mu must"),
        (dict(sub_ratio=0.0), "sub_ratio"),
        (dict(sub_ratio=1.5), "sub_ratio"),
        (dict(lr=1.0), "unknown geoda"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rfd.attacks.make_attack("geoda", "linf", **kwargs)


def test_registered_with_the_published_defaults():
    cls = ATTACKS["geoda"]
    assert cls.kind == "decision" and cls.order == 57 and not cls.constrained
    d = cls.defaults["linf"]
    assert d["sigma"] == 0.0002 and d["mu"] == 0.6 and d["tol"] == 0.0001
    assert round(d["sub_ratio"] * 224) == 75


@pytest.mark.slow
def test_geoda_fools_trained_default(trained_fmnist):
    """Linf eps 0.1 (GeoDA has the paper's Linf variant): >= 30% of the correct images fooled."""
    summary = success_on_trained(trained_fmnist, "geoda", "linf", 0.1)
    assert summary["success_rate"] >= 0.3
