"""What a defense is: the ``DEFENSES`` registry and the wrapper every defense shares.

A defense never edits the user's model. It wraps it: the wrapper holds the model as ``.base`` and
does its work only while its own ``forward`` runs, so the model called directly stays the
undefended model, bit for bit, before, during and after protection.

Each defense class declares what the rest of rfd needs to know about it, so that calibration,
the Lightning callback, the evaluation grid and the reports ask the class instead of matching
names: its ``title`` (the table row), whether it has a noise level ``nu`` to calibrate, whether it
acts at named ``layers``, and whether building it needs data. It describes its work per row
(:mod:`rfd.defenses.rows`): that one description serves both the standalone forward (noise drawn
from the defense's own generator) and the evaluation's shared forwards (noise keyed by image and
query). Defining a subclass with a ``name`` registers it: a new defense is one module, one
``configs/defense/<name>.yaml`` and its tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rfd.defenses.rows import RowForward
from rfd.models import eval_mode, model_device  # noqa: F401 (re-exported for older imports)
from rfd.rng import KeyedRNG

DEFENSES: dict[str, type[Defense]] = {}
DISTRIBUTIONS = ("gaussian", "laplace")
_ROW_OPS = ("row_input", "row_noise", "row_logits", "row_model")


def new_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator of its own, so defense noise never reads or resets the global RNG."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # OS entropy, not torch's global stream
    else:
        g.manual_seed(int(seed))
    return g


def check_nu(value: Any, what: str = "nu") -> float:
    """A finite, non-negative noise std as a float; raise ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
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


class Defense(nn.Module):
    """A classifier behind a defense; call it like the model it wraps.

    The wrapped model is registered as the submodule ``base`` so that ``.to()``, ``.eval()`` and
    friends reach it, but nothing is ever attached to it outside this wrapper's ``forward``.
    Attribute reads the wrapper does not answer fall through to ``base`` (e.g. ``num_classes``),
    so the wrapper can replace the model wherever the model was used.

    Class attributes a subclass declares:
        name: the registry key (``rfd.protect(defense=name)``, ``--defense name``).
        title: the row title in tables (the paper's: Base, Input, Feature, AAA).
        calibrated: it has a noise std ``nu`` that ``rfd.calibrate`` tunes to a target
            clean-accuracy drop; the constructor takes ``nu`` and checks it (``check_nu``): the
            one place a library value is validated.
        layered: it acts at named layers; the constructor takes ``layers``.
        order: position in ``DEFENSES`` (and so in "all" and in tables).

    Row operations (override any; the defaults leave rows untouched), see
    :mod:`rfd.defenses.rows`: ``row_input(x, rng)``, ``row_noise()``, ``row_logits(z)``,
    ``row_model(x, rng, forward)``.

    Attributes:
        nu: the noise standard deviation (0 for deterministic defenses).
        layers: where the defense acts (module paths, ``["input"]`` or ``["logits"]``).
        generator: the defense's own ``torch.Generator`` on the model's device.
        randomized: whether two identical queries can get different answers.
        base: the undefended model.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    calibrated: ClassVar[bool] = False
    layered: ClassVar[bool] = False
    order: ClassVar[int] = 100
    row_ops: ClassVar[frozenset[str]] = frozenset()
    # False: row_input is non-differentiable or masks gradients (e.g. JPEG's rounding); with BPDA
    # gradient attacks see the gradient of ``surrogate`` in its place (Athalye et al. 2018)
    differentiable: ClassVar[bool] = True
    # options naming a trained part's checkpoint (MagNet's autoencoder): a run's spec records
    # each file's content hash, so a part retrained in place is not mixed into a resumed run
    parts: ClassVar[tuple[str, ...]] = ()
    nu: Any = 0.0  # deterministic defenses; noise defenses override it with a checked property

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.row_ops = frozenset(
            op for op in _ROW_OPS if getattr(cls, op) is not getattr(Defense, op)
        )
        if "name" in cls.__dict__:
            if cls.name in DEFENSES and DEFENSES[cls.name] is not cls:
                raise ValueError(f"defense name {cls.name!r} registered twice")
            DEFENSES[cls.name] = cls

    def __init__(self, model: nn.Module, seed: int | None = None) -> None:
        super().__init__()
        if isinstance(model, Defense) and model.removed:
            raise ValueError("cannot protect a removed defense; protect its .base instead")
        self.base = model
        self.training = model.training  # mirror the model's mode without touching its modules
        self.seed = seed
        self.generator = new_generator(model_device(model), seed)
        self.layers: list[str] = []
        self.removed = False

    # -- what the registry asks ------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        nu: float | Sequence[float] | None = None,
        layers: str | Sequence[str] | None = None,
        seed: int | None = None,
        **options: Any,
    ) -> Defense:
        """Build from the settings every front end passes: ``nu`` and ``layers`` reach the
        constructor only when the class declares them, so callers never special-case names."""
        kwargs: dict[str, Any] = dict(options)
        if cls.calibrated:
            kwargs["nu"] = 0.0 if nu is None else nu
        if cls.layered and layers is not None:
            kwargs["layers"] = layers
        return cls(model, seed=seed, **kwargs)

    @classmethod
    def needs_data(cls, layers: Any = None, options: dict[str, Any] | None = None) -> bool:
        """Whether building it with these settings needs clean data (e.g. to measure a scale)."""
        return False

    @classmethod
    def nu_guess(cls, model: nn.Module, layers: list[str], batches: list, options: dict) -> float:
        """A first noise std for calibration, in this defense's units."""
        return 0.05

    @property
    def randomized(self) -> bool:
        return False

    def noise_key(self) -> int:
        """The base key of this defense's keyed noise: its seed, or a draw from its generator
        when it has none (so repeated evaluations of an unseeded defense still differ)."""
        if self.seed is not None:
            return int(self.seed)
        return int(
            torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device)
        )

    # -- the defense per row -----------------------------------------------------------------
    def row_input(self, x: Tensor, rng: KeyedRNG) -> Tensor:
        """Transform input rows (each row's draws from ``rng``, keyed per row)."""
        return x

    def surrogate(self, x: Tensor) -> Tensor:
        """The differentiable stand-in for ``row_input`` under BPDA (default: the identity)."""
        return x

    def row_noise(self) -> list[Any]:
        """Noise to add at named layers: a list of :class:`rfd.defenses.rows.NoiseSpec`."""
        return []

    def row_logits(self, z: Tensor) -> Tensor:
        """Post-process logits rows."""
        return z

    def row_model(self, x: Tensor, rng: KeyedRNG, forward: Any) -> Tensor:
        """Answer rows with any number of calls of ``forward`` (the undefended base model):
        for defenses that need several base forwards per query (randomized smoothing)."""
        return forward(x)

    @property
    def forwards_per_query(self) -> float:
        """Base-model forwards (or forward-equivalents) the defender spends per query: the
        defender's cost of answering, reported beside the attacker's queries."""
        return 1.0

    # -- the module ------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.removed:
            raise RuntimeError(
                f"this {self.name!r} defense was removed; call its .base model, or protect again"
            )
        return self.defended_forward(x)

    def defended_forward(self, x: Tensor) -> Tensor:
        """Every row gets fresh noise: keys drawn from the defense's own generator."""
        if not self.row_ops:
            return self.base(x)
        g = self.generator_for(x.device)
        keys = torch.randint(-(2**62), 2**62, (x.shape[0],), generator=g, device=x.device)
        plan = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return RowForward(self.base, [self])(x, plan, keys)

    def remove(self) -> nn.Module:
        """Detach the defense for good and hand back the untouched model.

        Hooks only live during this wrapper's forward, so there is nothing left on the model; the
        flag makes any later call fail loudly rather than silently answer undefended.
        """
        self.removed = True
        return self.base

    def __enter__(self) -> Defense:
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

    @property
    def defense(self) -> str:
        """The registry name (kept for code that read ``.defense``)."""
        return self.name

    def extra_repr(self) -> str:
        return f"defense={self.name!r}, nu={self.nu}, layers={self.layers}"


Defended = Defense  # the name earlier releases used


class NoDefense(Defense):
    """The undefended model behind the same interface, as the baseline row of every table."""

    name = "none"
    title = "Base"
    order = 0
