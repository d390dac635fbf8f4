"""rfd: randomized feature defense against query-based black-box attacks, and its measurement.

The public API (kept stable; the project's checks call it)::

    model = rfd.create_model("resnet18", num_classes=10)
    rfd.feature_layers(model)
    net = rfd.protect(model, defense="feature", layers="penultimate", nu=0.5)
    nu = rfd.calibrate(model, defense="feature", layers="penultimate", data=loader, target_drop=0.02)
    res = rfd.attack(net, images, labels, attack="square", norm="linf", eps=0.05, max_queries=1000)
    pred, radius = rfd.certify(model, images, sigma=0.25, n0=100, n=1000, alpha=0.001)
    x_released = rfd.robustify(model, images, delta=0.03, eps=0.03)
"""

from __future__ import annotations

from typing import Any

from rfd.models import ImageClassifier, create_model, feature_layers, resolve_layer

__all__ = [
    "ImageClassifier",
    "attack",
    "calibrate",
    "certify",
    "create_model",
    "feature_layers",
    "protect",
    "resolve_layer",
    "robustify",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Defenses and attacks import lazily so `import rfd` stays cheap for the CLI's --help.
    if name in ("protect", "calibrate", "certify", "robustify"):
        from rfd import defenses

        return getattr(defenses, name)
    if name == "attack":
        from rfd.attacks import attack

        return attack
    raise AttributeError(f"module 'rfd' has no attribute {name!r}")
