"""``python -m rfd.analysis certify``: certified L2 accuracy of randomized smoothing vs radius.

Cohen, Rosenfeld, Kolter (ICML 2019), Figure/Table 1's measurement: CERTIFY
(:func:`rfd.defenses.smoothing.certify`) on images of the evaluation split; the certified accuracy
at radius r is the fraction of images whose smoothed prediction is correct, not abstained, and
certified at a radius >= r. Each certificate holds with probability >= 1 - alpha over the noise,
whatever the attacker does inside the radius, so unlike the query-attack tables this is a lower
bound on robust accuracy (L2), not a measurement against particular attacks.

    python -m rfd.analysis certify --config fmnist_gauss025 --sigma 0.25 --n-images 500

Writes ``certify_<run>_s<sigma>.{md,csv,json}`` (the table at ``--radii``),
``..._per_image.csv`` and ``.png`` (certified accuracy vs radius) under ``--out``. The base
model should be trained with Gaussian noise of the same sigma (``configs/fmnist_gauss*.yaml``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import NormalDist
from typing import Any

import torch

from rfd.settings import integer, list_of, number

COMMAND = "certify"
HELP = "randomized smoothing: certified L2 accuracy vs radius (Cohen et al. 2019)"
# 500 images x (100 + 1000) noisy forwards of the embedded default architecture: 90-110 s
# wall on the shared 2-core machine, one thread (measured for sigma 0.12, 0.25, 0.5)
N_IMAGES = 500
DEFAULT_RADII = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's own options (the model/data/output ones are shared)."""
    parser.add_argument("--sigma", type=number(gt=0), default=0.25, help="noise std (pixels)")
    parser.add_argument(
        "--n0", type=integer(1), default=100, help="selection samples per image (%(default)s)"
    )
    parser.add_argument(
        "--n", type=integer(1), default=1000, help="estimation samples per image (%(default)s)"
    )
    parser.add_argument(
        "--alpha",
        type=number(gt=0, lt=1),
        default=0.001,
        help="failure probability of each certificate (%(default)s)",
    )
    parser.add_argument(
        "--radii",
        type=list_of(number(ge=0)),
        default=DEFAULT_RADII,
        help="comma-separated L2 radii of the table (default: 0,0.25,0.5,0.75,1,1.5,2)",
    )


def certified_accuracy(good: torch.Tensor, radius: torch.Tensor, r: float) -> float:
    """Fraction of images predicted correctly and not abstained (``good``) whose certified radius
    is >= r."""
    return float((good & (radius >= r)).float().mean())


def run(args: argparse.Namespace, loaded: Any, n: int, meta: dict[str, Any]) -> dict[str, Path]:
    """Certify ``n`` evaluation images of ``loaded.model``; write the table, CSV and PNG."""
    from rfd.analysis.report import markdown_table, write_csv, write_table
    from rfd.defenses.smoothing import certify
    from rfd.models import model_device

    model, dm = loaded.model, loaded.datamodule
    device = model_device(model)
    t0 = time.perf_counter()
    labels, preds, radii, base, ids = [], [], [], [], []
    for batch in dm.eval_dataloader(n, args.seed, batch_size=args.batch_size):
        x, y, idx = batch[0].to(device), batch[1], batch[2]
        pred, rad = certify(
            model, x, args.sigma, args.n0, args.n, args.alpha, args.batch_size, args.seed, idx
        )
        with torch.no_grad():
            base.append(model(x).argmax(1).cpu())
        labels.append(y)
        preds.append(pred)
        radii.append(rad)
        ids.append(idx)
    seconds = time.perf_counter() - t0
    y, pred, rad, base_pred = (torch.cat(t) for t in (labels, preds, radii, base))
    abstain = pred == -1
    good = (pred == y) & ~abstain
    rows = [
        {
            "radius": r,
            "certified_acc": certified_accuracy(good, rad, r),
            "n_certified": int((good & (rad >= r)).sum()),
        }
        for r in args.radii
    ]
    summary = {
        "n_images": len(y),
        "smoothed_clean_acc": float(good.float().mean()),
        "abstain_rate": float(abstain.float().mean()),
        "base_clean_acc": float((base_pred == y).float().mean()),
        "median_radius_correct": float(rad[good].median()) if bool(good.any()) else 0.0,
        # the largest radius n samples can certify (all n votes for c_A): sigma Phi^-1(alpha^(1/n))
        "max_certifiable_radius": args.sigma * NormalDist().inv_cdf(args.alpha ** (1 / args.n)),
        "seconds": round(seconds, 1),
        "sigma": args.sigma,
        "n0": args.n0,
        "n": args.n,
        "alpha": args.alpha,
    }
    name = f"certify_{loaded.name}_s{args.sigma:g}"
    notes = (
        f"Smoothed classifier (CERTIFY, sigma {args.sigma:g}, n0 {args.n0}, n {args.n}, alpha "
        f"{args.alpha:g}) on {len(y)} evaluation images: clean accuracy (correct and not "
        f"abstained) {summary['smoothed_clean_acc']:.3f}, abstention rate "
        f"{summary['abstain_rate']:.3f}; the base model alone: {summary['base_clean_acc']:.3f}. "
        f"Each radius is certified with probability >= {1 - args.alpha:g}; no radius above "
        f"{summary['max_certifiable_radius']:.3f} can be certified with n={args.n} (all votes "
        f"for one class); {seconds:.0f} s."
    )
    files = write_table(
        rows,
        args.out,
        name,
        title=f"Certified L2 accuracy of randomized smoothing, {loaded.name}, sigma {args.sigma:g}",
        notes=notes,
        meta=meta | summary,
    )
    per_image = [
        {"index": int(i), "label": int(a), "prediction": int(p), "radius": float(r)}
        for i, a, p, r in zip(torch.cat(ids), y, pred, rad, strict=True)
    ]
    files["per_image"] = write_csv(per_image, Path(args.out) / f"{name}_per_image.csv")
    files["png"] = plot_certified(good, rad, rows, args, loaded.name, Path(args.out), name)
    print(markdown_table(rows), end="")
    print(notes)
    return files


def plot_certified(
    good: torch.Tensor, radius: torch.Tensor, rows: list[dict[str, Any]], args: Any, run: str,
    out: Path, name: str,
) -> Path:  # fmt: skip
    """Certified accuracy as a step function of the radius, the table's ``rows`` marked."""
    import matplotlib.pyplot as plt

    from rfd.analysis.report import save_figure

    marks = [row["radius"] for row in rows], [row["certified_acc"] for row in rows]
    top = max([*marks[0], float(radius.max()) if radius.numel() else 0.0])
    grid = torch.linspace(0, max(top, 1e-3) * 1.05, 400)
    curve = [certified_accuracy(good, radius, r) for r in grid.tolist()]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(grid.numpy(), curve, label=f"{run}, sigma {args.sigma:g}")
    ax.plot(*marks, "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out / f"{name}.png")
