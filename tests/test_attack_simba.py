"""SimBA / SimBA-DCT: the DCT basis, the strided order, the MINUS/PLUS phase machine, validation."""

from __future__ import annotations

import pytest
import torch
from test_attacks import success_on_trained
from torch import nn

import rfd
from rfd.attacks import View
from rfd.attacks.base import Reply
from rfd.attacks.simba import MINUS, PLUS, SimBA, band_index
from rfd.dct import dct2, dct_matrix, idct2
from rfd.rng import KeyedRNG

pytestmark = pytest.mark.usefixtures("one_thread")


def make_view(x0: torch.Tensor, eps: float = 10.0, budget: int = 10_000, seed: int = 0) -> View:
    a = x0.shape[0]
    z = torch.zeros(a, dtype=torch.long)
    keys = torch.arange(a, dtype=torch.long) * 7919 + seed
    return View(x0, eps, "l2", budget, z + budget, z, KeyedRNG(keys))


def drive(attack, view, state, margin, steps):
    """Run the state machine by hand: one query per step, the margin of the projected query."""
    queries = torch.zeros(len(view), dtype=torch.long)
    for _ in range(steps):
        q = view.project(attack.propose(view, state))
        m = margin(q)
        reply = Reply((m < 0).unsqueeze(1), q.unsqueeze(1), m.unsqueeze(1))
        state = attack.observe(view, state, reply)
        queries += 1
    return state, queries


def test_dct_is_orthonormal_and_inverts():
    for n in (1, 5, 8, 28):
        d = dct_matrix(n).float()
        assert torch.allclose(d @ d.t(), torch.eye(n), atol=1e-5)
    x = torch.rand(3, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(idct2(dct2(x)), x, atol=1e-5)
    # DCT-II of a constant has only the DC coefficient
    c = dct2(torch.ones(1, 8, 8))
    assert torch.allclose(c[0, 0, 0], torch.tensor(8.0)) and c.flatten()[1:].abs().max() < 1e-5


@pytest.mark.parametrize("basis", ["dct", "pixel"])
def test_directions_are_the_orthonormal_basis(basis):
    attack = SimBA(basis=basis)
    shape = torch.Size((2 * 4 * 4, 2, 4, 4))
    q = attack.direction(torch.arange(32), shape).flatten(1)  # every basis image, (32, 32)
    assert torch.allclose(q @ q.t(), torch.eye(32), atol=1e-5)
    if basis == "dct":  # basis image k is the inverse DCT of the k-th one-hot coefficient
        onehot = torch.eye(32).view(32, 2, 4, 4)
        assert torch.allclose(q, idct2(onehot).flatten(1), atol=1e-6)


def test_strided_order_is_low_frequency_first_and_per_image():
    x0 = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    attack = SimBA()  # freq 1/8 -> a 4 x 4 first block at 28px, then bands of width 1
    state = attack.init(make_view(x0))
    perm = state["perm"]
    assert perm.shape == (5, 784)
    assert torch.equal(perm.sort(1).values, torch.arange(784).expand(5, -1))
    band = band_index(1, 28, 28, attack.freq, attack.stride)
    assert int((band == 0).sum()) == 16 and int(band.max()) == 24
    bands = band[perm]
    assert (bands[:, 1:] >= bands[:, :-1]).all()  # bands in order, shuffled within each
    assert set(perm[0, :16].tolist()) == {k * 28 + ll for k in range(4) for ll in range(4)}
    assert not torch.equal(perm[0], perm[1])  # each image has its own order ...
    # ... drawn from its own keyed stream: the same image (same key) in another batch gets
    # the same order
    v2 = View(x0[3:4], 10.0, "l2", 10_000, torch.tensor([10_000]), torch.tensor([0]),
              KeyedRNG(torch.tensor([3 * 7919])))  # fmt: skip
    assert torch.equal(attack.init(v2)["perm"][0], perm[3])
    # the order is cut to the budget: an image never tries more directions than queries
    assert attack.init(make_view(x0, budget=100))["perm"].shape == (5, 100)


@pytest.mark.parametrize("basis", ["pixel", "dct"])
def test_phase_machine_on_a_linear_margin(basis):
    """margin(x) = <w, x>: along each direction exactly one of -q, +q lowers it, so after every
    direction has been tried x = x0 - step * sum_k sign(<w, q_k>) q_k, and each direction cost
    one query (<w, q> > 0: MINUS kept) or two (MINUS refused, PLUS kept)."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, 1, 8, 8, generator=gen)
    x0 = torch.full((2, 1, 8, 8), 0.5)
    attack = SimBA(basis=basis, step=0.01)
    view = make_view(x0)
    margin = lambda x: (w * x).flatten(1).sum(1)  # noqa: E731
    coef = (w if basis == "pixel" else dct2(w)).flatten(1)
    n_neg = (coef < 0).sum(1)
    state = attack.init(view)
    state, _ = drive(attack, view, state, margin, 1)  # START: the original
    assert (state["phase"] == MINUS).all() and torch.allclose(state["loss"], margin(x0))
    # run each image exactly its own number of steps: 64 directions + one PLUS per negative
    for i in range(2):
        v = view.subset(torch.tensor([i]))
        s = {k: t[i : i + 1] for k, t in state.items()}
        s, _ = drive(attack, v, s, lambda x, i=i: (w[i : i + 1] * x).flatten(1).sum(1),
                     64 + int(n_neg[i]))  # fmt: skip
        assert int(s["k"]) == 64 and int(s["phase"]) == MINUS
        signs = coef[i].sign().view(1, 1, 8, 8)
        delta = signs if basis == "pixel" else idct2(signs)
        assert torch.allclose(s["x"], x0[i : i + 1] - 0.01 * delta, atol=1e-5)
        assert torch.equal(attack.incumbent(v, s), s["loss"])
        assert float(s["loss"]) == pytest.approx(float((w[i] * s["x"]).sum()), abs=1e-4)
        assert float(s["loss"]) < float(margin(x0)[i])


def test_minus_refused_then_plus_then_next_direction():
    x0 = torch.full((1, 1, 4, 4), 0.5)
    attack = SimBA(basis="pixel", step=0.1)
    view = make_view(x0)
    state = attack.init(view)
    first = int(state["perm"][0, 0])
    w = torch.zeros(16)
    w[first] = -1.0  # lowering the margin needs +q on the first direction
    margin = lambda x: (w * x.flatten(1)).sum(1)  # noqa: E731
    q = attack.propose(view, state)
    assert torch.equal(q, x0)  # START queries the original
    state, _ = drive(attack, view, state, margin, 1)
    minus = attack.propose(view, state).flatten()
    assert minus[first] == pytest.approx(0.4) and int(state["phase"]) == MINUS
    state, _ = drive(attack, view, state, margin, 1)
    assert int(state["phase"]) == PLUS and int(state["k"]) == 0  # refused: same direction
    assert torch.equal(state["x"], x0)
    plus = attack.propose(view, state).flatten()
    assert plus[first] == pytest.approx(0.6)
    state, _ = drive(attack, view, state, margin, 1)
    assert int(state["phase"]) == MINUS and int(state["k"]) == 1
    assert state["x"].flatten()[first] == pytest.approx(0.6)
    assert float(attack.incumbent(view, state)) == pytest.approx(-0.6)
    # a direction the margin ignores is refused both ways: two queries, nothing kept
    state, _ = drive(attack, view, state, margin, 2)
    assert int(state["k"]) == 2 and state["x"].flatten()[first] == pytest.approx(0.6)


def test_kept_point_is_projected_onto_the_ball():
    """Steps accumulate beyond eps; the kept point is the projected query, inside the ball."""
    x0 = torch.full((1, 1, 8, 8), 0.5)
    attack = SimBA(basis="pixel", step=0.2)
    view = make_view(x0, eps=0.5)
    w = torch.ones(1, 1, 8, 8)
    state, _ = drive(attack, view, attack.init(view), lambda x: (w * x).flatten(1).sum(1), 40)
    d = (state["x"] - x0).flatten(1).norm(dim=1)
    assert float(d) == pytest.approx(0.5, rel=1e-4)
    assert torch.equal(view.project(state["x"]), state["x"])


def test_packing_does_not_change_results():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        nn.init.normal_(net[1].weight, std=0.5)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    kw = dict(attack="simba", norm="l2", eps=1.0, max_queries=60, criterion="none", seed=3)
    a = rfd.attack(net, x, y, **kw)
    b = rfd.attack(net, x.flip(0), y.flip(0), ids=torch.arange(6).flip(0), max_batch=4, **kw)
    assert torch.equal(a.adv, b.adv.flip(0)) and torch.equal(a.queries, b.queries.flip(0))
    assert a.success.any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(basis="haar"), "basis"),
        (dict(step=0.0), "step"),
        (dict(freq=0.0), "freq"),
        (dict(stride=1.5), "stride"),
        (dict(step=-1.0), "step"),
        (dict(step=float("inf")), r"simba step must be a finite number > 0, got inf"),
        (dict(step=float("nan")), r"simba step must be a finite number > 0, got nan"),
        (dict(step="0.2"), r"simba step must be a finite number > 0, got '0.2'"),
        (dict(freq=float("nan")), "freq"),
        (dict(stride=float("inf")), "stride"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SimBA(**kwargs)
    with pytest.raises(ValueError, match="supported: l2"):
        SimBA("linf")


@pytest.mark.slow
def test_simba_fools_trained_default(trained_fmnist):
    summary = success_on_trained(trained_fmnist, "simba", "l2", 2.0)
    assert summary["success_rate"] >= 0.5
