"""What an attack is: a per-image state machine that proposes queries and learns from replies.

Published attack code writes its own loop, counts its own queries and often gets them wrong
(adaptive Square charges one query per M forwards; NES and SignHunter forget to clip to [0, 1];
decision attacks judge success from a batch-summed distance). In rfd an attack owns none of that:
it describes ``init``, ``propose`` and ``observe`` on a named per-image state, and the engine
(:mod:`rfd.attacks.engine`) owns the loop, the budget, the forwards, EOT, the success criterion and
the bookkeeping, exactly once for every attack. Because the state is per image and the randomness
is keyed per image (:mod:`rfd.rng`), the engine may step any subset of images at any time and pack
their queries with other jobs' into full forward batches without changing any result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from rfd.metrics import records_from_tensors, summarize
from rfd.rng import KeyedRNG
from rfd.tensors import take

NORMS = ("linf", "l2")
CRITERIA = ("vote", "single", "none")
# which fooling queries count: every one the criterion confirms, or (the published code's rule for
# random-search and greedy attacks) only those that also lower the attack's incumbent loss
SUCCESS_RULES = ("any", "improved")
KINDS = ("score", "decision", "gradient")
VOTES, MAJORITY = 9, 5  # the paper's Appendix D.4: re-query 9 times, adversarial iff >= 5 wrong
_EPS_BY_SIZE = {224: (0.05, 5.0), 32: (0.05, 1.0), 28: (0.1, 2.0)}
SNAP = 1e-6  # float rounding allowed when deciding that a point lies inside the ball

State = dict[str, Tensor]

ATTACKS: dict[str, type[Attack]] = {}


def default_eps(img_size: int, norm: str) -> float:
    """The attack radius the literature uses for this image size (pixels in [0, 1]).

    224px follows the paper (0.05 Linf / 5 L2), 32px BlackboxBench's CIFAR10 setting (0.05 / 1.0),
    28px the usual Fashion-MNIST setting (0.1 / 2.0). Other sizes have no agreed radius, so the
    caller must choose one rather than get a silently transplanted value.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    if img_size not in _EPS_BY_SIZE:
        sizes = ", ".join(f"{s}px" for s in _EPS_BY_SIZE)
        raise ValueError(f"no default eps for {img_size}px images (known: {sizes}); pass eps=")
    return _EPS_BY_SIZE[img_size][NORMS.index(norm)]


def check_eps(eps: float, norm: str, image_shape: tuple[int, ...]) -> None:
    """Refuse a radius that contains every image: Linf eps >= 1, or an L2 eps beyond the diagonal
    of [0, 1]^d (robust accuracy would then only measure the attack's failures)."""
    if norm == "linf" and eps >= 1:
        raise ValueError(f"eps must be < 1 for norm linf: pixels lie in [0, 1] (got {eps})")
    if norm == "l2":
        diag = math.sqrt(math.prod(image_shape))
        if eps >= diag:
            raise ValueError(
                f"eps must be < {diag:.4g} for norm l2 on {'x'.join(map(str, image_shape))} "
                f"images: the diagonal of [0, 1]^d (got {eps})"
            )


def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` is set, else ``b``; ``mask`` has one flag per leading index.

    Exact: ``lerp`` with 0/1 weights returns its endpoints bit for bit. It replaces
    ``torch.where``, which on CPU is an order of magnitude slower than arithmetic for float
    images (a mixed bool/float kernel) and would dominate an attack's own cost.
    """
    w = mask.to(a.dtype).view(*mask.shape, *[1] * (a.dim() - mask.dim()))
    return torch.lerp(b, a, w)


def bracket_stuck(lo: Tensor, hi: Tensor) -> Tensor:
    """Whether a bisection bracket can no longer shrink in its dtype (the midpoint is one end).

    Published boundary searches use float64 tolerances; on float32 brackets they can lie below
    the spacing (HSJA's Linf ``theta * dist`` at 224 px, Sign-OPT's ``beta / 500`` at distances
    above 32), and the midpoint would then repeat one query for the rest of the budget.
    """
    half = (lo + hi) / 2
    return (half == lo) | (half == hi)


class Rows:
    """``state`` restricted to rows ``idx`` (``None``: all), each key gathered on first read.

    Attacks that walk images through phases step each phase's images separately; a phase reads a
    few of the state's keys, and gathering every key for every phase (image-sized ones included)
    would cost more than the phase's own arithmetic.
    """

    def __init__(self, state: State, idx: Tensor | None) -> None:
        self.state, self.idx = state, idx
        self._got: State = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._got:
            t = self.state[key]
            self._got[key] = t if self.idx is None else take(t, self.idx)
        return self._got[key]


def phase_rows(phase: Tensor) -> list[tuple[int, Tensor | None]]:
    """The phases present in ``phase`` (A,) in increasing order, each with the indices of its
    images, ``None`` when one phase holds every image (the common case: no gathers needed)."""
    counts = torch.bincount(phase).tolist()
    present = [ph for ph, k in enumerate(counts) if k]
    if len(present) == 1:
        return [(present[0], None)]
    return [(ph, (phase == ph).nonzero()[:, 0]) for ph in present]


class BudgetError(RuntimeError):
    """An attack asked for more queries than an image's budget allows."""


class AccessError(RuntimeError):
    """A decision-based attack asked for scores, which a hard-label attacker never sees."""


class View:
    """What an attack may know about the images it steps: originals, ball, budget left, its RNG.

    Attributes:
        x0: the original images (A, C, H, W) in [0, 1].
        eps, norm: the threat model.
        budget: the charged-query budget per image (all images of one attack share it).
        eot: forwards per query (each charged); ``total`` = queries the budget allows, the
            clean query included.
        remaining: (A,) queries each image may still send (EOT samples already divided out).
        step: (A,) how many steps each image has completed (its own clock).
        rng: per-image random stream for this step, keyed by (attack seed, image, step).
    """

    def __init__(
        self,
        x0: Tensor | Callable[[], Tensor],
        eps: float,
        norm: str,
        budget: int,
        remaining: Tensor,
        step: Tensor,
        rng: KeyedRNG | Callable[[], KeyedRNG],
        eot: int = 1,
    ) -> None:
        # x0 and rng may be given as thunks: the engine builds a view for every group of images
        # it steps, and most attacks read only part of it (gathers are the engine's main cost).
        self._x0, self._rng = x0, rng
        self.eps, self.norm, self.budget, self.eot = eps, norm, budget, eot
        self.remaining, self.step = remaining, step
        self._box: tuple[Tensor, Tensor] | Callable[[], tuple[Tensor, Tensor]] | None = None

    @property
    def x0(self) -> Tensor:
        if not isinstance(self._x0, Tensor):
            self._x0 = self._x0()
        return self._x0

    @property
    def rng(self) -> KeyedRNG:
        if not isinstance(self._rng, KeyedRNG):
            self._rng = self._rng()
        return self._rng

    @property
    def total(self) -> int:
        """Queries the whole budget allows (the charged clean query included)."""
        return self.budget // self.eot

    def __len__(self) -> int:
        return self.remaining.shape[0]

    def subset(self, idx: Tensor) -> View:
        """The view of images ``idx`` only (same step, same streams)."""
        v = View(
            lambda: take(self.x0, idx), self.eps, self.norm, self.budget,
            take(self.remaining, idx), take(self.step, idx), lambda: self.rng[idx], self.eot,
        )  # fmt: skip
        if self._box is not None:
            v._box = lambda: tuple(take(t, idx) for t in self._linf_box())
        return v

    @property
    def lower(self) -> Tensor:
        """Linf box ``[x - eps, x + eps] ∩ [0, 1]``, lower corner: the values projection uses."""
        return self._linf_box()[0]

    @property
    def upper(self) -> Tensor:
        return self._linf_box()[1]

    def _linf_box(self) -> tuple[Tensor, Tensor]:
        if self._box is None:
            self._box = ((self.x0 - self.eps).clamp_(min=0.0), (self.x0 + self.eps).clamp_(max=1.0))
        elif not isinstance(self._box, tuple):
            self._box = self._box()
        return self._box

    def project(self, x: Tensor) -> Tensor:
        """Points (A, C, H, W) or (A, R, C, H, W) onto their image's eps-ball and [0, 1].

        Exact, bit for bit, for points already inside, so an attack's stored point is the very
        point that was queried.
        """
        grouped = x.dim() == self.x0.dim() + 1
        if self.norm == "linf":
            lo, hi = self._linf_box()
            if grouped:
                lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
            return torch.clamp(x, min=lo, max=hi)
        x0 = self.x0.unsqueeze(1) if grouped else self.x0
        x = x.clamp(0.0, 1.0)
        d = x - x0
        norms = d.flatten(2 if grouped else 1).norm(dim=-1)
        out = norms > self.eps * (1 + SNAP)
        scale = (self.eps / norms.clamp(min=1e-12)).view(*norms.shape, 1, 1, 1)
        return select(out, (x0 + d * scale).clamp(0.0, 1.0), x)

    def inside(self, x: Tensor) -> Tensor:
        """Whether each point lies in its image's ball (up to float rounding)."""
        return (x - self.project(x)).flatten(x.dim() - 3).abs().amax(-1) <= SNAP


@dataclass
class Reply:
    """The answers to one step's queries, (A, R) per image and query.

    Gradient (white-box) attacks also read ``grad`` (A, R, C, H, W), the gradient of their loss
    with respect to the query (the EOT mean over the defense's noise), and ``loss`` (A, R).

    ``x`` holds the queries as they were sent (projected onto the ball for score attacks,
    clipped to [0, 1] for decision attacks), (A, R, C, H, W). Score attacks read ``margin`` (``z_y - max_{i != y} z_i`` of the EOT-mean logits; negative
    means misclassified) or ``logits``; decision attacks only ``adversarial`` (the EOT-majority
    label differs from the true label), and reading scores raises :class:`AccessError`.
    """

    adversarial: Tensor
    x: Tensor
    _margin: Tensor | None = None
    _logits: Tensor | None = None
    _grad: Tensor | None = None
    _loss: Tensor | None = None

    @property
    def margin(self) -> Tensor:
        if self._margin is None:
            raise AccessError("a decision-based attack may only see labels, not scores")
        return self._margin

    @property
    def logits(self) -> Tensor:
        if self._logits is None:
            raise AccessError("a decision-based attack may only see labels, not scores")
        return self._logits

    @property
    def grad(self) -> Tensor:
        if self._grad is None:
            raise AccessError("only gradient (white-box) attacks receive gradients")
        return self._grad

    @property
    def loss(self) -> Tensor:
        if self._loss is None:
            raise AccessError("only gradient (white-box) attacks receive their loss")
        return self._loss

    def rows(self, idx: Tensor) -> Reply:
        pick = lambda t: None if t is None else take(t, idx)  # noqa: E731
        return Reply(
            take(self.adversarial, idx), take(self.x, idx), pick(self._margin), pick(self._logits),
            pick(self._grad), pick(self._loss),
        )  # fmt: skip


class Attack:
    """A black-box attack: hyperparameters plus a per-image state machine; it never sees the model.

    Subclasses declare ``name``, ``title`` (table column), ``kind`` (``"score"``,
    ``"decision"`` or ``"gradient"``: white-box, each query also returns the gradient of the
    attack's ``loss``, a key of :data:`rfd.gradients.LOSSES`), the ``norms`` they support, per-norm ``defaults`` (mirrored in
    ``configs/attack/<name>.yaml``) and implement:

    - ``init(view) -> state``: the per-image state (a dict of tensors with leading dim A);
    - ``queries(remaining) -> (A,)``: how many queries the next step sends (default 1);
    - ``propose(view, state) -> (A, C, H, W)`` or ``(A, R, C, H, W)``: the next queries (rows
      beyond an image's ``queries`` are ignored and not charged); it may put scratch tensors
      (leading dim A) into ``state`` under keys ``init`` did not create, for ``observe``;
    - ``observe(view, state, reply) -> state``: learn from the answers (``state`` is the very
      dict ``propose`` saw; only the keys ``init`` created are kept);
    - ``best(view, state) -> (A, C, H, W)``: the point to report if an image is never fooled.

    Defining a subclass with a ``name`` registers it in :data:`ATTACKS`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    kind: ClassVar[str]
    norms: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, dict[str, Any]]]
    order: ClassVar[int] = 100  # position in ``ATTACKS`` (and so in "all" and in tables)
    # Constrained attacks keep their queries in the eps-ball (the engine projects them); others
    # (decision attacks, C&W L2) walk outside it and succeed only with a query inside.
    constrained: ClassVar[bool] = True
    loss: str = "margin"  # gradient attacks: the loss whose gradient each query returns
    min_queries: ClassVar[int] = 1  # fewest queries a step can send; an image stops below it
    # whether the attack draws from ``view.rng`` (its seed then changes its path); declared so the
    # invariant tests can check it without a list of names outside the attack's module
    uses_rng: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
                raise ValueError(f"attack name {cls.name!r} registered twice")
            if cls.kind not in KINDS:
                raise ValueError(f"attack {cls.name!r}: kind must be one of {KINDS}")
            if cls.kind == "decision":
                cls.constrained = False
            ATTACKS[cls.name] = cls

    def __init__(self, norm: str = "linf", **params: Any) -> None:
        # Subclasses list their hyperparameters explicitly (None = this norm's default) and pass
        # them here, so signatures document them and unknown names fail loudly.
        if norm not in self.norms:
            raise ValueError(
                f"attack {self.name!r} does not support norm {norm!r}; "
                f"supported: {', '.join(self.norms)}"
            )
        allowed = self.defaults[norm]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown {self.name} hyperparameter(s) {unknown}; valid: {sorted(allowed) or '[]'}"
            )
        self.norm = norm
        self.params = {**allowed, **{k: v for k, v in params.items() if v is not None}}
        for k, v in self.params.items():
            setattr(self, k, v)

    # -- the protocol ---------------------------------------------------------------------
    def queries(self, remaining: Tensor) -> Tensor:
        """Queries of the next step per image, given the queries each may still send."""
        return torch.ones_like(remaining)

    def init(self, view: View) -> State:
        raise NotImplementedError

    def propose(self, view: View, state: State) -> Tensor:
        raise NotImplementedError

    def observe(self, view: View, state: State, reply: Reply) -> State:
        raise NotImplementedError

    def best(self, view: View, state: State) -> Tensor:
        return view.x0

    def incumbent(self, view: View, state: State) -> Tensor | None:
        """The margin (A,) a fooling query must be below to count under ``success="improved"``,
        or None if this attack keeps no incumbent.

        Random-search and greedy attacks accept a candidate only when it lowers their stored
        loss, and their published code stops only at a fooling query it accepts: Square and
        SimBA return that stored loss; Parsimonious returns the threshold of its own early stop.
        The engine reads it before ``observe``; attacks returning None (gradient estimators,
        decision attacks) are judged by ``success="any"`` either way.
        """
        return None

    def column(self, eot: int = 1) -> str | None:
        """The table column of this attack, or None for "title + budget" (query attacks)."""
        return None

    def require_positive(self, *keys: str) -> None:
        """Refuse hyperparameters ``keys`` unless each is a finite number > 0: ``v > 0`` alone
        lets NaN through (a silent NaN attack) and inf (a step that jumps to the box's corner).
        One rule and one message for every attack's real-valued knobs."""
        for k in keys:
            v = getattr(self, k)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{self.name} {k} must be a finite number > 0, got {v!r}")

    def key(self) -> tuple[Any, ...]:
        """Identity of the hyperparameters: attacks with equal keys can share one state batch."""
        return (type(self), self.norm, tuple(sorted((k, repr(v)) for k, v in self.params.items())))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(norm={self.norm!r}{', ' if args else ''}{args})"


@dataclass
class AttackResult:
    """Per-image outcome of :func:`rfd.attack`, on the device of the input images.

    ``fooled_at`` is the charged-query count at which an image was first verified fooled (-1 if
    never); robust accuracy at any smaller budget follows from it without re-running the attack.
    Images misclassified before the attack have ``clean_correct=False``, ``success=False`` and
    their original as ``adv``; they count as not robust.
    """

    adv: Tensor
    success: Tensor
    queries: Tensor
    verify_queries: Tensor
    clean_correct: Tensor
    fooled_at: Tensor
    labels: Tensor
    probe: Tensor | None = None
    attack: str = ""
    norm: str = "linf"
    eps: float = 0.0
    max_queries: int = 0
    criterion: str = "vote"
    eot: int = 1
    seed: int = 0
    success_rule: str = "any"
    randomized: bool = False
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    padded_rows: int = 0

    @property
    def probe_queries(self) -> int:
        """Uncharged forwards spent detecting whether the model is randomized."""
        return int(self.probe.sum()) if self.probe is not None else 0

    def fooled_by(self, budget: int | None = None) -> Tensor:
        """Images fooled with at most ``budget`` charged queries (default: the whole budget)."""
        if budget is None:
            return self.success.clone()
        return self.success & (self.fooled_at <= budget)

    def robust_accuracy(self, budget: int | None = None) -> float:
        """Fraction of all images still correctly classified after ``budget`` queries."""
        robust = self.clean_correct & ~self.fooled_by(budget)
        return float(robust.float().mean()) if robust.numel() else float("nan")

    def robust_accuracy_curve(self, budgets: Sequence[int]) -> list[float]:
        """Robust accuracy at each budget: the robust-accuracy-versus-queries curve."""
        return [self.robust_accuracy(b) for b in budgets]

    def records(self) -> list[dict[str, Any]]:
        """One record per image in the names of :mod:`rfd.metrics` (``index`` = position)."""
        return records_from_tensors(
            label=self.labels, attack_clean_correct=self.clean_correct, success=self.success,
            queries=self.queries, fooled_at=self.fooled_at, verify_queries=self.verify_queries,
            probe_queries=self.probe if self.probe is not None else 0,
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """The settings and every metric of :func:`rfd.metrics.summarize`, in its names."""
        settings = {
            "attack": self.attack, "norm": self.norm, "eps": self.eps,
            "max_queries": self.max_queries, "criterion": self.criterion, "eot": self.eot,
            "success_rule": self.success_rule, "seed": self.seed, "randomized": self.randomized, "params": dict(self.params),
            "wall_seconds": self.seconds,
        }  # fmt: skip
        stats = self.stats or None
        return {**settings, **summarize(self.records(), [self.max_queries], stats)}
