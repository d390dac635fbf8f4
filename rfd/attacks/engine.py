"""The attack engine: one loop for every attack, with exact accounting and full forward batches.

A *job* is one image under one *cell* (an attack against a defended model). The engine owns what
published attack code gets wrong in a hundred different ways: the charged-query budget, clipping
to [0, 1] and projection onto the eps-ball, EOT averaging (M forwards charged as M queries), the
9-query majority vote (uncharged), which answers an attack may read (scores or labels only), and
the per-image record (``fooled_at``: the exact charged count at the first verified fooling query).

It also owns the forwards. Every cycle it fills a few forwards of exactly ``batch_size`` rows
from the queries of many jobs, across all cells that share a base model: an image under feature
noise and an image under input noise ride in the same batch, each row with its own defense plan and
noise key (:mod:`rfd.defenses.rows`). When a job ends (fooled, budget spent, or misclassified at
the start) the next one takes its place. Verification votes and EOT samples are rows like any
other. Jobs are oversubscribed (more live than one batch holds) and served least-spent first, so
that near the end the survivors finish together instead of trickling through half-empty batches;
lane by lane (the lane holding the least-spent job first), so that a forward carries few, large
chunks whose proposals and observations each run as one batch of tensor ops. Choosing the jobs
once for several forwards (``cycle``) pays that choice and the bookkeeping around it once.

Randomness never depends on this packing: the attacker's draws are keyed by (attack seed, image,
step) and the defense's by (defense seed, image, query, sample) (:mod:`rfd.rng`), so an image's
result is the same whatever batch size, job order or number of devices is used. For query
attacks on CPU that holds bit for bit. Gradient queries (white-box attacks) differ in the last
float bits between packings, because a backward pass through a batch is not batch-invariant;
their successes and query counts matched in every packing tried.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfd.attacks.base import (
    CRITERIA,
    MAJORITY,
    SUCCESS_RULES,
    VOTES,
    Attack,
    BudgetError,
    Reply,
    State,
    View,
)
from rfd.defenses.base import Defense
from rfd.defenses.rows import RowForward
from rfd.gradients import LOSSES
from rfd.models import check_logits
from rfd.rng import KeyedRNG, derive, derive_rows, offset_rows
from rfd.tensors import put, take

_VOTE_SUB, _PROBE_SUB = 1000, 2000  # noise-key sub-indices of vote and probe rows
CLEAN, RUN, VOTE = 0, 1, 2


@dataclass
class Cell:
    """One (defended model, attack) pair: the unit results are reported for.

    Attributes:
        model: the defended model. An ``rfd`` defense (``rfd.protect``) shares forwards with every
            other cell over the same base model and gets keyed noise; any other module is queried
            as it is (its own randomness, its own forwards).
        attack: the attack (cells may share one attack object: their jobs then share state
            batches).
        eps, max_queries, criterion, eot: the threat model and the rules (see ``rfd.attack``).
        seed: the attacker's seed.
        name: a label for progress and reports.
        success: ``"any"`` (every fooling query the criterion confirms counts) or
            ``"improved"`` (only those that also lower the attack's incumbent loss, the published
            code's rule; see :meth:`Attack.incumbent`).
    """

    model: nn.Module
    attack: Attack
    eps: float
    max_queries: int
    criterion: str = "vote"
    eot: int = 1
    seed: int = 0
    name: str = ""
    success: str = "any"

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")
        if self.success not in SUCCESS_RULES:
            raise ValueError(
                f"unknown success rule {self.success!r}; valid: {', '.join(SUCCESS_RULES)}"
            )
        if self.eot < 1 or self.max_queries < self.eot:
            raise ValueError(
                f"need eot >= 1 and max_queries >= eot, got {self.eot}, {self.max_queries}"
            )


@dataclass
class CellStats:
    """How one cell used the forwards (see :mod:`rfd.metrics` for the names)."""

    forwards: int = 0
    fill_sum: float = 0.0
    rows: int = 0
    seconds: float = 0.0
    randomized: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "forwards": self.forwards,
            "fill_sum": self.fill_sum,
            "rows": self.rows,
            "seconds": self.seconds,
        }


@dataclass
class Progress:
    """What a progress bar shows after each forward."""

    jobs_done: int
    jobs_total: int
    forwards: int
    rows: int
    charged: int
    seconds: float
    fill: float  # mean rows used ÷ batch size so far


class _Lane:
    """Live jobs sharing one attack configuration: their states are batched in slots."""

    def __init__(
        self, attack: Attack, eps: float, budget: int, eot: int, criterion: str, success: str
    ) -> None:
        self.attack, self.eps, self.budget, self.eot, self.criterion = (
            attack, eps, budget, eot, criterion,
        )  # fmt: skip
        # "improved" only changes anything for attacks that keep an incumbent (score attacks)
        self.improved = success == "improved" and attack.kind == "score"
        self.kind = attack.kind
        self.grad = attack.kind == "gradient"
        self.constrained = attack.constrained
        self.lossfn = LOSSES[attack.loss] if self.grad else None
        # attacks that keep Attack.queries send one query per step: no per-step checks needed
        self.single = type(attack).queries is Attack.queries
        self.state: State = {}
        self.cap = 0
        self.free: list[int] = []

    def alloc(self, new: State, n: int, device: torch.device) -> Tensor:
        """Slots for ``n`` new jobs, their state written in."""
        while len(self.free) < n:
            grow = max(self.cap, n - len(self.free), 16)
            for k, v in new.items():
                pad = torch.zeros((grow, *v.shape[1:]), dtype=v.dtype, device=v.device)
                self.state[k] = torch.cat([self.state[k], pad]) if k in self.state else pad
            self.free.extend(range(self.cap, self.cap + grow))
            self.cap += grow
        slots = torch.tensor(self.free[:n], dtype=torch.long, device=device)
        del self.free[:n]
        self.write(slots, new)
        return slots

    def read(self, slots: Tensor) -> State:
        return {k: take(v, slots) for k, v in self.state.items()}

    def write(self, slots: Tensor, new: State) -> None:
        """Store the keys ``init`` created; other keys are a step's scratch and are dropped."""
        for k, t in self.state.items():
            if k in new:
                put(t, slots, new[k])

    def release(self, slots: Tensor) -> None:
        self.free.extend(slots.tolist())


class _Executor:
    """One base model with the defense plans of its cells (or one opaque model); a gradient
    executor runs the same model's forwards with a backward, for white-box queries."""

    def __init__(self, fwd: RowForward, opaque: bool, grad: bool = False) -> None:
        self.fwd, self.opaque, self.grad = fwd, opaque, grad
        self.index = 0
        self.queue: deque[_Chunk] = deque()

    def queued_rows(self) -> int:
        return sum(c.rows - c.sent for c in self.queue)


@dataclass
class _Chunk:
    """Rows of one lane's jobs waiting for (or being given) a forward."""

    kind: str  # "clean", "step", "vote-clean", "vote-step"
    lane: _Lane
    jobs: Tensor  # global job ids (A,)
    x: Tensor  # (rows, C, H, W)
    plan: Tensor  # (rows,)
    keys: Tensor  # (rows,)
    cell: Tensor  # (rows,) cell of each row (statistics)
    extra: dict[str, Any] = field(default_factory=dict)
    sent: int = 0
    out: Tensor | None = None
    grad: bool = False  # gradient queries: also the gradient of the lane's loss per row
    grad_out: Tensor | None = None
    loss_out: Tensor | None = None

    @property
    def rows(self) -> int:
        return self.x.shape[0]


class Engine:
    """Runs jobs of many cells to completion through shared, full forward batches.

    Args:
        batch_size: rows per forward (queries, EOT samples and votes alike).
        oversubscribe: at most ``oversubscribe * batch_size`` jobs are live at once (their
            attack states are in memory); more keeps the end of a large grid full.
        cycle: forwards per selection. Each cycle selects rows for up to ``cycle`` full forwards,
            runs them, then processes their answers: the per-cycle work (choosing jobs, the
            statistics, the progress report) is paid once for several forwards. A job takes at
            most one step per cycle; when the idle jobs cannot fill the cycle, it runs the full
            forwards they fill.
        margin: lanes (attacks) whose least-spent idle job is ahead of the least-spent live job
            by more than this share of the budget sit out a cycle once one forward is covered,
            so that every lane finishes together (see :meth:`EngineRun._select`).
        precision, channels_last, compile: forward settings (see :class:`RowForward`).
        progress: called after every cycle with a :class:`Progress`.
        bpda: gradient queries pass a defense's declared surrogate (the identity by default) in
            place of its non-differentiable part (Athalye et al. 2018), instead of its own
            (masked) gradient.
    """

    def __init__(
        self,
        batch_size: int = 256,
        oversubscribe: float = 16.0,
        cycle: int = 4,
        margin: float = 0.02,
        precision: str = "32",
        channels_last: bool = False,
        compile: bool = False,
        progress: Callable[[Progress], None] | None = None,
        bpda: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not oversubscribe >= 1:
            raise ValueError(f"oversubscribe must be >= 1, got {oversubscribe!r}")
        if not isinstance(cycle, int) or cycle < 1:
            raise ValueError(f"cycle must be a positive integer, got {cycle!r}")
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.batch_size, self.oversubscribe, self.cycle = batch_size, oversubscribe, cycle
        self.margin = margin
        self.precision, self.channels_last, self.compile = precision, channels_last, compile
        self.progress = progress
        self.bpda = bpda

    # ------------------------------------------------------------------------------ setup
    def run(
        self,
        cells: Sequence[Cell],
        images: Tensor,
        labels: Tensor,
        ids: Tensor | None = None,
        jobs: Tensor | None = None,
        on_done: Callable[[EngineRun, Tensor], None] | None = None,
        keep_adv: bool = False,
    ) -> EngineRun:
        """Attack ``jobs`` ((J, 2) rows of [cell, image], default every image under every cell,
        image-major) and return their outcomes. ``ids`` are the images' dataset indices: they
        key all randomness (default: positions). ``on_done(run, job_ids)`` is called after each
        forward with the jobs that finished in it."""
        run = EngineRun(self, list(cells), images, labels, ids, jobs, keep_adv)
        # inference mode: no autograd bookkeeping on the thousands of small ops per second (AAA
        # still differentiates: it works on a clone outside inference mode)
        with torch.inference_mode(), run.executors_entered():
            run.loop(on_done)
        return run


class EngineRun:
    """The state of one :meth:`Engine.run`; its public tensors are the per-job results.

    Attributes (per job, (J,)): ``cell``, ``image``, ``used`` (charged queries), ``verify``
    (uncharged vote rows), ``probe`` (uncharged randomness-probe rows), ``fooled_at``,
    ``success``, ``clean_correct``; ``adv`` (J, C, H, W) when ``keep_adv``; ``stats`` per cell.
    """

    def __init__(
        self,
        engine: Engine,
        cells: list[Cell],
        images: Tensor,
        labels: Tensor,
        ids: Tensor | None,
        jobs: Tensor | None,
        keep_adv: bool,
    ) -> None:
        self.engine, self.cells = engine, cells
        dev = self.device = images.device
        self.images = images
        self.labels = labels.to(dev, torch.long)
        n = images.shape[0]
        self.ids = (torch.arange(n, device=dev) if ids is None else ids.to(dev)).long()
        if jobs is None:  # image-major: every cell of image 0, then of image 1, ...
            ci = torch.arange(len(cells), device=dev).repeat(n)
            jobs = torch.stack([ci, torch.arange(n, device=dev).repeat_interleave(len(cells))], 1)
        jobs = jobs.to(dev).long().view(-1, 2)
        self.cell, self.image = jobs[:, 0].contiguous(), jobs[:, 1].contiguous()
        j = self.cell.shape[0]
        z = torch.zeros(j, dtype=torch.long, device=dev)
        self.used, self.verify, self.probe, self.steps = z.clone(), z.clone(), z.clone(), z.clone()
        self.fooled_at = torch.full_like(z, -1)
        self.success = torch.zeros(j, dtype=torch.bool, device=dev)
        self.clean_correct = torch.ones_like(self.success)
        self.done = torch.zeros_like(self.success)
        self.live = torch.zeros_like(self.success)
        self.busy = torch.zeros_like(self.success)
        self.phase = torch.zeros_like(z)
        self.slot = torch.full_like(z, -1)
        self.adv = images[self.image].clone() if keep_adv else None
        self.stats = [CellStats() for _ in cells]
        # a row's share of a forward's time: its defense's base forwards per query (randomized
        # smoothing answers each row with n + 1), so a cheap cell is not billed for a costly one
        self.row_cost = [float(getattr(c.model, "forwards_per_query", 1.0)) for c in cells]
        self._setup_cells()
        self.job_lane = self._cell_lane[self.cell]
        self.job_label = self.labels[self.image]
        self.job_plan = self._cell_plan[self.cell]
        self.job_grad = torch.tensor([self.lanes[int(li)].grad for li in self._cell_lane.tolist()],
                                     dtype=torch.bool, device=self.device)[self.cell]  # fmt: skip
        self.job_inv_budget = 1.0 / self._cell_budget[self.cell].double()
        self.akey = derive_rows(self._cell_akey[self.cell], self.ids[self.image])
        self.dkey = derive_rows(self._cell_dkey[self.cell], self.ids[self.image])
        self.next_job = self.n_live = 0
        self.max_live = max(int(engine.oversubscribe * engine.batch_size), 1)
        self.t_start = time.perf_counter()
        self.forwards = self.rows_total = 0
        self.fill_total = self.forward_seconds = 0.0
        self.padded = 0  # rows forwarded only to keep one-row forwards on batch kernels
        self.forward_rows: list[int] = []  # rows of each forward
        self.drain_from: int | None = None  # first forward after the last job was admitted
        self.n_done = 0
        self._done_batch: list[Tensor] = []
        self._boxes: dict[float, tuple[Tensor, Tensor]] = {}
        self._vote_subs = torch.arange(VOTES, device=dev) + _VOTE_SUB  # a vote's noise samples

    def _setup_cells(self) -> None:
        def pluggable(m: nn.Module) -> bool:
            return isinstance(m, Defense) and not isinstance(m.base, Defense)

        lanes: dict[tuple, int] = {}
        self.lanes: list[_Lane] = []
        groups: dict[int, list[int]] = {}
        cell_lane, akeys, dkeys = [], [], []
        for ci, c in enumerate(self.cells):
            key = (id(c.attack), c.eps, c.max_queries, c.eot, c.criterion, c.success)
            if key not in lanes:
                lanes[key] = len(self.lanes)
                self.lanes.append(
                    _Lane(c.attack, c.eps, c.max_queries, c.eot, c.criterion, c.success)
                )
            cell_lane.append(lanes[key])
            base = c.model.base if pluggable(c.model) else c.model
            # a raw model and defenses over that same model are separate groups: only rows of
            # rfd defenses can share a forward with per-row plans
            groups.setdefault((id(base), pluggable(c.model)), []).append(ci)
            akeys.append(derive(c.seed, "attack"))
            dkeys.append(derive(c.model.noise_key(), "defense") if pluggable(c.model) else 0)
        self.executors: list[_Executor] = []
        cell_exec, cell_gexec = [0] * len(self.cells), [-1] * len(self.cells)
        plan = [0] * len(self.cells)
        e = self.engine
        for members in groups.values():
            first = self.cells[members[0]].model
            plans: list[Any] = []
            for ci in members:
                d = self.cells[ci].model
                if pluggable(d):
                    if all(d is not u for u in plans):
                        plans.append(d)
                    plan[ci] = next(i for i, u in enumerate(plans) if u is d)
                    self.stats[ci].randomized = bool(d.randomized)
                cell_exec[ci] = len(self.executors)
            if not pluggable(first):
                plans = [None]
            base = first.base if pluggable(first) else first
            fwd = RowForward(base, plans, e.precision, e.channels_last, e.compile)
            self.executors.append(_Executor(fwd, opaque=not pluggable(first)))
            if any(self.lanes[cell_lane[ci]].grad for ci in members):
                # gradient queries run in forwards of their own (with a backward), through the
                # same per-row defense plans
                for ci in members:
                    cell_gexec[ci] = len(self.executors)
                self.executors.append(_Executor(fwd, opaque=not pluggable(first), grad=True))
        dev = self.device
        t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)  # noqa: E731
        self._cell_lane, self._cell_exec, self._cell_plan = t(cell_lane), t(cell_exec), t(plan)
        self._cell_gexec = t(cell_gexec)
        for xi, ex in enumerate(self.executors):
            ex.index = xi
        self._cell_akey, self._cell_dkey = t(akeys), t(dkeys)
        self._cell_budget = t([c.max_queries for c in self.cells])

    def executors_entered(self) -> Any:
        from contextlib import ExitStack

        stack = ExitStack()
        for ex in self.executors:
            stack.enter_context(ex.fwd)
        return stack

    # ------------------------------------------------------------------------------ helpers
    def _remaining(self, lane: _Lane, g: Tensor, used: Tensor | None = None) -> Tensor:
        """Queries jobs ``g`` may still send (EOT samples divided out); ``used``: their charged
        counts, when the caller has gathered them already."""
        left = lane.budget - (take(self.used, g) if used is None else used)
        return left if lane.eot == 1 else left // lane.eot

    @staticmethod
    def _probe(lane: _Lane, ex: _Executor) -> int:
        """Extra rows of a clean query: an opaque model's randomness probe (a second forward of
        the image), unless EOT samples already give two forwards to compare."""
        return 1 if ex.opaque and lane.eot == 1 else 0

    def _view(self, lane: _Lane, g: Tensor, init: bool = False, used: Tensor | None = None) -> View:
        rem = self._remaining(lane, g, used)
        step = take(self.steps, g)
        image = take(self.image, g)  # the originals and their box are gathered by it

        def rng() -> KeyedRNG:  # keyed by (attack seed, image, the image's own step)
            return KeyedRNG(offset_rows(take(self.akey, g), 0 if init else step + 1))

        def x0() -> Tensor:
            return take(self.images, image)

        view = View(x0, lane.eps, lane.attack.norm, lane.budget, rem, step, rng, lane.eot)
        if lane.attack.norm == "linf":
            view._box = lambda: tuple(take(t, image) for t in self._box(lane.eps))
        return view

    def _box(self, eps: float) -> tuple[Tensor, Tensor]:
        """The Linf box of every image at radius ``eps``, computed once (attacks read it at
        every step; a gather is cheaper than recomputing it)."""
        if eps not in self._boxes:
            x = self.images
            self._boxes[eps] = ((x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0))
        return self._boxes[eps]

    def _noise_keys(self, gi: Tensor, query: Tensor | int, sub: Tensor | int) -> Tensor:
        """The defense-noise key of each row: (job's key, query number, EOT/vote/probe sample).
        Query 0 is the clean query; a query's number is fixed by the job's own history."""
        return offset_rows(take(self.dkey, gi), query, sub)

    def _by_lane(self, g: Tensor) -> list[tuple[_Lane, Tensor]]:
        """Split jobs ``g`` by lane, keeping their order within each lane."""
        if len(self.lanes) == 1:
            return [(self.lanes[0], g)]
        li = take(self.job_lane, g)
        counts = torch.bincount(li, minlength=len(self.lanes)).tolist()
        present = [k for k, n in enumerate(counts) if n]
        if len(present) == 1:  # the common case: selection is lane-major
            return [(self.lanes[present[0]], g)]
        parts = g[torch.argsort(li, stable=True)].split(counts)
        return [(self.lanes[k], parts[k]) for k in present]

    def _reduce(self, lane: _Lane, raw: Tensor) -> tuple[Tensor, Tensor]:
        """(Q, M, K) logits -> (EOT-mean logits, label): mean for scores, majority for labels."""
        if raw.shape[1] == 1:
            z = raw[:, 0]
            return z, z.argmax(1)
        if lane.kind == "score":
            z = raw.mean(1)
            return z, z.argmax(1)
        z, k = raw.mean(1), raw.shape[2]
        counts = F.one_hot(raw.argmax(2), k).sum(1)
        # equal votes go to the higher mean logit: the lowest class index would make a tie with
        # the label adversarial for high labels and never for label 0
        return z, (counts * k + z.argsort(1).argsort(1)).argmax(1)

    def _chunk(self, kind: str, lane: _Lane, g: Tensor, x: Tensor, gi: Tensor, keys: Tensor,
               extra: dict[str, Any]) -> _Chunk:  # fmt: skip
        return _Chunk(kind, lane, g, x, take(self.job_plan, gi), keys, take(self.cell, gi), extra)

    def _executor(self, g: Tensor, grad: bool = False) -> _Executor:
        if len(self.executors) == 1:
            return self.executors[0]
        table = self._cell_gexec if grad else self._cell_exec
        return self.executors[int(table[self.cell[g[0]]])]

    # ------------------------------------------------------------------------------ jobs
    def _admit(self) -> bool:
        """Admit the next jobs, up to ``max_live`` live jobs. Starting every job as early as
        memory allows matters more than anything else for full batches at the end: with all
        survivors live together, least-spent-first service keeps them level and they finish
        together, instead of the last-admitted ones running on alone through half-empty
        batches. Returns whether any job was admitted."""
        total = self.cell.shape[0]
        start = self.next_job
        self.next_job = min(total, start + self.max_live - self.n_live)
        if self.next_job == start:
            return False
        new = torch.arange(start, self.next_job, device=self.device)
        self.live[new] = True
        self.n_live += new.shape[0]
        for lane, sub in self._by_lane(new):
            state = lane.attack.init(self._view(lane, sub, init=True))
            self.slot[sub] = lane.alloc(state, sub.shape[0], self.device)
        return True

    def _finish(self, g: Tensor) -> None:
        if g.numel() == 0:
            return
        self.done[g] = True
        self.busy[g] = False
        self.live[g] = False
        for lane, sub in self._by_lane(g):
            lane.release(self.slot[sub])
        self.slot[g] = -1
        self.n_live -= g.shape[0]
        self.n_done += g.shape[0]
        self._done_batch.append(g)

    def _end_or_continue(
        self, lane: _Lane, g: Tensor, view: View | None, state: State | None,
        rows: Tensor | None = None,
    ) -> None:  # fmt: skip
        """After a step: finish the jobs that cannot pay another step or say they are done.
        ``rows`` picks the jobs ``g`` are out of a larger ``view`` and ``state`` (default: all)."""
        if g.numel() == 0:
            return
        self.busy[g] = False
        end = self._remaining(lane, g) < lane.attack.min_queries
        if state is not None and "done" in state:
            done = state["done"] if rows is None else state["done"][rows]
            end |= done.bool()
        if bool(end.any()):
            idx = end.nonzero()[:, 0]
            if self.adv is not None and state is not None:
                if view is None:  # back from a vote: the state observed then is in the slots
                    v, sub = self._view(lane, g[idx]), lane.read(self.slot[g[idx]])
                else:
                    at = idx if rows is None else rows[idx]
                    v, sub = view.subset(at), {k: take(t, at) for k, t in state.items()}
                self.adv[g[idx]] = v.project(lane.attack.best(v, sub))
            self._finish(g[idx])

    def _succeed(self, g: Tensor, points: Tensor, fooled_at: Tensor) -> None:
        self.success[g] = True
        self.fooled_at[g] = fooled_at
        if self.adv is not None:
            self.adv[g] = points
        self._finish(g)

    def _enqueue(self, ch: _Chunk) -> None:
        self.busy[ch.jobs] = True
        self._executor(ch.jobs, ch.grad).queue.append(ch)

    # ------------------------------------------------------------------------------ chunks
    def _clean_chunk(self, lane: _Lane, g: Tensor) -> _Chunk:
        probe = self._probe(lane, self._executor(g))
        per = lane.eot + probe
        x = take(self.images, take(self.image, g)).repeat_interleave(per, 0)
        subs = torch.arange(per, device=self.device)
        if probe:
            subs[-1] = _PROBE_SUB
        gi = g.repeat_interleave(per)
        keys = self._noise_keys(gi, 0, subs.repeat(g.shape[0]))
        return self._chunk("clean", lane, g, x, gi, keys, {"per": per, "probe": probe})

    def _vote_chunk(self, kind: str, lane: _Lane, g: Tensor, pts: Tensor, query: Tensor,
                    extra: dict[str, Any]) -> _Chunk:  # fmt: skip
        x = pts.repeat_interleave(VOTES, 0)
        subs = self._vote_subs.repeat(g.shape[0])
        gi = g.repeat_interleave(VOTES)
        keys = self._noise_keys(gi, query.repeat_interleave(VOTES), subs)
        return self._chunk(kind, lane, g, x, gi, keys, {**extra, "points": pts})

    def _step_chunk(self, lane: _Lane, g: Tensor, n: Tensor | None) -> _Chunk:
        """The next step of jobs ``g``; ``n``: the queries each sends (``lane.attack.queries``
        of their remaining budget), None for a lane of one query per step (every live job can
        pay one: :meth:`_end_or_continue` ends the others)."""
        used = take(self.used, g)  # read three times below and once more when the answers come
        view = self._view(lane, g, used=used)
        if n is not None:
            if bool(((n < 1) | (n > view.remaining)).any()):
                raise BudgetError(
                    f"attack {lane.attack.name!r} planned {n.tolist()} queries with "
                    f"{view.remaining.tolist()} left"
                )
        slots = take(self.slot, g)
        state = lane.read(slots)  # observe gets this very dict, with propose's scratch
        q = lane.attack.propose(view, state)
        if q.dim() == view.x0.dim():
            q = q.unsqueeze(1)
        r, m = q.shape[1], lane.eot
        if n is not None and int(n.max()) > r:
            raise BudgetError(
                f"attack {lane.attack.name!r} proposed {r} queries, planned {n.max()}"
            )
        if n is None and r != 1:
            raise BudgetError(f"attack {lane.attack.name!r} proposed {r} queries, planned 1")
        if lane.constrained:
            q, inside = view.project(q), None
        else:  # decision attacks and C&W L2 walk outside the ball: only a point inside succeeds
            q = q.clamp(0.0, 1.0)
            inside = view.inside(q)
        # each query's number (the image's queries so far) and EOT sample key its noise, so a
        # query gets the same noise whatever it is packed with
        if r == 1:
            valid, flat, gi, qnum = None, q[:, 0], g, (used + 1 if m == 1 else used // m + 1)
        else:
            qnum = (used // m).unsqueeze(1) + torch.arange(1, r + 1, device=self.device)
            if bool((n == r).all()):  # every image sends all its rows: no masks, no copies
                valid, flat = None, q.flatten(0, 1)
                gi, qnum = g.repeat_interleave(r), qnum.view(-1)
            else:
                valid = torch.arange(r, device=self.device).unsqueeze(0) < n.unsqueeze(1)
                flat, gi, qnum = q[valid], g.unsqueeze(1).expand(-1, r)[valid], qnum[valid]
        if m > 1:
            flat, gi, qnum = (
                flat.repeat_interleave(m, 0),
                gi.repeat_interleave(m),
                qnum.repeat_interleave(m),
            )
        sub = torch.arange(m, device=self.device).repeat(gi.shape[0] // m) if m > 1 else 0
        keys = self._noise_keys(gi, qnum, sub)
        extra = {"view": view, "q": q, "n": n, "valid": valid, "inside": inside, "state": state,
                 "used": used, "slots": slots}  # fmt: skip
        ch = self._chunk("step", lane, g, flat, gi, keys, extra)
        if lane.grad:
            ch.grad = True
            ch.extra["labels"] = take(self.job_label, gi)
        return ch

    # ------------------------------------------------------------------------------ processing
    def _process(self, ch: _Chunk) -> None:
        lane, g, out = ch.lane, ch.jobs, ch.out
        assert out is not None
        y = take(self.job_label, g)
        if ch.kind == "clean":  # the first answer: enough classes for the labels
            check_logits(out, y)
        if ch.kind == "step":
            self._process_step(ch, y)
        elif ch.kind == "clean":
            self._process_clean(ch, y)
        else:  # a vote: 9 uncharged re-queries of one point per job
            lab = out.argmax(1).view(g.shape[0], VOTES)
            ok = (lab != y.unsqueeze(1)).sum(1) >= MAJORITY
            self.verify.index_add_(0, g, torch.full_like(g, VOTES))
            n_ok = int(ok.sum())
            # most votes go one way for the whole chunk (every alarm of a noisy model is false,
            # every one of a deterministic model true): no subsets then
            if n_ok == g.shape[0]:
                back = g[:0]
            else:
                back = (~ok).nonzero()[:, 0]
                self.phase[take(g, back)] = RUN
            if ch.kind == "vote-clean":
                self.clean_correct[g[ok]] = False
                self._finish(g[ok])
                self._end_or_continue(lane, g[back], None, None)
            else:
                if n_ok:
                    yes = ok.nonzero()[:, 0]
                    pts, at = ch.extra["points"], ch.extra["fooled_at"]
                    self._succeed(take(g, yes), take(pts, yes), take(at, yes))
                if back.numel() == 0:
                    return
                back = self._vote_next(lane, ch, back)
                # not confirmed: the step's answers were observed with the rest of its chunk
                # (the state is in the slots); the job goes on or ends as any other would
                done = ch.extra["done"]
                back_state = {} if done is None else {"done": done[back]}
                self._end_or_continue(lane, g[back], None, back_state)

    def _process_clean(self, ch: _Chunk, y: Tensor) -> None:
        lane, g = ch.lane, ch.jobs
        per, probe, m = ch.extra["per"], ch.extra["probe"], lane.eot
        raw = ch.out.view(g.shape[0], per, -1)
        self.used[g] += m
        self.probe[g] += probe
        if probe or (m > 1 and self._executor(g).opaque):
            a, b = raw[:, 0], raw[:, 1]  # two forwards of the same image: do they differ?
            if bool((a - b).abs().amax() > 1e-5 * (1.0 + float(a.abs().amax()))):
                for ci in set(take(self.cell, g).tolist()):
                    self._mark_randomized(ci)
        _, lab = self._reduce(lane, raw[:, :m])
        wrong = lab != y
        self.phase[g] = RUN
        w, ok = wrong.nonzero()[:, 0], (~wrong).nonzero()[:, 0]
        if w.numel():
            if lane.criterion == "vote":  # one unlucky noisy forward does not make it wrong
                self.phase[g[w]] = VOTE
                pts = take(self.images, self.image[g[w]])
                self._enqueue(
                    self._vote_chunk("vote-clean", lane, g[w], pts, torch.zeros_like(w), {})
                )
            else:
                self.clean_correct[g[w]] = False
                self._finish(g[w])
        self._end_or_continue(lane, g[ok], None, None)

    def _process_step(self, ch: _Chunk, y: Tensor) -> None:
        lane, g, out = ch.lane, ch.jobs, ch.out
        view, q, n, valid, inside = (ch.extra[k] for k in ("view", "q", "n", "valid", "inside"))
        a, r, m = g.shape[0], q.shape[1], lane.eot
        z, lab = self._reduce(lane, out.view(-1, m, out.shape[-1]))
        k = z.shape[-1]
        if valid is None:  # every query of the step was sent
            zf, labf = z.view(a, r, k), lab.view(a, r)
        else:
            zf = torch.zeros((a, r, k), dtype=z.dtype, device=z.device)
            zf[valid] = z
            labf = y.unsqueeze(1).expand(a, r).clone()
            labf[valid] = lab
        adversarial = labf != y.unsqueeze(1)
        fooled = adversarial if inside is None else adversarial & inside
        used_before = ch.extra["used"]  # the jobs were busy since: nothing else charged them
        self.used.index_add_(0, g, torch.full_like(g, m) if n is None else n * m)
        self.steps.index_add_(0, g, torch.ones_like(g))
        if lane.kind == "decision":
            reply = Reply(adversarial, q)
        else:
            yy = y.view(a, 1, 1).expand(a, r, 1)
            zy = zf.gather(-1, yy).squeeze(-1)
            margin = zy - zf.scatter(-1, yy, float("-inf")).amax(-1)
            reply = Reply(adversarial, q, margin, zf)
            if lane.grad:  # EOT: the mean gradient and loss over the M noise draws
                grad = ch.grad_out.view(-1, m, *ch.grad_out.shape[1:]).mean(1)
                loss = ch.loss_out.view(-1, m).mean(1)
                if valid is None:
                    reply._grad, reply._loss = grad.view(a, r, *grad.shape[1:]), loss.view(a, r)
                else:
                    reply._grad = grad.new_zeros((a, r, *grad.shape[1:]))
                    reply._grad[valid] = grad
                    reply._loss = loss.new_zeros((a, r))
                    reply._loss[valid] = loss
        if lane.improved and bool(fooled.any()):
            incumbent = lane.attack.incumbent(view, ch.extra["state"])
            if incumbent is not None:  # the published rule: only a query that is also accepted
                fooled = fooled & (reply.margin < incumbent.unsqueeze(1))
        hit = fooled.any(1)
        # every job observes its answers now, fooled ones included: a fooled job waiting for its
        # vote would observe exactly these answers if the vote failed, and one observation of
        # the whole chunk avoids gathering its state, view and answers into two subsets
        state = lane.attack.observe(view, ch.extra["state"], reply)
        lane.write(ch.extra["slots"], state)
        if not bool(hit.any()):
            self._end_or_continue(lane, g, view, state)
            return
        h, miss = hit.nonzero()[:, 0], (~hit).nonzero()[:, 0]
        gh = take(g, h)
        if lane.criterion == "vote":
            self.phase[gh] = VOTE
            done = take(state["done"], h) if "done" in state else None
            # the step's fooling queries are voted in query order until one is confirmed
            extra = {"done": done, "rest": take(fooled, h) if q.shape[1] > 1 else None,
                     "q": take(q, h), "base": take(used_before, h)}  # fmt: skip
            self._vote_first(lane, gh, extra)
        else:
            first = take(fooled, h).int().argmax(1)  # argmax returns the first fooling query
            self._succeed(gh, q[h, first], take(used_before, h) + (first + 1) * lane.eot)
        self._end_or_continue(lane, take(g, miss), view, state, rows=miss)

    def _vote_first(self, lane: _Lane, g: Tensor, extra: dict[str, Any]) -> None:
        """Vote the first fooling query left in each job's step: ``extra["rest"]`` (A, R) marks
        the step's fooling queries not voted yet (None for steps of one query: it is the one to
        vote, and none is left after it), ``extra["q"]`` (A, R, ...) holds them."""
        m, rest, base = lane.eot, extra["rest"], extra["base"]
        if rest is None:
            at = base + m
            extra = {**extra, "fooled_at": at}
            query = at if m == 1 else base // m + 1  # the query's number (its noise key)
            self._enqueue(self._vote_chunk("vote-step", lane, g, extra["q"][:, 0], query, extra))
            return
        rest = rest.clone()
        first = rest.int().argmax(1)  # argmax returns the first True
        rows = torch.arange(g.shape[0], device=g.device)
        rest[rows, first] = False
        pts = extra["q"][rows, first]
        extra = {**extra, "rest": rest, "fooled_at": base + (first + 1) * m}
        self._enqueue(self._vote_chunk("vote-step", lane, g, pts, base // m + first + 1, extra))

    def _vote_next(self, lane: _Lane, ch: _Chunk, back: Tensor) -> Tensor:
        """After failed votes (rows ``back`` of a vote chunk): jobs whose step holds another
        fooling query vote it next; returns the rows whose step has none left. Voting only the
        first would drop later fooling queries of the step that were sent and charged."""
        rest = ch.extra["rest"]
        if back.numel() == 0 or rest is None:
            return back
        more = rest[back].any(1)
        if not bool(more.any()):
            return back
        nxt = back[more]
        self.phase[ch.jobs[nxt]] = VOTE
        done = ch.extra["done"]
        extra = {"done": None if done is None else done[nxt], "rest": rest[nxt],
                 "q": ch.extra["q"][nxt], "base": ch.extra["base"][nxt]}  # fmt: skip
        self._vote_first(lane, ch.jobs[nxt], extra)
        return back[~more]

    def _mark_randomized(self, ci: int) -> None:
        st = self.stats[ci]
        if not st.randomized:
            st.randomized = True
            if self.cells[ci].criterion == "none":
                warnings.warn(
                    "criterion='none' assumes a deterministic model, but this one answers "
                    "identical queries differently; one misclassified query will count as success",
                    stacklevel=5,
                )

    # ------------------------------------------------------------------------------ the loop
    def _select(self, xi: int, need: int) -> int:
        """Give the least-spent idle jobs of executor ``xi`` their next rows: about ``need``, or,
        when the idle jobs of the lanes not far ahead cannot fill ``need``, as many full forwards
        as they fill (all of them if less than one). Returns how many of the ``need`` rows are
        still missing."""
        ex = self.executors[xi]
        idle = self.live & ~self.busy
        if len(self.executors) > 1:
            idle &= (self._cell_gexec if ex.grad else self._cell_exec)[self.cell] == xi
            # a gradient lane's steps go to its gradient executor, its clean query to the other
            idle &= (self.job_grad & (self.phase == RUN)) == ex.grad
        g = idle.nonzero()[:, 0]
        if g.numel() == 0:
            return need
        clean = take(self.phase, g) == CLEAN
        prio = (take(self.used, g) * take(self.job_inv_budget, g)).masked_fill_(clean, -1.0)
        lanes = len(self.lanes)
        if lanes > 1:
            # lane-major: the lane holding the least-spent job first, its jobs least-spent
            # first, then the next lane. A forward then carries one or two lanes' chunks, not
            # every lane's: each chunk's proposals and observations run as one batch of tensor
            # ops, so fewer, larger chunks cost less per row. Lanes stay level across forwards.
            job_lane = take(self.job_lane, g)
            low = torch.full((lanes,), 2.0, dtype=prio.dtype, device=prio.device)
            low.scatter_reduce_(0, job_lane, prio, "amin")
            by_low = torch.argsort(low, stable=True)  # lanes, least-spent job first
            rank = torch.argsort(by_low)  # each lane's place in that order
            order = torch.argsort(prio + 4.0 * take(rank, job_lane), stable=True)  # prio in [-1, 1]
            counts = torch.bincount(job_lane, minlength=lanes).tolist()
            lows = low.tolist()
            runs = [(k, counts[k], lows[k]) for k in by_low.tolist() if counts[k]]
        else:
            order = torch.argsort(prio, stable=True)
            runs = [(0, g.shape[0], -1.0)]
        g, clean = take(g, order), take(clean, order)
        any_clean = bool(clean.any())
        # first what each lane could send, in service order, until the need is covered. Once
        # one forward is covered, a lane whose least-spent idle job is ahead of the least-spent
        # live job (busy ones too: a job in a vote has no step now) by more than the margin
        # waits: if every lane stepped every cycle, lanes slowed by votes would fall behind
        # and finish alone at the end, through half-empty forwards
        offers, avail, start = [], 0, 0
        c, queued = self.engine.batch_size, ex.queued_rows()
        one = max(c - queued, 0)
        floor = float(self._spent_floor()) + self.engine.margin if need > one else 2.0
        for k, count, low in runs:
            if avail >= need or (avail >= one and low > floor):
                break
            lane, jobs = self.lanes[k], g[start : start + count]
            n_clean = int(clean[start : start + count].sum()) if any_clean else 0
            start += count
            per = lane.eot + self._probe(lane, ex) if n_clean else 0
            steps = jobs[n_clean:]
            if lane.single or steps.numel() == 0:  # one query (eot forwards) per step
                n, step_rows = None, steps.shape[0] * lane.eot
            else:  # the attack says how many queries each image sends next
                n = lane.attack.queries(self._remaining(lane, steps))
                step_rows = int(n.sum()) * lane.eot
            offers.append((lane, jobs, n_clean, per, steps, n))
            avail += n_clean * per + step_rows
        # too few rows for the whole cycle: as many full forwards as they fill (else what there
        # is), least-spent first; rows past the last full forward would wait in a cut chunk
        whole = (queued + avail) // c * c - queued
        target = need if avail >= need else (min(avail, one) if whole <= 0 else whole)
        short = target
        for lane, jobs, n_clean, per, steps, n in offers:
            if short <= 0:
                break
            if n_clean:
                pick = min(n_clean, -(-short // per))
                self._enqueue(self._clean_chunk(lane, jobs[:pick]))
                short -= pick * per
                if short <= 0:
                    break
            if steps.numel() == 0:
                continue
            if n is None:
                pick = min(steps.shape[0], -(-short // lane.eot))
                short -= pick * lane.eot
            else:
                cum = torch.cumsum(n * lane.eot, 0)
                pick = min(int(torch.searchsorted(cum, short)) + 1, steps.shape[0])
                short -= int(cum[pick - 1])
                n = n[:pick]
            self._enqueue(self._step_chunk(lane, steps[:pick], n))
        return max(need - (target - short), 0)

    def _spent_floor(self) -> Tensor:
        """The least budget share spent by a live job that has taken its clean query."""
        spent = self.used * self.job_inv_budget
        return spent.masked_fill_(~self.live | (self.phase == CLEAN), 1.0).min()

    def _forward(self, ex: _Executor) -> Tensor | None:
        """One forward of up to ``batch_size`` queued rows, their answers stored in the chunks
        (:meth:`_drain` processes those it completed). Returns the rows per cell of this
        forward."""
        c = self.engine.batch_size
        pieces: list[tuple[_Chunk, int, int]] = []
        room = c
        for ch in ex.queue:
            if room == 0:
                break
            k = min(room, ch.rows - ch.sent)
            if k:
                pieces.append((ch, ch.sent, ch.sent + k))
                room -= k
        rows = c - room
        if rows == 0:
            return None
        if len(pieces) == 1:
            ch, a, b = pieces[0]
            x, plan, keys, cells = ch.x[a:b], ch.plan[a:b], ch.keys[a:b], ch.cell[a:b]
        else:
            x = torch.cat([ch.x[a:b] for ch, a, b in pieces])
            plan = torch.cat([ch.plan[a:b] for ch, a, b in pieces])
            keys = torch.cat([ch.keys[a:b] for ch, a, b in pieces])
            cells = torch.cat([ch.cell[a:b] for ch, a, b in pieces])
        if rows == 1:  # one-row forwards use other kernels (other rounding) than batches do
            x, plan, keys = x.expand(2, *x.shape[1:]), plan.expand(2), keys.expand(2)
            self.padded += 1
        t0 = time.perf_counter()
        if ex.grad:
            out, grad, loss = self._grad_forward(ex, x, plan, keys, rows, pieces)
        else:
            out = ex.fwd(x, plan, keys)[:rows]
        self.forward_seconds += time.perf_counter() - t0
        # NaN logits would read as misclassified: one check per forward, not one per chunk
        check_logits(out)
        off = 0
        for ch, a, b in pieces:
            part = out[off : off + b - a]
            whole = (a, b) == (0, ch.rows)  # the whole chunk in one forward: no copy
            if whole:
                ch.out = part
            else:
                if ch.out is None:
                    ch.out = out.new_empty((ch.rows, out.shape[1]))
                ch.out[a:b] = part
            if ex.grad:
                if whole:
                    ch.grad_out, ch.loss_out = grad[off : off + b - a], loss[off : off + b - a]
                else:
                    if ch.grad_out is None:
                        ch.grad_out = grad.new_empty((ch.rows, *grad.shape[1:]))
                        ch.loss_out = loss.new_empty((ch.rows,))
                    ch.grad_out[a:b] = grad[off : off + b - a]
                    ch.loss_out[a:b] = loss[off : off + b - a]
            off += b - a
            ch.sent = b
        self.forwards += 1
        self.forward_rows.append(rows)
        if self.drain_from is None and self.next_job >= self.cell.shape[0]:
            self.drain_from = self.forwards - 1  # from here on no job is left to admit
        self.rows_total += rows
        self.fill_total += rows / c
        return torch.bincount(cells, minlength=len(self.cells))

    def _drain(self, ex: _Executor) -> None:
        """Process the chunks at the head of the queue whose every row has been answered."""
        while ex.queue and ex.queue[0].sent == ex.queue[0].rows:
            self._process(ex.queue.popleft())

    def _grad_forward(self, ex: _Executor, x: Tensor, plan: Tensor, keys: Tensor, rows: int,
                      pieces: list[tuple[_Chunk, int, int]]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """Logits, the gradient of each row's lane loss with respect to its input, and the loss:
        one forward and one backward for the whole batch (rows do not interact in eval mode,
        so the gradient of the summed loss is each row's own)."""
        with torch.inference_mode(False), torch.enable_grad():
            # plain copies: autograd may not save tensors made in inference mode (the engine's)
            xg = x.detach().clone().requires_grad_(True)
            z = ex.fwd(xg, plan.clone(), keys.clone(), bpda=self.engine.bpda)[:rows]
            parts, off = [], 0
            for ch, a, b in pieces:
                fn = ch.lane.lossfn
                assert fn is not None
                parts.append(fn(z[off : off + b - a], ch.extra["labels"][a:b].clone()))
                off += b - a
            loss = torch.cat(parts)
            (grad,) = torch.autograd.grad(loss.sum(), xg)
        return z.detach(), grad[:rows], loss.detach()

    def loop(self, on_done: Callable[[EngineRun, Tensor], None] | None) -> None:
        total = self.cell.shape[0]
        c, k = self.engine.batch_size, self.engine.cycle
        while self.n_done < total:
            self._done_batch = []
            self._admit()
            progressed = False
            for xi, ex in enumerate(self.executors):
                t0 = time.perf_counter()
                need = k * c - ex.queued_rows()
                if need > 0:
                    short = self._select(xi, need)
                    if short > 0 and self._admit():  # new jobs take the empty rows
                        self._select(xi, short)
                fws: list[list[int]] = []
                while len(fws) < k and (not fws or ex.queued_rows() >= c):
                    counts = self._forward(ex)
                    if counts is None:
                        break
                    fws.append(counts.tolist())
                self._drain(ex)
                if not fws:
                    continue
                progressed = True
                dt = time.perf_counter() - t0  # selection, proposals, forwards and processing
                for per_cell in fws:
                    rows = sum(per_cell)
                    for ci, n in enumerate(per_cell):
                        if n:
                            st = self.stats[ci]
                            st.forwards += 1
                            st.fill_sum += rows / c
                            st.rows += n
                # the cycle's time goes to its cells by their rows (times their defenses' cost)
                weight = [sum(f[ci] for f in fws) * cost for ci, cost in enumerate(self.row_cost)]
                total_weight = sum(weight)
                for ci, w in enumerate(weight):
                    if w:
                        self.stats[ci].seconds += dt * w / total_weight
            if not progressed and self.n_done < total and self.next_job >= total:
                raise RuntimeError("engine stalled: jobs are left but none can run")
            if self._done_batch and on_done is not None:
                on_done(self, torch.cat(self._done_batch))
            if self.engine.progress is not None:
                self.engine.progress(
                    Progress(self.n_done, total, self.forwards, self.rows_total,
                             int(self.used.sum()), time.perf_counter() - self.t_start,
                             self.fill_total / max(self.forwards, 1))
                )  # fmt: skip
