"""Theorem 1 of the paper, predicted and measured, and the first-order error it rests on (Fig. 3).

Theorem 1 (paper Section 3.3, proof in Appendix C). A random-search attacker compares
``L(f(x + u))`` with ``L(f(x))`` and keeps ``u`` if the loss went down. Under the defense each query
draws fresh noise at layer h, so the attacker sees ``L(g(h(x + u) + d1)) - L(g(h(x) + d2))``.
Linearizing both terms, the comparison is wrong ("the attacker takes the opposite action") when

    (grad_x . u + grad_h . (d1 - d2)) / (grad_x . u) < 0,

and with u ~ N(0, mu I), d1, d2 ~ N(0, nu I) independent, the ratio
``grad_h.(d1 - d2) / grad_x.u`` is Cauchy with scale ``gamma = sqrt(2 nu |grad_h|^2 / (mu |grad_x|^2))``
so that

    P(flip) = P(Cauchy(0, gamma) < -1) = 1/2 + arctan(-1 / gamma) / pi.

THE MAPPING TO rfd (exact):

* Paper ``nu`` is a VARIANCE; rfd's ``nu`` (``rfd.protect(..., nu=...)``) is the STANDARD
  DEVIATION: rfd adds ``nu * z``, z ~ N(0, I). So ``nu_paper = nu_rfd ** 2``. Functions here take
  rfd's std and square it.
* Paper ``mu`` is the VARIANCE of the attacker's probe u per input coordinate, in [0, 1] pixel
  units (rfd models normalize internally; gradients are taken w.r.t. the [0, 1] image):
    - ``probe="gaussian", scale=s``: u = s * z, so ``mu = s ** 2`` exactly (the theorem's setting).
    - NES (rfd ``fd_eta``): a probe compared with the current iterate is the Gaussian probe with
      ``s = fd_eta`` (``mu = fd_eta ** 2``); rfd's NES differences antithetic pairs
      ``L(x + eta z) - L(x - eta z)``, whose signal is ``2 eta grad.z``, i.e. ``mu = 4 fd_eta ** 2``.
    - Square-Linf (``probe="square", scale=p``): one window of side ``round(sqrt(p * H * W))`` set
      to ``x +- eps`` (one random sign per channel, as Square does), clipped to [0, 1]. Its
      isotropic equivalent is ``mu ~ p * eps ** 2`` from the clean image (each pixel moves by eps
      with probability p) and ``2 p eps ** 2`` from a vertex of the ball (a window pixel moves by 0
      or 2 eps). The window's signal ``grad.u`` is not Gaussian, so the theorem is applied with the
      per-image effective ``mu_eff = E[(grad.u)^2] / |grad|^2`` estimated from the probes drawn;
      ``p_linear`` (below) drops the Gaussian-probe assumption altogether.
    - SignHunter (``eps``): its first probe ``x + eps * sign`` has ``u_i = +-eps``, ``mu = eps ** 2``.
* ``grad_h`` is the gradient w.r.t. the whole output tensor of the noised module (every element
  gets independent noise); ``layer="input"`` is RND (noise on pixels), where grad_h = grad_x.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rfd.analysis.gradients import (
    INPUT,
    Data,
    collect,
    layer_gradients,
    margin_loss,
)
from rfd.models import eval_mode, model_device, resolve_layer

PROBES = ("gaussian", "square")


def theorem_ratio(nu: float | Tensor, mu: float | Tensor, grad_h: Tensor, grad_x: Tensor) -> Tensor:
    """Theorem 1's ratio ``2 nu_paper |grad_h|^2 / (mu |grad_x|^2)`` with ``nu_paper = nu ** 2``.

    Args:
        nu: rfd's noise standard deviation (``rfd.protect(nu=...)``).
        mu: the attacker's probe variance per input coordinate (see the module docstring).
        grad_h: ``||dL/dh(x)||_2`` per image.
        grad_x: ``||dL/dx||_2`` per image (pixel units).
    """
    nu_t = torch.as_tensor(nu, dtype=torch.float64)
    return (
        2 * nu_t**2 * grad_h.double() ** 2 / (torch.as_tensor(mu).double() * grad_x.double() ** 2)
    )


def flip_probability(ratio: Tensor | float) -> Tensor:
    """``P = 1/2 + arctan(-ratio ** -0.5) / pi``: Theorem 1's probability of a wrong comparison.

    0 without defense noise (ratio 0), 1/2 when the noise drowns the probe (ratio -> inf).
    """
    r = torch.as_tensor(ratio, dtype=torch.float64)
    return 0.5 - torch.atan(torch.rsqrt(r)) / math.pi


# --------------------------------------------------------------------------- probes


def square_side(p: float, h: int, w: int) -> int:
    """Square's window side for a pixel fraction ``p`` (Andriushchenko et al., clamped to [1, h-1])."""
    return int(min(max(round(math.sqrt(p * h * w)), 1), max(h - 1, 1)))


def sample_probes(
    x: Tensor,
    probe: str,
    scale: float,
    eps: float | None,
    generator: torch.Generator,
) -> Tensor:
    """The probed points ``x + u`` for every row of ``x``.

    ``gaussian``: ``x + scale * z`` (not clipped: the theorem's u is Gaussian on R^d).
    ``square``: a Square-Linf window of pixel fraction ``scale`` set to ``x +- eps`` (one sign per
    channel), clipped to [0, 1] as a real query would be.
    """
    if probe == "gaussian":
        return x + scale * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    if probe != "square":
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if eps is None:
        raise ValueError("the square probe needs eps (the attack's Linf radius)")
    n, c, h, w = x.shape
    s = square_side(scale, h, w)
    r = torch.randint(0, h - s + 1, (n,), generator=generator)
    cidx = torch.randint(0, w - s + 1, (n,), generator=generator)
    rows = (torch.arange(h).view(1, h) - r.view(n, 1)).clamp(min=-1)
    cols = (torch.arange(w).view(1, w) - cidx.view(n, 1)).clamp(min=-1)
    mask = ((rows >= 0) & (rows < s)).view(n, 1, h, 1) & ((cols >= 0) & (cols < s)).view(n, 1, 1, w)
    sign = torch.randint(0, 2, (n, c, 1, 1), generator=generator).to(x.dtype) * 2 - 1
    return (x + eps * sign * mask.to(x.dtype)).clamp(0.0, 1.0)


def probe_mu(probe: str, scale: float, eps: float | None = None) -> float:
    """The a priori isotropic probe variance mu (per pixel) of a probe, from the clean image."""
    if probe == "gaussian":
        return scale**2
    if probe == "square":
        return scale * (eps or 0.0) ** 2
    raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")


# --------------------------------------------------------------------------- Theorem 1


@dataclass
class Theorem1Result:
    """Predicted versus measured probability that one random-search comparison is flipped.

    Per image (tensors of length N):
        loss, correct: margin loss and clean correctness of the undefended model.
        grad_x, grad_h: ``||dL/dx||`` and ``||dL/dh||``.
        mu_eff: the probe variance used in the prediction (``mu`` for Gaussian probes; the
            per-image second moment of ``grad.u / |grad|`` for Square windows).
        p_theorem: Theorem 1's closed form at (nu, mu_eff).
        p_linear: the first-order flip probability without assuming a Gaussian probe:
            ``mean_u Phi(-|grad_x.u| / (sqrt(2) nu |grad_h|))`` over the probes drawn (equals
            ``p_theorem`` in expectation for Gaussian probes).
        p_measured: the fraction of draws where ``sign(L(f_rand(x+u)) - L(f_rand(x)))`` differs
            from the noiseless ``sign(L(f(x+u)) - L(f(x)))`` (ties of the latter skipped).
        sign_agree: fraction of draws where the noiseless difference has the sign of its
            linearization ``grad_x.u`` (how first-order the model is at this probe scale).
        n_valid: draws counted per image.
    """

    layer: str
    nu: float
    probe: str
    scale: float
    eps: float | None
    mu: float
    n_draws: int
    loss: Tensor
    correct: Tensor
    grad_x: Tensor
    grad_h: Tensor
    mu_eff: Tensor
    p_theorem: Tensor
    p_linear: Tensor
    p_measured: Tensor
    sign_agree: Tensor
    n_valid: Tensor

    @property
    def label(self) -> str:
        tail = f", eps={self.eps:g}" if self.probe == "square" else ""
        return f"{self.probe}({self.scale:g}{tail})"

    @property
    def mad(self) -> float:
        """Mean absolute difference between Theorem 1's prediction and the measurement."""
        return float((self.p_theorem - self.p_measured).abs().mean())

    @property
    def mad_linear(self) -> float:
        """Mean absolute difference between the first-order prediction and the measurement."""
        return float((self.p_linear - self.p_measured).abs().mean())

    @property
    def mad_if_exact(self) -> float:
        """The MAD expected from Monte-Carlo noise alone if the prediction were exact.

        A binomial frequency over n draws misses p by ``sqrt(2/pi) * sqrt(p(1-p)/n)`` on average
        (normal approximation); a ``mad`` near this value means agreement within noise.
        """
        p = self.p_theorem
        se = (p * (1 - p) / self.n_valid.clamp_min(1)).sqrt()
        return float(math.sqrt(2 / math.pi) * se.mean())

    def summary(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "nu_std": self.nu,
            "nu_paper_var": self.nu**2,
            "probe": self.label,
            "mu": self.mu,
            "mu_eff_median": float(self.mu_eff.median()),
            "n_images": len(self.loss),
            "n_draws": self.n_draws,
            "p_theorem_mean": float(self.p_theorem.mean()),
            "p_measured_mean": float(self.p_measured.mean()),
            "mad": self.mad,
            "mad_linear": self.mad_linear,
            "mc_se_mean": float(
                (self.p_measured * (1 - self.p_measured) / self.n_valid.clamp_min(1)).sqrt().mean()
            ),
            "mad_if_exact": self.mad_if_exact,
            "sign_agree_mean": float(self.sign_agree.mean()),
        }

    def per_image(self) -> list[dict[str, Any]]:
        keys = ("loss", "grad_x", "grad_h", "mu_eff", "p_theorem", "p_linear", "p_measured")
        rows = []
        for i in range(len(self.loss)):
            r: dict[str, Any] = {"probe": self.label, "image": i, "correct": bool(self.correct[i])}
            r |= {k: float(getattr(self, k)[i]) for k in keys}
            r |= {"sign_agree": float(self.sign_agree[i]), "n_valid": int(self.n_valid[i])}
            rows.append(r)
        return rows


def theorem1_check(
    model: nn.Module,
    data: Data,
    layer: str = "penultimate",
    nu: float = 0.1,
    probe: str = "gaussian",
    scale: float = 0.01,
    eps: float | None = None,
    n_draws: int = 200,
    n_images: int | None = 100,
    seed: int = 0,
    max_rows: int = 4096,
) -> Theorem1Result:
    """Theorem 1's flip probability against a Monte-Carlo measurement on the real model, per image.

    For each image, ``n_draws`` probes u are drawn; each is queried on the noiseless model and on
    the defended model (``rfd.protect(model, "feature", layer, nu)``; ``"input"`` noise for
    ``layer="input"``), with fresh noise for ``f_rand(x + u)`` and for ``f_rand(x)`` as in the
    proof. A flip is a draw where the defended comparison's sign differs from the noiseless one.

    Args:
        model: a classifier on [0, 1] images.
        data: a loader or an ``(x, y)`` pair.
        layer: the noised layer (a ``rfd.feature_layers`` name or ``"input"``).
        nu: rfd's noise standard deviation at that layer (paper's variance is ``nu ** 2``).
        probe: ``"gaussian"`` (``scale`` = std of u, ``mu = scale ** 2``) or ``"square"``
            (``scale`` = Square's pixel fraction p, with Linf radius ``eps``).
        scale: probe size, see ``probe``.
        eps: Linf radius for the square probe.
        n_draws: probes per image (the measurement's standard error is <= 0.5 / sqrt(n_draws)).
        n_images: images used.
        seed: seeds the probes and the defense's own noise generator.
        max_rows: rows per forward pass (memory bound).
    """
    from rfd.defenses import protect

    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if nu <= 0:
        raise ValueError(f"nu must be > 0 (a standard deviation), got {nu}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; valid: {', '.join(PROBES)}")
    if probe == "square" and (eps is None or eps <= 0):
        raise ValueError("the square probe needs eps > 0 (the attack's Linf radius)")
    if layer != INPUT:
        resolve_layer(model, layer)
    x, y = collect(data, n_images)
    gen = torch.Generator().manual_seed(seed)
    noisy = (
        protect(model, "input", nu=nu, seed=seed + 1)
        if layer == INPUT
        else protect(model, "feature", layers=layer, nu=nu, seed=seed + 1)
    )
    per: dict[str, list[Tensor]] = {k: [] for k in ("mu", "lin", "meas", "agree", "valid")}
    grads = []
    chunk = max(1, max_rows // n_draws)
    try:
        for i in range(0, len(y), chunk):
            xb, yb = x[i : i + chunk], y[i : i + chunk]
            g = layer_gradients(model, xb, yb, [layer], keep_input_grad=True)
            grads.append(g)
            out = _measure(model, noisy, xb, yb, g, layer, nu, probe, scale, eps, n_draws, gen)
            for k, v in out.items():
                per[k].append(v)
    finally:
        noisy.remove()
    loss = torch.cat([g.loss for g in grads])
    gx = torch.cat([g.grad_norm[INPUT] for g in grads])
    gh = torch.cat([g.grad_norm[layer] for g in grads])
    mu_eff = torch.cat(per["mu"])
    return Theorem1Result(
        layer=layer,
        nu=float(nu),
        probe=probe,
        scale=float(scale),
        eps=eps,
        mu=probe_mu(probe, scale, eps),
        n_draws=n_draws,
        loss=loss,
        correct=torch.cat([g.correct for g in grads]),
        grad_x=gx,
        grad_h=gh,
        mu_eff=mu_eff,
        p_theorem=flip_probability(theorem_ratio(nu, mu_eff, gh, gx)),
        p_linear=torch.cat(per["lin"]),
        p_measured=torch.cat(per["meas"]),
        sign_agree=torch.cat(per["agree"]),
        n_valid=torch.cat(per["valid"]),
    )


@torch.no_grad()
def _measure(
    model: nn.Module,
    noisy: nn.Module,
    x: Tensor,
    y: Tensor,
    g: Any,
    layer: str,
    nu: float,
    probe: str,
    scale: float,
    eps: float | None,
    n: int,
    gen: torch.Generator,
) -> dict[str, Tensor]:
    device = model_device(model)
    b = len(y)
    xr = x.repeat_interleave(n, 0)
    yr = y.repeat_interleave(n, 0).to(device)
    xp = sample_probes(xr, probe, scale, eps, gen)
    u = xp - xr
    grad = g.input_grad.repeat_interleave(n, 0)
    signal = (u * grad).flatten(1).sum(1).double().view(b, n)  # grad_x . u, per draw
    with eval_mode(model):
        l0 = margin_loss(model(x.to(device)), y.to(device)).cpu().repeat_interleave(n, 0)
        l1 = margin_loss(model(xp.to(device)), yr).cpu()
        r1 = margin_loss(noisy(xp.to(device)), yr).cpu()
        r0 = margin_loss(noisy(xr.to(device)), yr).cpu()
    d_true = (l1 - l0).view(b, n)
    d_rand = (r1 - r0).view(b, n)
    valid = d_true != 0
    flips = (torch.sign(d_rand) != torch.sign(d_true)) & valid
    agree = (torch.sign(d_true) == torch.sign(signal)) & valid
    n_valid = valid.sum(1)
    gx, gh = g.grad_norm[INPUT].double(), g.grad_norm[layer].double()
    if probe == "gaussian":
        mu_eff = torch.full((b,), scale**2, dtype=torch.float64)
    else:
        mu_eff = signal.square().mean(1) / gx.square().clamp_min(1e-300)
    tau = math.sqrt(2.0) * nu * gh.view(b, 1)  # std of grad_h . (d1 - d2)
    lin = torch.special.ndtr(-signal.abs() / tau.clamp_min(1e-300)).mean(1)
    return {
        "mu": mu_eff,
        "lin": lin,
        "meas": flips.sum(1).double() / n_valid.clamp_min(1),
        "agree": agree.sum(1).double() / n_valid.clamp_min(1),
        "valid": n_valid,
    }


# --------------------------------------------------------------------------- Figure 3


@dataclass
class FirstOrderResult:
    """Errors of the first-order approximations the analysis rests on (paper Figure 3).

    ``errors[source]`` holds ``|L(x + u) - L(x) - grad_x . u|`` for input probes (source
    ``"input s=<std>"``) and ``|L(g(h + d)) - L(g(h)) - grad_h . d|`` for the defense's feature
    noise (source ``"<layer> nu=<std>"``), one value per (image, draw); ``signals[source]`` the
    corresponding ``|grad . u|`` it is compared against.
    """

    errors: dict[str, Tensor]
    signals: dict[str, Tensor]
    n_images: int
    n_draws: int

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for src, err in self.errors.items():
            sig = self.signals[src]
            rel = err / sig.clamp_min(1e-30)
            out.append(
                {
                    "source": src,
                    "n": len(err),
                    "err_median": float(err.median()),
                    "err_p90": float(torch.quantile(err.double(), 0.9)),
                    "signal_median": float(sig.median()),
                    "rel_err_median": float(rel.median()),
                    "frac_rel_err_below_0.1": float((rel < 0.1).double().mean()),
                }
            )
        return out


def first_order_error(
    model: nn.Module,
    data: Data,
    scales: Sequence[float] = (0.001, 0.01, 0.05),
    n_draws: int = 20,
    n_images: int | None = 200,
    layer: str | None = None,
    nu: float | None = None,
    seed: int = 0,
    max_rows: int = 4096,
) -> FirstOrderResult:
    """``|L(x+u) - L(x) - grad.u|`` over images and Gaussian probes, and the same for feature noise.

    Args:
        model: a classifier on [0, 1] images.
        data: a loader or an ``(x, y)`` pair.
        scales: standard deviations of the input probes u ~ N(0, s^2 I) (pixel units; not
            clipped: this measures the Taylor error of the function, eq. 16).
        n_draws: probes per image and scale.
        n_images: images used.
        layer: also measure eq. 17's error for noise ``d ~ N(0, nu^2 I)`` added at this layer.
        nu: rfd's noise std at ``layer`` (required with ``layer``).
        seed: seeds the probes.
        max_rows: rows per forward pass.
    """
    if n_draws < 1 or not scales and layer is None:
        raise ValueError("need n_draws >= 1 and at least one scale or a layer")
    if any(s <= 0 for s in scales):
        raise ValueError(f"probe scales must be > 0, got {list(scales)}")
    if layer is not None and (nu is None or nu <= 0):
        raise ValueError("feature-noise error needs nu > 0 (rfd's noise std at the layer)")
    hidden = [] if layer is None or layer == INPUT else [layer]
    if hidden:
        resolve_layer(model, layer)
    x, y = collect(data, n_images)
    device = model_device(model)
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, list[Tensor]] = {}
    signals: dict[str, list[Tensor]] = {}
    sources = [(f"input s={s:g}", INPUT, s) for s in scales]
    if layer is not None:
        sources.append((f"{layer} nu={nu:.3g}", layer, float(nu)))
    chunk = max(1, max_rows // n_draws)
    for i in range(0, len(y), chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        g = layer_gradients(model, xb, yb, hidden, keep_input_grad=True, keep_layer_grads=True)
        xr = xb.repeat_interleave(n_draws, 0)
        yr = yb.repeat_interleave(n_draws, 0).to(device)
        l0 = g.loss.double().repeat_interleave(n_draws, 0)
        with torch.no_grad(), eval_mode(model):
            for src, where, s in sources:
                if where == INPUT:
                    u = s * torch.randn(xr.shape, generator=gen, dtype=xr.dtype)
                    lin = (u * g.input_grad.repeat_interleave(n_draws, 0)).flatten(1).sum(1)
                    l1 = margin_loss(model((xr + u).to(device)), yr).cpu()
                else:
                    gh = g.extra["layer_grad"].get(where)
                    if gh is None:
                        raise ValueError(f"layer {where!r} runs more than once per forward")
                    d = s * torch.randn((len(xr), *gh.shape[1:]), generator=gen, dtype=gh.dtype)
                    lin = (d * gh.repeat_interleave(n_draws, 0)).flatten(1).sum(1)
                    l1 = _loss_with_offset(model, where, xr.to(device), yr, d.to(device)).cpu()
                errors.setdefault(src, []).append((l1.double() - l0 - lin.double()).abs())
                signals.setdefault(src, []).append(lin.double().abs())
    return FirstOrderResult(
        errors={k: torch.cat(v) for k, v in errors.items()},
        signals={k: torch.cat(v) for k, v in signals.items()},
        n_images=len(y),
        n_draws=n_draws,
    )


def _loss_with_offset(model: nn.Module, layer: str, x: Tensor, y: Tensor, d: Tensor) -> Tensor:
    """Margin loss of ``g(h(x) + d)``: a forward hook adds the given offset at ``layer``."""

    def add(module: nn.Module, args: Any, out: Tensor, offset: Tensor) -> Tensor:
        return out + offset

    handle = model.get_submodule(resolve_layer(model, layer)).register_forward_hook(
        partial(add, offset=d)
    )
    try:
        return margin_loss(model(x), y)
    finally:
        handle.remove()
