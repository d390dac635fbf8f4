"""Choose nu by the clean accuracy it costs, as the paper does (by hand there, automatically here).

The paper sets nu so that clean accuracy drops by about 1-2 % (ImageNet) or 2-4 % (CIFAR10) on a
small held-out set. rfd measures the drop as the mean over ``n_passes`` noisy passes on the
calibration split and finds nu by bracketing then bisection. Every evaluation restarts the
defense's generator from the same seed (common random numbers): with Gaussian noise the draws are
then ``nu * z`` for one fixed ``z``, so the measured drop is a deterministic, practically monotone
function of nu and bisection is well posed despite the noise.

This module is the core search for concrete layers. ``layers="auto"`` is resolved one level up,
by the public ``rfd.calibrate`` / ``calibrate_report`` in :mod:`rfd.defenses.api`: the rule
(:mod:`rfd.defenses.autolayer`) itself calibrates, so it imports this module, not the reverse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rfd.defenses.base import DEFENSES
from rfd.models import (
    check_inputs,
    eval_mode,
    file_hash,
    model_device,
    model_hash,
    resolve_layer,
)

AUTO = "auto"  # layers="auto": the layer rfd.defenses.autolayer.auto_layer ranks most robust
# Part of every cache key: bump it when the noise draws or the search change, so that a nu found
# under the old ones (a stale drop for the same key) is computed again instead of reused.
CACHE_VERSION = 2


@dataclass(frozen=True)
class Calibration:
    """A calibrated noise level and what it costs.

    Attributes:
        nu: the noise standard deviation found.
        drop: clean accuracy minus mean noisy accuracy at ``nu`` (a fraction, 0.02 = 2 points).
        drop_std: standard deviation of the per-pass drop across the ``n_passes`` passes.
        clean_acc: undefended accuracy on the calibration data.
        noisy_acc: mean defended accuracy at ``nu``.
        history: every ``(nu, drop)`` evaluated, in order, to audit the search.
        cached: whether this came from the on-disk cache.
        chosen: the layer ``layers="auto"`` picked, as ``rfd.protect`` names it (None when the
            layers were given): build the defense there, at the drop it was picked for.
    """

    nu: float
    drop: float
    drop_std: float
    clean_acc: float
    noisy_acc: float
    target_drop: float
    defense: str
    layers: list[str]
    n_samples: int
    n_passes: int
    seed: int
    history: list[tuple[float, float]] = field(default_factory=list)
    cached: bool = False
    chosen: str | None = None


class TargetUnreachable(RuntimeError):
    """No noise level tried reaches the target drop: a request beyond what the defense can do
    (front ends report it as a usage error), not a failure of the search.

    Attributes:
        nu: the strongest noise tried (the search's last and largest).
        drop: the drop measured there.
        target: the drop asked for.
    """

    def __init__(self, nu: float, drop: float, target: float) -> None:
        super().__init__(f"noise up to nu={nu:.4g} drops accuracy by {drop:.4f} < {target}")
        self.nu, self.drop, self.target = nu, drop, target


def default_cache_dir() -> Path:
    """``$RFD_CACHE_DIR/calibration``, else ``~/.cache/rfd/calibration``."""
    root = os.environ.get("RFD_CACHE_DIR") or Path.home() / ".cache" / "rfd"
    return Path(root) / "calibration"


def read_calibration_data(
    defense: str, data: Iterable[Any] | None, target_drop: float, n_passes: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Check the calibration arguments and read ``data`` once into ``(x, y)`` batches.

    Raises:
        ValueError: a defense with nothing to calibrate, no or empty data, or a bad target.
    """
    calibrated = [n for n, c in DEFENSES.items() if c.calibrated]
    if defense not in DEFENSES:
        raise ValueError(f"unknown defense {defense!r}; valid defenses: {', '.join(DEFENSES)}")
    if not DEFENSES[defense].calibrated:
        raise ValueError(
            f"defense {defense!r} has no noise level to calibrate; calibrated defenses: "
            f"{', '.join(calibrated)}"
        )
    if data is None:
        raise ValueError("calibration needs data: a DataLoader over the calibration split")
    if not 0 < target_drop < 1 or n_passes < 1:
        raise ValueError(f"need 0 < target_drop < 1, n_passes >= 1; got {target_drop}, {n_passes}")
    batches = [_xy(b) for b in data]
    if sum(len(y) for _, y in batches) == 0:
        raise ValueError("calibration data is empty")
    return batches


def calibrate_report(
    model: nn.Module,
    defense: str = "feature",
    layers: str | Sequence[str] = "penultimate",
    data: Iterable[Any] | None = None,
    target_drop: float = 0.02,
    n_passes: int = 5,
    tol: float = 1e-3,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    checkpoint: str | os.PathLike | None = None,
    nu_start: float | None = None,
    max_evals: int = 40,
    **opts: Any,
) -> Calibration:
    """The search behind ``rfd.calibrate`` for concrete layers; arguments as documented there.

    ``layers="auto"`` is not accepted here: :func:`rfd.defenses.api.calibrate_report` resolves it.
    """
    if layers == AUTO and defense in DEFENSES and DEFENSES[defense].layered:
        raise ValueError(
            'layers="auto" is resolved by rfd.calibrate / rfd.defenses.calibrate_report; '
            "the core calibration needs concrete layer names"
        )
    batches = read_calibration_data(defense, data, target_drop, n_passes)
    check_inputs(model, batches[0][0], batches[0][1])  # 0-255 pixels would calibrate nonsense
    n = sum(len(y) for _, y in batches)
    device = model_device(model)
    cls = DEFENSES[defense]
    names = [layers] if isinstance(layers, str) else list(layers)
    resolved = [resolve_layer(model, s) for s in names] if cls.layered else [defense]
    key = {
        "version": CACHE_VERSION,
        "model": file_hash(checkpoint) if checkpoint is not None else model_hash(model),
        "defense": defense,
        "layers": resolved,
        "target_drop": target_drop,
        "n_passes": n_passes,
        "n_samples": n,
        "data": _fingerprint(batches),
        "tol": tol,
        "seed": seed,
        "opts": {k: v for k, v in sorted(opts.items()) if k != "data"},
    }
    path = Path(cache_dir or default_cache_dir()) / f"{defense}-{_digest(key)}.json"
    if use_cache and (hit := _read_cache(path, key)) is not None:
        return hit

    with eval_mode(model), torch.inference_mode():
        clean = sum(_correct(model, x, y, device) for x, y in batches)
        if opts.get("scale") == "channel":
            opts.setdefault("data", batches)
        net = cls.build(model, nu=0.0, layers=layers, seed=seed, **opts)
        history: list[tuple[float, float, float]] = []

        def evaluate(nu: float) -> float:
            net.nu = nu
            net.reseed(seed)
            accs = [sum(_correct(net, x, y, device) for x, y in batches) for _ in range(n_passes)]
            drops = torch.tensor([(clean - a) / n for a in accs], dtype=torch.float64)
            std = float(drops.std()) if n_passes > 1 else 0.0
            history.append((nu, (clean * n_passes - sum(accs)) / (n * n_passes), std))
            return history[-1][1]

        guess = nu_start or cls.nu_guess(model, resolved, batches, opts)
        resolution = 0.5 / (n * n_passes)
        nu = _search(evaluate, guess, target_drop, max(tol, resolution), max_evals)
        net.remove()

    nu, drop, std = next(h for h in history if h[0] == nu)
    result = Calibration(
        nu=nu,
        drop=drop,
        drop_std=std,
        clean_acc=clean / n,
        noisy_acc=clean / n - drop,
        target_drop=target_drop,
        defense=defense,
        layers=resolved,
        n_samples=n,
        n_passes=n_passes,
        seed=seed,
        history=[(h[0], h[1]) for h in history],
    )
    if use_cache:
        _write_cache(path, key, result)
    return result


def _search(evaluate: Any, guess: float, target: float, tol: float, max_evals: int) -> float:
    """Bracket the target drop, then bisect in log nu until the drop is within ``tol``.

    Small drops grow roughly like a power of nu, so steps are taken on log-log scale: the bracket
    grows by a power-law extrapolation from the last two points (clamped to 1.1x-8x), and the split
    point inside it is interpolated between the ends' log drops (regula falsi), with a plain
    geometric midpoint whenever the bracket failed to halve. That keeps bisection's guarantee
    (at most twice its evaluations) while usually converging in a handful of evaluations.
    """
    lo, d_lo = 0.0, 0.0
    hi, d_hi = guess, evaluate(guess)
    evals, best = 1, (abs(d_hi - target), guess)
    while d_hi < target and best[0] > tol:
        if evals >= max_evals or hi > guess * 1e6:
            raise TargetUnreachable(hi, d_hi, target)
        # local power-law exponent from the last two points (2 until there are two)
        k = math.log(d_hi / d_lo) / math.log(hi / lo) if 0 < d_lo < d_hi else 2.0
        step = 1.1 * (target / d_hi) ** (1 / min(max(k, 1.0), 4.0)) if d_hi > 0 else 4.0
        lo, d_lo = hi, d_hi
        hi *= min(max(step, 1.1), 8.0)
        d_hi = evaluate(hi)
        evals += 1
        best = min(best, (abs(d_hi - target), hi))
    halve = False
    while best[0] > tol and evals < max_evals and (lo == 0 or hi / lo > 1 + 1e-4):
        if lo == 0:  # nothing below yet: power-law step down from hi
            mid = hi * min(max((target / d_hi) ** 0.5, 0.125), 0.9)
            width = math.inf
        else:
            width = math.log(hi / lo)
            if halve:
                frac = 0.5
            elif d_lo > 0:
                frac = math.log(target / d_lo) / math.log(d_hi / d_lo)
            else:
                frac = 1 - 0.5 * math.log(d_hi / target) / width
            mid = lo * math.exp(min(max(frac, 0.05), 0.95) * width)
        d = evaluate(mid)
        evals += 1
        best = min(best, (abs(d - target), mid))
        if d < target:
            lo, d_lo = mid, d
        else:
            hi, d_hi = mid, d
        halve = not halve and lo > 0 and math.log(hi / lo) > width / 2
    return best[1]


def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise ValueError("calibration data must yield (x, y) or (x, y, index) batches")
    return batch[0], torch.as_tensor(batch[1])


def _correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> int:
    return int((net(x.to(device)).argmax(1).cpu() == y).sum())


def _fingerprint(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    budget = 1 << 26  # hash at most 64 MiB of pixels: enough to tell calibration sets apart
    for x, y in batches:
        h.update(y.cpu().numpy().tobytes())
        raw = x.detach().cpu().contiguous().view(-1).view(torch.uint8)
        h.update(raw[: max(budget, 0)].numpy().tobytes())
        budget -= raw.numel()
    return h.hexdigest()[:16]


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_cache(path: Path, key: dict[str, Any]) -> Calibration | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or half-written: recompute
    if json.dumps(obj.get("key"), sort_keys=True, default=str) != json.dumps(
        key, sort_keys=True, default=str
    ):
        return None
    res = obj["result"]
    res["history"] = [tuple(h) for h in res["history"]]
    res["cached"] = True
    return Calibration(**res)


def _write_cache(path: Path, key: dict[str, Any], result: Calibration) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "result": asdict(result)}, indent=1, default=str))
    os.replace(tmp, path)  # atomic: concurrent runs never read a torn file
