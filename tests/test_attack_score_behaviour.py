"""Behaviour of the score attacks NES, SignHunter and Square (L2): each step does what the
published algorithm says, checked by driving init/propose/observe by hand against a linear
margin ``<w, x>``, and each attack fools a tiny CNN where doing nothing fools nothing."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from test_attack_bandits import view_at as _view_at
from test_attacks import tiny_cnn

import rfd
from rfd.attacks import Reply, View
from rfd.attacks.nes import NESAttack
from rfd.attacks.signhunter import SignHunter
from rfd.attacks.square import SquareAttack, meta_pattern, p_selection

pytestmark = pytest.mark.usefixtures("one_thread")

view_at = partial(_view_at, seed=23)  # the keys these tests were written with


def linear_reply(q: torch.Tensor, w: torch.Tensor) -> Reply:
    """The engine's answer to queries ``q`` (A, R, C, H, W) for the margin ``<w, x>``."""
    m = torch.einsum("archw,achw->ar", q, w)
    return Reply(m < 0, q, m, torch.stack([m, torch.zeros_like(m)], -1))


def margin_of(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.einsum("achw,achw->a", x, w)


def step(attack, view: View, state: dict, w: torch.Tensor) -> tuple[dict, torch.Tensor, Reply]:
    """One engine step by hand: propose, project (as the engine does), answer, observe."""
    q = attack.propose(view, state)
    q = view.project(q if q.dim() == 5 else q.unsqueeze(1))
    reply = linear_reply(q, w)
    return attack.observe(view, state, reply), q, reply


# --------------------------------------------------------------------------- NES
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("remaining", [1000, 8])
def test_nes_step_is_the_antithetic_estimate(norm, remaining):
    """Queries are ``[x, x + s u_1, x - s u_1, ...]`` and the step is ``-lr * sign(g)`` (Linf) or
    ``-lr * g / |g|_2`` (L2) for ``g = sum_k (m(x + s u_k) - m(x - s u_k)) u_k`` over the pairs
    actually sent: the published NES estimate, built from the model's answers."""
    attack = NESAttack(norm)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 1, 12, 12, generator=g, dtype=torch.float64)
    x0 = 0.4 + 0.2 * torch.rand(3, 1, 12, 12, generator=g, dtype=torch.float64)
    view = view_at(x0, 0.5 if norm == "linf" else 20.0, norm, 0, remaining)  # no projection
    state = attack.init(view)
    q = attack.propose(view, state)
    k = (int(attack.queries(view.remaining)[0]) - 1) // 2
    assert k == min((remaining - 1) // 2, attack.pairs)
    u = state["u"]
    assert q.shape == (3, 1 + 2 * attack.pairs, 1, 12, 12) and torch.equal(q[:, 0], x0)
    assert torch.allclose(q[:, 1::2], x0.unsqueeze(1) + attack.fd_eta * u)
    assert torch.allclose(q[:, 2::2], x0.unsqueeze(1) - attack.fd_eta * u)
    reply = linear_reply(view.project(q), w)
    new = attack.observe(view, state, reply)
    m = reply.margin
    est = torch.einsum("ak,akchw->achw", m[:, 1 : 2 * k : 2] - m[:, 2 : 2 * k + 1 : 2], u[:, :k])
    if norm == "linf":
        direction = est.sign()
    else:
        direction = est / est.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(new["x"], x0 - attack.lr * direction, atol=1e-9)
    # the iterate's own answer is what the attack keeps as its best so far
    assert torch.equal(new["best"], x0) and torch.equal(new["best_m"], m[:, 0])
    if remaining == 1000:  # 30 pairs in 144 dimensions: the step descends the margin
        assert (margin_of(new["x"], w) < margin_of(x0, w)).all()


@pytest.mark.parametrize("key_seed", [23, 7, 76])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nes_descends_a_linear_margin(norm, key_seed):
    """In 16 dimensions 30 antithetic pairs estimate the gradient well: the margin falls at
    every step (for L2: every step until the ball binds), the iterate moves along -sign(w) (Linf)
    or -w (L2) and gets most of the best possible descent, and ``best`` is the lowest iterate
    answered. The bounds hold for every one of 200 key seeds tried (worst: Linf descent 0.66 of
    the optimum, sign agreement over the 64 coordinates 0.78; L2 descent and cosine 0.89), so they test the estimator,
    not one lucky draw."""
    lr = 0.01 if norm == "linf" else 0.1
    attack = NESAttack(norm, lr=lr)
    at = partial(_view_at, seed=key_seed)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.full((4, 1, 4, 4), 0.5, dtype=torch.float64)
    eps, steps = 0.4, 8
    state = attack.init(at(x0, eps, norm, 0))
    margins = [margin_of(x0, w)]
    for t in range(steps):
        view = at(x0, eps, norm, t)
        state, q, reply = step(attack, view, state, w)
        assert torch.allclose(reply.margin[:, 0], margins[-1])  # it queries its iterate first
        margins.append(margin_of(state["x"], w))
        if norm == "linf" or (t + 1) * lr <= eps:  # on the L2 sphere noise may undo a little
            assert (margins[-1] < margins[-2]).all(), t
        assert view.inside(state["x"]).all()
    moved, wf = (x0 - state["x"]).flatten(1), w.flatten(1)
    drop = margins[0] - margins[-1]
    if norm == "linf":  # the best is steps sign steps of lr (the box never binds here)
        assert (drop >= 0.6 * steps * lr * wf.abs().sum(1)).all(), drop
        agree = (moved.sign() == wf.sign()).double().mean()  # over rows: 64 coordinates
        assert agree >= 0.75, agree
    else:  # the best is the ball's point along -w
        assert (drop >= 0.85 * eps * wf.norm(dim=1)).all(), drop
        cos = torch.cosine_similarity(moved, wf)
        assert (cos > 0.85).all(), cos
    answered = torch.stack(margins[:-1], 1)  # the last iterate is not answered yet
    assert torch.allclose(state["best_m"], answered.amin(1))
    assert torch.allclose(margin_of(attack.best(view, state), w), state["best_m"])


# --------------------------------------------------------------------------- SignHunter
def hierarchy(d: int) -> list[tuple[int, int, int, int]]:
    """The published schedule: (level, chunk, start, end); chunks of ceil(d / 2^level) at level
    0, 1, ..., ceil(log2 d), the last one cut at d."""
    out = []
    for level in range(math.ceil(math.log2(d)) + 1):
        size = math.ceil(d / 2**level)
        out += [(level, c, c * size, min(c * size + size, d)) for c in range(math.ceil(d / size))]
    return out


def vertex(view: View, up: torch.Tensor, norm: str) -> torch.Tensor:
    """The ball's vertex with signs ``up`` (1 = +), built from the threat model alone."""
    up = up.view_as(view.x0)
    if norm == "linf":
        return torch.where(up > 0, view.upper, view.lower)
    d = view.x0[0].numel()
    return (view.x0 + view.eps / math.sqrt(d) * (2 * up - 1)).clamp(0, 1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 3, 4), (2, 3, 3)])
def test_signhunter_hierarchy_recovers_the_descent_signs(norm, shape):
    """One pass over the hierarchy (the all-plus vertex, then chunks of d, d/2, ..., 1): every
    query is the kept vertex with exactly the scheduled chunk flipped, a flip is kept iff the
    margin does not rise, and since the last level flips single coordinates, on a linear margin
    the kept signs end as -sign(w): the best vertex of the eps-box."""
    a = 3
    g = torch.Generator().manual_seed(2)
    w = torch.randn(a, *shape, generator=g, dtype=torch.float64)
    x0 = torch.rand(a, *shape, generator=g, dtype=torch.float64)
    x0[:, 0, 0, 0] = 0.0  # a pixel on the box's edge (its lower vertex is the original)
    d = math.prod(shape)
    eps = 0.1 if norm == "linf" else 0.5
    attack = SignHunter(norm)
    view = view_at(x0, eps, norm, 0)
    state = attack.init(view)
    # step 0 queries the all-plus vertex and flips nothing
    state, q, reply = step(attack, view, state, w)
    assert torch.allclose(q[:, 0], vertex(view, torch.ones(a, d), norm))
    assert torch.equal(state["up"], torch.ones(a, d))
    assert torch.equal(state["best"], reply.margin[:, 0])
    for t, (level, chunk, start, end) in enumerate(hierarchy(d), 1):
        assert state["level"].tolist() == [level] * a and state["chunk"].tolist() == [chunk] * a
        up, best = state["up"].clone(), state["best"].clone()
        flipped = up.clone()
        flipped[:, start:end] = 1 - flipped[:, start:end]
        view = view_at(x0, eps, norm, t)
        state, q, reply = step(attack, view, state, w)
        assert torch.allclose(q[:, 0], vertex(view, flipped, norm))
        m = reply.margin[:, 0]
        keep = (m <= best).view(a, 1)
        assert torch.equal(state["up"], torch.where(keep, flipped, up)), (level, chunk)
        assert torch.equal(state["best"], torch.minimum(best, m))
    # the hierarchy restarts, and the kept signs are the minimizing vertex
    assert state["level"].tolist() == [0] * a and state["chunk"].tolist() == [0] * a
    assert torch.equal(state["up"], (w < 0).flatten(1).double())
    best = attack.best(view, state)
    assert torch.allclose(best, vertex(view, (w < 0).double(), norm))
    assert torch.allclose(state["best"], margin_of(best, w))


def test_signhunter_keeps_lower_and_tied_flips_and_reverts_higher():
    """The acceptance rule (minimizing the margin): a flip is kept when the margin falls or stays
    (ties keep the flip, as the original's ``>=`` on its ascent objective), reverted when it
    rises; the chunk advances either way and wraps to the next level at the level's end."""
    a, d = 3, 16
    x0 = torch.full((a, 1, 4, 4), 0.5)
    view = view_at(x0, 0.1, "linf", 5)
    attack = SignHunter()
    state = attack.init(view)
    up0 = torch.ones(a, d)
    up0[:, ::3] = 0.0
    state.update(up=up0.clone(), best=torch.ones(a), level=torch.full((a,), 2))
    state["chunk"] = torch.full((a,), 1)  # level 2: chunks of 4, this one is [4, 8)
    q = attack.propose(view, state)
    changed = (q - vertex(view, up0, "linf")).flatten(1) != 0
    assert changed[:, 4:8].all() and not changed[:, :4].any() and not changed[:, 8:].any()
    m = torch.tensor([0.5, 1.0, 2.0])  # lower, tie, higher
    reply = Reply(torch.zeros(a, 1, dtype=torch.bool), q.unsqueeze(1), m.view(a, 1))
    new = attack.observe(view, state, reply)
    flipped = up0.clone()
    flipped[:, 4:8] = 1 - flipped[:, 4:8]
    assert torch.equal(new["up"][0], flipped[0]) and torch.equal(new["up"][1], flipped[1])
    assert torch.equal(new["up"][2], up0[2])
    assert new["best"].tolist() == [0.5, 1.0, 1.0]
    assert new["level"].tolist() == [2] * a and new["chunk"].tolist() == [2] * a
    # the last chunk of a level moves to the next level's first chunk
    state = {**new, "chunk": torch.full((a,), 3)}
    q = attack.propose(view, state)
    new = attack.observe(view, state, Reply(reply.adversarial, q.unsqueeze(1), m.view(a, 1)))
    assert new["level"].tolist() == [3] * a and new["chunk"].tolist() == [0] * a


# --------------------------------------------------------------------------- Square L2
def l2_side(p_init: float, it: int, n_iters: int, h: int, w: int) -> int:
    """The original's L2 window side: round(sqrt(p * h * w)), at least 3, odd, below the image."""
    s = max(round(math.sqrt(p_selection(p_init, it, n_iters) * h * w)), 3)
    s += 1 - s % 2
    return min(s, min(h, w) - 1 - min(h, w) % 2)


def square_windows(changed: torch.Tensor, s: int) -> list[tuple[int, int]]:
    """Positions (r, c) of the s x s windows entirely inside the (H, W) mask ``changed``."""
    full = torch.nn.functional.avg_pool2d(changed[None, None].double(), s, stride=1)[0, 0]
    return [tuple(p) for p in (full > 1 - 1e-9).nonzero().tolist()]


def fits_in_window(mask: torch.Tensor, s: int) -> bool:
    if not mask.any():
        return True
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return int(rows[-1] - rows[0]) < s and int(cols[-1] - cols[0]) < s


def published_l2_change(new: torch.Tensor, old: torch.Tensor, s: int) -> torch.Tensor | None:
    """Recognise the published L2 update in the perturbations (C, H, W) of a candidate (``new``)
    and its incumbent (``old``): some s x s window 1 holds, per channel, ``k_c * (b * P + old_c /
    |old_c|)`` with one of the two bumps P, b = +-1 and k_c > 0, and everything else that changed
    fits one s x s window 2 and is now zero. Returns that zeroed part (an (H, W) mask), or None
    when no window 1 explains the change."""
    c, h, w = new.shape
    changed = ((new - old).abs() > 1e-9).any(0)
    for r, q in square_windows(changed, s):
        w1 = torch.zeros(h, w, dtype=torch.bool)
        w1[r : r + s, q : q + s] = True
        rest = changed & ~w1
        if not fits_in_window(rest, s) or (new[:, rest].abs() > 1e-9).any():
            continue
        o = old[:, r : r + s, q : q + s].flatten(1)
        o = o / o.norm(dim=1, keepdim=True)
        v = new[:, r : r + s, q : q + s].flatten(1)
        for pat in meta_pattern(s).double():
            basis = torch.stack([pat.flatten().expand(c, -1), o], -1)  # (C, s * s, 2)
            coef = torch.linalg.lstsq(basis, v.unsqueeze(-1)).solution[..., 0]  # (C, 2)
            fits = torch.allclose((basis @ coef.unsqueeze(-1))[..., 0], v, atol=1e-9)
            if fits and (coef[:, 1] > 0).all() and torch.allclose(coef[:, 0].abs(), coef[:, 1]):
                return rest
    return None


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16)])
def test_square_l2_init_lies_on_the_sphere(shape):
    """The first query is the initialization, a grid of bumps with random signs, on the sphere
    of radius eps around the original (nothing clipped here)."""
    a = 4
    x0 = 0.3 + 0.4 * torch.rand(a, *shape, generator=torch.Generator().manual_seed(3))
    attack = SquareAttack("l2")
    view = view_at(x0, 1.0, "l2", 0)
    state = attack.init(view)
    assert torch.isinf(state["loss"]).all()
    x = attack.propose(view, state)
    assert torch.equal(x, state["x"])  # the first query is the initialization itself
    assert ((x > 0) & (x < 1)).all()  # away from the box: nothing clipped
    norms = (x - x0).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((a,), 1.0), rtol=1e-5)
    assert not torch.equal(x[0] - x0[0], x[1] - x0[1])  # each image draws its own signs


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16)])
@pytest.mark.parametrize("t", [1, 600])
def test_square_l2_candidate_changes_two_windows_as_published(shape, t):
    """A candidate differs from the incumbent only inside two s x s windows: window 1 gets, per
    channel, a +-bump plus the window's old content scaled to unit norm (rescaled to the room the
    rest of the image leaves), window 2 is zeroed, and the result lies on the sphere of radius eps.
    Nothing outside the windows moves, also when the incumbent lies inside the sphere."""
    a, eps = 6, 0.5
    _, h, wd = shape
    g = torch.Generator().manual_seed(4)
    x0 = 0.4 + 0.2 * torch.rand(a, *shape, generator=g, dtype=torch.float64)
    delta = torch.randn(a, *shape, generator=g, dtype=torch.float64)
    # incumbents on the sphere and (as after clipping) inside it: the new window takes up the
    # norm the incumbent leaves unused, so the candidate is on the sphere with the rest unmoved
    radius = eps * torch.tensor([1.0, 0.6, 1.0, 0.8, 1.0, 0.5], dtype=torch.float64)
    xb = x0 + delta * (radius / delta.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    attack = SquareAttack("l2")
    view = view_at(x0, eps, "l2", t)
    state = {"x": xb, "loss": torch.zeros(a, dtype=torch.float64)}
    cand = attack.propose(view, state)
    s = l2_side(attack.p_init, t - 1, view.total - 1, h, wd)
    assert ((cand > 0) & (cand < 1)).all()
    norms = (cand - x0).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((a,), eps, dtype=torch.float64), rtol=1e-9)
    zeroed = []
    for i in range(a):
        rest = published_l2_change(cand[i] - x0[i], xb[i] - x0[i], s)
        assert rest is not None, f"image {i}: not window 1 + zeroed window 2 of side {s}"
        zeroed.append(bool(rest.any()))
    assert any(zeroed)  # some image's second window lies outside its first


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_acceptance_is_strict(norm):
    """Only a strictly lower margin replaces the kept point (and its stored loss)."""
    a = 3
    x0 = 0.3 + 0.4 * torch.rand(a, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    attack = SquareAttack(norm)
    view = view_at(x0, 0.1 if norm == "linf" else 1.0, norm, 7)
    state = attack.init(view)
    state["loss"] = torch.ones(a)
    kept = state["x"].clone()
    cand = attack.propose(view, state)
    assert not torch.equal(cand, kept)
    m = torch.tensor([0.5, 1.0, 2.0])  # lower, tie, higher
    reply = Reply(torch.zeros(a, 1, dtype=torch.bool), cand.unsqueeze(1), m.view(a, 1))
    new = attack.observe(view, state, reply)
    assert torch.equal(new["x"][0], cand[0])
    assert torch.equal(new["x"][1:], kept[1:])
    assert new["loss"].tolist() == [0.5, 1.0, 1.0]
    assert torch.equal(attack.incumbent(view, new), new["loss"])


def test_square_l2_random_search_on_a_linear_margin():
    """Over many steps every query lies on the sphere (nothing is clipped here), the kept loss
    never rises, always equals the margin of the kept point, and falls well below its start."""
    a, eps = 4, 1.0
    g = torch.Generator().manual_seed(6)
    w = torch.randn(a, 1, 16, 16, generator=g, dtype=torch.float64)
    x0 = torch.full((a, 1, 16, 16), 0.5, dtype=torch.float64)
    attack = SquareAttack("l2")
    state = attack.init(view_at(x0, eps, "l2", 0))
    losses = []
    for t in range(120):
        view = view_at(x0, eps, "l2", t)
        state, q, _ = step(attack, view, state, w)
        assert ((q > 0) & (q < 1)).all()
        d = (q[:, 0] - x0).flatten(1).norm(dim=1)
        assert torch.allclose(d, torch.full((a,), eps, dtype=torch.float64), rtol=1e-9)
        losses.append(state["loss"])
        assert torch.allclose(state["loss"], margin_of(state["x"], w))
        assert torch.equal(attack.best(view, state), state["x"])
    losses = torch.stack(losses)
    assert (losses[1:] <= losses[:-1]).all()
    # the best of the sphere is -eps * |w|_2 away from the start: a good part of it is found
    gain = (losses[0] - losses[-1]) / (eps * w.flatten(1).norm(dim=1))
    assert (gain > 0.15).all(), gain


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def cnn_images() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The tiny CNN and 16 images labelled with its own predictions: doing nothing fools none."""
    net = tiny_cnn(seed=1)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


@pytest.mark.parametrize(
    "attack,norm,eps,budget,kwargs",
    [
        ("nes", "linf", 0.05, 300, dict(lr=0.02)),  # the default lr needs thousands of queries
        ("nes", "l2", 1.0, 300, {}),
        ("signhunter", "linf", 0.02, 300, {}),  # small enough that the first vertices do not fool
        ("square", "l2", 1.0, 200, {}),
    ],
)
def test_fools_a_tiny_cnn(cnn_images, attack, norm, eps, budget, kwargs):
    """A few hundred queries fool at least 5 of 16 images (the attacks as written fool 6 to 8;
    a random NES direction, a SignHunter that keeps no flip or only worse ones, a Square L2 that
    never moves or negates its perturbation fool at most 2)."""
    net, x, y = cnn_images
    res = rfd.attack(net, x, y, attack=attack, norm=norm, eps=eps, max_queries=budget,
                     criterion="none", **kwargs)  # fmt: skip
    assert res.clean_correct.all()  # the do-nothing control fools no image
    assert int(res.success.sum()) >= 5, res.fooled_at.tolist()
    with torch.no_grad():
        assert (net(res.adv[res.success]).argmax(1) != y[res.success]).all()
    d = (res.adv - x).flatten(1)
    assert (d.abs().amax(1) if norm == "linf" else d.norm(dim=1)).max() <= eps * (1 + 1e-5)
