"""White-box attacks: gradient queries (EOT means, charges), BPDA, JPEG, and the trained default."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rfd
from rfd.attacks import ATTACKS, Attack, Cell, Engine, make_attack
from rfd.defenses import RowForward
from rfd.defenses.jpeg import jpeg
from rfd.gradients import dlr_loss


class Recording(nn.Module):
    """A linear classifier whose logits get fresh noise from its own generator on every row; it
    keeps the noise of its last call, so a test can recompute each draw's gradient by hand."""

    def __init__(self, d: int = 16, k: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(4 * torch.randn(k, d, generator=g))
        self.gen = torch.Generator().manual_seed(1)
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = 0.5 * torch.randn(x.shape[0], self.w.shape[0], generator=self.gen)
        self.last = d
        return x.flatten(1) @ self.w.T + d


def one_step(loss: str) -> type[Attack]:
    """A white-box attack that asks one gradient query at the clean image and keeps the reply."""

    class Probe(Attack):
        name = f"test-probe-{loss}"
        title = "Probe"
        kind = "gradient"
        norms = ("linf",)
        defaults = {"linf": {}}
        seen: list = []

        def __init__(self, norm: str = "linf") -> None:
            super().__init__(norm)
            self.loss = loss

        def init(self, view):
            return {"done": torch.zeros(len(view), dtype=torch.bool)}

        def propose(self, view, state):
            return view.x0

        def observe(self, view, state, reply):
            Probe.seen.append((reply.grad.clone(), reply.loss.clone(), reply.x.clone()))
            return {"done": torch.ones_like(state["done"])}

    return Probe


@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
@pytest.mark.filterwarnings("ignore:criterion=.none. assumes")
def test_eot_gradient_is_the_mean_of_per_draw_gradients(loss):
    """A gradient query with eot=M returns the mean over M noise draws of the loss's gradient,
    and is charged M queries."""
    m = 6
    model = Recording()
    probe = one_step(loss)
    try:
        x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.25
        with torch.no_grad():
            y = (x.flatten(1) @ model.w.T).argmax(1)
        cell = Cell(model, probe(), eps=0.01, max_queries=10 * m, criterion="none", eot=m)
        run = Engine(64).run([cell], x, y)
        grad, mean_loss, _ = probe.seen[-1]
        noise = model.last  # the M draws of the gradient forward (its rows are the M samples)
        assert noise is not None and noise.shape[0] == m
        from rfd.gradients import LOSSES

        per_draw = []
        for d in noise:
            xg = x.clone().requires_grad_(True)
            z = xg.flatten(1) @ model.w.T + d
            (g,) = torch.autograd.grad(LOSSES[loss](z, y).sum(), xg)
            per_draw.append((g, LOSSES[loss](z, y)))
        want = torch.stack([g for g, _ in per_draw]).mean(0)
        assert torch.allclose(grad[:, 0], want, atol=1e-5)
        assert torch.allclose(mean_loss[:, 0], torch.stack([v for _, v in per_draw]).mean(0))
        assert int(run.used[0]) == 2 * m  # the clean query and the gradient query, M each
    finally:
        ATTACKS.pop(probe.name)


def test_gradient_rows_are_accounted_like_queries(trained_fmnist):
    net = trained_fmnist.model
    x, y, _ = next(iter(trained_fmnist.datamodule.eval_dataloader(20, seed=1)))
    rows = []

    class Count(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            rows.append(x.shape[0])
            return self.net(x)

    res = rfd.attack(Count(), x, y, attack="pgd", eps=0.05, max_queries=40, eot=2)
    assert (res.queries % 2 == 0).all() and (res.queries <= 40).all()
    total = res.queries.sum() + res.verify_queries.sum() + res.probe_queries + res.padded_rows
    assert sum(rows) == total


def test_bpda_backward_is_the_identity_where_declared():
    """Through JPEG (rounding) the true gradient vanishes almost everywhere; with BPDA the
    backward is the identity in its place, so the gradient is the model's at the JPEG'd point."""
    torch.manual_seed(0)
    w = torch.randn(3, 64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3, bias=False))
    model[1].weight.data = w
    d = rfd.protect(model, "jpeg")
    assert not d.differentiable
    x = torch.rand(4, 1, 8, 8)
    c = torch.randn(4, 3)
    plan, keys = torch.zeros(4, dtype=torch.long), torch.arange(4)
    grads = {}
    for bpda in (False, True):
        xg = x.clone().requires_grad_(True)
        z = RowForward(model, [d])(xg, plan, keys, bpda=bpda)
        assert torch.allclose(z, model(jpeg(x)))  # the forward is JPEG's either way
        (grads[bpda],) = torch.autograd.grad((z * c).sum(), xg)
    assert grads[False].abs().max() == 0  # masked
    assert torch.allclose(grads[True].flatten(1), c @ w)  # identity in JPEG's place


def test_dlr_is_invariant_to_shift_and_scale_of_the_logits():
    z = torch.randn(8, 10, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(dlr_loss(z, y), dlr_loss(3.0 * z + 7.0, y), atol=1e-5)
    wrong = z.argmax(1) != y
    assert (dlr_loss(z, y)[wrong] > 0).all() and (dlr_loss(z, y)[~wrong] <= 0).all()


def test_whitebox_columns_name_steps_and_eot():
    assert make_attack("pgd").column(10) == "PGD-20 EOT10"
    assert make_attack("apgd", loss="dlr").column(1) == "APGD-DLR-100"
    assert make_attack("fgsm").column(1) == "FGSM"
    assert make_attack("square").column(1) is None  # query attacks: title + budget


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["pgd", "apgd"])
def test_pgd_and_apgd_break_the_undefended_default(trained_fmnist, attack):
    x, y, ids = next(iter(trained_fmnist.datamodule.eval_dataloader(100, seed=0)))
    res = rfd.attack(trained_fmnist.model, x, y, attack=attack, eps=0.1, max_queries=200, ids=ids)
    assert res.clean_correct.float().mean() >= 0.6
    assert res.robust_accuracy() <= 0.02


@pytest.mark.slow
def test_jpeg_masks_plain_pgd_and_bpda_breaks_it(trained_fmnist):
    x, y, ids = next(iter(trained_fmnist.datamodule.eval_dataloader(50, seed=0)))
    d = rfd.protect(trained_fmnist.model, "jpeg")
    kw = dict(attack="pgd", eps=0.1, max_queries=100, ids=ids)
    plain = rfd.attack(d, x, y, bpda=False, **kw).robust_accuracy()
    bpda = rfd.attack(d, x, y, bpda=True, **kw).robust_accuracy()
    assert plain >= 0.5 and bpda <= 0.1 and plain > bpda + 0.4, (plain, bpda)
