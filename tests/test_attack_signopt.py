"""Sign-OPT (Cheng et al., ICLR 2020): the phase machine on a linear boundary, validation, and
the hard-label requirement on the trained default."""

from __future__ import annotations

import pytest
import torch
from test_attacks import success_on_trained

import rfd
from rfd.attacks import ATTACKS, Reply, View
from rfd.attacks.signopt import GRAD, SignOPT
from rfd.rng import KeyedRNG, offset_rows, row_keys


def drive(attack, oracle, x0, steps, eps=1e-3):
    """Step the attack's state machine by hand (one query per step), recording its state."""
    a = x0.shape[0]
    keys = row_keys(0, torch.arange(a))
    step = torch.zeros(a, dtype=torch.long)
    total = steps + 1

    def view():
        rng = KeyedRNG(offset_rows(keys, step + 1))
        return View(x0, eps, attack.norm, total, total - 1 - step, step.clone(), rng)

    state = attack.init(View(x0, eps, attack.norm, total, step + total - 1, step.clone(),
                             KeyedRNG(keys)))  # fmt: skip
    trace = []
    for _ in range(steps):
        v = view()
        q = attack.propose(v, state)
        assert q.shape == x0.shape  # one query per step
        state = attack.observe(v, state, Reply(oracle(q).unsqueeze(1), q.unsqueeze(1)))
        trace.append({k: t.clone() for k, t in state.items()})
        step += 1
    return state, trace


def linear(w, b):
    return lambda x: (x.flatten(1) @ w + b) > 0


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_converges_to_the_distance_of_a_linear_boundary(norm):
    torch.manual_seed(0)
    d = 16
    w = torch.randn(d)
    x0 = torch.full((2, 1, 4, 4), 0.5)
    # boundary at distance 0.15 (L2) or 0.02 (Linf) from x0, well inside the box
    dist = 0.15 if norm == "l2" else 0.02
    scale = w.norm() if norm == "l2" else w.abs().sum()
    b = float(-(0.5 * w.sum()) - dist * scale)
    attack = SignOPT(norm)
    state, trace = drive(attack, linear(w, b), x0, 2500)
    g = torch.stack([t["g"] for t in trace])  # (steps, A)
    started = torch.stack([t["phase"] for t in trace]) == GRAD
    # once the descent runs, g never increases (the line search accepts improvements only)
    first = started.float().argmax(0)
    for i in range(2):
        gi = g[first[i] :, i]
        assert (gi[1:] <= gi[:-1]).all()
        assert gi[0] > dist * 1.2  # a random direction is far from the normal
    # g is always an adversarial radius: never below the true distance
    assert (state["g"] >= dist * (1 - 1e-4)).all()
    if norm == "l2":
        assert torch.allclose(state["g"], torch.full((2,), dist), rtol=0.03)
        cos = torch.nn.functional.cosine_similarity(state["theta"], w.expand(2, -1))
        assert (cos > 0.9).all()  # the direction found is the normal
    else:
        # the Linf variant descends more slowly (the optimum is a vertex, sign(w))
        assert (state["g"] < 1.8 * dist).all()
        assert (state["g"] < 0.8 * g[first, torch.arange(2)]).all()


def test_bisection_ends_where_float32_cannot_reach_the_tolerance():
    """At a boundary distance of 40 (L2) float32's spacing exceeds ``beta / 500``: each local
    search must still end (about 20 bisections), not repeat its midpoint until the budget ends."""
    from rfd.attacks.signopt import BIN

    a = 2
    x0 = 0.5 + 0.01 * torch.rand((a, 3, 64, 64), generator=torch.Generator().manual_seed(0))

    def oracle(q):  # adversarial outside an L2 sphere of radius 40
        return (q - x0).flatten(1).norm(dim=1) > 40.0

    attack = SignOPT("l2", k=20, directions=3)
    keys, step, total = row_keys(0, torch.arange(a)), torch.zeros(a, dtype=torch.long), 10**6
    state = attack.init(View(x0, 1.0, "l2", total, step + total - 1, step.clone(), KeyedRNG(keys)))
    run = longest = torch.zeros(a, dtype=torch.long)
    for _ in range(1200):
        v = View(x0, 1.0, "l2", total, total - 1 - step, step.clone(),
                 KeyedRNG(offset_rows(keys, step + 1)))  # fmt: skip
        q = attack.propose(v, state)
        state = attack.observe(v, state, Reply(oracle(q).unsqueeze(1), q.unsqueeze(1)))
        run = torch.where(state["phase"] == BIN, run + 1, 0)
        longest = torch.maximum(longest, run)
        step += 1
    assert (longest > 0).all() and (longest < 60).all(), longest


def test_initial_directions_are_capped_by_the_budget():
    """With 300 queries at most 30 random directions are tried before the descent starts."""
    w = torch.ones(16)
    x0 = torch.full((1, 1, 4, 4), 0.5)
    attack = SignOPT("l2")
    _, trace = drive(attack, linear(w, -8.0 - 0.5 * 4), x0, 299)
    dirs = max(int(t["dirs"][0]) for t in trace)
    assert dirs == 30  # total = 300 // 10
    assert any(int(t["phase"][0]) == GRAD for t in trace)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(alpha=0.0), "alpha and beta"),
        (dict(beta=-1.0), "alpha and beta"),
        (dict(k=0), "k must"),
        (dict(k=2.5), "k must"),
        (dict(directions=0), "directions"),
        (dict(gamma=1.0), "unknown signopt"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rfd.attacks.make_attack("signopt", "l2", **kwargs)


def test_registered_with_the_published_defaults():
    cls = ATTACKS["signopt"]
    assert cls.kind == "decision" and cls.order == 56 and not cls.constrained
    assert cls.defaults["l2"] == {"alpha": 0.2, "beta": 0.001, "k": 200, "directions": 100}


@pytest.mark.slow
def test_signopt_fools_trained_default(trained_fmnist):
    """The paper's variant (L2) at eps 2.0: >= 30% of the correctly classified images fooled."""
    summary = success_on_trained(trained_fmnist, "signopt", "l2", 2.0)
    assert summary["success_rate"] >= 0.3
