"""Bandits-TD (rfd.attacks.bandits): the prior's updates, the query layout, the budget, and the
issue's requirement on the trained Fashion-MNIST default."""

from __future__ import annotations

import math

import pytest
import torch
from test_attacks import MarginLinear as Linear
from test_attacks import success_on_trained

import rfd
from rfd.attacks import ATTACKS, Reply, View
from rfd.attacks.api import make_attack
from rfd.attacks.bandits import BanditsAttack, eg_step
from rfd.rng import KeyedRNG, derive_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def tile_pattern(a: int, side: int, tile: int, seed: int) -> torch.Tensor:
    """(a, 1, side, side) random +-1 field, constant on ``tile`` x ``tile`` tiles."""
    n = math.ceil(side / tile)
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 2, (a, 1, n, n), generator=g).float() * 2 - 1
    return small.repeat_interleave(tile, 2).repeat_interleave(tile, 3)[..., :side, :side]


def view_at(
    x0: torch.Tensor, eps: float, norm: str, step: int, remaining: int = 1000, seed: int = 7
) -> View:
    """The engine's view of images ``x0`` at ``step``: keys per image (from ``seed``) and step."""
    a = x0.shape[0]
    keys = derive_rows(torch.arange(a, dtype=torch.int64), seed)
    return View(
        x0, eps, norm, budget=10_000, remaining=torch.full((a,), remaining),
        step=torch.full((a,), step), rng=KeyedRNG(derive_rows(keys, step)),
    )  # fmt: skip


def run_linear(attack: BanditsAttack, w: torch.Tensor, x0: torch.Tensor, eps: float, steps: int):
    """Step the state machine by hand against the margin ``<w, x>``; returns the states."""
    state = attack.init(view_at(x0, eps, attack.norm, 0))
    states = [state]
    for t in range(steps):
        view = view_at(x0, eps, attack.norm, t)
        q = view.project(attack.propose(view, state))
        m = torch.einsum("archw,achw->ar", q, w)
        reply = Reply(m < 0, q, m, torch.stack([m, torch.zeros_like(m)], -1))
        state = {k: v for k, v in attack.observe(view, state, reply).items()}
        states.append(state)
    return states


# --------------------------------------------------------------------------- hyperparameters
def test_registered_with_the_authors_defaults():
    cls = ATTACKS["bandits"]
    assert cls is BanditsAttack and cls.kind == "score" and cls.order == 60
    assert cls.norms == ("linf", "l2")
    assert cls.defaults["linf"] == dict(
        fd_eta=0.1, image_lr=0.01, online_lr=100.0, exploration=1.0, tile_size=6
    )
    assert cls.defaults["l2"] == dict(
        fd_eta=0.01, image_lr=0.5, online_lr=0.1, exploration=0.01, tile_size=6
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fd_eta=0.0), "fd_eta"),
        (dict(image_lr=-0.1), "image_lr"),
        (dict(online_lr=float("inf")), "online_lr"),
        (dict(exploration=0), "exploration"),
        (dict(tile_size=0), "tile_size"),
        (dict(tile_size=2.5), "tile_size"),
        (dict(tile=4), "tile_size"),  # unknown names list the valid ones
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_attack("bandits", "linf", **kwargs)
    with pytest.raises(ValueError, match="linf, l2"):
        make_attack("bandits", "l1")


# --------------------------------------------------------------------------- the prior
def test_eg_step_is_tanh_of_shifted_atanh():
    """The published EG step equals tanh(atanh(v) + lr * g), the form the attack stores."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1000, generator=g, dtype=torch.float64) * 1.98 - 0.99
    grad = torch.randn(1000, generator=g, dtype=torch.float64)
    for lr in (0.1, 1.0, 5.0):
        assert torch.allclose(eg_step(v, grad, lr), torch.tanh(torch.atanh(v) + lr * grad))
    # where the published form overflows to NaN, the stored form stays finite
    big = torch.full((3,), 50.0)
    assert torch.isnan(eg_step(torch.zeros(3), big, 100.0)).all()
    assert torch.isfinite(torch.tanh(torch.atanh(torch.zeros(3)) + 100.0 * big)).all()
    # and so does the attack's own update: a step whose finite difference is large enough to
    # overflow the published form (lr * grad >> 88) leaves the prior, the iterate and the next
    # probes finite
    attack = BanditsAttack("linf")  # online_lr = 100, the authors' Linf setting
    x0 = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    view = view_at(x0, 0.1, "linf", 0)
    state = attack.init(view)
    q = view.project(attack.propose(view, state))
    m = torch.tensor([[1.0, -20.0, 20.0], [1.0, 20.0, -20.0]])  # derivative +-400 per unit probe
    new = attack.observe(view, state, Reply(m < 0, q, m, torch.stack([m, -m], -1)))
    grad = ((m[:, 2] - m[:, 1]) / (attack.fd_eta * attack.exploration)).view(-1, 1, 1, 1)
    published = eg_step(torch.zeros_like(state["u"]), grad * state["u"], attack.online_lr)
    assert torch.isnan(published).any()  # the regime where the published form breaks
    for k in ("x", "z", "best", "best_m"):
        assert torch.isfinite(new[k]).all(), k
    assert torch.tanh(new["z"]).abs().max() == 1.0  # saturated, not NaN
    assert bool(view.inside(new["x"]).all())
    nxt = attack.propose(view_at(x0, 0.1, "linf", 1), new)
    assert torch.isfinite(nxt).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_queries_are_the_iterate_and_an_antithetic_pair_on_tiles(norm):
    attack = BanditsAttack(norm)
    x0 = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    view = view_at(x0, 10.0, norm, 0)
    state = attack.init(view)
    assert state["z"].shape == (3, 1, 5, 5)  # 28px with 6px tiles: a 5x5 data prior
    q = attack.propose(view, state)
    assert q.shape == (3, 3, 1, 28, 28)
    assert torch.equal(q[:, 0], x0)
    d1, d2 = (q[:, 1] - x0), (q[:, 2] - x0)
    for d in (d1, d2):
        assert torch.allclose(d.flatten(1).norm(dim=1), torch.full((3,), attack.fd_eta))
    # a zero prior: the two probes are opposite, and constant on each 6px tile
    assert torch.allclose(d1, -d2, atol=1e-7)
    padded = torch.nn.functional.pad(d1, (0, 2, 0, 2), mode="replicate")  # 30 = 5 tiles of 6
    tiles = padded.unfold(2, 6, 6).unfold(3, 6, 6)  # (3, 1, 5, 5, 6, 6)
    assert torch.allclose(tiles, tiles[..., :1, :1].expand_as(tiles), atol=1e-6)
    assert attack.queries(torch.tensor([100, 3, 2, 1])).tolist() == [3, 3, 1, 1]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_prior_learns_a_linear_gradient(norm):
    """Against margin <w, x> with w constant on tiles, the prior turns towards -w (descent)
    and the image follows it, lowering the margin every few steps."""
    a = 4
    w = tile_pattern(a, 28, 6, seed=3)
    x0 = torch.full((a, 1, 28, 28), 0.5)
    eps = 0.5 if norm == "linf" else 20.0  # a ball the walk does not reach: no projection
    attack = BanditsAttack(norm)
    states = run_linear(attack, w, x0, eps, steps=100)
    prior = attack._prior(states[-1]["z"])
    target = -w[..., ::6, ::6]  # one value per tile
    if norm == "linf":
        agree = (prior.sign() == target).float().mean()
        assert agree >= 0.9, agree
    else:
        # the L2 prior's steps shrink as it grows (exploration is fixed): it learns more slowly
        cos = torch.cosine_similarity(prior.flatten(1), target.flatten(1))
        assert cos.mean() > 0.5 and (cos > 0.3).all(), cos
    margin = lambda s: torch.einsum("achw,achw->a", s["x"], w)  # noqa: E731
    assert (margin(states[-1]) < margin(states[0]) - 1.0).all()


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("budget", [10, 11, 12, 40])
def test_an_unfoolable_image_spends_exactly_its_budget(norm, budget):
    """1 clean query, then steps of 3; a remainder of 1 or 2 is one last check of the iterate
    (so a remainder of 2 leaves one query unspent)."""
    w = tile_pattern(2, 28, 6, seed=1)[0].flatten()
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = Linear(w * 1e-3, b=100.0)  # margin ~100 everywhere in the ball
    eps = 0.1 if norm == "linf" else 2.0
    res = rfd.attack(model, x, torch.zeros(2, dtype=torch.long), attack="bandits", norm=norm,
                     eps=eps, max_queries=budget, criterion="single")  # fmt: skip
    assert not res.success.any()
    spent = budget - int((budget - 1) % 3 == 2)
    assert res.queries.tolist() == [spent, spent]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fools_a_linear_model(norm):
    w = tile_pattern(4, 28, 6, seed=5).flatten(1)[0]
    x = torch.full((4, 1, 28, 28), 0.5)
    # margin 0.5 * sum(w) + b; the ball lets -eps * |w|_1 (Linf) or -eps * |w|_2 (L2) through,
    # of which half (Linf) or a third (L2, the slower learner) must be found
    eps = 0.1 if norm == "linf" else 2.0
    reach = eps * (w.abs().sum() if norm == "linf" else w.norm())
    need = 0.5 if norm == "linf" else 0.3
    model = Linear(w, b=float(-0.5 * w.sum() + need * reach))
    res = rfd.attack(model, x, torch.zeros(4, dtype=torch.long), attack="bandits", norm=norm,
                     eps=eps, max_queries=300, criterion="single")  # fmt: skip
    assert res.clean_correct.all() and res.success.all()


# --------------------------------------------------------------------------- trained default
@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 2.0)])
def test_bandits_fools_trained_default(trained_fmnist, norm, eps):
    summary = success_on_trained(trained_fmnist, "bandits", norm, eps)
    assert summary["success_rate"] >= 0.5
