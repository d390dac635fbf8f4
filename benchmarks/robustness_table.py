"""Robust accuracy of the trained default under every attack: none / input / feature defense.

    python benchmarks/robustness_table.py            # 100 test images, 1000 queries, vote, Linf

The protocol is the paper's on the embedded Fashion-MNIST default: class-balanced test images
(``eval_dataloader(n, seed=0)``), eps = the 28px default (0.1 Linf), the 9-query majority vote,
noise std calibrated to a 2% clean-accuracy drop on the disjoint calibration split. Robust
accuracy is over all evaluated images (misclassified clean images count as not robust).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import rfd
from rfd.attacks import ATTACKS
from rfd.data import FashionMNISTDataModule


def clean_accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int) -> float:
    """Mean accuracy over several noisy passes (one pass suffices for a deterministic model)."""
    with torch.no_grad():
        return sum(float((net(x).argmax(1) == y).float().mean()) for _ in range(passes)) / passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", default="runs/fmnist_default/best.ckpt")
    p.add_argument("--n-images", type=int, default=100)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--criterion", default="vote")
    p.add_argument("--target-drop", type=float, default=0.02)
    p.add_argument("--n-calibration", type=int, default=1000)
    p.add_argument("--defenses", nargs="+", default=["none", "input", "feature"])
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        print(f"error: {ckpt} is missing; train the default first (make demo)")
        return 2
    model = rfd.create_model("test_resnet", 10, in_chans=1, checkpoint=ckpt)
    dm = FashionMNISTDataModule(batch_size=args.n_images)
    dm.setup()
    x, y, _ = next(iter(dm.eval_dataloader(args.n_images, seed=0)))
    calib = dm.calibration_dataloader(args.n_calibration, seed=0, n_eval=1000)

    rows = []
    for defense in args.defenses:
        nu = 0.0
        if defense in ("input", "feature"):
            nu = rfd.calibrate(
                model, defense=defense, layers="penultimate", data=calib,
                target_drop=args.target_drop,
            )  # fmt: skip
        net = rfd.protect(model, defense=defense, layers="penultimate", nu=nu, seed=0)
        row = {"defense": defense, "nu": nu, "clean": clean_accuracy(net, x, y, 10)}
        for attack in args.attacks:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = rfd.attack(
                    net, x, y, attack=attack, norm="linf", eps=None, max_queries=args.queries,
                    criterion=args.criterion, seed=0,
                )  # fmt: skip
            row[attack] = res.robust_accuracy()
            s = res.summary()
            print(
                f"{defense:>8} nu={nu:.4g} {attack:<10} robust={row[attack]:.2f} "
                f"clean(criterion)={s['clean_accuracy']:.2f} "
                f"mean queries (fooled)={s['mean_queries_success']:.0f} "
                f"{time.perf_counter() - t:.0f}s",
                flush=True,
            )
        rows.append(row)

    print(
        f"\nRobust accuracy (%), {args.n_images} test images, {args.queries} queries, "
        f"criterion {args.criterion}, Linf eps 0.1"
    )
    print("| defense | nu | clean acc | " + " | ".join(args.attacks) + " |")
    print("| --- " * (3 + len(args.attacks)) + "|")
    for r in rows:
        cells = " | ".join(f"{100 * r[a]:.0f}" for a in args.attacks)
        print(f"| {r['defense']} | {r['nu']:.4g} | {100 * r['clean']:.1f} | {cells} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
