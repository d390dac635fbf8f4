"""ZO-signSGD (rfd.attacks.zo_signsgd): the estimator is exact on a linear model, the query
layout and budget, and the issue's requirement on the trained Fashion-MNIST default."""

from __future__ import annotations

import pytest
import torch
from test_attacks import MarginLinear as Linear
from test_attacks import success_on_trained

import rfd
from rfd.attacks import ATTACKS, Reply, View
from rfd.attacks.api import make_attack
from rfd.attacks.zo_signsgd import ZOSignSGD
from rfd.rng import KeyedRNG, derive_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def view_at(x0: torch.Tensor, eps: float, step: int, remaining: int = 1000) -> View:
    a = x0.shape[0]
    keys = derive_rows(torch.arange(a, dtype=torch.int64), 11)
    return View(
        x0, eps, "linf", budget=10_000, remaining=torch.full((a,), remaining),
        step=torch.full((a,), step), rng=KeyedRNG(derive_rows(keys, step)),
    )  # fmt: skip


def test_registered_with_its_defaults():
    cls = ATTACKS["zo_signsgd"]
    assert cls is ZOSignSGD and cls.kind == "score" and cls.order == 70
    assert cls.norms == ("linf",)
    assert cls.defaults == {"linf": {"q": 30, "fd_eta": 0.01, "lr": 0.01}}


@pytest.mark.parametrize(
    "norm,kwargs,match",
    [
        ("linf", dict(q=0), "q"),
        ("linf", dict(q=2.0), "q"),
        ("linf", dict(fd_eta=0.0), "fd_eta"),
        ("linf", dict(lr=float("nan")), "lr"),
        ("linf", dict(mu=0.1), "fd_eta"),  # unknown names list the valid ones
        ("l2", {}, "supported: linf"),
    ],
)
def test_invalid_hyperparameters(norm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_attack("zo_signsgd", norm, **kwargs)


@pytest.mark.parametrize("remaining", [1000, 31, 12, 2])
def test_one_step_is_the_sign_of_the_forward_difference_estimate(remaining):
    """On a linear margin the forward differences are exact: the step must be
    ``-lr * sign(sum_i <w, u_i> u_i)`` over the directions actually sent."""
    attack = ZOSignSGD()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 1, 28, 28, generator=g, dtype=torch.float64)
    x0 = torch.full((3, 1, 28, 28), 0.5, dtype=torch.float64)
    view = view_at(x0, 0.5, 0, remaining)
    state = attack.init(view)
    q = attack.propose(view, state)
    k = int(attack.queries(view.remaining)[0]) - 1
    assert k == min(remaining - 1, attack.q)
    assert q.shape == (3, 1 + attack.q, 1, 28, 28) and torch.equal(q[:, 0], x0)
    u = state["u"]
    assert torch.allclose(q[:, 1:], x0.unsqueeze(1) + attack.fd_eta * u)
    m = torch.einsum("archw,achw->ar", q, w)
    reply = Reply(m < 0, q, m, torch.stack([m, torch.zeros_like(m)], -1))
    new = attack.observe(view, state, reply)
    est = torch.einsum("ak,ak...->a...", torch.einsum("akchw,achw->ak", u[:, :k], w), u[:, :k])
    assert torch.allclose(new["x"], x0 - attack.lr * est.sign())
    assert torch.equal(new["best"], x0) and torch.allclose(new["best_m"], m[:, 0])


def test_the_estimate_agrees_with_the_gradient_in_low_dimension():
    """With many directions in few dimensions, the sign estimate is the gradient's sign."""
    attack = ZOSignSGD(q=400)
    w = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = torch.full((4, 1, 4, 4), 0.5, dtype=torch.float64)
    view = view_at(x0, 0.5, 3)
    state = attack.init(view)
    q = attack.propose(view, state)
    m = torch.einsum("archw,achw->ar", q, w)
    new = attack.observe(view, state, Reply(m < 0, q, m, None))
    agree = ((x0 - new["x"]).sign() == w.sign()).double().mean()
    assert agree >= 0.95, agree


@pytest.mark.parametrize("budget", [5, 32, 40, 63, 100])
def test_an_unfoolable_image_spends_exactly_its_budget(budget):
    """1 clean query, steps of q + 1, and a last step with fewer directions."""
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    w = torch.randn(784, generator=torch.Generator().manual_seed(1))
    model = Linear(w * 1e-3, b=100.0)  # margin ~100 everywhere in the ball
    res = rfd.attack(model, x, torch.zeros(2, dtype=torch.long), attack="zo_signsgd", eps=0.1,
                     max_queries=budget, criterion="single")  # fmt: skip
    assert not res.success.any()
    spent = budget - int((budget - 1) % 31 == 1)  # a last step needs the iterate + 1 direction
    assert res.queries.tolist() == [spent, spent]


def test_fools_a_linear_model():
    w = torch.randn(784, generator=torch.Generator().manual_seed(2))
    x = torch.full((4, 1, 28, 28), 0.5)
    # margin 0.5 * sum(w) + b; the ball lets -eps * |w|_1 through, of which 30% must be found
    # (q = 30 directions in 784 dimensions: ~40% in 1000 queries)
    model = Linear(w, b=float(-0.5 * w.sum() + 0.3 * 0.1 * w.abs().sum()))
    res = rfd.attack(model, x, torch.zeros(4, dtype=torch.long), attack="zo_signsgd", eps=0.1,
                     max_queries=1000, criterion="single")  # fmt: skip
    assert res.clean_correct.all() and res.success.all()


@pytest.mark.slow
def test_zo_signsgd_fools_trained_default(trained_fmnist):
    summary = success_on_trained(trained_fmnist, "zo_signsgd", "linf", 0.1)
    assert summary["success_rate"] >= 0.5
