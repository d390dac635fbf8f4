"""Grid benchmark: batch fill and efficiency of the engine on a trained model, in one run.

    python benchmarks/bench_attacks.py                                   # the embedded default, CPU
    python benchmarks/bench_attacks.py --model vgg19 --img-size 224 --device cuda --precision bf16

A grid (defenses × attacks, ν calibrated to a 2% drop) runs through one engine exactly as
``evaluate.py`` runs it: images leave as they are fooled and new jobs take their slots.

- ``batch fill``: mean over forwards of rows used ÷ batch size (per cell and overall).
- ``efficiency``: (charged + verification + probe forward rows) × the plain, undefended forward
  time per image at full batch ÷ wall time. 1.0 means the grid cost nothing beyond the rows it
  forwarded; everything else (attack arithmetic, defense noise, bookkeeping, partial batches)
  lowers it.
- ``forward share``: the fraction of wall time spent inside forwards (defense noise included).

The plain forward time is measured during the grid itself: every ``--probe-every`` forwards the
benchmark times one plain forward of a full batch (its time is taken out of the wall time), and
the median of those probes is used. A machine whose speed drifts during the run, or whose caches
the engine's own work leaves cold, then slows both sides of the ratio alike.

``--procs N`` runs the grid as ``evaluate.py --devices N`` does on a CPU: N processes of
cores ÷ N threads each, every one an engine over its share of the images (results are the same
as one process's: randomness is keyed by image and query). On a small model one process leaves a
core idle while the engine does its small tensor ops, and two threads speed a forward up by far
less than 2×, so one process per core finishes sooner. A process that ends first hands its core
to the others (``rfd.evaluation.CoreHandover``, as ``evaluate.py`` does); probes are not taken
on the extra threads. The efficiency is then taken against the
fastest plain forwards seen: the layout's own (each process's in-run probes, N processes
forwarding side by side) or one process with every thread (timed before the grid), whichever
is faster, so that a layout cannot look efficient by making forwards slower.
Without a checkpoint (``--model`` other than the default) the model is untrained: then most
images fall within a few queries, the hardest case for keeping batches full.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rfd
from rfd.attacks import Cell, Engine, make_attack
from rfd.defenses import calibrate, protect
from rfd.evaluation import CoreHandover
from rfd.metrics import merge_stats
from rfd.settings import keep_freed_memory

DEFAULT_CKPT = Path("runs/fmnist_default/best.ckpt")


class PlainProbe:
    """Times one plain (undefended) forward of a full batch every ``every`` engine forwards."""

    def __init__(
        self, model: torch.nn.Module, x: torch.Tensor, batch: int, fw: dict, every: int
    ) -> None:
        from rfd.defenses import RowForward

        self.xb = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch].contiguous()
        self.plan = torch.zeros(batch, dtype=torch.long, device=x.device)
        self.keys = torch.arange(batch, device=x.device)
        self.fwd = RowForward(model, [None], **fw)
        self.batch, self.every = batch, every
        self.times: list[float] = []
        self.spent = 0.0
        self.last = -every
        self.threads = torch.get_num_threads()

    def time_one(self) -> None:
        t = time.perf_counter()
        sync = self.xb.device.type == "cuda"
        if sync:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        with torch.no_grad():
            self.fwd(self.xb, self.plan, self.keys)
        if sync:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.times.append((t2 - t1) / self.batch)
        self.spent += t2 - t

    def __call__(self, p: object) -> None:
        # after a core handover the forwards run on more threads than the layout's share: a
        # timing then would not be the layout's plain forward
        if p.forwards - self.last >= self.every and torch.get_num_threads() == self.threads:
            self.last = p.forwards
            self.time_one()

    @property
    def per_image(self) -> float:
        return statistics.median(self.times)


def load(
    args: argparse.Namespace,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """The model and class-balanced test images (Fashion-MNIST, resized when --img-size asks)."""
    from rfd.data import FashionMNISTDataModule

    default = DEFAULT_CKPT if args.model == "test_resnet" else None
    ckpt = Path(args.checkpoint) if args.checkpoint else default
    kw = dict(in_chans=args.in_chans, img_size=args.img_size)
    if ckpt is not None and ckpt.is_file():
        model = rfd.create_model(args.model, 10, checkpoint=ckpt, **kw)
    else:
        print(f"note: no checkpoint at {ckpt}: benchmarking an untrained {args.model}")
        model = rfd.create_model(args.model, 10, **kw)
    dm = FashionMNISTDataModule(batch_size=256, img_size=args.img_size, channels=args.in_chans)
    dm.setup("test")
    x, y, ids = next(iter(dm.eval_dataloader(args.n_images, seed=0, batch_size=args.n_images)))
    calib = dm.calibration_dataloader(1000, seed=0, batch_size=256, n_eval=args.n_images)
    return model.to(args.device).eval(), x.to(args.device), y.to(args.device), ids, calib


def cells_for(args: argparse.Namespace, model: torch.nn.Module, nus: dict[str, float]) -> list:
    """The grid's cells: every defense (ν as calibrated) under every attack."""
    defenses = {d: protect(model, d, nu=nus[d], seed=0) for d in args.defenses.split(",")}
    attacks = {a: make_attack(a) for a in args.attacks.split(",")}
    return [Cell(dv, av, args.eps, args.queries, "vote", 1, 0, f"{dn}/{an}")
            for dn, dv in defenses.items() for an, av in attacks.items()]  # fmt: skip


def forward_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"precision": args.precision, "channels_last": args.channels_last,
            "compile": args.compile}  # fmt: skip


def run_share(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              ids: torch.Tensor, nus: dict[str, float], start: Any = None,
              handover: CoreHandover | None = None) -> dict[str, Any]:  # fmt: skip
    """One engine over images ``x``: its per-job outcomes, cell statistics and timings.

    ``start`` (a barrier) lines the processes of a multi-process run up after their warm-up, so
    that the wall time covers the grid alone; ``handover`` gives the cores of processes that end
    first to the others, as ``evaluate.py --devices N`` does.
    """
    fw = forward_settings(args)
    cells = cells_for(args, model, nus)
    probe = PlainProbe(model, x, args.batch, fw, args.probe_every)
    # the probe keeps its forward entered for the whole grid: leaving it after each timing
    # would restore the shared model's memory format under the engine (--channels-last)
    with probe.fwd:
        for _ in range(3):  # warm-up (and compilation) outside the timings
            probe.time_one()
        probe.times.clear()
        probe.spent = 0.0
        progress = probe if handover is None else handover.wrap(probe)
        engine = Engine(args.batch, progress=progress, **fw)
        if start is not None:
            start.wait()
        t0 = time.monotonic()  # system-wide: comparable across processes
        run = engine.run(cells, x, y, ids=ids.to(args.device))
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.monotonic()
        if handover is not None:
            handover.finish()
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731 (arrays pickle by value)
    return {
        "names": [c.name for c in cells],
        "cell": cpu(run.cell), "used": cpu(run.used), "verify": cpu(run.verify),
        "probe": cpu(run.probe), "success": cpu(run.success),
        "clean_correct": cpu(run.clean_correct),
        "stats": [st.as_dict() for st in run.stats],
        "forwards": run.forwards, "fill_total": run.fill_total,
        "forward_seconds": run.forward_seconds, "probe_times": probe.times,
        "t0": t0, "t1": t1, "probe_spent": probe.spent, "threads": torch.get_num_threads(),
    }  # fmt: skip


def _worker(rank: int, procs: int, threads: int, args: argparse.Namespace,
            nus: dict[str, float], start: Any, out: Any, cores: str) -> None:  # fmt: skip
    """One process of a ``--procs`` run: images ``rank::procs``, ``threads`` torch threads (more
    once others end: ``cores`` is the handover's shared folder)."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    model, x, y, ids, _ = load(args)
    share = slice(rank, None, procs)
    handover = CoreHandover(rank, procs, Path(cores))
    out.put((rank, run_share(args, model, x[share], y[share], ids[share], nus, start, handover)))


def run_procs(args: argparse.Namespace, procs: int, nus: dict[str, float]) -> list[dict[str, Any]]:
    """The grid in ``procs`` spawned processes, the cores split evenly between them. A process
    that dies ends the benchmark (the others are stopped) instead of leaving it waiting."""
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # a forked OpenMP runtime can hang; spawn starts clean
    threads = max(1, torch.get_num_threads() // procs)
    start, out = ctx.Barrier(procs), ctx.Queue()
    cores = tempfile.mkdtemp(prefix="rfd-bench-cores-")
    ps = [ctx.Process(target=_worker, args=(r, procs, threads, args, nus, start, out, cores))
          for r in range(procs)]  # fmt: skip
    for p in ps:
        p.start()
    shares: dict[int, dict[str, Any]] = {}
    try:
        while len(shares) < procs:
            try:
                rank, share = out.get(timeout=1.0)
                shares[rank] = share
            except queue.Empty:
                dead = [p.exitcode for p in ps if p.exitcode not in (None, 0)]
                if dead:
                    raise SystemExit(
                        f"a benchmark process failed with exit code {dead[0]}"
                    ) from None
    finally:
        for p in ps:
            if len(shares) < procs:
                p.terminate()  # a failed run: the others may wait at the start barrier forever
            p.join()
        shutil.rmtree(cores, ignore_errors=True)
    return [shares[r] for r in range(procs)]


def plain_time(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor) -> float:
    """The plain forward time per image at full batch in this process (every thread), outside any
    grid: the one-process reference a multi-process layout is held to."""
    probe = PlainProbe(model, x, args.batch, forward_settings(args), 1)
    with probe.fwd:
        for _ in range(3):
            probe.time_one()
        probe.times.clear()
        for _ in range(20):
            probe.time_one()
    return probe.per_image


def procs_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--procs takes a positive integer or auto, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="test_resnet")
    ap.add_argument("--checkpoint", default=None, help=f"default: {DEFAULT_CKPT} for test_resnet")
    ap.add_argument("--img-size", type=int, default=28)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--defenses", default="none,input,feature")
    ap.add_argument("--attacks", default="square,nes,signhunter,rays,signflip")
    ap.add_argument("--precision", default="32", choices=["32", "tf32", "bf16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    ap.add_argument(
        "--procs", type=procs_arg, default=1,
        help="processes sharing the images (CPU only; auto: one per core, as evaluate.py "
        "--devices N runs); the threads are split between them",
    )  # fmt: skip
    ap.add_argument("--probe-every", type=int, default=100, help="forwards between plain timings")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every front end does (rfd.settings.run_cli)
    if args.threads:
        torch.set_num_threads(args.threads)
    procs = args.procs
    if procs == "auto":
        procs = 1 if args.device != "cpu" else len(os.sched_getaffinity(0))
    if procs > 1 and args.device != "cpu":
        ap.error("--procs > 1 is for CPU runs (a GPU is one device: use --device cpu)")
    model, x, y, ids, calib = load(args)
    nus = {d: calibrate(model, d, data=calib, target_drop=0.02) if d in ("input", "feature")
           else 0.0 for d in args.defenses.split(",")}  # fmt: skip
    single = None
    if procs == 1:
        shares = [run_share(args, model, x, y, ids, nus)]
    else:
        single = plain_time(args, model, x)
        shares = run_procs(args, procs, nus)
    report(args, shares, single)
    return 0


def report(args: argparse.Namespace, shares: list[dict[str, Any]], single: float | None) -> None:
    """Print the per-cell table and the grid's totals, summed over the processes."""
    procs, names = len(shares), shares[0]["names"]
    cat = lambda k: torch.from_numpy(np.concatenate([s[k] for s in shares]))  # noqa: E731
    cell, used, success, clean = cat("cell"), cat("used"), cat("success"), cat("clean_correct")
    charged, verify, probe_rows = int(used.sum()), int(cat("verify").sum()), int(cat("probe").sum())
    rows = charged + verify + probe_rows
    forwards = sum(s["forwards"] for s in shares)
    t0 = min(s["t0"] for s in shares)
    # each process's wall time less its own probes; the grid ends with the last process
    wall = max(s["t1"] - t0 - s["probe_spent"] for s in shares)
    forward_seconds = sum(s["forward_seconds"] for s in shares) / procs
    # the machine's plain time per row in this layout: one process's forward time per image,
    # with ``procs`` processes forwarding side by side
    per_proc = statistics.median(t for s in shares for t in s["probe_times"])
    layout = per_proc / procs
    per_image = layout if single is None else min(layout, single)
    threads = shares[0]["threads"]
    where = f"{procs} processes x {threads} threads" if procs > 1 else f"{threads} threads"
    print(f"model {args.model} {args.img_size}px on {args.device} ({where}), "
          f"{len(args.defenses.split(','))} defenses x {len(args.attacks.split(','))} attacks, "
          f"{args.n_images} images, {args.queries} queries, batch {args.batch}, "
          f"precision {args.precision}")  # fmt: skip
    print(f"{'cell':22s} {'robust':>7s} {'fill':>6s} {'forwards':>9s} {'q/s':>9s}")
    for ci, name in enumerate(names):
        sel = cell == ci
        robust = float((clean[sel] & ~success[sel]).float().mean())
        # the processes ran side by side: their seconds count once, as evaluate.py's ranks do
        st = merge_stats([{**s["stats"][ci], "ranks": procs} for s in shares])
        fw, seconds = st["forwards"], st["seconds"]
        qps = float(used[sel].sum()) / seconds if seconds else float("nan")
        print(f"{name:22s} {robust:7.3f} {st['fill_sum'] / fw:6.3f} {fw:9d} {qps:9.0f}")
    n_probes = sum(len(s["probe_times"]) for s in shares)
    if procs > 1:  # a process that ends early hands its core to the others (CoreHandover)
        ends = ", ".join(f"{s['t1'] - t0 - s['probe_spent']:.1f}" for s in shares)
        # the shares' rows: a process that ends late had more work, or a slower machine
        share_rows = ", ".join(str(int(s["used"].sum() + s["verify"].sum() + s["probe"].sum()))
                               for s in shares)  # fmt: skip
        print(f"processes done after {ends} s, with {share_rows} rows")
    print(f"wall {wall:.1f} s, {forwards} forwards, {rows} rows ({charged} charged, {verify} "
          f"verification, {probe_rows} probe), plain forward {per_proc * 1e6:.1f} us/image per "
          f"process (median of {n_probes} timings during the run)")  # fmt: skip
    if single is not None:
        print(f"plain forward per image, machine-wide: {layout * 1e6:.1f} us in this layout, "
              f"{single * 1e6:.1f} us in one process of {torch.get_num_threads()} threads (timed "
              f"before the grid); efficiency is taken against the faster")  # fmt: skip
    plain = rows * per_image
    outside = wall - forward_seconds
    print(f"time: {plain:.1f} s plain forwards of the rows, {forward_seconds - plain:.1f} s "
          f"more inside forwards (defense noise, per-row plans), {outside:.1f} s outside "
          f"forwards ({outside / forwards * procs * 1e3:.2f} ms per forward: selection, attack "
          f"arithmetic, bookkeeping)")  # fmt: skip
    fill = sum(s["fill_total"] for s in shares) / forwards
    print(f"batch fill {fill:.3f} | forward share {forward_seconds / wall:.3f} | "
          f"efficiency {plain / wall:.3f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
