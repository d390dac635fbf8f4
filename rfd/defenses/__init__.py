"""Defenses against query-based black-box attacks, applied without touching the model.

``nu`` is everywhere the noise standard deviation: delta ~ N(0, nu^2 I).

    net = rfd.protect(model, defense="feature", layers="penultimate", nu=0.5, seed=0)
    with rfd.protect(model, defense="input", nu=0.02) as net:
        logits = net(x)
    nu = rfd.calibrate(model, defense="feature", data=calibration_loader, target_drop=0.02)
"""

from rfd.defenses.aaa import AAA, aaa_logits
from rfd.defenses.api import DEFENSES, protect
from rfd.defenses.base import Defended, NoDefense
from rfd.defenses.calibration import Calibration, calibrate, calibrate_report, default_cache_dir
from rfd.defenses.callback import NoiseDefense
from rfd.defenses.noise import FeatureNoise, InputNoise, channel_std

__all__ = [
    "AAA",
    "DEFENSES",
    "Calibration",
    "Defended",
    "FeatureNoise",
    "InputNoise",
    "NoDefense",
    "NoiseDefense",
    "aaa_logits",
    "calibrate",
    "calibrate_report",
    "channel_std",
    "default_cache_dir",
    "protect",
]
