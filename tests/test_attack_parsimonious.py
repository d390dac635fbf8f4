"""Parsimonious attack: blocks, the lazy-greedy phase machine on a separable loss, validation."""

from __future__ import annotations

import pytest
import torch
from test_attacks import success_on_trained
from torch import nn

import rfd
from rfd.attacks import View
from rfd.attacks.base import Reply
from rfd.attacks.parsimonious import DEL_EVAL, INS_EVAL, START, Parsimonious
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
    # the incumbent is the observed margin of the kept vertex, bit for bit
    best = att.best(view, state)
    assert torch.equal(att.incumbent(view, state), margin(best))
    assert float(att.incumbent(view, state)) < float(margin(view.lower))


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
    c = rfd.attack(net, x, y, success="improved", **kw)
    assert torch.equal(a.success, c.success)


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
