"""Parsimonious attack: blocks, the lazy-greedy phase machine on a separable loss, validation."""

from __future__ import annotations

import pytest
import torch
from test_attacks import success_on_trained, tiny_cnn
from torch import nn

import rfd
from rfd.attacks import View
from rfd.attacks.base import Reply
from rfd.attacks.parsimonious import (
    DEL_EVAL,
    DEL_LAZY,
    INS_EVAL,
    INS_LAZY,
    START,
    Parsimonious,
    first_rejected,
)
from rfd.rng import KeyedRNG

pytestmark = pytest.mark.usefixtures("one_thread")


def make_view(x0: torch.Tensor, eps: float = 0.1, budget: int = 10_000) -> View:
    a = x0.shape[0]
    z = torch.zeros(a, dtype=torch.long)
    keys = torch.arange(a, dtype=torch.long) * 7919 + 5
    return View(x0, eps, "linf", budget, z + budget, z, KeyedRNG(keys))


def drive(attack, view, state, margin, steps):
    """Run the state machine by hand, one query per step; returns the queries sent."""
    sent = []
    for _ in range(steps):
        q = view.project(attack.propose(view, state))
        sent.append(q)
        m = margin(q)
        reply = Reply((m < 0).unsqueeze(1), q.unsqueeze(1), m.unsqueeze(1))
        state = attack.observe(view, state, reply)
    return state, sent


def test_initial_block_side_scales_with_the_image():
    att = Parsimonious()
    assert att.initial_block(32, 32) == 4  # the authors' CIFAR-10 setting
    assert att.initial_block(28, 28) == 4
    assert att.initial_block(224, 224) == 28


@pytest.mark.parametrize("shape,bs", [((1, 2, 8, 8), 4), ((1, 2, 8, 8), 2), ((1, 1, 7, 7), 3),
                                      ((1, 3, 5, 5), 1)])  # fmt: skip
def test_blocks_partition_the_image(shape, bs):
    att = Parsimonious()
    size = torch.Size(shape)
    nb = int(att._grid(torch.tensor(bs), size)[2])
    ids = torch.arange(nb)
    masks = att._block_mask(ids, torch.full((nb,), bs), torch.Size((nb, *shape[1:])))
    assert torch.equal(masks.sum(0), torch.ones(masks.shape[1], dtype=torch.long))
    assert (masks.sum(1) >= 1).all() and (masks.sum(1) <= bs * bs).all()


def test_lazy_greedy_on_a_separable_loss():
    """margin(x) = <w, x> is separable over blocks: a block's gain g_b never changes. One
    mini-batch then inserts every block with g_b < 0 (the best without re-query, the rest in
    lazy order, stopping at the first positive), and the deletion round removes the least
    useful one (the published code flips the best deletion candidate unconditionally), in
    1 + 16 + n_neg + n_neg + 1 queries; then the block side halves."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1, 1, 8, 8, generator=gen)
    x0 = torch.full((1, 1, 8, 8), 0.5)
    att = Parsimonious(block_frac=0.25)  # 2 px blocks: 16 blocks, one mini-batch
    view = make_view(x0)
    margin = lambda x: (w * x).flatten(1).sum(1)  # noqa: E731
    g = w.view(4, 2, 4, 2).sum((1, 3)).flatten() * 0.2  # gain of each 2x2 block
    neg = (g < 0).nonzero()[:, 0]
    n_neg = neg.numel()
    assert n_neg >= 2 and n_neg < 16
    state = att.init(view)
    assert int(state["phase"]) == START and int(state["bs"]) == 2
    state, sent = drive(att, view, state, margin, 1 + 16)
    assert torch.equal(sent[0], view.lower)  # the all -eps start
    assert all((q - view.lower).abs().sum() > 0 for q in sent[1:])
    state, _ = drive(att, view, state, margin, n_neg)
    assert int(state["phase"]) == DEL_EVAL
    inserted = state["up"].view(4, 2, 4, 2)[:, 0, :, 0].flatten() > 0.5
    assert torch.equal(inserted.nonzero()[:, 0], neg)
    state, _ = drive(att, view, state, margin, n_neg + 1)
    kept = state["up"].view(4, 2, 4, 2)[:, 0, :, 0].flatten() > 0.5
    expect = g < 0
    expect[neg[g[neg].argmax()]] = False
    assert torch.equal(kept, expect)
    assert int(state["phase"]) == INS_EVAL and int(state["bs"]) == 1  # next pass, 1 px blocks
    # the stored loss is the observed margin of the kept vertex, bit for bit
    best = att.best(view, state)
    assert torch.equal(state["loss"], margin(best))
    assert float(state["loss"]) < float(margin(view.lower))
    # in an evaluation phase every fooling query counts under "improved" (published early stop)
    assert float(att.incumbent(view, state)) == float("inf")


def test_every_query_is_a_vertex_and_blocks_are_shuffled_per_pass():
    x0 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    att = Parsimonious(block_frac=0.25, batch_size=5)
    view = make_view(x0)
    w = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    state = att.init(view)
    first = state["ids"].clone()
    assert not torch.equal(first[0], first[1])
    state, sent = drive(att, view, state, lambda x: (w * x).flatten(1).sum(1), 120)
    lo, hi = view.lower, view.upper
    for q in sent:
        assert ((q == lo) | (q == hi)).all()
    assert (state["bs"] == 1).all()  # 16 blocks in batches of 5: passes end and sides halve


def test_packing_does_not_change_results():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        nn.init.normal_(net[1].weight, std=0.5)
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net(x).argmax(1)
    kw = dict(attack="parsimonious", eps=0.1, max_queries=80, criterion="none", seed=3)
    a = rfd.attack(net, x, y, **kw)
    b = rfd.attack(net, x.flip(0), y.flip(0), ids=torch.arange(6).flip(0), max_batch=4, **kw)
    assert torch.equal(a.adv, b.adv.flip(0)) and torch.equal(a.queries, b.queries.flip(0))
    # "improved" (the published early stop) can only count a success later, never earlier
    c = rfd.attack(net, x, y, success="improved", **kw)
    assert not bool((c.success & ~a.success).any())
    both = a.success & c.success
    assert bool((c.fooled_at[both] >= a.fooled_at[both]).all())


def _observe_one(att, view, state, m):
    """``observe`` of a copy of ``state`` answered with margins ``m`` (A,); returns whether each
    lazy re-evaluation was accepted (its block flipped)."""
    s = {k: v.clone() for k, v in state.items()}
    q = view.project(att.propose(view, s))
    reply = Reply((m < 0).unsqueeze(1), q.unsqueeze(1), m.unsqueeze(1))
    new = att.observe(view, s, reply)
    return (new["up"] != state["up"]).any(1)


def test_incumbent_is_the_published_early_stopping_rule():
    """The authors' code returns success at any fooled start or evaluated candidate, but at a
    fooled re-evaluated candidate only if the lazy step accepts it. ``margin < incumbent`` (the
    engine's "improved" test) must say exactly that, for the margin each step really got and at
    the float boundary itself, including candidates below the stored loss that are pushed back
    (the old incumbent, the stored loss, counted those and missed fooled evaluations above it)."""
    gen = torch.Generator().manual_seed(4)
    a = 6
    x0 = torch.rand(a, 1, 8, 8, generator=gen)
    att = Parsimonious(block_frac=0.25, batch_size=8)
    view = make_view(x0)
    w1 = torch.randn(a, 64, generator=gen)
    w2 = torch.randn(a, 64, generator=gen)
    # not separable over blocks: re-evaluated gains change, so the lazy steps push and stop too

    def margin(x: torch.Tensor) -> torch.Tensor:
        return (w1 * x.flatten(1)).sum(1) + 3 * (w2 * x.flatten(1)).sum(1).tanh()

    state = att.init(view)
    inf = torch.full((a,), float("inf"))
    seen = {"eval": 0, "accepted": 0, "refused below loss": 0}
    for _ in range(150):
        inc = att.incumbent(view, state)
        lazy = (state["phase"] == INS_LAZY) | (state["phase"] == DEL_LAZY)
        assert torch.equal(inc[~lazy], inf[~lazy])  # START and EVAL: any fooled query counts
        m = margin(view.project(att.propose(view, state)))
        accepted = _observe_one(att, view, state, m)
        assert torch.equal((m < inc)[lazy], accepted[lazy])
        # the boundary is exact: the float below the incumbent is accepted, the incumbent not
        if bool(lazy.any()):
            below = torch.nextafter(inc, -inf)
            assert bool(_observe_one(att, view, state, below)[lazy].all())
            assert not bool(_observe_one(att, view, state, inc)[lazy].any())
        seen["eval"] += int((~lazy & (state["phase"] != START)).sum())
        seen["accepted"] += int((lazy & accepted).sum())
        seen["refused below loss"] += int((lazy & ~accepted & (m < state["loss"])).sum())
        state, _ = drive(att, view, state, margin, 1)
    assert min(seen.values()) > 0, seen


@pytest.mark.parametrize(
    "loss,top",
    [
        (1.0, -1.0 - 2**-23),  # many floats round to one gain: loss + top is 2**23 floats off
        (0.3, 0.5),  # a worse other gain: only "gain <= 0" binds, i.e. m <= loss
        (0.3, -0.1),
        (2.0, float("inf")),  # nothing else queued
        (-0.5, -0.25),  # a fooled kept point (after a failed vote)
    ],
)
def test_lazy_incumbent_is_the_exact_acceptance_boundary(loss, top):
    att = Parsimonious(block_frac=0.5, batch_size=4)
    view = make_view(torch.full((1, 1, 4, 4), 0.5))
    state = att.init(view)
    state["phase"][:] = INS_LAZY
    state["slot"][:] = 0
    state["loss"][:] = loss
    state["score"][0] = torch.tensor([-5.0, top, float("inf"), float("inf")])
    inc = att.incumbent(view, state)
    below = torch.nextafter(inc, torch.tensor(-float("inf")))
    assert bool(_observe_one(att, view, state, below)) and not _observe_one(att, view, state, inc)
    if loss == 1.0:
        assert float(inc) == -(2**-24)


def test_first_rejected_handles_non_finite_values():
    loss = torch.tensor([float("inf"), float("nan"), 1.0, 1.0])
    cap = torch.tensor([0.0, 0.0, float("nan"), -float("inf")])
    t = first_rejected(loss, cap)
    # +inf loss: every finite m has m - loss = -inf, accepted; NaN: never accepted;
    # cap -inf: m - 1 <= -inf only for m = -inf
    assert t.tolist() == [float("inf"), -float("inf"), -float("inf"), -3.4028234663852886e38]
    # float64 keys span more than int64: the bisection must not overflow
    loss, cap = torch.tensor([0.25, 3.0], dtype=torch.float64), torch.tensor([-0.5, 0.0]).double()
    t = first_rejected(loss, cap)
    below = torch.nextafter(t, torch.full_like(t, -float("inf")))
    assert t.dtype == torch.float64 and ((below - loss) <= cap).all() and ((t - loss) > cap).all()
    assert float(t[0]) == -0.25 + 2**-54  # -0.25 + 2**-55 still rounds to a gain of -0.5


def test_improved_on_a_deterministic_model_fools_the_same_images_some_later():
    """Without noise the published rule loses no success of "any" here, but it can count one
    later: a fooled candidate pushed back by a lazy step (a better stored gain remains) does not
    stop the search; it counts when popped again and accepted (image 7: query 59, not 56)."""
    net = tiny_cnn()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    kw = dict(attack="parsimonious", eps=0.04, max_queries=100, criterion="none", seed=2)
    a = rfd.attack(net, x, y, **kw)
    b = rfd.attack(net, x, y, success="improved", **kw)
    assert int(a.success.sum()) >= 8 and torch.equal(a.success, b.success)
    assert bool((b.fooled_at >= a.fooled_at).all()) and bool((b.fooled_at > a.fooled_at).any())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_frac=0.0), "block_frac"),
        (dict(block_frac=2.0), "block_frac"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.5), "batch_size"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Parsimonious(**kwargs)
    with pytest.raises(ValueError, match="supported: linf"):
        Parsimonious("l2")


@pytest.mark.slow
def test_parsimonious_fools_trained_default(trained_fmnist):
    summary = success_on_trained(trained_fmnist, "parsimonious", "linf", 0.1)
    assert summary["success_rate"] >= 0.5
