"""HopSkipJumpAttack: the phase machine, the estimator on linear boundaries, validation, and the
issue's requirement on the trained default."""

from __future__ import annotations

import math

import pytest
import torch
from test_attacks import success_on_trained
from torch import nn

import rfd
from rfd.attacks import ATTACKS, Reply, View
from rfd.attacks.hsja import GRAD, INIT, SEARCH, STEP, HopSkipJump
from rfd.rng import KeyedRNG

pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(nn.Module):
    """Two classes split by the hyperplane ``w . (x - 0.5) = b``: class 1 on the positive side."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w, self.b = w.flatten(), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.flatten(1) - 0.5) @ self.w - self.b
        return torch.stack([-z, z], 1)


def drive(attack, oracle, x0, steps, budget=10**6):
    """Step ``attack`` by hand on images ``x0`` (one query per step), as the engine would:
    per-image keyed streams that change every step. Returns the states after each step."""
    a = x0.shape[0]
    keys = torch.arange(a, dtype=torch.long) * 7919 + 1
    states = []
    step = torch.zeros(a, dtype=torch.long)

    def view():
        rng = KeyedRNG(keys * 1000003 + step)
        return View(x0, 0.1, attack.norm, budget, budget - 1 - step, step.clone(), rng)

    state = attack.init(view())
    for _ in range(steps):
        v = view()
        q = attack.propose(v, state).clamp(0, 1)
        state = attack.observe(v, state, Reply(oracle(q).unsqueeze(1), q.unsqueeze(1)))
        states.append({k: t.clone() for k, t in state.items()})
        step = step + 1
    return states


def _linear_case(seed: int = 0, shape=(1, 6, 6), a: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    x0 = 0.5 - 0.15 * w / w.norm() + 0.02 * torch.rand((a, *shape), generator=g)
    x0 = x0.clamp(0, 1)
    net = Linear(w)
    with torch.no_grad():
        assert (net(x0).argmax(1) == 0).all()
    return w, x0, (lambda q: net(q).argmax(1) == 1)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_phases_and_schedule_follow_the_paper(norm):
    """INIT until a misclassified random image, SEARCH to the boundary, then iterations of
    B_t = B_0 sqrt(t) probes (GRAD), a geometric step search (STEP) and a SEARCH back."""
    w, x0, oracle = _linear_case()
    attack = HopSkipJump(norm, init_num_evals=20)
    states = drive(attack, oracle, x0, 400)
    phases = torch.stack([s["phase"] for s in states], 1)  # (A, steps)
    d = x0[0].numel()
    theta = 1 / d**1.5 if norm == "l2" else 1 / d**2
    search_steps = math.ceil(math.log2(1 / theta))  # the bracket shrinks to theta (relative)
    for img in range(x0.shape[0]):
        runs: list[tuple[int, int]] = []  # (phase, length) of consecutive steps by phase sent
        seq = [INIT] + phases[img, :-1].tolist()  # the phase each step was sent in
        for p in seq:
            if runs and runs[-1][0] == p:
                runs[-1] = (p, runs[-1][1] + 1)
            else:
                runs.append((p, 1))
        assert runs[0][0] == INIT and runs[1] == (SEARCH, search_steps)
        grads = [n for p, n in runs if p == GRAD][:-1]  # the last may be cut off
        assert len(grads) >= 3
        assert grads == [math.floor(20 * math.sqrt(t)) for t in range(1, len(grads) + 1)]
        after_grad = [runs[i + 1][0] for i, (p, _) in enumerate(runs[:-1]) if p == GRAD]
        assert set(after_grad) == {STEP}
        # delta_1 = 0.1; later deltas d^q theta dist_{t-1} = gamma dist_{t-1} / d
        first = states[[i for i, p in enumerate(phases[img].tolist()) if p == GRAD][0]]
        assert first["delta"][img] == pytest.approx(0.1)
        last = states[-1]
        if last["it"][img] > 1 and last["phase"][img] == GRAD:
            assert last["delta"][img] == pytest.approx(float(last["dist"][img]) / d, rel=1e-5)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_boundary_points_are_adversarial_and_close_to_the_boundary(norm):
    w, x0, oracle = _linear_case()
    attack = HopSkipJump(norm, init_num_evals=20)
    states = drive(attack, oracle, x0, 300)
    wn = w.flatten() / w.norm()
    d = x0[0].numel()
    # the bracket ends within theta (L2: of the blend factor of a segment shorter than
    # sqrt(d); Linf: of the Linf radius, <= 1): at most sqrt(d) theta from the hyperplane
    tol = d**0.5 * (d**-1.5 if norm == "l2" else d**-2.0)
    for s in states:
        fresh = s["phase"] == GRAD  # the boundary point x_t was just set
        if not fresh.any():
            continue
        x = s["x"][fresh]
        assert oracle(x).all()  # the adversarial end of the bracket
        margin = (x.flatten(1) - 0.5) @ wn
        assert (margin >= 0).all() and (margin <= tol * 1.01).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_estimate_aligns_with_the_normal_of_a_linear_boundary(norm):
    """On a hyperplane the sign-of-decision estimate points along its normal: with B_0 = 100
    probes in d = 36, the cosine is far above chance; Linf then steps along the sign."""
    w, x0, oracle = _linear_case(shape=(1, 6, 6))
    attack = HopSkipJump(norm)
    states = drive(attack, oracle, x0, 200)
    wn = w.flatten() / w.norm()
    seen = 0
    for prev, s in zip(states, states[1:], strict=False):
        est = (prev["phase"] == GRAD) & (s["phase"] == STEP)
        if est.any():
            ray = s["ray"][est].flatten(1)
            if norm == "l2":
                cos = ray @ wn / ray.norm(dim=1)
                assert (cos > 0.7).all(), cos
            else:
                assert torch.isin(ray, torch.tensor([-1.0, 0.0, 1.0])).all()
                # the sign step's gain along w, relative to the best sign step's (sign(w))
                gain = ray @ wn / wn.abs().sum()
                assert (gain > 0.5).all(), gain  # chance: 0
            seen += int(est.sum())
    assert seen >= x0.shape[0]


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_distance_shrinks_over_iterations(norm):
    w, x0, oracle = _linear_case(shape=(1, 8, 8), seed=3)
    attack = HopSkipJump(norm, init_num_evals=30)
    states = drive(attack, oracle, x0, 1500)
    its = torch.stack([s["it"] for s in states], 1)
    dists = torch.stack([s["dist"] for s in states], 1)
    first = dists[torch.arange(x0.shape[0]), (its >= 1).long().argmax(1)]
    last = dists[:, -1]
    assert (its[:, -1] >= 4).all()
    assert (last < 0.8 * first).all(), (first, last)
    # the boundary of a hyperplane is at distance |w.(x0-0.5)| / ||w||_q from x0
    wf = w.flatten()
    gap = -((x0.flatten(1) - 0.5) @ wf)
    dual = wf.norm() if norm == "l2" else wf.abs().sum()
    assert (last >= gap / dual * (1 - 1e-4)).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_float32_images_at_224px_leave_the_search_and_probe_for_real(norm):
    """At 3x224x224 the authors' tolerances (Linf: ~1e-11 of the distance) and probe radii lie
    below float32's spacing: the search must still end and a probe must still move pixels, or an
    image repeats one query until its budget is spent."""
    _, x0, oracle = _linear_case(shape=(3, 224, 224), seed=1, a=2)
    attack = HopSkipJump(norm, init_num_evals=20)
    keys = torch.arange(2, dtype=torch.long) * 7919 + 1
    step = torch.zeros(2, dtype=torch.long)
    state = attack.init(View(x0, 0.1, norm, 10**6, 10**6 - step, step, KeyedRNG(keys)))
    moved = []
    for _ in range(300):
        v = View(
            x0, 0.1, norm, 10**6, 10**6 - 1 - step, step.clone(), KeyedRNG(keys * 1000003 + step)
        )
        q = attack.propose(v, state).clamp(0, 1)
        probing = state["phase"] == GRAD
        if bool(probing.any()):
            moved.append(bool((q[probing] != state["x"][probing]).flatten(1).any(1).all()))
        state = attack.observe(v, state, Reply(oracle(q).unsqueeze(1), q.unsqueeze(1)))
        step = step + 1
    assert (state["it"] >= 3).all(), state["it"]
    assert moved and all(moved)


def test_init_gives_up_after_init_tries():
    """A model no random image fools: each image spends the clean query and init_tries."""

    class Constant(nn.Module):
        def forward(self, x):
            return torch.stack([torch.ones(x.shape[0]), torch.zeros(x.shape[0])], 1)

    x, y = torch.rand(3, 1, 6, 6), torch.zeros(3, dtype=torch.long)
    res = rfd.attack(Constant(), x, y, attack="hsja", eps=0.1, max_queries=500, init_tries=7)
    assert not res.success.any()
    assert res.queries.tolist() == [8, 8, 8]
    assert torch.equal(res.adv, x)


def test_finds_an_adversarial_inside_the_ball_on_a_linear_model():
    w, x0, _ = _linear_case(shape=(1, 8, 8))
    y = torch.zeros(x0.shape[0], dtype=torch.long)
    for norm, eps in (("l2", 0.3), ("linf", 0.1)):
        res = rfd.attack(Linear(w), x0, y, attack="hsja", norm=norm, eps=eps, max_queries=1500)
        assert res.success.all(), norm


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(init_num_evals=0), "init_num_evals"),
        (dict(init_num_evals=2.5), "init_num_evals"),
        (dict(max_num_evals=0), "max_num_evals"),
        (dict(init_num_evals=200, max_num_evals=100), "max_num_evals"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=float("nan")), "gamma"),
        (dict(init_tries=0), "init_tries"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HopSkipJump("linf", **kwargs)


def test_unknown_hyperparameters_name_the_valid_ones():
    w, x0, _ = _linear_case()
    y = torch.zeros(x0.shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="init_num_evals"):
        rfd.attack(Linear(w), x0, y, attack="hsja", eps=0.1, max_queries=20, delta=0.1)


def test_registered():
    cls = ATTACKS["hsja"]
    assert cls is HopSkipJump and cls.kind == "decision" and not cls.constrained
    assert cls.norms == ("linf", "l2") and cls.order == 55


# --------------------------------------------------------------------------- trained default
@pytest.mark.slow
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 2.0)])
def test_hsja_fools_trained_default(trained_fmnist, norm, eps):
    summary = success_on_trained(trained_fmnist, "hsja", norm, eps)
    assert summary["success_rate"] >= 0.3, summary
