"""rfd.attacks: exact query accounting in the oracle and the invariants every attack must keep.

The invariants are checked over the whole registry (every attack x supported norm x criterion) on
a tiny CNN, with hypothesis drawing seeds, budgets and radii; the oracle's bookkeeping (EOT
charges, 9-query votes, budgets, projections, access rights) is checked on its own with models
whose every forward is counted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rfd
from rfd.attacks import (
    ATTACKS,
    CRITERIA,
    VOTES,
    AccessError,
    BudgetError,
    default_eps,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "attack"
CASES = [(a, n) for a, cls in ATTACKS.items() for n in cls.norms]
PROPS = settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class Counting(nn.Module):
    """Counts forwards and rows; the attacks' queries all pass through here."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        return self.net(x)

    @property
    def rows(self) -> int:
        return sum(self.batches)


class OneHot(nn.Module):
    """Same labels as ``net`` but scores that carry nothing else: a hard-label view."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return nn.functional.one_hot(z.argmax(1), z.shape[1]).to(z.dtype) * 7.0


class MarginLinear(nn.Module):
    """Two logits ``[<w, x> + b, 0]``: the margin of label 0 is exactly ``<w, x> + b``."""

    def __init__(self, w: torch.Tensor, b: float = 0.0) -> None:
        super().__init__()
        self.w, self.b = w.flatten(), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([z, torch.zeros_like(z)], 1)


class Center(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 4


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A random CNN small enough for hundreds of attack runs; centering its input gives it
    varied predictions and margins that an eps-ball can cross."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(
            Center(),
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(8 * 16, 10),
        )
    return net.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN, 8 images, labels = its predictions except two deliberately wrong ones."""
    net = tiny_cnn()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:2] = (y[:2] + 1) % 10
    return net, x, y


def noisy(net: nn.Module, nu: float = 0.05, seed: int = 0) -> nn.Module:
    return rfd.protect(net, defense="feature", layers="penultimate", nu=nu, seed=seed)


def distance(adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    d = (adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def eps_for(norm: str, scale: float = 1.0) -> float:
    return default_eps(28, norm) * scale


def check_common(res, x: torch.Tensor, norm: str, eps: float, budget: int) -> None:
    """Invariants that hold for any model: ball, box, budget, bookkeeping."""
    assert distance(res.adv, x, norm).max() <= eps + 1e-5
    assert res.adv.min() >= 0 and res.adv.max() <= 1
    assert (res.queries <= budget).all() and (res.queries >= 1).all()
    assert not (res.success & ~res.clean_correct).any()
    assert torch.equal(res.adv[~res.clean_correct], x[~res.clean_correct])
    assert ((res.fooled_at >= 1) & (res.fooled_at <= res.queries))[res.success].all()
    assert (res.fooled_at[~res.success] == -1).all()
    assert (res.verify_queries % VOTES == 0).all()
    if res.criterion != "vote":
        assert (res.verify_queries == 0).all()


# --------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("attack,norm", CASES)
@PROPS
@given(
    seed=st.integers(0, 2**16),
    budget=st.integers(20, 150),
    scale=st.floats(0.5, 2.0),
    eot=st.sampled_from([1, 1, 2, 3]),
)
def test_invariants_deterministic_model(tiny, attack, norm, criterion, seed, budget, scale, eot):
    net, x, y = tiny
    eps = eps_for(norm, scale)
    counter = Counting(net)
    res = rfd.attack(
        counter, x, y, attack=attack, norm=norm, eps=eps, max_queries=budget,
        criterion=criterion, eot=eot, seed=seed,
    )  # fmt: skip
    check_common(res, x, norm, eps, budget)
    assert (res.queries % eot == 0).all()
    assert not res.randomized
    assert res.clean_correct.tolist() == [False, False] + [True] * 6
    # Deterministic model: success <=> the returned image is misclassified.
    with torch.no_grad():
        wrong = net(res.adv).argmax(1) != y
    assert torch.equal(res.success, wrong & res.clean_correct)
    # Every forward row is accounted for: charged + verification + the randomness probe + the
    # copies that keep one-row forwards on batch kernels.
    assert counter.rows == (res.queries.sum() + res.verify_queries.sum() + res.probe_queries
                            + res.padded_rows)  # fmt: skip


@pytest.mark.parametrize("criterion", ("vote", "single"))
@pytest.mark.parametrize("attack,norm", CASES)
@PROPS
@given(seed=st.integers(0, 2**16), budget=st.integers(20, 150))
def test_invariants_randomized_model(tiny, attack, norm, criterion, seed, budget):
    net, x, y = tiny
    eps = eps_for(norm)
    res = rfd.attack(
        noisy(net, seed=seed), x, y, attack=attack, norm=norm, eps=eps, max_queries=budget,
        criterion=criterion, seed=seed,
    )  # fmt: skip
    check_common(res, x, norm, eps, budget)
    assert res.randomized


@pytest.mark.parametrize("attack", ["square", "signhunter", "rays"])
def test_vote_against_single_on_a_randomized_model(tiny, attack):
    """Re-evaluating ``adv`` with fresh forwards: a point verified by the 9-query vote is never
    one the model (almost) never misclassifies, and is misclassified more often than a point
    that fooled a single forward. Vote leaves at least as many images robust as single."""
    net, x, y = tiny
    xs, ys = x.repeat(4, 1, 1, 1), y.repeat(4)
    out = {}
    for criterion in ("vote", "single"):
        defended = noisy(net, nu=0.05)
        res = rfd.attack(
            defended, xs, ys, attack=attack, eps=0.1, max_queries=200, criterion=criterion
        )
        adv, lab = res.adv[res.success], ys[res.success]
        with torch.no_grad():
            rate = torch.stack([(defended(adv).argmax(1) != lab).float() for _ in range(200)])
        out[criterion] = (res, rate.mean(0))
    (vote, p_vote), (single, p_single) = out["vote"], out["single"]
    assert vote.success.sum() >= 4 and single.success.sum() >= 4
    assert (p_vote > 0).all()  # p < 1.5% would pass a 5-of-9 vote with probability < 1e-6
    assert p_vote.mean() > p_single.mean()
    assert vote.robust_accuracy() >= single.robust_accuracy()


class Coin(nn.Module):
    """Says class 1 with probability ``p`` whatever the input, from its own generator."""

    def __init__(self, p: float, seed: int = 0) -> None:
        super().__init__()
        self.p, self.gen = p, torch.Generator().manual_seed(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = torch.rand(x.shape[0], generator=self.gen) < self.p
        return torch.stack([(~one).float(), one.float()], 1)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_criteria_rates_on_a_coin(criterion):
    """The criterion rules, measured: with a model fooled by each forward with probability p, a
    query succeeds with probability p (single, none) or p * P[Bin(9, p) >= 5] (vote)."""
    p, n = 0.4, 4000
    vote = sum(torch.distributions.Binomial(VOTES, torch.tensor(p)).log_prob(torch.tensor(k)).exp()
               for k in range(5, VOTES + 1))  # fmt: skip
    rate = p * float(vote) if criterion == "vote" else p
    x, y = torch.full((n, 1, 2, 2), 0.5), torch.zeros(n, dtype=torch.long)
    kw = dict(attack="signhunter", eps=0.1, max_queries=2, criterion=criterion)
    if criterion == "none":  # "none" means undefended semantics: it warns on a noisy model
        with pytest.warns(UserWarning, match="deterministic"):
            res = rfd.attack(Coin(p), x, y, **kw)
    else:
        res = rfd.attack(Coin(p), x, y, **kw)
    tol = 5 * (rate * (1 - rate) / n) ** 0.5
    assert abs((~res.clean_correct).float().mean() - rate) < tol
    assert abs(res.success[res.clean_correct].float().mean() - rate) < tol
    assert bool((res.verify_queries == 0).all()) == (criterion != "vote")


@pytest.mark.parametrize("attack,norm", CASES)
def test_seeds(tiny, attack, norm):
    net, x, y = tiny
    kw = dict(attack=attack, norm=norm, eps=eps_for(norm), max_queries=80)
    a = rfd.attack(net, x, y, seed=3, **kw)
    b = rfd.attack(net, x, y, seed=3, **kw)
    c = rfd.attack(net, x, y, seed=4, **kw)
    for k in ("adv", "success", "queries", "verify_queries", "fooled_at", "clean_correct"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    differs = not torch.equal(a.adv, c.adv) or not torch.equal(a.queries, c.queries)
    assert differs == ATTACKS[attack].uses_rng


@pytest.mark.parametrize("attack,norm", CASES)
def test_attacks_leave_global_rng_alone_and_key_the_defense_noise(tiny, attack, norm):
    net, x, y = tiny
    kw = dict(attack=attack, norm=norm, eps=eps_for(norm), max_queries=40)
    before = torch.random.get_rng_state()
    a = rfd.attack(noisy(net, seed=11), x, y, **kw)
    assert torch.equal(torch.random.get_rng_state(), before)
    # A seeded defense keys its noise by (seed, image, query): the same call, the same result.
    b = rfd.attack(noisy(net, seed=11), x, y, **kw)
    assert torch.equal(a.adv, b.adv) and torch.equal(a.queries, b.queries)
    # An unseeded one draws its key from its own generator: advanced, never reset.
    free = noisy(net, seed=None)
    state = free.generator.get_state()
    rfd.attack(free, x, y, **kw)
    assert not torch.equal(free.generator.get_state(), state)


@pytest.mark.parametrize("attack", [a for a, cls in ATTACKS.items() if cls.kind == "decision"])
def test_decision_attacks_use_labels_only(tiny, attack, monkeypatch):
    net, x, y = tiny
    kw = dict(attack=attack, eps=0.1, max_queries=120, seed=5)
    ref = rfd.attack(net, x, y, **kw)
    # Scores that carry nothing but the label give bit-identical results ...
    hard = rfd.attack(OneHot(net), x, y, **kw)
    for k in ("adv", "success", "queries", "fooled_at"):
        assert torch.equal(getattr(ref, k), getattr(hard, k)), k

    # ... and the engine never hands them any.
    seen = []
    real = rfd.attacks.Reply.__init__

    def spy(self, adversarial, x, *scores):
        seen.append(any(t is not None for t in scores))
        real(self, adversarial, x, *scores)

    monkeypatch.setattr(rfd.attacks.Reply, "__init__", spy)
    rfd.attack(net, x, y, **kw)
    assert seen and not any(seen)


# --------------------------------------------------------------------------- accounting
class Fixed(nn.Module):
    """Logits from the mean pixel: class 1 wins when the image is brighter than 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.flatten(1).mean(1)
        return torch.stack([0.5 - m, m - 0.5, torch.zeros_like(m)], 1)


def test_eot_charges_m_per_query_and_every_row_is_accounted_for(tiny):
    net, x, y = tiny
    counter = Counting(noisy(net))
    res = rfd.attack(counter, x, y, attack="square", eps=0.1, max_queries=60, eot=4)
    assert (res.queries % 4 == 0).all() and (res.queries <= 60).all()
    assert res.probe_queries == 0  # with eot > 1 the clean query itself reveals the noise
    assert counter.rows == res.queries.sum() + res.verify_queries.sum() + res.padded_rows


def test_eot_averages_m_noisy_answers():
    """With a coin model, an EOT query answers the majority of M coin flips (ties: class 0)."""
    p, m, n = 0.4, 15, 3000
    x, y = torch.full((n, 1, 2, 2), 0.5), torch.zeros(n, dtype=torch.long)
    res = rfd.attack(Coin(p), x, y, attack="signhunter", eps=0.1, max_queries=m, eot=m,
                     criterion="single")  # fmt: skip
    dist = torch.distributions.Binomial(m, torch.tensor(p))
    wrong = float(sum(dist.log_prob(torch.tensor(float(k))).exp() for k in range(8, m + 1)))
    rate = float((~res.clean_correct).float().mean())
    assert abs(rate - wrong) < 5 * (wrong * (1 - wrong) / n) ** 0.5
    assert (res.queries == m).all()


def test_vote_is_uncharged_and_settles_success():
    """A model that flips to class 1 near 0.4 is fooled inside the ball: the query is charged,
    its 9 re-queries are not, and fooled_at is the charged count at that query."""

    class Shifted(Fixed):
        def forward(self, x):
            return super().forward(x + 0.15)

    x = torch.full((3, 1, 6, 6), 0.3)
    y = torch.zeros(3, dtype=torch.long)
    counter = Counting(Shifted())
    res = rfd.attack(counter, x, y, attack="signhunter", eps=0.1, max_queries=50)
    assert res.success.all()
    assert res.fooled_at.tolist() == [2, 2, 2]  # clean query, then the first vertex (0.4)
    assert res.verify_queries.tolist() == [VOTES] * 3
    assert counter.rows == (res.queries.sum() + res.verify_queries.sum() + res.probe_queries
                            + res.padded_rows)  # fmt: skip


def test_budget_overruns_are_refused():
    """An attack that asks for one query more than an image may send is stopped, not truncated."""

    class Greedy(rfd.attacks.Attack):
        name = "test-greedy"
        title = "Greedy"
        kind = "score"
        norms = ("linf",)
        defaults = {"linf": {}}

        def queries(self, remaining):
            return remaining + 1

        def init(self, view):
            return {"x": view.x0.clone()}

        def propose(self, view, state):
            return state["x"].unsqueeze(1).expand(-1, 2, -1, -1, -1)

    try:
        x, y = torch.full((2, 1, 6, 6), 0.3), torch.zeros(2, dtype=torch.long)
        cell = rfd.attacks.Cell(Fixed(), Greedy(), 0.1, 5, "none")
        with pytest.raises(BudgetError):
            rfd.attacks.Engine(16).run([cell], x, y)
    finally:
        ATTACKS.pop("test-greedy")


def test_decision_attacks_see_no_scores_and_outside_points_do_not_count():
    x, y = torch.full((2, 1, 6, 6), 0.3), torch.zeros(2, dtype=torch.long)
    reply = rfd.attacks.Reply(torch.zeros(2, 1, dtype=torch.bool), x.unsqueeze(1))
    with pytest.raises(AccessError):
        reply.margin  # noqa: B018
    with pytest.raises(AccessError):
        reply.logits  # noqa: B018
    # SignFlip's random starting points are misclassified (bright) but far outside the ball
    res = rfd.attack(Fixed(), x, y, attack="signflip", eps=0.05, max_queries=40, criterion="single")
    assert not res.success.any()


def _signflip_case(a: int, init_rows: int = 0):
    """A SignFlip state of ``a`` images alternating PROJECT and FLIP, after ``init_rows`` images
    still in INIT (which make propose and observe take the per-phase path)."""
    from rfd.attacks import View
    from rfd.attacks.signflip import FLIP, INIT, PROJECT, SignFlip
    from rfd.rng import KeyedRNG, row_keys

    n = a + init_rows
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    z = torch.zeros(n, dtype=torch.long)
    view = View(x0, 0.1, "linf", 100, z + 50, z + 20, KeyedRNG(row_keys(5, torch.arange(n))))
    sf = SignFlip()
    state = sf.init(view)
    state["phase"] = torch.tensor([INIT] * init_rows + [PROJECT, FLIP] * (a // 2))
    state["delta"] = (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) - 0.5) / 20
    state["prob"] = torch.full_like(x0, 0.9)  # many flips, so that the draws are visible
    state["count"] = (torch.arange(n) + 7) % 10  # some flip images adapt at this step
    state["acc_flip"] = (torch.arange(n) % 9).float()
    return sf, view, state


def test_signflip_observes_the_very_draw_it_proposed():
    """Images in the projection and the flip phase step together; each phase's random draw is
    made once, in propose, and observe applies exactly that draw to the accepted images."""
    from rfd.attacks.signflip import FLIP, PROJECT

    a = 6
    sf, view, state = _signflip_case(a)
    x0 = view.x0
    q = sf.propose(view, state)
    draw, delta, flips = state["draw"], state["delta"], state["flips"]
    p, f = slice(0, a, 2), slice(1, a, 2)
    assert torch.equal(q, (x0 + draw).clamp(0, 1))
    assert torch.equal(draw[f], delta[f] * flips[f])
    assert set(flips[f].unique().tolist()) == {-1.0, 1.0}
    # the projection phase's draw moves each coordinate by alpha inside the shrunk ball
    radius = delta[p].flatten(1).abs().amax(1) - sf.alpha
    assert (draw[p].flatten(1).abs().amax(1) <= radius + 1e-7).all()
    # a phase's draw depends on its own rows' keys only: stepping one phase alone draws the same
    for rows in (p, f):
        alone = {k: t[rows] for k, t in state.items() if k not in ("draw", "flips", "flip")}
        sf.propose(view.subset(torch.arange(a)[rows]), alone)
        assert torch.equal(alone["draw"], draw[rows])
    ok = torch.tensor([True, True, False, False, True, True]).view(a, 1)
    new = sf.observe(view, state, rfd.attacks.Reply(ok, q.unsqueeze(1)))
    acc_p, acc_f = torch.tensor([0, 4]), torch.tensor([1, 5])
    assert torch.equal(new["delta"][acc_p], draw[acc_p])
    assert torch.equal(new["delta"][acc_f], delta[acc_f] * flips[acc_f])
    assert torch.equal(new["delta"][2:4], delta[2:4])  # rejected: unchanged
    assert torch.equal(new["phase"], torch.tensor([FLIP, PROJECT] * 3))
    # only accepted flips move the flip probabilities (by 1e-4 against each coordinate's sign)
    moved = (new["prob"] - state["prob"]).flatten(1).abs().amax(1)
    assert (moved[acc_f] > 0).all() and (moved[[0, 2, 3, 4]] == 0).all()


def test_signflip_steady_steps_match_the_per_phase_steps():
    """Once every image alternates PROJECT and FLIP, SignFlip steps them with full-width masked
    ops; with one image still in INIT it steps each phase on its own images. Both must give
    every image the same candidate and the same new state, bit for bit."""
    a = 8
    sf, view, state = _signflip_case(a, init_rows=1)
    rows = torch.arange(1, a + 1)
    steady = {k: t[rows] for k, t in state.items()}
    ok = torch.tensor([True, False] * 4 + [True]).roll(1)  # accepted and rejected in each phase
    q = sf.propose(view, state)
    new = sf.observe(view, state, rfd.attacks.Reply(ok.view(-1, 1), q.unsqueeze(1)))
    assert "flips" not in state  # the per-phase path
    sub = view.subset(rows)
    q_s = sf.propose(sub, steady)
    new_s = sf.observe(sub, steady, rfd.attacks.Reply(ok[rows].view(-1, 1), q_s.unsqueeze(1)))
    assert "flips" in steady
    assert torch.equal(q_s, q[rows])
    for k, t in new_s.items():
        assert torch.equal(t, (new[k] if k in new else state[k])[rows]), k
    assert (new_s["alpha"] != steady["alpha"]).any()  # the adapting images were exercised


def test_l2_projection_and_exactness_inside():
    from rfd.attacks import View
    from rfd.rng import KeyedRNG

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.zeros(3, dtype=torch.long)
    v = View(x, 0.5, "l2", 10, z + 5, z, KeyedRNG(z))
    far = (x + torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    p = v.project(far)
    assert ((p - x).flatten(1).norm(dim=1) <= 0.5 * (1 + 1e-5)).all()
    assert p.min() >= 0 and p.max() <= 1
    assert torch.equal(v.project(p), p)
    near = (x + 0.01).clamp(0, 1)
    assert torch.equal(v.project(near), near)
    assert v.inside(near).all() and not v.inside(far).any()


def test_clean_misclassified_images_are_not_attacked(tiny):
    net, x, y = tiny
    res = rfd.attack(net, x, y, attack="square", eps=0.1, max_queries=50)
    assert (res.queries[~res.clean_correct] == 1).all()
    assert res.robust_accuracy() <= res.clean_correct.float().mean()


def test_robust_accuracy_curve(tiny):
    net, x, y = tiny
    res = rfd.attack(net, x, y, attack="signhunter", eps=0.15, max_queries=200, criterion="none")
    assert res.success.any()
    budgets = [1, 10, 50, 100, 200]
    curve = res.robust_accuracy_curve(budgets)
    assert curve == sorted(curve, reverse=True)
    assert curve[-1] == res.robust_accuracy()
    for b, acc in zip(budgets, curve, strict=True):
        expect = (res.clean_correct & ~(res.success & (res.fooled_at <= b))).float().mean()
        assert acc == pytest.approx(float(expect))
    s = res.summary()
    assert s["robust_acc"] == pytest.approx(res.robust_accuracy()) and s["n_images"] == 8
    assert s["batch_fill"] > 0 and s["queries_per_second"] > 0 and s["attack"] == "signhunter"
    assert s["mean_queries_success"] == pytest.approx(
        float(res.fooled_at[res.success].float().mean())
    )


# --------------------------------------------------------------------------- API and configs
def test_default_eps():
    assert default_eps(224, "linf") == 0.05 and default_eps(224, "l2") == 5.0
    assert default_eps(32, "linf") == 0.05 and default_eps(32, "l2") == 1.0
    assert default_eps(28, "linf") == 0.1 and default_eps(28, "l2") == 2.0
    with pytest.raises(ValueError, match="28px"):
        default_eps(64, "linf")


def test_eps_none_uses_the_data_default(tiny):
    net, x, y = tiny
    res = rfd.attack(net, x, y, attack="signhunter", eps=None, max_queries=20)
    assert res.eps == 0.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attack="boundary"), re.escape(", ".join(ATTACKS))),
        (dict(attack="rays", norm="l2"), "supported: linf"),
        (dict(norm="l1"), "linf, l2"),
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(criterion="majority"), "vote, single, none"),
        (dict(eot=0), "eot"),
        (dict(max_queries=0), "max_queries"),
        (dict(attack="square", q_init=0.1), "p_init"),
        (dict(attack="nes", samples=7), "even"),
    ],
)
def test_invalid_arguments(tiny, kwargs, match):
    net, x, y = tiny
    args = {**dict(attack="square", norm="linf", eps=0.1, max_queries=20), **kwargs}
    with pytest.raises(ValueError, match=match):
        rfd.attack(net, x, y, **args)


def test_registry_metadata():
    assert list(ATTACKS)[:5] == ["square", "nes", "signhunter", "rays", "signflip"]
    for name, cls in ATTACKS.items():
        assert cls.name == name and cls.kind in ("score", "decision", "gradient") and cls.title
        assert set(cls.defaults) == set(cls.norms)
        doc = sys.modules[cls.__module__].__doc__
        assert re.search(r'"[^"]{20,}" [\w&. ]+ 20\d\d', doc), name  # cites "Title." Venue Year
    assert ATTACKS["rays"].norms == ("linf",) and ATTACKS["signflip"].norms == ("linf",)
    white = {n for n, c in ATTACKS.items() if c.kind == "gradient"}
    assert white == {"fgsm", "pgd", "cw", "cw_l2", "apgd"}
    assert not ATTACKS["cw_l2"].constrained and ATTACKS["pgd"].constrained


@pytest.mark.parametrize("name", list(ATTACKS))
def test_config_mirrors_defaults(name):
    cfg = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert cfg == ATTACKS[name].defaults
    for norm, params in cfg.items():
        assert ATTACKS[name](norm, **params).params == params


# --------------------------------------------------------------------------- trained default
def success_on_trained(trained, attack: str, norm: str, eps: float) -> dict:
    """The summary of ``attack`` on 100 images of the undefended trained default, 1000 queries,
    vote criterion (the setting of the attacks' success thresholds)."""
    x, y, _ = next(iter(trained.datamodule.eval_dataloader(100, seed=0)))
    res = rfd.attack(
        trained.model, x, y, attack=attack, norm=norm, eps=eps, max_queries=1000,
        criterion="vote", seed=0,
    )  # fmt: skip
    assert res.clean_correct.float().mean() >= 0.6
    return res.summary()


@pytest.mark.slow
def test_square_fools_trained_default(trained_fmnist):
    assert success_on_trained(trained_fmnist, "square", "linf", 0.1)["success_rate"] >= 0.9


# --------------------------------------------------------------------------- Square L2 start
def test_square_l2_start_transposes_each_cells_bump_at_random():
    """The original's ``meta_pseudo_gaussian_pert`` transposes the two-bump pattern with
    probability 1/2 at every cell of the L2 start's grid (here per image and cell). Each cell must
    hold +- the pattern or +- its transpose, both must occur, and the cells' signs must still be
    the draws of the ``grid`` stream (the transpose bits have a stream of their own)."""
    from rfd.attacks import View
    from rfd.attacks.square import SquareAttack, meta_pattern
    from rfd.rng import KeyedRNG

    a, c, h = 16, 2, 28
    x0 = torch.full((a, c, h, h), 0.5)  # mid-grey: nothing is clipped
    keys = torch.arange(a, dtype=torch.int64) * 104729 + 11
    z = torch.zeros(a, dtype=torch.long)
    view = View(x0, 1.0, "l2", 1000, z + 1000, z, KeyedRNG(keys))
    delta = SquareAttack("l2").init(view)["x"] - x0
    s, sp = h // 5, (h - h // 5 * 5) // 2
    pat = meta_pattern(s)[0]
    assert not torch.allclose(pat, pat.t())
    signs = KeyedRNG(keys).stream("grid").bits01((5, 5, c, 1, 1)) * 2 - 1
    # 25 disjoint cells of c unit-norm bumps each, rescaled together onto the sphere
    scale = (delta.flatten(1).norm(dim=1) / (25 * c) ** 0.5).view(a, 1, 1, 1)
    turned = torch.zeros(a, 5, 5, dtype=torch.bool)
    inside = torch.zeros(h, h, dtype=torch.bool)
    for i in range(5):
        for j in range(5):
            rows, cols = slice(sp + i * s, sp + (i + 1) * s), slice(sp + j * s, sp + (j + 1) * s)
            inside[rows, cols] = True
            cell = delta[:, :, rows, cols] / (scale * signs[:, i, j])
            plain = (cell - pat).abs().flatten(1).amax(1) < 1e-5
            turn = (cell - pat.t()).abs().flatten(1).amax(1) < 1e-5
            assert bool((plain ^ turn).all()), f"cell ({i}, {j}) is neither bump nor transpose"
            turned[:, i, j] = turn
    assert bool((delta[:, :, ~inside] == 0).all())
    assert 0.3 < float(turned.float().mean()) < 0.7
    assert not torch.equal(turned[0], turned[1])  # drawn per image


# --------------------------------------------------------------------------- NES hyperparameters
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fd_eta=float("nan")), r"nes fd_eta must be a finite number > 0, got nan"),
        (dict(fd_eta=float("inf")), r"nes fd_eta must be a finite number > 0, got inf"),
        (dict(fd_eta=0.0), r"nes fd_eta must be a finite number > 0, got 0\.0"),
        (dict(lr=float("nan")), r"nes lr must be a finite number > 0, got nan"),
        (dict(lr=float("inf")), r"nes lr must be a finite number > 0, got inf"),
        (dict(lr=-0.1), r"nes lr must be a finite number > 0, got -0\.1"),
        (dict(lr="0.01"), r"nes lr must be a finite number > 0, got '0\.01'"),
        (dict(samples=float("inf")), r"nes samples must be an even integer >= 2, got inf"),
        (dict(samples=float("nan")), r"nes samples must be an even integer >= 2, got nan"),
        (dict(samples=8.5), r"nes samples must be an even integer >= 2, got 8\.5"),
        (dict(samples=7), r"nes samples must be an even integer >= 2, got 7"),
        (dict(samples=0), r"nes samples must be an even integer >= 2, got 0"),
    ],
)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nes_rejects_non_finite_and_non_positive_hyperparameters(norm, kwargs, match):
    """NaN slipped past ``<= 0`` (a NaN attack failing later on the model's logits) and an
    infinite lr was accepted (every step a jump to a box vertex): both must fail at construction,
    naming the parameter and what it may be."""
    from rfd.attacks.nes import NESAttack

    with pytest.raises(ValueError, match=match):
        NESAttack(norm, **kwargs)


def test_square_side_table_matches_the_schedule():
    """Square looks its window sides up in a table built once per schedule: every iteration
    (and any past the end of the run) must get the side the schedule's formula gives."""
    from rfd.attacks.square import _side_formula, _sides

    for n_iters in (1, 9, 999, 9999):
        for norm in ("linf", "l2"):
            it = torch.arange(n_iters + 20)
            want = _side_formula(0.05, it, n_iters, 28, 28, norm)
            assert torch.equal(_sides(0.05, it, n_iters, 28, 28, norm), want)
