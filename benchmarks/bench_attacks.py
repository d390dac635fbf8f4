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
Without a checkpoint (``--model`` other than the default) the model is untrained: then most
images fall within a few queries, the hardest case for keeping batches full.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import rfd
from rfd.attacks import Cell, Engine, make_attack
from rfd.defenses import calibrate, protect
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
        if p.forwards - self.last >= self.every:
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
    ap.add_argument("--probe-every", type=int, default=100, help="forwards between plain timings")
    args = ap.parse_args(argv)
    keep_freed_memory()  # as every front end does (rfd.settings.run_cli)
    if args.threads:
        torch.set_num_threads(args.threads)
    fw = {"precision": args.precision, "channels_last": args.channels_last, "compile": args.compile}
    model, x, y, ids, calib = load(args)
    defenses = {}
    for d in args.defenses.split(","):
        nu = calibrate(model, d, data=calib, target_drop=0.02) if d in ("input", "feature") else 0.0
        defenses[d] = protect(model, d, nu=nu, seed=0)
    attacks = {a: make_attack(a) for a in args.attacks.split(",")}
    cells = [Cell(dv, av, args.eps, args.queries, "vote", 1, 0, f"{dn}/{an}")
             for dn, dv in defenses.items() for an, av in attacks.items()]  # fmt: skip
    probe = PlainProbe(model, x, args.batch, fw, args.probe_every)
    for _ in range(3):  # warm-up (and compilation) outside the timings
        probe.time_one()
    probe.times.clear()
    probe.spent = 0.0
    engine = Engine(args.batch, progress=probe, **fw)
    t0 = time.perf_counter()
    run = engine.run(cells, x, y, ids=ids.to(args.device))
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0 - probe.spent
    per_image = probe.per_image
    charged, verify, probe_rows = int(run.used.sum()), int(run.verify.sum()), int(run.probe.sum())
    rows = charged + verify + probe_rows
    print(f"model {args.model} {args.img_size}px on {args.device} ({torch.get_num_threads()} threads), "
          f"{len(defenses)} defenses x {len(attacks)} attacks, {args.n_images} images, "
          f"{args.queries} queries, batch {args.batch}, precision {args.precision}")  # fmt: skip
    print(f"{'cell':22s} {'robust':>7s} {'fill':>6s} {'forwards':>9s} {'q/s':>9s}")
    for ci, c in enumerate(cells):
        st, sel = run.stats[ci], run.cell == ci
        robust = float((run.clean_correct[sel] & ~run.success[sel]).float().mean())
        qps = float(run.used[sel].sum()) / st.seconds if st.seconds else float("nan")
        print(
            f"{c.name:22s} {robust:7.3f} {st.fill_sum / st.forwards:6.3f} {st.forwards:9d} {qps:9.0f}"
        )
    print(f"wall {wall:.1f} s, {run.forwards} forwards, {rows} rows ({charged} charged, {verify} "
          f"verification, {probe_rows} probe), plain forward {per_image * 1e6:.1f} us/image "
          f"(median of {len(probe.times)} timings during the run)")  # fmt: skip
    plain, outside = rows * per_image, wall - run.forward_seconds
    print(f"time: {plain:.1f} s plain forwards of the rows, {run.forward_seconds - plain:.1f} s "
          f"more inside forwards (defense noise, per-row plans), {outside:.1f} s outside "
          f"forwards ({outside / run.forwards * 1e3:.2f} ms per forward: selection, attack "
          f"arithmetic, bookkeeping)")  # fmt: skip
    print(
        f"batch fill {run.fill_total / run.forwards:.3f} | forward share "
        f"{run.forward_seconds / wall:.3f} | efficiency {plain / wall:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
