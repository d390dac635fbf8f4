"""How success is counted (``success="any"|"improved"``) and Square's incumbent refresh.

``improved`` is the rule of the paper's public code: a fooling query counts only if it also lowers
the attack's stored (incumbent) loss. Under the same keys both rules follow the same trajectory up
to the first fooling query the criterion confirms, so ``improved`` can only succeed later or never.
"""

from __future__ import annotations

import pytest
import torch
from test_attacks import noisy, tiny_cnn

import rfd
from rfd.attacks import ATTACKS, SUCCESS_RULES, Attack, View
from rfd.attacks.square import SquareAttack
from rfd.rng import KeyedRNG, row_keys

SCORE = [a for a, c in ATTACKS.items() if c.kind == "score"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    net = tiny_cnn()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = net(x).argmax(1)
    return x, y


def _run(model, x, y, attack: str, success: str, **kw):
    norm = ATTACKS[attack].norms[0]
    eps = 0.1 if norm == "linf" else 2.0
    return rfd.attack(
        model, x, y, attack=attack, norm=norm, eps=eps, max_queries=150, success=success, **kw
    )


def test_rules_are_listed_and_checked():
    assert SUCCESS_RULES == ("any", "improved")
    net = tiny_cnn()
    x, y = torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown success rule 'lucky'; valid: any, improved"):
        rfd.attack(net, x, y, attack="square", eps=0.1, max_queries=10, success="lucky")


@pytest.mark.parametrize("attack", SCORE)
def test_improved_never_reports_more_successes_than_any(attack, images):
    x, y = images
    model = noisy(tiny_cnn(), nu=0.3)
    a = _run(model, x, y, attack, "any")
    b = _run(model, x, y, attack, "improved")
    assert b.success_rule == "improved" and b.summary()["success_rule"] == "improved"
    assert not bool((b.success & ~a.success).any()), "improved fooled an image that any did not"
    both = a.success & b.success
    assert bool((a.fooled_at[both] <= b.fooled_at[both]).all())  # the same path, cut no later
    assert int(b.success.sum()) <= int(a.success.sum())


def test_improved_bites_on_square_against_noise(images):
    # lucky noisy answers lower Square's stored loss: some fooling queries stop counting
    x, y = images
    model = noisy(tiny_cnn(), nu=0.3)
    a, b = (_run(model, x, y, "square", s) for s in SUCCESS_RULES)
    later = b.success.sum() < a.success.sum() or bool((b.fooled_at > a.fooled_at).any())
    assert later


NO_INCUMBENT = [a for a in SCORE if ATTACKS[a].incumbent is Attack.incumbent]


def test_some_score_attacks_keep_no_incumbent():
    assert {"nes", "signhunter"} <= set(NO_INCUMBENT)


@pytest.mark.parametrize("attack", NO_INCUMBENT)
def test_score_attacks_without_an_incumbent_are_unaffected(attack, images):
    # the engine applies "improved" to every score attack and asks for its incumbent: None
    # must leave each fooling query counted, exactly as under "any"
    x, y = images
    model = noisy(tiny_cnn(), nu=0.3)
    a, b = _run(model, x, y, attack, "any"), _run(model, x, y, attack, "improved")
    assert int(a.success.sum()) > 0
    assert torch.equal(a.success, b.success) and torch.equal(a.fooled_at, b.fooled_at)


def test_on_a_deterministic_model_the_rules_agree(images):
    # without noise a fooling query (margin < 0) always beats the incumbent (margin >= 0)
    x, y = images
    a, b = (_run(tiny_cnn(), x, y, "square", s, criterion="none") for s in SUCCESS_RULES)
    assert torch.equal(a.success, b.success) and torch.equal(a.queries, b.queries)
    assert int(a.success.sum()) > 0


def test_the_rule_reaches_the_table_caption(tmp_path):
    from rfd.report import caption

    summaries = [{"n_images": 100, "norm": "linf", "eps": 0.1, "criterion": "vote",
                  "success_rule": "improved"}]  # fmt: skip
    assert caption(summaries).endswith("criterion vote, success improved")


# --------------------------------------------------------------------------- refresh


def _view(x0: torch.Tensor, step: int) -> View:
    a = x0.shape[0]
    return View(
        x0, 0.1, "linf", 100, torch.full((a,), 50), torch.full((a,), step),
        KeyedRNG(row_keys(0, torch.arange(a))),
    )  # fmt: skip


@pytest.mark.parametrize("bad", [-1, 1, 2.5, True])
def test_refresh_every_is_checked(bad):
    with pytest.raises(ValueError, match="refresh_every must be 0"):
        SquareAttack("linf", refresh_every=bad)


def test_refresh_requeries_the_kept_point_and_stores_its_fresh_loss():
    atk = SquareAttack("linf", refresh_every=3)
    x0 = torch.rand(2, 1, 8, 8)
    state = atk.init(_view(x0, 0))
    state["loss"] = torch.tensor([0.5, 0.2])  # the kept point's (lucky) stored losses
    kept = state["x"].clone()
    for step, refresh in [(1, False), (2, False), (3, True), (6, True)]:
        view = _view(x0, step)
        s = dict(state)
        q = atk.propose(view, s)
        assert torch.equal(q, kept) == refresh
        # the kept point now answers worse than its stored loss: only a refresh stores that
        fresh = torch.tensor([0.9, 0.7])
        reply = rfd.attacks.Reply(torch.zeros(2, 1, dtype=torch.bool), q.unsqueeze(1),
                                  fresh.unsqueeze(1), torch.zeros(2, 1, 10))  # fmt: skip
        out = atk.observe(view, s, reply)
        expect = fresh if refresh else torch.tensor([0.5, 0.2])
        assert torch.equal(out["loss"], expect) and torch.equal(out["x"], kept)
    assert SquareAttack("linf").refresh_every == 0  # off by default: the original attack


def test_refresh_keeps_the_invariants(images):
    x, y = images
    model = noisy(tiny_cnn(), nu=0.3)
    res = _run(model, x, y, "square", "any", refresh_every=4)
    d = (res.adv - x).flatten(1).abs().amax(1)
    assert bool((d <= 0.1 + 1e-6).all()) and res.adv.min() >= 0 and res.adv.max() <= 1
    assert bool((res.queries <= 150).all())
    again = _run(model, x, y, "square", "any", refresh_every=4)
    assert torch.equal(res.fooled_at, again.fooled_at)


# --------------------------------------------------------------------------- vote order


def test_a_failed_vote_moves_on_to_the_next_fooling_query_of_the_step():
    """A step that sends several queries (NES, ZO-signSGD, Bandits) may fool with more than one.
    When the first one's vote fails, the next one is voted: it was sent and charged, and the
    first verified fooling query is what ``fooled_at`` reports."""
    from torch import nn

    class Flaky(nn.Module):
        """Class 1 for a mean pixel above 0.9; with probability 0.2 between 0.6 and 0.9."""

        def __init__(self) -> None:
            super().__init__()
            self.g = torch.Generator().manual_seed(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1)
            lucky = torch.rand(x.shape[0], generator=self.g) < 0.2
            one = (m > 0.9) | ((m > 0.6) & (m < 0.9) & lucky)
            return torch.stack([(~one).float(), one.float()], 1)

    class TwoShot(Attack):
        name = "test-twoshot"
        title = "TwoShot"
        kind = "score"
        norms = ("linf",)
        defaults = {"linf": {}}

        def queries(self, remaining):
            return torch.clamp(remaining, max=2)

        def init(self, view):
            return {"x": view.x0.clone()}

        def propose(self, view, state):  # a flaky point, then one that always fools
            return torch.stack([view.x0 + 0.2, view.x0 + 0.45], 1)

        def observe(self, view, state, reply):
            return state

    try:
        n = 200
        x, y = torch.full((n, 1, 4, 4), 0.5), torch.zeros(n, dtype=torch.long)
        cell = rfd.attacks.Cell(Flaky(), TwoShot(), 0.49, 21, "vote")
        run = rfd.attacks.Engine(64).run([cell], x, y)
    finally:
        ATTACKS.pop("test-twoshot")
    assert run.clean_correct.all() and run.success.all()
    # query 2 counts only if its own vote passes (rare at p = 0.2); otherwise query 3 does
    fooled_at = run.fooled_at.tolist()
    assert set(fooled_at) <= {2, 3} and fooled_at.count(3) > n // 2
    lucky_first = run.verify == 2 * 9  # voted query 2, then query 3
    assert bool(lucky_first.any())
    assert (run.fooled_at[lucky_first] == 3).all()
