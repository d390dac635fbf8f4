"""The engine: shared full forwards, keyed randomness, and results that packing cannot move."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rfd
from rfd.attacks import Cell, Engine, make_attack
from rfd.defenses import RowForward
from rfd.rng import KeyedRNG, derive_rows, row_keys


class Center(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - 0.5) * 4


def cnn(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            Center(), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Linear(8 * 16, 10),
        ).eval()  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = cnn()
    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


FIELDS = ("adv", "success", "queries", "verify_queries", "fooled_at", "clean_correct")


def same(a, b, rows_a=slice(None), rows_b=slice(None)) -> None:
    for k in FIELDS:
        assert torch.equal(getattr(a, k)[rows_a], getattr(b, k)[rows_b]), k


@pytest.mark.parametrize("attack", ["square", "nes", "signflip"])
def test_results_do_not_depend_on_batch_size_or_position(data, attack):
    """Randomness is keyed by (seed, image id, query): an image's result is the same whatever
    rows share its forwards and wherever it sits in the input."""
    net, x, y = data
    defended = rfd.protect(net, "feature", nu=0.3, seed=5)
    kw = dict(attack=attack, eps=0.1, max_queries=120, seed=1)
    big = rfd.attack(defended, x, y, max_batch=512, **kw)
    small = rfd.attack(defended, x, y, max_batch=5, **kw)
    same(big, small)
    perm = torch.tensor([7, 2, 11, 0, 5])
    part = rfd.attack(defended, x[perm], y[perm], ids=perm, max_batch=3, **kw)
    same(big, part, perm)


def test_grid_cells_share_forwards_and_match_separate_runs(data):
    net, x, y = data
    defs = [rfd.protect(net, "none"), rfd.protect(net, "input", nu=0.05, seed=2),
            rfd.protect(net, "feature", nu=0.3, seed=2)]  # fmt: skip
    atks = [make_attack("square"), make_attack("rays")]
    cells = [Cell(d, a, 0.1, 100, "vote", 1, 4) for d in defs for a in atks]
    grid = Engine(32).run(cells, x, y, keep_adv=True)
    for ci, c in enumerate(cells):
        alone = Engine(7).run([c], x, y, keep_adv=True)
        sel = grid.cell == ci
        assert torch.equal(grid.used[sel], alone.used)
        assert torch.equal(grid.success[sel], alone.success)
        assert torch.equal(grid.fooled_at[sel], alone.fooled_at)
        assert torch.equal(grid.adv[sel], alone.adv)
    # one executor for the whole grid: every cell's rows rode in the same forwards
    assert len(grid.executors) == 1
    assert grid.forwards < sum(Engine(32).run([c], x, y).forwards for c in cells)
    # choosing jobs once per forward, per three or per four (the default) changes which rows
    # share a forward, not any job's result
    for cycle in (1, 3):
        other = Engine(32, cycle=cycle).run(cells, x, y, keep_adv=True)
        for k in ("used", "verify", "success", "fooled_at", "adv"):
            assert torch.equal(getattr(other, k), getattr(grid, k)), (cycle, k)


def test_forwards_are_full_until_the_work_runs_out(data):
    """While jobs are left to admit, every forward holds exactly ``batch_size`` rows, whatever
    the attacks' step sizes (NES sends 61 queries a step, the others one); only the drain at the
    end, when the last images run on alone, may leave rows empty.

    Exactly, with one forward per cycle: a forward's leftover rows then belong to one job. A
    longer cycle can end inside a chunk of several NES jobs, whose one leftover row holds them
    all back: with no more live jobs than one batch, the next forward may then lack a row."""
    net, x, y = data
    xs, ys = x.repeat(8, 1, 1, 1), y.repeat(8)
    ids = torch.arange(xs.shape[0])
    cells = [Cell(rfd.protect(net, "feature", nu=0.3, seed=0), make_attack(a), 0.1, 200)
             for a in ("square", "nes", "signhunter", "rays")]  # fmt: skip
    # few live jobs at a time: jobs are admitted as others finish
    run = Engine(40, oversubscribe=1, cycle=1).run(cells, xs, ys, ids=ids)
    fill_incremental = run.rows_total / (run.forwards * 40)
    assert run.drain_from is not None and run.drain_from > 10
    assert all(r == 40 for r in run.forward_rows[: run.drain_from])
    cycled = Engine(40, oversubscribe=1, cycle=4).run(cells, xs, ys, ids=ids)
    assert sum(cycled.forward_rows[: cycled.drain_from]) >= 0.99 * 40 * cycled.drain_from
    assert sum(run.forward_rows) == run.rows_total <= run.forwards * 40
    for st in run.stats:
        assert st.forwards > 0 and st.rows > 0 and st.seconds > 0
    assert sum(st.rows for st in run.stats) == run.rows_total
    # every job live from the start (the default when memory allows): survivors stay level under
    # least-spent-first service and finish together, so even the end of the run is full
    run = Engine(40).run(cells, xs, ys, ids=ids)
    assert run.drain_from == 0
    fill_all = run.rows_total / (run.forwards * 40)
    assert fill_all > fill_incremental and fill_all > 0.8, (fill_all, fill_incremental)


def test_row_forward_applies_each_plan_to_its_rows_only(data):
    """One forward holding rows of four defenses equals each defense forwarded on its own rows
    with the same keys; undefended rows get exactly the model's logits."""
    net, x, _ = data
    plans = [rfd.protect(net, "none"), rfd.protect(net, "input", nu=0.05, seed=1),
             rfd.protect(net, "feature", nu=0.5, seed=1), rfd.protect(net, "aaa")]  # fmt: skip
    plan = torch.arange(12) % 4
    keys = row_keys(9, torch.arange(12))
    with torch.no_grad():
        mixed = RowForward(net, plans)(x, plan, keys)
        for p in range(4):
            rows = plan == p
            alone = RowForward(net, [plans[p]])(x[rows], torch.zeros(int(rows.sum()), dtype=torch.long),
                                                keys[rows])  # fmt: skip
            assert torch.allclose(mixed[rows], alone, atol=1e-6), p
        assert torch.equal(mixed[plan == 0], net(x[plan == 0]))
    assert not any(m._forward_hooks for m in net.modules())


def test_row_forward_draws_feature_noise_ahead_and_compiles_on_cpu(data, monkeypatch):
    """From the second call on, feature noise is drawn before the forward (the layer's shape is
    known by then): the same draws as in the hook. A compiled model traces its noise hooks, and
    the keyed draw (numpy words on CPU) must stay out of the trace (dynamo failed on it)."""
    import functools

    net, x, _ = data
    plans = [rfd.protect(net, "none"), rfd.protect(net, "input", nu=0.05, seed=1),
             rfd.protect(net, "feature", nu=0.5, seed=1)]  # fmt: skip
    plan, keys = torch.arange(12) % 3, row_keys(9, torch.arange(12))
    with torch.no_grad():
        fresh = RowForward(net, plans)(x, plan, keys)  # drawn in the hook
        fw = RowForward(net, plans)
        with fw:
            fw(x[:5], plan[:5], keys[:5])
            assert torch.equal(fw(x, plan, keys), fresh)  # drawn ahead
        # the graph breaks of tracing are what this checks; the eager backend skips the C++ build
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
        torch._dynamo.reset()
        compiled = RowForward(net, plans, compile=True)
        with compiled:
            for _ in range(2):
                assert torch.allclose(compiled(x, plan, keys), fresh, atol=1e-5)
    torch._dynamo.reset()


def test_precision_bf16_runs_and_stays_close(data):
    net, x, y = data
    d = rfd.protect(net, "feature", nu=0.3, seed=0)
    keys = row_keys(0, torch.arange(12))
    plan = torch.zeros(12, dtype=torch.long)
    with torch.no_grad():
        full = RowForward(net, [d])(x, plan, keys)
        half = RowForward(net, [d], precision="bf16")(x, plan, keys)
    assert half.dtype == torch.float32
    assert (half - full).abs().max() < 0.1 * full.abs().max()
    with pytest.raises(ValueError, match="precision"):
        RowForward(net, [d], precision="fp8")


def test_channels_last_forwards_over_one_model_restore_its_format_when_the_last_leaves():
    """A second forward over the same model (a benchmark's plain probe, say) entered and left
    inside the first must not switch the model back to NCHW under the first."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(2, 1, 8, 8)
    net(x)  # materialize the lazy layer

    def is_cl() -> bool:
        return net[1].weight.is_contiguous(memory_format=torch.channels_last)

    assert not is_cl()
    plan, keys = torch.zeros(2, dtype=torch.long), row_keys(0, torch.arange(2))
    outer = RowForward(net, [None], channels_last=True)
    inner = RowForward(net, [None], channels_last=True)
    with outer:
        assert is_cl()
        with torch.no_grad():
            inner(x, plan, keys)  # enters and leaves inside ``outer``
        assert is_cl()
    assert not is_cl()


def test_keyed_rng_is_a_function_of_the_key_alone():
    ids = torch.arange(50)
    r = KeyedRNG(row_keys(3, ids))
    z = r.normal((4, 7))
    assert z.shape == (50, 4, 7)
    sub = KeyedRNG(row_keys(3, ids[[10, 3, 40]]))
    assert torch.equal(sub.normal((4, 7)), z[[10, 3, 40]])
    assert not torch.equal(r.stream("a").normal((4, 7)), z)
    assert torch.equal(r.stream("a").normal((4, 7)), r.stream("a").normal((4, 7)))
    assert not torch.equal(KeyedRNG(derive_rows(r.keys, ids)).normal((4, 7)), z)
    # an odd count drops the last sine of the Box-Muller pairs: a prefix of the next even count
    assert torch.equal(r.normal((3, 5, 5)).flatten(1), r.normal(76)[:, :75])
    # the hash works in place on its own temporaries, never on the caller's keys
    keys = r.keys.clone()
    derive_rows(r.keys), r.uniform(5), r.bits01(5), r.stream(ids).normal(3)
    assert torch.equal(r.keys, keys)


def test_keyed_rng_per_row_streams_give_each_row_its_streams_numbers():
    """``streams`` draws row a from stream names[which[a]] in one pass: the very numbers each
    stream gives that row, whatever the other rows draw; ``uniform_and_bits01`` reads both kinds
    from one pass."""
    r = KeyedRNG(row_keys(3, torch.arange(7))).stream("outer")
    which = torch.tensor([0, 1, 1, 0, 2, 0, 1])
    names = ("a", "b", "c")
    mixed = r.streams(which, *names)
    u, bits = mixed.uniform_and_bits01((3, 4))
    for a, w in enumerate(which.tolist()):
        one = r.stream(names[w])
        assert torch.equal(mixed.normal(5)[a], one.normal(5)[a])
        assert torch.equal(u[a], one.uniform((3, 4))[a])
        assert torch.equal(bits[a], one.bits01((3, 4))[a])


def test_keyed_rng_streams_are_pinned():
    """The draws are part of every stored result (a resumed folder appends to records made
    with them): a faster formula must give the same float32 bits, pinned here."""
    r = KeyedRNG(row_keys(7, torch.tensor([0, 5, 123])))
    assert r.normal(5).view(torch.int32).tolist() == [
        [1070082833, 1066949831, 1065672266, 1055799007, -1074027097],
        [1042143135, -1079976737, -1076846275, 1070013191, -1078170435],
        [1064912789, -1111959412, 1053398048, 1053967983, -1085823167],
    ]
    assert r.stream("u").uniform(3).view(torch.int32).tolist() == [
        [1064760410, 1055860136, 1057837305],
        [1033932824, 1060183773, 1056990007],
        [1050830532, 1060173531, 1043659580],
    ]


def test_keyed_rng_cpu_words_match_the_reference():
    """On CPU the hash and the bit fields run in numpy as uint64; they must give the bits of the
    scalar reference (splitmix64 in Python integers) and of the torch expressions other
    devices use, including for non-contiguous words (which take the torch path)."""
    from rfd.rng import _field, _mix_, _mix_int, _shr

    g = torch.Generator().manual_seed(3)
    x = torch.randint(-(2**63), 2**63 - 1, (64, 7), generator=g, dtype=torch.int64)
    mixed = _mix_(x.clone())
    assert mixed.flatten().tolist() == [_mix_int(v) for v in x.flatten().tolist()]
    v = int(x[0, 0])  # a 0-dim tensor (numpy would hand back a scalar): the torch path
    assert _mix_(torch.tensor(v)).item() == _mix_int(v)
    assert int(_shr(torch.tensor(v), 40, 24)) == (v % 2**64) >> 40
    strided = x.clone().t()  # not contiguous: the torch path
    assert torch.equal(_mix_(strided).t(), mixed)
    for s, bits, scale, complement in [(40, 24, 2.0**-24, False), (40, 24, 2.0**-24, True),
                                       (16, 24, 3.7e-7, False), (63, 1, 1.0, False)]:  # fmt: skip
        t = _shr(x, s, bits)
        assert t.min() >= 0 and t.max() < 2**bits
        assert torch.equal(t, (x >> s) & ((1 << bits) - 1))  # the torch path of _shr
        t = (1 << bits) - t if complement else t
        for dtype in (torch.float32, torch.float64):
            want = (
                (t * scale if scale != 1.0 else t.float())
                if dtype == torch.float32
                else (t.to(dtype) * scale)
            )
            got = _field(x, s, bits, scale, dtype, complement)
            assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_keyed_rng_moments():
    r = KeyedRNG(row_keys(0, torch.arange(400)))
    n = 400 * 1000
    for z in (r.normal(1000), r.stream("l").laplace(1000)):
        assert abs(float(z.mean())) < 5 / n**0.5
        assert abs(float(z.std()) - 1) < 0.01
    u = r.stream("u").uniform(1000)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005
    k = r.stream("k").randint(torch.full((400,), 7), 1000)
    counts = torch.bincount(k.flatten(), minlength=7).float() / n
    assert k.min() == 0 and k.max() == 6 and (counts - 1 / 7).abs().max() < 0.005
    b = r.stream("b").bernoulli(torch.full((400, 1000), 0.3))
    assert abs(float(b.float().mean()) - 0.3) < 0.005
    rows = r.normal(256)
    off = torch.corrcoef(rows[:20]) - torch.eye(20)
    assert off.abs().max() < 0.3  # independent rows: |r| ~ 1/16 each


@pytest.mark.parametrize("kind", ["decision", "gradient"])
def test_eot_majority_ties_go_to_the_higher_mean_logit_not_the_lower_class(kind):
    """With an even EOT count a 1:1 split must not be decided by class index (which would make a
    tie with the label adversarial for label 9 and never for label 0); more votes still win."""
    from types import SimpleNamespace

    from rfd.attacks.engine import EngineRun

    lane = SimpleNamespace(kind=kind)
    tied = torch.tensor([
        [[3.0, 0.0, 1.0], [0.0, 0.0, 5.0]],  # one vote each for 0 and 2, mean favours 2
        [[5.0, 0.0, 1.0], [0.0, 0.0, 2.0]],  # one vote each for 0 and 2, mean favours 0
    ])  # fmt: skip
    z, lab = EngineRun._reduce(None, lane, tied)
    assert lab.tolist() == [2, 0] and torch.equal(z, tied.mean(1))
    # two votes for 0 beat one for 2, whose logit makes the mean favour 2
    _, lab = EngineRun._reduce(None, lane, torch.tensor([[[1.0, 0, 0], [1.0, 0, 0], [0, 0, 9.0]]]))
    assert lab.tolist() == [0]


class _NaNAfterClean(nn.Module):
    """Finite logits for the images themselves, NaN for any other input."""

    def __init__(self, net: nn.Module, images: torch.Tensor) -> None:
        super().__init__()
        self.net, self.images = net, images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        known = (x.flatten(1).unsqueeze(1) == self.images.flatten(1).unsqueeze(0)).all(-1).any(1)
        return torch.where(known.unsqueeze(1), z, torch.full_like(z, float("nan")))


def test_nan_logits_of_a_step_stop_the_run_instead_of_counting_as_fooled(data):
    """NaN logits would read as misclassified (argmax of NaN is no class): every forward is
    checked, not only the clean one."""
    net, x, y = data
    model = _NaNAfterClean(net, x[:4]).eval()
    cell = Cell(model, make_attack("square"), 0.1, 50, "vote", 1, 0)
    with pytest.raises(ValueError, match="NaN or inf logits"):
        Engine(16).run([cell], x[:4], y[:4])


@pytest.mark.parametrize(
    "kw, msg",
    [({"batch_size": 0}, "batch_size must be a positive integer"),
     ({"oversubscribe": 0.5}, "oversubscribe must be >= 1"),
     ({"cycle": 0}, "cycle must be a positive integer"),
     ({"margin": -0.1}, "margin must be >= 0")],
)  # fmt: skip
def test_engine_settings_are_checked(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Engine(**kw)
