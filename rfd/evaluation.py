"""One model's evaluation grid as a LightningModule: every (defense, attack) cell in one engine.

``test_step`` receives this rank's share of the class-balanced evaluation images (one batch: the
engine packs jobs itself), measures clean and defended accuracy, and runs every unfinished
(cell, image) job through :class:`rfd.attacks.Engine`, whose forwards mix queries of all cells.
Each finished job is appended to its cell's per-rank JSONL file (flushed every few seconds and
fsynced), so a killed run loses seconds of work and a rerun resumes with the jobs that are left.
Because all randomness is keyed by (seed, image, query), the resumed results equal those of an
uninterrupted run, and do not depend on the number of ranks. Lightning supplies the devices, the
DistributedSampler and the process group; torchmetrics aggregate the logged accuracies across
ranks, de-duplicating the sampler's padding by dataset index.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from rfd.attacks import Attack, Cell, Engine, EngineRun, Progress
from rfd.defenses import Defense, RowForward
from rfd.metrics import IndexedMean, merge_stats
from rfd.report import append_jsonl, read_jsonl
from rfd.rng import derive, derive_rows

FLUSH_SECONDS = 2.0  # at most this much finished work is lost when the process is killed


@dataclass
class GridCell:
    """A cell of the grid: where its records go and how it is attacked."""

    name: str
    defense: str
    attack_name: str
    model: Defense
    attack: Attack
    eps: float
    max_queries: int
    criterion: str
    eot: int
    seed: int
    records_dir: Path | None = None
    done: set[int] = field(default_factory=set)
    success: str = "any"


def read_cell(records_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every rank's records and engine statistics of a cell (a torn last line is ignored)."""
    records = [r for p in sorted(records_dir.glob("records.rank*.jsonl")) for r in read_jsonl(p)]
    stats = [r for p in sorted(records_dir.glob("stats.rank*.jsonl")) for r in read_jsonl(p)]
    return records, stats


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """No hardware banner and no tips: the grid prints one table, not thirty lines per cell (nor
    a line per rank when DDP starts)."""
    logs = [logging.getLogger(name) for name in
            ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.distributed")]  # fmt: skip
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            # logged values are IndexedMean results, which sync across ranks themselves, and
            # records are de-duplicated by dataset index (the sampler's padding counts once)
            warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
            warnings.filterwarnings("ignore", message=".*Using `DistributedSampler`.*")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def clean_passes(
    base: nn.Module,
    defenses: Sequence[Defense],
    x: Tensor,
    y: Tensor,
    ids: Tensor,
    n_passes: int,
    batch_size: int,
    **forward_kw: Any,
) -> tuple[Tensor, Tensor]:
    """Undefended correctness (N,) and each defense's mean correctness over ``n_passes`` noisy
    passes (D, N), in full forward batches with noise keyed by (defense, image, pass)."""
    n, d = x.shape[0], len(defenses)
    passes = [n_passes if m.randomized else 1 for m in defenses]
    rows_def = torch.cat([torch.full((passes[i] * n,), i) for i in range(d)]).to(x.device)
    rows_img = torch.cat([torch.arange(n).repeat(passes[i]) for i in range(d)]).to(x.device)
    rows_pass = torch.cat([torch.arange(passes[i]).repeat_interleave(n) for i in range(d)])
    keys0 = torch.tensor([derive(m.noise_key(), "clean-pass") for m in defenses], device=x.device)
    keys = derive_rows(keys0[rows_def], ids[rows_img], rows_pass.to(x.device))
    right = torch.empty(rows_def.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad(), RowForward(base, list(defenses), **forward_kw) as fwd:
        for s in range(0, rows_def.shape[0], batch_size):
            sl = slice(s, s + batch_size)
            right[sl] = fwd(x[rows_img[sl]], rows_def[sl], keys[sl]).argmax(1) == y[rows_img[sl]]
        clean = torch.empty(n, dtype=torch.bool, device=x.device)
        for s in range(0, n, batch_size):
            clean[s : s + batch_size] = (
                base(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]
            )
    acc = torch.zeros((d, n), device=x.device)
    acc.index_put_((rows_def, rows_img), right.float(), accumulate=True)
    return clean, acc / torch.tensor(passes, device=x.device).view(-1, 1)


class CoreHandover:
    """Hands the cores of a CPU process that has finished its share to the processes still
    attacking.

    A CPU run over several processes gives each the same share of the cores (one thread each,
    on a machine with a core per process). The shares of images never cost exactly the same, so
    one process ends first and its cores would idle until the last one ends. Each process marks
    its end with a file in a folder all of them share; the others look every ``every`` engine
    cycles and split the freed cores between them (``torch.set_num_threads``). Threads change speed,
    never results: forwards of rows are per row, and every draw is keyed.

    Args:
        rank, world: this process and how many share the machine.
        where: a folder shared by the processes of this run alone.
        every: engine cycles (a few forwards each) between looks (a look is ``world - 1`` file
            checks).
    """

    def __init__(self, rank: int, world: int, where: Path, every: int = 2) -> None:
        self.rank, self.world, self.where, self.every = rank, world, Path(where), every
        self.base = torch.get_num_threads()
        self.done = 0
        self._calls = 0

    def poll(self) -> None:
        """After a cycle: take a share of the cores of the processes that have ended."""
        self._calls += 1
        if self._calls % self.every:
            return
        done = sum((self.where / f"done.{p}").exists() for p in range(self.world) if p != self.rank)
        if done != self.done:
            self.done = done
            torch.set_num_threads(self.base * self.world // (self.world - done))

    def wrap(self, progress: Callable[[Progress], None] | None) -> Callable[[Progress], None]:
        """An engine progress callback that polls first, then calls ``progress`` (if any)."""

        def poll_then(p: Progress) -> None:
            self.poll()
            if progress is not None:
                progress(p)

        return poll_then

    def finish(self) -> None:
        """This process has ended: its cores are free (and it goes back to its own share)."""
        (self.where / f"done.{self.rank}").touch()
        torch.set_num_threads(self.base)

    @classmethod
    @contextlib.contextmanager
    def for_ranks(cls, device: torch.device) -> Iterator[CoreHandover | None]:
        """A handover between the ranks of this DDP run (CPU, more than one rank; else None):
        rank 0 makes the shared folder, and removes it once every rank has ended."""
        dist = torch.distributed
        if device.type != "cpu" or not (dist.is_available() and dist.is_initialized()):
            yield None
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            yield None
            return
        name = [f"rfd-cores-{uuid.uuid4().hex}" if rank == 0 else ""]
        dist.broadcast_object_list(name, src=0)
        where = Path(tempfile.gettempdir()) / name[0]
        if rank == 0:
            where.mkdir()
        dist.barrier()
        handover = cls(rank, world, where)
        try:
            yield handover
        finally:
            handover.finish()
        dist.barrier()  # every rank has ended: the folder is no longer read
        if rank == 0:
            shutil.rmtree(where, ignore_errors=True)


class GridEvaluation(L.LightningModule):
    """Attack this rank's images under every cell of one model's grid, in shared forwards.

    Args:
        model: the undefended classifier (every cell's defense wraps it).
        make_cells: builds the grid's cells for the model once it is on its device (defenses
            are calibrated there); ``GridCell.done`` holds dataset indices finished earlier.
        batch_size: rows per forward.
        n_clean_passes: noisy passes for the defended clean accuracy.
        forward: ``(device) -> {precision, channels_last, compile}`` for every forward.
        progress: called with the engine's :class:`Progress` after each cycle (rank 0).
        bpda: white-box attacks use BPDA through defenses that declare it (see ``Engine``).
    """

    def __init__(
        self,
        model: nn.Module,
        make_cells: Callable[[nn.Module], Sequence[GridCell]],
        batch_size: int = 256,
        n_clean_passes: int = 5,
        forward: Callable[[torch.device], dict[str, Any]] | None = None,
        progress: Callable[[Progress], None] | None = None,
        bpda: bool = True,
    ) -> None:
        super().__init__()
        self.bpda = bpda
        self.model = model
        self.make_cells = make_cells
        self.batch_size, self.n_clean_passes = batch_size, n_clean_passes
        self.forward = forward
        self.progress = progress
        self.cells: list[GridCell] = []
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.stats: dict[str, list[dict[str, Any]]] = {}
        self.forward_kw: dict[str, Any] = {}

    def on_test_start(self) -> None:
        self.cells = list(self.make_cells(self.model))
        self.records = {c.name: [] for c in self.cells}
        self.stats = {c.name: [] for c in self.cells}
        self.robust_acc = [IndexedMean().to(self.device) for _ in self.cells]
        self.forward_kw = self.forward(self.device) if self.forward else {}

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y, ids = batch[0], batch[1].long(), batch[2].long()
        defenses: list[Defense] = []
        for c in self.cells:
            if all(c.model is not d for d in defenses):
                defenses.append(c.model)
        which = [next(i for i, d in enumerate(defenses) if d is c.model) for c in self.cells]
        clean, defended = clean_passes(
            self.model, defenses, x, y, ids, self.n_clean_passes, self.batch_size, **self.forward_kw
        )
        id_list = ids.tolist()
        pos = {i: k for k, i in enumerate(id_list)}
        jobs = [
            (ci, pos[i])
            for i in id_list  # image-major, so every cell advances from the start
            for ci, c in enumerate(self.cells)
            if i not in c.done
        ]
        # ranks that attack side by side: their engine seconds overlap in wall time (a resumed
        # run may leave some ranks without work, and those add no time)
        working = torch.tensor([int(bool(jobs))], device=x.device)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(working)
        # every rank enters (the handover's setup is collective), a rank without work too: its
        # cores go to the others at once
        with CoreHandover.for_ranks(x.device) as handover:
            if jobs:
                cells = [
                    Cell(
                        c.model,
                        c.attack,
                        c.eps,
                        c.max_queries,
                        c.criterion,
                        c.eot,
                        c.seed,
                        name=c.name,
                        success=c.success,
                    )
                    for c in self.cells
                ]
                writer = _Writer(self, cells, clean, defended, which, y, ids, int(working.item()))
                bar = self.progress if self.global_rank == 0 else None
                progress = bar if handover is None else handover.wrap(bar)
                engine = Engine(self.batch_size, progress=progress, bpda=self.bpda,
                                **self.forward_kw)  # fmt: skip
                try:
                    run = engine.run(cells, x, y, ids=ids, jobs=torch.tensor(jobs, device=x.device),
                                     on_done=writer.done, keep_adv=writer.detecting)  # fmt: skip
                except BaseException:  # interrupted: keep every finished job, then stop
                    if writer.run is not None:
                        writer.flush(writer.run)
                    raise
                writer.flush(run)
        for ci, c in enumerate(self.cells):  # the torchmetrics view, synced across ranks
            rows = self.records[c.name]
            # every rank updates every metric, with nothing if it had no work left (a resumed
            # run): a rank with an empty list state would skip the gather the others wait in
            idx = torch.tensor([r["index"] for r in rows], dtype=torch.long, device=x.device)
            val = torch.tensor(
                [float(r["attack_clean_correct"] and not r["success"]) for r in rows],
                device=x.device,
            )
            self.robust_acc[ci].update(val, idx)

    def on_test_epoch_end(self) -> None:
        for ci, c in enumerate(self.cells):  # IndexedMean syncs across ranks itself
            self.log(f"robust_acc/{c.name}", self.robust_acc[ci].compute())


class _Writer:
    """Turns finished jobs into records, buffered and appended (fsynced) every few seconds."""

    def __init__(self, ev: GridEvaluation, cells: list[Cell], clean: Tensor, defended: Tensor,
                 which: list[int], y: Tensor, ids: Tensor, ranks: int = 1) -> None:  # fmt: skip
        self.ev, self.cells = ev, cells
        self.clean, self.defended, self.which = clean.tolist(), defended.tolist(), which
        self.y, self.ids = y.tolist(), ids.tolist()
        self.pending: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cells}
        self.last = time.perf_counter()
        self.sent: list[dict[str, float]] = [{} for _ in cells]
        self.ranks = ranks  # ranks attacking concurrently (see merge_stats)
        self.run: EngineRun | None = None
        # defenses with a detector (MagNet) judge each fooled job's adversarial example, so the
        # engine keeps the adversarial examples
        self.detectors = [getattr(type(c.model), "detect", None) is not None for c in cells]
        self.detecting = any(self.detectors)

    def done(self, run: EngineRun, g: Tensor) -> None:
        self.run = run
        cols = [run.cell[g], run.image[g], run.clean_correct[g], run.success[g], run.used[g],
                run.verify[g], run.fooled_at[g], run.probe[g]]  # fmt: skip
        detected = self._detect(run, g)
        for k, (ci, im, cc, ok, q, v, fa, pr) in enumerate(
            zip(*(c.tolist() for c in cols), strict=True)
        ):
            cell = self.cells[ci]
            rec = {
                "index": self.ids[im], "label": self.y[im], "clean_correct": bool(self.clean[im]),
                "defended_correct": float(self.defended[self.which[ci]][im]),
                "attack_clean_correct": bool(cc), "success": bool(ok), "queries": q,
                "verify_queries": v, "fooled_at": fa, "probe_queries": pr,
            }  # fmt: skip
            if self.detectors[ci]:
                rec["detected"] = bool(detected[k])
            self.pending[cell.name].append(rec)
        if time.perf_counter() - self.last >= FLUSH_SECONDS:
            self.flush(run)

    def _detect(self, run: EngineRun, g: Tensor) -> list[bool]:
        """Per finished job: its defense's detector flags its adversarial example (fooled jobs
        under a detecting defense only; False otherwise)."""
        out = [False] * len(g)
        if not self.detecting or run.adv is None:
            return out
        cells, fooled = run.cell[g].tolist(), run.success[g].tolist()
        for ci, cell in enumerate(self.cells):
            pick = [k for k, c in enumerate(cells) if c == ci and fooled[k]]
            if pick and self.detectors[ci]:
                with torch.no_grad():
                    flags = cell.model.detect(run.adv[g[pick]]).tolist()
                for k, f in zip(pick, flags, strict=True):
                    out[k] = bool(f)
        return out

    def flush(self, run: EngineRun) -> None:
        ev = self.ev
        for ci, cell in enumerate(self.cells):
            rows = self.pending[cell.name]
            st = run.stats[ci].as_dict()
            delta = {k: st[k] - self.sent[ci].get(k, 0) for k in st}
            self.sent[ci] = st
            if self.ranks > 1:
                delta["ranks"] = self.ranks  # concurrent ranks: their seconds overlap
            gc = ev.cells[ci]
            if gc.records_dir is not None and (rows or delta["forwards"]):
                rank = ev.global_rank
                if rows:
                    append_jsonl(gc.records_dir / f"records.rank{rank}.jsonl", rows)
                if delta["forwards"]:
                    append_jsonl(gc.records_dir / f"stats.rank{rank}.jsonl", [delta])
            ev.records[cell.name].extend(rows)
            if delta["forwards"]:
                ev.stats[cell.name].append(delta)
            self.pending[cell.name] = []
        self.last = time.perf_counter()


def cell_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The engine statistics of a cell summed over ranks and resumed segments."""
    return merge_stats(stats)  # no statistics: every count 0
