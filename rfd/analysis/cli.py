"""``python -m rfd.analysis SUBCOMMAND``: the paper's analyses on a trained model, as files.

Subcommands (each writes ``<out>/<name>.{md,csv,json,png}`` and prints the table):

    ratios          gradient-norm ratio per layer, clean and after one step (Figure 1)
    magnitude       robustness magnitude per layer (Figure 2)
    theorem1        Theorem 1's flip probability vs Monte-Carlo measurement (scatter + MAD)
    layer-sweep     noise each layer at equal clean drop, attack it (Tables 6 and 14; auto layer)
    strength-sweep  robust accuracy over the attacker's probe size, input vs feature (Table 3)
    first-order     first-order approximation error (Figure 3)
    auto-layer      the layer layers="auto" picks, with every layer's score
    certify         randomized smoothing: certified accuracy vs L2 radius (Cohen et al. 2019)
    robustify       preemptive robustification (Moon et al. 2022) vs white-box PGD/APGD

The model and its data come from :func:`rfd.runs.load_run`: ``--config NAME`` (a training config;
its checkpoint ``runs/<run_name>/best.ckpt`` unless ``--checkpoint``), ``--checkpoint PATH`` alone
(the run folder's ``config.yaml`` beside it, else the checkpoint's hyperparameters with
Fashion-MNIST), or neither: the embedded default, ``configs/fmnist_default.yaml`` with
``runs/fmnist_default/best.ckpt``. A plain state_dict needs ``--config`` to say which model it is.
Bad input (flags, a missing checkpoint, missing data) prints one line on stderr and exits with
status 2 (:func:`rfd.settings.run_cli`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rfd.runs import LoadedRun, load_run
from rfd.settings import (
    BadValue,
    OneLineParser,
    UsageError,
    check_writable,
    integer,
    list_of,
    number,
    run_cli,
    text,
)

__all__ = ["UsageError", "build_parser", "main", "preflight", "run"]

DEFAULT_OUT = Path("runs/analysis")
SUBCOMMANDS = (
    "ratios",
    "magnitude",
    "theorem1",
    "layer-sweep",
    "strength-sweep",
    "first-order",
    "auto-layer",
)
# Subcommands that live in their own module (one module per analysis, nothing else to edit):
# each defines COMMAND, HELP, N_IMAGES, add_arguments(parser) and
# run(args, loaded, n, meta) -> dict[str, Path] (the files written).
PLUGINS = ("rfd.analysis.certify", "rfd.analysis.robustify")
_positive_int = integer(1)
_positive_float = number(gt=0)
_fraction = number(gt=0, lt=1)
_csv = list_of(text)
_floats = list_of(_positive_float)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every subcommand shares the model/data/output options)."""
    common = OneLineParser(add_help=False)
    g = common.add_argument_group("model and data")
    g.add_argument(
        "--config",
        help="training config of the model (bare names resolve in configs/; default: the "
        "embedded fmnist_default.yaml unless --checkpoint is given alone)",
    )
    g.add_argument(
        "--checkpoint",
        type=Path,
        help="Lightning .ckpt or state_dict (default: runs/<run_name>/best.ckpt of the config)",
    )
    g.add_argument("--n-images", type=_positive_int, help="images analysed (subcommand default)")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (%(default)s)")
    g.add_argument("--seed", type=integer(0), default=0, help="data subset, probes and noise seed")
    g.add_argument("--batch-size", type=_positive_int, default=256)
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: attack loops run small batches, and on a loaded "
        "machine extra OpenMP threads spin and slow everything down)",
    )
    g.add_argument(
        "--wandb",
        choices=("disabled", "offline", "online"),
        default="disabled",
        help="also log tables and plots to a W&B run (default: %(default)s)",
    )

    parser = OneLineParser(
        prog="python -m rfd.analysis",
        description="The paper's analyses (Theorem 1, Figures 1-3, Tables 3, 6, 14) on a model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    sub.required = True

    p = sub.add_parser("ratios", parents=[common], help="gradient-norm ratios (Figure 1)")
    p.add_argument("--layers", type=_csv, help="comma-separated layers (default: all)")
    p.add_argument("--step", type=_positive_float, help="Linf step (default: attack eps)")

    p = sub.add_parser("magnitude", parents=[common], help="robustness magnitude (Figure 2)")
    p.add_argument("--layers", type=_csv, help="comma-separated layers (default: all)")
    p.add_argument("--quantile", type=_fraction, default=0.01, help="drop sized for (%(default)s)")

    p = sub.add_parser("theorem1", parents=[common], help="Theorem 1: predicted vs measured")
    p.add_argument("--layer", default="penultimate", help="noised layer, or 'input'")
    p.add_argument("--nu", type=_positive_float, help="noise std (default: calibrated)")
    p.add_argument("--target-drop", type=_fraction, default=0.02, help="for the default nu")
    p.add_argument(
        "--probes",
        type=_csv,
        default=["gaussian:0.005", "gaussian:0.05", "square:0.05", "square:0.3"],
        help="KIND:SCALE list; gaussian scale = std of u, square scale = p (default: %(default)s)",
    )
    p.add_argument("--eps", type=_positive_float, help="Linf radius of square probes")
    p.add_argument("--n-draws", type=_positive_int, default=200)

    p = sub.add_parser("layer-sweep", parents=[common], help="per-layer sweep (Tables 6, 14)")
    p.add_argument("--layers", type=_csv, help="comma-separated layers (default: all)")
    _attack_args(p)
    p.add_argument("--attack", default="square")
    p.add_argument("--no-base", action="store_true", help="skip the undefended baseline")

    p = sub.add_parser("strength-sweep", parents=[common], help="attacker strength (Table 3)")
    _attack_args(p)
    p.add_argument("--attacks", type=_csv, default=["square", "nes", "signhunter"])
    p.add_argument("--layer", default="penultimate", help="feature-noise layer")
    p.add_argument("--defenses", type=_csv, default=["input", "feature"])
    for name, help_ in (
        ("square", "Square p_init values"),
        ("nes", "NES fd_eta values"),
        ("signhunter", "SignHunter eps values"),
    ):
        p.add_argument(f"--{name}-values", type=_floats, help=help_ + " (default: paper grid)")

    p = sub.add_parser("first-order", parents=[common], help="first-order error (Figure 3)")
    p.add_argument("--scales", type=_floats, default=[0.001, 0.01, 0.05], help="probe stds")
    p.add_argument("--n-draws", type=_positive_int, default=20)
    p.add_argument("--layer", default="penultimate", help="also the feature noise here")
    p.add_argument("--nu", type=_positive_float, help="feature noise std (default: calibrated)")
    p.add_argument("--target-drop", type=_fraction, default=0.02, help="for the default nu")
    p = sub.add_parser("auto-layer", parents=[common], help="the layers='auto' pick")
    p.add_argument("--layers", type=_csv, help="candidate layers (default: all)")
    p.add_argument("--target-drop", type=_fraction, default=0.02, help="equal clean drop")
    p.add_argument("--step", type=_positive_float, help="Linf step (default: attack eps)")
    p.add_argument("--nu-source", choices=("calibrated", "predicted"), default="calibrated")
    for mod in plugins().values():
        mod.add_arguments(sub.add_parser(mod.COMMAND, parents=[common], help=mod.HELP))
    sub.metavar = "{" + ",".join([*SUBCOMMANDS, *plugins()]) + "}"
    return parser


def plugins() -> dict[str, Any]:
    """The subcommand modules of ``PLUGINS`` that exist, by command name."""
    import importlib
    import importlib.util

    out = {}
    for name in PLUGINS:
        if importlib.util.find_spec(name) is not None:
            mod = importlib.import_module(name)
            out[mod.COMMAND] = mod
    return out


def _attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-drop", type=_fraction, default=0.02, help="equal clean drop")
    p.add_argument("--max-queries", type=_positive_int, default=1000)
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=_positive_float, help="radius (default: by image size)")
    p.add_argument("--criterion", choices=("vote", "single", "none"), default="vote")
    p.add_argument("--n-calib", type=_positive_int, default=500, help="calibration images")
    p.add_argument("--n-passes", type=_positive_int, default=3, help="noisy passes per nu")


# Defaults chosen so each subcommand takes <= 3 minutes on 2 CPU cores for the embedded default
# (measured wall time on a shared, loaded 2-core machine, --threads 1: ratios 11 s, magnitude 7 s,
# theorem1 50-56 s, first-order 17 s, auto-layer 22 s, layer-sweep 85 s, strength-sweep 138 s).
# The sweeps' robust accuracies then rest on few images (standard error ~7 points at 40): raise
# --n-images for conclusions (layer-sweep at 200 images took 226 s).
N_IMAGES = {
    "ratios": 1000,
    "magnitude": 2000,
    "theorem1": 50,
    "layer-sweep": 40,
    "strength-sweep": 20,
    "first-order": 200,
    "auto-layer": 500,
}


# --------------------------------------------------------------------------- loading


def load(args: argparse.Namespace) -> LoadedRun:
    """The model and its data module (:func:`rfd.runs.load_run`); seeds torch with ``--seed``."""
    import torch

    run = load_run(args.config, args.checkpoint, stage=None)
    torch.manual_seed(args.seed)
    return run


# --------------------------------------------------------------------------- subcommands


def _eps(dm: Any, model: Any, norm: str, eps: float | None) -> float:
    if eps is not None:
        return eps
    from rfd.attacks import default_eps

    x = dm.test_set[0][0]
    return default_eps(int(x.shape[-1]), norm)


def _calibrated_nu(model: Any, dm: Any, layer: str, drop: float, args: Any, n_eval: int) -> float:
    """nu at ``drop``, calibrated on 500 images disjoint from the ``n_eval`` measured ones."""
    from rfd.analysis.gradients import INPUT
    from rfd.defenses import calibrate

    loader = dm.calibration_dataloader(500, args.seed, batch_size=args.batch_size, n_eval=n_eval)
    if layer == INPUT:
        return calibrate(model, "input", data=loader, target_drop=drop, n_passes=3)
    return calibrate(model, "feature", layers=layer, data=loader, target_drop=drop, n_passes=3)


def preflight(args: argparse.Namespace) -> LoadedRun:
    """Refuse what can be refused in seconds, and load the model and data for :func:`run`.

    The CLI calls this before it starts W&B: a bad ``--out`` (a file), a missing or corrupt
    checkpoint, missing data, an unknown layer, attack, defense or probe would otherwise be
    found after ``wandb.init`` had started a run (an offline run under /tmp/wandb when ``--out``
    is a file), and some of them (a layer-sweep's attack) only after minutes of calibration.

    Raises:
        UsageError, ValueError, FileNotFoundError: one line each (:func:`rfd.settings.run_cli`).
    """
    from rfd.analysis.gradients import analysis_layers

    check_writable(args.out, "--out")
    if args.command == "theorem1":
        for spec in args.probes:
            _probe(spec)
    if args.command == "strength-sweep":
        from rfd.analysis.sweeps import check_strength_sweep

        check_strength_sweep(args.attacks, args.defenses)  # ValueError: one line, exit 2
    if args.command == "layer-sweep":
        from rfd.attacks.api import make_attack

        make_attack(args.attack, args.norm)  # ValueError names the valid attacks
    loaded = load(args)
    for names in (getattr(args, "layers", None), getattr(args, "layer", None)):
        if names:  # ValueError lists the model's layers ("input" is always valid)
            analysis_layers(loaded.model, names)
    return loaded


def run(args: argparse.Namespace, loaded: LoadedRun | None = None) -> dict[str, Path]:
    """Run one subcommand; returns the files written. The thread setting is restored afterwards,
    so calling this from Python leaves the process as it was.

    Args:
        args: the parsed command line (:func:`build_parser`).
        loaded: the model and data when the caller has them already (:func:`preflight`, which
            the CLI runs before starting W&B); loaded from ``args`` otherwise.
    """
    import torch

    before = torch.get_num_threads()
    try:
        return _run(args, loaded)
    finally:
        torch.set_num_threads(before)


def _run(args: argparse.Namespace, loaded: LoadedRun | None) -> dict[str, Path]:
    import torch

    from rfd.analysis import gradients as G
    from rfd.analysis import report as R
    from rfd.analysis import sweeps as S
    from rfd.analysis import theorem as T

    torch.set_num_threads(args.threads)
    check_writable(args.out, "--out")  # before minutes of work, not after
    if loaded is None:
        loaded = load(args)
    model, dm = loaded.model, loaded.datamodule
    meta = {"checkpoint": str(loaded.checkpoint), "command": args.command, "seed": args.seed}
    extra = plugins()
    if args.command in extra:
        mod = extra[args.command]
        return mod.run(args, loaded, args.n_images or mod.N_IMAGES, meta)
    n = args.n_images or N_IMAGES[args.command]
    if args.command == "auto-layer":  # calibration images, never the evaluation subset
        eval_data = dm.calibration_dataloader(n, args.seed, batch_size=args.batch_size)
    else:
        eval_data = dm.eval_dataloader(n, args.seed, batch_size=args.batch_size)
    out = args.out
    files: dict[str, Path] = {}

    if args.command == "ratios":
        step = args.step or _eps(dm, model, "linf", None)
        res = G.gradient_norm_ratios(model, eval_data, args.layers, step=step)
        files |= R.write_table(
            res.rows(),
            out,
            "ratios",
            title=f"Gradient-norm ratio ||dL/dh|| / ||dL/dx|| (n={len(res.clean.loss)}, "
            f"step {step:g})",
            notes="Over correctly classified images. `change` = mean per-image ratio after one "
            "signed gradient step / before (Table 14). The input's ratio is 1 by definition.",
            meta=meta | {"step": step},
        )
        files["per_image"] = R.write_csv(res.per_image(), out / "ratios_per_image.csv")
        files["png"] = R.plot_ratios(res, out / "ratios.png")
        _print(res.rows())
    elif args.command == "magnitude":
        res = G.robustness_magnitude(model, eval_data, args.layers, quantile=args.quantile)
        files |= R.write_table(
            res.rows(),
            out,
            "magnitude",
            title=f"Robustness magnitude q{args.quantile:g}(L/||dL/dh||) * ||dL/dh|| "
            f"(n={len(res.grads.loss)})",
            notes="`q_ratio` is the quantile of L/||dL/dh|| over correctly classified images; "
            "`nu_pred` the noise std the first-order model predicts for that clean drop.",
            meta=meta | {"quantile": args.quantile},
        )
        files["png"] = R.plot_magnitude(res, out / "magnitude.png")
        _print(res.rows())
    elif args.command == "theorem1":
        probes = [_probe(s) for s in args.probes]
        eps = _eps(dm, model, "linf", args.eps)
        nu = args.nu or _calibrated_nu(model, dm, args.layer, args.target_drop, args, n)
        results = [
            T.theorem1_check(
                model,
                eval_data,
                layer=args.layer,
                nu=nu,
                probe=kind,
                scale=scale,
                eps=eps,
                n_draws=args.n_draws,
                n_images=n,
                seed=args.seed,
            )
            for kind, scale in probes
        ]
        rows = [r.summary() for r in results]
        files |= R.write_table(
            rows,
            out,
            "theorem1",
            title=f"Theorem 1 at {args.layer}: predicted vs measured flip probability",
            notes=T.__doc__.split("THE MAPPING TO rfd (exact):")[1].strip() if T.__doc__ else "",
            meta=meta | {"nu_std": nu, "eps": eps},
        )
        files["per_image"] = R.write_csv(
            [row for r in results for row in r.per_image()], out / "theorem1_per_image.csv"
        )
        files["png"] = R.plot_theorem1(results, out / "theorem1.png")
        _print(rows)
    elif args.command == "layer-sweep":
        res = S.layer_sweep(
            model,
            eval_data,
            dm.calibration_dataloader(args.n_calib, args.seed, args.batch_size, n_eval=n),
            layers=args.layers,
            target_drop=args.target_drop,
            attack=args.attack,
            norm=args.norm,
            eps=args.eps,
            max_queries=args.max_queries,
            criterion=args.criterion,
            n_images=n,
            n_calib=args.n_calib,
            n_passes=args.n_passes,
            seed=args.seed,
            include_base=not args.no_base,
            progress=_progress,
        )
        notes = (
            f"layers='auto' picks **{res.auto}** (highest score, from calibration images only); "
            f"the most robust hidden layer measured is **{res.best}**. Spearman rank correlation "
            f"with robust accuracy over the noised layers: score {res.spearman_score:.2f}, mean "
            f"ratio {res.spearman_ratio:.2f}, change of ratio {res.spearman_change:.2f}."
        )
        files |= R.write_table(
            res.rows,
            out,
            "layer_sweep",
            title=f"{args.attack} ({res.settings['norm']}, eps {res.settings['eps']:g}, "
            f"{args.max_queries} queries, n={res.settings['n_images']}) with noise at one layer, "
            f"clean drop {args.target_drop:g}",
            notes=notes,
            meta=meta | res.settings | {"auto": res.auto, "best": res.best},
        )
        files["png"] = R.plot_layer_sweep(res.rows, out / "layer_sweep.png")
        _print(res.rows)
        print(notes)
    elif args.command == "strength-sweep":
        values = {
            a: getattr(args, f"{a}_values")
            for a in ("square", "nes", "signhunter")
            if getattr(args, f"{a}_values")
        }
        res = S.strength_sweep(
            model,
            eval_data,
            dm.calibration_dataloader(args.n_calib, args.seed, args.batch_size, n_eval=n),
            attacks=args.attacks,
            values=values,
            defenses=args.defenses,
            layer=args.layer,
            target_drop=args.target_drop,
            norm=args.norm,
            eps=args.eps,
            max_queries=args.max_queries,
            criterion=args.criterion,
            n_images=n,
            n_calib=args.n_calib,
            n_passes=args.n_passes,
            seed=args.seed,
            progress=_progress,
        )
        files |= R.write_table(
            res.rows,
            out,
            "strength_sweep",
            title=f"Robust accuracy over the attacker's probe size (clean drop "
            f"{args.target_drop:g}, {args.max_queries} queries, n={res.settings['n_images']})",
            notes="`mu`: isotropic probe variance (Square p·eps², NES 4·fd_eta², SignHunter "
            "eps²); `nu`: calibrated noise std.",
            meta=meta | res.settings | {"calibrations": res.calibrations},
        )
        files["png"] = R.plot_strength(res.rows, out / "strength_sweep.png")
        _print(res.rows)
    elif args.command == "first-order":
        nu = args.nu or _calibrated_nu(model, dm, args.layer, args.target_drop, args, n)
        res = T.first_order_error(
            model,
            eval_data,
            scales=args.scales,
            n_draws=args.n_draws,
            n_images=n,
            layer=args.layer,
            nu=nu,
            seed=args.seed,
        )
        files |= R.write_table(
            res.rows(),
            out,
            "first_order",
            title=f"First-order approximation error (n={res.n_images} images x "
            f"{res.n_draws} draws)",
            notes="Input rows: u ~ N(0, s² I) on pixels (eq. 16); the layer row: the defense's "
            "noise d ~ N(0, nu² I) at that layer (eq. 17). rel = error / |grad·u|.",
            meta=meta | {"nu_std": nu},
        )
        files["png"] = R.plot_first_order(res, out / "first_order.png")
        _print(res.rows())
    elif args.command == "auto-layer":
        from rfd.analysis.autolayer import layer_scores

        step = args.step or _eps(dm, model, "linf", None)
        res = layer_scores(
            model,
            eval_data,
            args.layers,
            target_drop=args.target_drop,
            step=step,
            n_images=n,
            nu=args.nu_source,
        )
        files |= R.write_table(
            res.rows(),
            out,
            "auto_layer",
            title=f"layers='auto': score = nu * median ||dL/dh|| / ||dL/dx|| after one step "
            f"({step:g}), clean drop {args.target_drop:g}, nu {res.nu_source}",
            notes=f"Picked: **{res.best}**.",
            meta=meta | {"best": res.best, "step": step},
        )
        _print(res.rows())
        print(f"auto layer: {res.best}")
    return files


def _probe(spec: str) -> tuple[str, float]:
    from rfd.analysis.theorem import PROBES

    kind, _, scale = spec.partition(":")
    if kind not in PROBES or not scale:
        raise UsageError(f"bad probe {spec!r}: expected KIND:SCALE with KIND in {PROBES}")
    try:
        return kind, _positive_float(scale)
    except BadValue as e:
        raise UsageError(f"probe scale in {spec!r} {e}") from None


def _print(rows: Sequence[dict[str, Any]]) -> None:
    from rfd.analysis.report import markdown_table

    print(markdown_table(rows), end="")


def _progress(line: str) -> None:
    print("  " + line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rfd.analysis``; returns the exit status (2: bad input)."""
    return run_cli(_main, None if argv is None else list(argv))


def _main(argv: list[str] | None) -> dict[str, Path]:
    from rfd.defenses.calibration import TargetUnreachable

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    loaded = preflight(args)  # bad input is refused before W&B starts a run
    wandb_run = None
    try:
        if args.wandb != "disabled":
            import wandb

            wandb_run = wandb.init(
                project="rfd",
                job_type="analysis",
                name=args.command,
                dir=str(args.out),
                mode=args.wandb,
                config={k: str(v) for k, v in vars(args).items()},
            )
        try:
            files = run(args, loaded)
        except TargetUnreachable as e:  # a request beyond the noise, not a failure
            raise UsageError(f"--target-drop: {e}; use a smaller value or a fixed --nu") from None
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    elapsed = time.perf_counter() - t0
    print(f"wrote {', '.join(str(p) for p in files.values())} in {elapsed:.1f} s")
    return files
