"""Defenses against query-based black-box attacks, applied without touching the model.

``nu`` is everywhere the noise standard deviation: delta ~ N(0, nu^2 I).

    net = rfd.protect(model, defense="feature", layers="penultimate", nu=0.5, seed=0)
    with rfd.protect(model, defense="input", nu=0.02) as net:
        logits = net(x)
    nu = rfd.calibrate(model, defense="feature", data=calibration_loader, target_drop=0.02)

``DEFENSES`` maps each registered name to its class. Every module of this package is imported
here, and defining a :class:`Defense` subclass with a ``name`` registers it, so a new defense is
one module (plus its ``configs/defense/<name>.yaml`` and tests), nothing else.
"""

import importlib
import pkgutil

from rfd.defenses.base import DEFENSES, Defended, Defense, NoDefense

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
_sorted = sorted(DEFENSES.items(), key=lambda kv: (kv[1].order, kv[0]))
DEFENSES.clear()
DEFENSES.update(_sorted)

from rfd.defenses.aaa import AAA, aaa_logits  # noqa: E402
from rfd.defenses.api import calibrate, calibrate_report, protect  # noqa: E402
from rfd.defenses.calibration import Calibration, default_cache_dir  # noqa: E402
from rfd.defenses.callback import NoiseDefense  # noqa: E402
from rfd.defenses.noise import FeatureNoise, InputNoise, channel_std  # noqa: E402
from rfd.defenses.robustify import robustify  # noqa: E402
from rfd.defenses.rows import PRECISIONS, NoiseSpec, RowForward  # noqa: E402
from rfd.defenses.smoothing import certify  # noqa: E402

__all__ = [
    "AAA",
    "DEFENSES",
    "PRECISIONS",
    "Calibration",
    "Defended",
    "Defense",
    "FeatureNoise",
    "InputNoise",
    "NoDefense",
    "NoiseDefense",
    "NoiseSpec",
    "RowForward",
    "aaa_logits",
    "calibrate",
    "calibrate_report",
    "certify",
    "channel_std",
    "default_cache_dir",
    "protect",
    "robustify",
]
