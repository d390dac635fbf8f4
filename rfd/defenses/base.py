"""The defended-model wrapper every defense shares: own RNG, clean detach, drop-in attributes.

A defense never edits the user's model. It wraps it: the wrapper holds the model as ``.base`` and
does its work only while its own ``forward`` runs, so the model called directly stays the
undefended model, bit for bit, before, during and after protection.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

DISTRIBUTIONS = ("gaussian", "laplace")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless module)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for a measurement, then every submodule's own mode back (frozen BN included)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def new_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator of its own, so defense noise never reads or resets the global RNG."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # OS entropy, not torch's global stream
    else:
        g.manual_seed(int(seed))
    return g


def unit_noise(like: torch.Tensor, dist: str, generator: torch.Generator) -> torch.Tensor:
    """Zero-mean, unit-std noise shaped like ``like``; every element (so every sample) independent.

    Laplace is drawn as the difference of two Exp(1) variables (Laplace(0, 1)), divided by sqrt(2)
    so that both distributions share the same standard deviation and ``nu`` means the same thing.
    """
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    if dist == "gaussian":
        z = torch.randn(like.shape, generator=generator, device=like.device, dtype=dtype)
    else:
        e = torch.empty((2, *like.shape), device=like.device, dtype=dtype)
        e.exponential_(generator=generator)
        z = (e[0] - e[1]) / math.sqrt(2.0)
    return z.to(like.dtype)


def check_nu(value: Any, what: str = "nu") -> float:
    """A finite, non-negative noise std as a float; raise ``ValueError`` otherwise."""
    try:
        nu = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(nu) or nu < 0:
        raise ValueError(f"{what} must be a finite standard deviation >= 0, got {value!r}")
    return nu


def check_dist(dist: str) -> str:
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown noise distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")
    return dist


class Defended(nn.Module):
    """A classifier behind a defense; call it like the model it wraps.

    The wrapped model is registered as the submodule ``base`` so that ``.to()``, ``.eval()`` and
    friends reach it, but nothing is ever attached to it outside this wrapper's ``forward``.
    Attribute reads the wrapper does not answer fall through to ``base`` (e.g. ``num_classes``),
    so the wrapper can replace the model wherever the model was used.

    Attributes:
        defense: the defense name (``"none"``, ``"input"``, ``"feature"``, ``"aaa"``).
        nu: the noise standard deviation (0 for deterministic defenses).
        layers: where the defense acts (resolved module paths, ``["input"]`` or ``["logits"]``).
        generator: the defense's own ``torch.Generator`` on the model's device.
        randomized: whether two identical queries can get different answers.
        base: the undefended model.
    """

    defense = "none"

    def __init__(self, model: nn.Module, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(model, Defended) and model.removed:
            raise ValueError("cannot protect a removed defense; protect its .base instead")
        self.base = model
        self.training = model.training  # mirror the model's mode without touching its modules
        self.seed = seed
        self.generator = new_generator(model_device(model), seed)
        self.layers: list[str] = []
        self.removed = False

    @property
    def randomized(self) -> bool:
        return False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.removed:
            raise RuntimeError(
                f"this {self.defense!r} defense was removed; call its .base model, or protect again"
            )
        return self.defended_forward(x)

    def defended_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def remove(self) -> nn.Module:
        """Detach the defense for good and hand back the untouched model.

        Hooks only live during this wrapper's forward, so there is nothing left on the model; the
        flag makes any later call fail loudly rather than silently answer undefended.
        """
        self.removed = True
        return self.base

    def __enter__(self) -> Defended:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def reseed(self, seed: int) -> None:
        """Restart the noise stream from ``seed`` (calibration: common random numbers)."""
        self.seed = seed
        self.generator = new_generator(self.generator.device, seed)

    def generator_for(self, device: torch.device) -> torch.Generator:
        """The generator on ``device``; after a move, re-seeded from the old one (reproducibly)."""
        if self.generator.device != device:
            seed = torch.randint(
                0, 2**62, (1,), generator=self.generator, device=self.generator.device
            )
            self.generator = new_generator(device, int(seed.item()))
        return self.generator

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "base":
                raise
            return getattr(super().__getattr__("base"), name)

    def extra_repr(self) -> str:
        return f"defense={self.defense!r}, nu={getattr(self, 'nu', 0.0)}, layers={self.layers}"


class NoDefense(Defended):
    """The undefended model behind the same interface, as the baseline row of every table."""

    defense = "none"

    def __init__(self, model: nn.Module, seed: int | None = None) -> None:
        super().__init__(model, seed)
        self.nu = 0.0
