"""Attack efficiency: how much of an attack's wall time is spent in model forwards.

    python benchmarks/bench_attacks.py                       # embedded default, CPU, batch 256
    python benchmarks/bench_attacks.py --model vgg19 --img-size 224 --device cuda

efficiency = charged queries x (plain forward seconds per image at the same batch size) / attack
seconds, measured in the same run on the same defended model. 1.0 means the attack costs nothing
beyond the forwards it pays for; the target is >= 0.95 on CPU and >= 0.90 on a GPU.

Two further columns separate the attack's own overhead from things the formula also charges to
it: "incl. uncharged" adds the forwards the budget does not see (the 9-query majority votes and
the randomness probe); "fwd share" is the fraction of attack time measured inside model forwards
(timed around each forward), which is also immune to the smaller batches of a shrinking active
set and to other processes slowing the machine during the run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import rfd
from rfd.attacks import CRITERIA, NORMS

DEFAULT_CKPT = Path("runs/fmnist_default/best.ckpt")
SCORE_ATTACKS = ("square", "nes", "signhunter")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The embedded default from its checkpoint, else an untrained stand-in (timing is the same)."""
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    kw = dict(in_chans=args.in_chans, img_size=args.img_size)
    if ckpt is not None and ckpt.is_file():
        return rfd.create_model(args.model, args.num_classes, checkpoint=ckpt, **kw)
    print(f"warning: no checkpoint at {ckpt}; benchmarking an untrained {args.model}")
    return rfd.create_model(args.model, args.num_classes, **kw)


def load_images(args: argparse.Namespace, model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """Fashion-MNIST test images when present (the default model's data), else random images
    labelled by the model itself (so every image starts correctly classified)."""
    if args.img_size == 28 and args.in_chans == 1:
        try:
            from rfd.data import FashionMNISTDataModule

            n = -(-args.batch // 10) * 10  # the balanced subset needs a multiple of 10 classes
            dm = FashionMNISTDataModule(batch_size=n)
            dm.setup()
            x, y, _ = next(iter(dm.eval_dataloader(n, seed=0)))
            return x[: args.batch], y[: args.batch]
        except Exception as e:  # data not installed: timing does not need real images
            print(f"warning: Fashion-MNIST unavailable ({type(e).__name__}); using random images")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, args.in_chans, args.img_size, args.img_size, generator=gen)
    with torch.no_grad():
        y = model.to(args.device)(x.to(args.device)).argmax(1).cpu()
    return x, y


def feature_spread(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Std of the penultimate features on ``x``: a scale for nu when no calibration is given."""
    from rfd.models import resolve_layer

    feats: list[torch.Tensor] = []
    mod = model.get_submodule(resolve_layer(model, "penultimate"))
    h = mod.register_forward_hook(lambda m, i, o: feats.append(o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return float(feats[0].float().std())


class Timed(torch.nn.Module):
    """Accumulates the wall time spent inside the wrapped model's forwards."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        out = self.net(x)
        sync()
        self.seconds += time.perf_counter() - t
        return out


def forward_seconds(net: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    """Median seconds of one plain forward of the whole batch."""
    times = []
    with torch.no_grad():
        net(x)
        for _ in range(reps):
            if x.is_cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            net(x)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=None, help="default: 1 at 28px, else 3")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--nu", type=float, default=None, help="default: 0.25 x feature spread")
    p.add_argument("--norm", default="linf", choices=NORMS)
    p.add_argument("--criterion", default="vote", choices=CRITERIA)
    p.add_argument("--attacks", nargs="+", default=list(SCORE_ATTACKS))
    p.add_argument("--reps", type=int, default=10, help="timed plain forwards per measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.in_chans is None:
        args.in_chans = 1 if args.img_size == 28 else 3
    if args.model != "test_resnet" and args.checkpoint == str(DEFAULT_CKPT):
        args.checkpoint = None
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda requested but no CUDA device is available")
        return 2
    torch.backends.cudnn.benchmark = args.device == "cuda"

    model = build_model(args).to(args.device).eval()
    x, y = load_images(args, model)
    x, y = x.to(args.device), y.to(args.device)
    nu = args.nu if args.nu is not None else 0.25 * feature_spread(model, x)
    net = rfd.protect(model, defense="feature", layers="penultimate", nu=nu, seed=0)
    print(
        f"model={args.model} img={args.img_size}px device={args.device} batch={len(x)} "
        f"threads={torch.get_num_threads()} queries={args.queries} nu={nu:.4g} "
        f"criterion={args.criterion} norm={args.norm}"
    )
    header = f"{'attack':<11}{'seconds':>9}{'charged':>10}{'uncharged':>10}{'fwd ms/img':>11}"
    print(header + f"{'robust':>8}{'efficiency':>12}{'incl. uncharged':>17}{'fwd share':>11}")
    worst = float("inf")
    for name in args.attacks:
        t_before = forward_seconds(net, x, args.reps)
        timed = Timed(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = rfd.attack(
                timed, x, y, attack=name, norm=args.norm, max_queries=args.queries,
                criterion=args.criterion, seed=0,
            )  # fmt: skip
        t_after = forward_seconds(net, x, args.reps)
        per_img = (t_before + t_after) / 2 / len(x)
        charged = int(res.queries.sum())
        uncharged = int(res.verify_queries.sum()) + res.probe_queries
        eff = charged * per_img / res.seconds
        eff_all = (charged + uncharged) * per_img / res.seconds
        worst = min(worst, eff)
        print(
            f"{name:<11}{res.seconds:>9.2f}{charged:>10d}{uncharged:>10d}{per_img * 1e3:>11.4f}"
            f"{res.robust_accuracy():>8.3f}{eff:>12.3f}{eff_all:>17.3f}"
            f"{timed.seconds / res.seconds:>11.3f}"
        )
    target = 0.95 if args.device == "cpu" else 0.90
    print(f"worst efficiency {worst:.3f} (target >= {target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
