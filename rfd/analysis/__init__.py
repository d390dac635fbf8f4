"""Why feature noise works: the paper's theory as tools to run on your own model.

    from rfd import analysis
    r = analysis.gradient_norm_ratios(model, loader)                 # Figure 1
    m = analysis.robustness_magnitude(model, loader)                 # Figure 2, Section 3.5
    t = analysis.theorem1_check(model, loader, layer="penultimate", nu=0.3, scale=0.01)
    t.mad                                                            # Theorem 1 vs measurement
    layer = analysis.auto_layer(model, calibration_loader)           # layers="auto"
    s = analysis.layer_sweep(model, eval_loader, calibration_loader) # Tables 6 and 14
    s = analysis.strength_sweep(model, eval_loader, calibration_loader)  # Table 3
    e = analysis.first_order_error(model, loader)                    # Figure 3

or from the shell: ``python -m rfd.analysis --help``.

Conventions (exact): rfd's ``nu`` is the noise STANDARD DEVIATION, delta ~ N(0, nu^2 I); the
paper's Theorem 1 writes N(0, nu I) with nu a variance, so ``nu_paper = nu ** 2``. The attacker's
``mu`` is the per-pixel VARIANCE of its probe u in [0, 1] pixel units (Gaussian probe of std s:
``mu = s ** 2``; NES antithetic pairs with step eta: ``mu = 4 eta ** 2``; Square-Linf with pixel
fraction p and radius eps: ``mu ~ p eps ** 2``; SignHunter: ``mu = eps ** 2``). See
:mod:`rfd.analysis.theorem`. Gradients are of the margin loss ``z_y - max_{i != y} z_i`` w.r.t. the
[0, 1] image (before the model's normalization, where input noise is added) and w.r.t. the whole
output tensor of a layer.
"""

from rfd.analysis.autolayer import LayerScores, auto_layer, layer_scores
from rfd.analysis.gradients import (
    INPUT,
    LayerGradients,
    MagnitudeResult,
    RatioResult,
    analysis_layers,
    dataset_gradients,
    gradient_norm_ratios,
    gradient_step,
    layer_gradients,
    margin_loss,
    predicted_nu,
    robustness_magnitude,
)
from rfd.analysis.sweeps import (
    STRENGTHS,
    LayerSweepResult,
    StrengthSweepResult,
    layer_sweep,
    mu_equivalent,
    strength_sweep,
)
from rfd.analysis.theorem import (
    PROBES,
    FirstOrderResult,
    Theorem1Result,
    first_order_error,
    flip_probability,
    probe_mu,
    sample_probes,
    theorem1_check,
    theorem_ratio,
)

__all__ = [
    "INPUT",
    "PROBES",
    "STRENGTHS",
    "FirstOrderResult",
    "LayerGradients",
    "LayerScores",
    "LayerSweepResult",
    "MagnitudeResult",
    "RatioResult",
    "StrengthSweepResult",
    "Theorem1Result",
    "analysis_layers",
    "auto_layer",
    "dataset_gradients",
    "first_order_error",
    "flip_probability",
    "gradient_norm_ratios",
    "gradient_step",
    "layer_gradients",
    "layer_scores",
    "layer_sweep",
    "margin_loss",
    "mu_equivalent",
    "predicted_nu",
    "probe_mu",
    "robustness_magnitude",
    "sample_probes",
    "strength_sweep",
    "theorem1_check",
    "theorem_ratio",
]
