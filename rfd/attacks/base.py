"""The query oracle: the only door between an attack and a model, plus the attack result.

Published attack code miscounts queries (adaptive Square charges one query per M forwards),
forgets to clip to [0, 1] (NES, SignHunter) and judges decision attacks by a batch-summed
distance. Putting counting, budgets, clipping, the epsilon ball, access rights (scores versus
labels), EOT averaging and the success criterion in one object makes each of them exact once, for
every attack, and testable on its own. Attacks never hold the model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("linf", "l2")
CRITERIA = ("vote", "single", "none")
KINDS = ("score", "decision")
VOTES, MAJORITY = 9, 5  # paper D.4: re-query 9 times, adversarial iff >= 5 are misclassified
_EPS_BY_SIZE = {224: (0.05, 5.0), 32: (0.05, 1.0), 28: (0.1, 2.0)}
_SNAP = 1e-6  # float rounding allowed when deciding that a point lies inside the ball


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


def select(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where ``mask`` is set, else ``b``; ``mask`` has one flag per leading index.

    Exact: ``lerp`` with 0/1 weights returns its endpoints bit for bit. It replaces
    ``torch.where``, which on CPU is an order of magnitude slower than arithmetic for float
    images (a mixed bool/float kernel) and would dominate an attack's own cost.
    """
    w = mask.to(a.dtype).view(*mask.shape, *[1] * (a.dim() - mask.dim()))
    return torch.lerp(b, a, w)


class BudgetError(RuntimeError):
    """An attack asked for a query that an image's budget (or the active set) does not allow."""


class AccessError(RuntimeError):
    """A decision-based attack asked for scores, which a hard-label attacker never sees."""


class QueryOracle:
    """Exact, batched black-box access to a (possibly randomized) model for one batch of images.

    A call sends ``x`` of shape (A, C, H, W), one query per image ``idx[a]`` (distinct indices),
    or (A, R, C, H, W), R queries per image (NES's probes). The oracle charges ``eot`` per query,
    refuses queries of finished images or beyond an image's budget (raising, so an attack that
    plans badly fails loudly instead of being silently truncated), clamps queries to [0, 1], and
    for score attacks projects them onto the epsilon ball. Decision attacks must walk in from
    outside the ball (RayS, SignFlip), so their queries are only clamped; a query counts as
    adversarial only if it lies inside the ball. A query that looks adversarial is settled by the
    criterion: ``"vote"`` re-queries it 9 times in one uncharged forward (all images that need it
    together), ``"single"``/``"none"`` accept it.

    Attributes:
        images, labels: the originals and their true labels (the attacker knows both).
        lower, upper: the Linf box ``[x - eps, x + eps] ∩ [0, 1]`` (``None`` for L2), exposed so
            attacks build vertices with exactly the values the projection uses.
        generator: the attacker's seeded stream; attacks draw all their randomness from it.
        queries, verify_queries: charged and uncharged (verification) queries per image.
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        *,
        kind: str,
        norm: str,
        eps: float,
        max_queries: int,
        criterion: str = "vote",
        eot: int = 1,
        seed: int = 0,
        max_batch: int = 512,
    ) -> None:
        self._model = model
        self.kind, self.norm, self.eps, self.criterion = kind, norm, float(eps), criterion
        self.max_queries, self.eot, self.max_batch = int(max_queries), int(eot), int(max_batch)
        self.device = images.device
        self.images = images.contiguous()
        self.labels = labels.to(self.device, torch.long)
        self.n = n = images.shape[0]
        if norm == "linf":
            self.lower = (self.images - self.eps).clamp_(min=0.0)
            self.upper = (self.images + self.eps).clamp_(max=1.0)
        else:
            self.lower = self.upper = None
        z = torch.zeros(n, dtype=torch.long, device=self.device)
        self.queries, self.verify_queries = z.clone(), z.clone()
        self.fooled_at = torch.full_like(z, -1)
        self.success = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.clean_correct = torch.ones_like(self.success)
        self.open = torch.zeros_like(self.success)  # clean-correct, not yet fooled
        self.adv, self.best = self.images.clone(), self.images.clone()
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.randomized = False
        self.probe_queries = 0
        self._cache: tuple[Tensor, tuple[Tensor, ...]] | None = None
        # Hot-path bookkeeping that spares tensor ops: `_events` counts changes of the open set,
        # `_spent` bounds from above the charged queries of any open image, and `_valid` holds
        # the last idx tensor found distinct and all open (with `_events` then, and its counts).
        # Attacks reuse one idx tensor until their set shrinks, so most calls skip the checks.
        self._events, self._spent = 0, 0
        self._valid: tuple[Tensor, int, Tensor] | None = None

    # ------------------------------------------------------------------ public queries
    def margin(self, idx: Tensor, x: Tensor) -> Tensor:
        """Margin loss ``z_y - max_{i != y} z_i`` per query (negative means misclassified)."""
        z = self.logits(idx, x)
        y = self._rows(idx)[0].view(-1, *[1] * (z.dim() - 1))
        zy = z.gather(-1, y.expand(*z.shape[:-1], 1)).squeeze(-1)
        other = z.scatter(-1, y.expand(*z.shape[:-1], 1), float("-inf")).amax(-1)
        return zy - other

    def logits(self, idx: Tensor, x: Tensor) -> Tensor:
        """Logits per query (the mean of ``eot`` noisy forwards); score attacks only."""
        if self.kind != "score":
            raise AccessError("a decision-based attack may only ask for labels, not scores")
        return self._query(idx, x)[0]

    def predict(self, idx: Tensor, x: Tensor) -> Tensor:
        """Predicted label per query (the majority of ``eot`` noisy labels under EOT)."""
        return self._query(idx, x)[1]

    def is_adversarial(self, idx: Tensor, x: Tensor) -> Tensor:
        """Whether each query's (EOT) label differs from its image's true label."""
        lab = self.predict(idx, x)
        return lab != self._rows(idx)[0].view(-1, *[1] * (lab.dim() - 1))

    # ------------------------------------------------------------------ budgets and state
    def active(self, cost: int = 1) -> Tensor:
        """Indices of images still attacked that can pay ``cost`` more queries (x eot)."""
        return (self.open & (self.queries + cost * self.eot <= self.max_queries)).nonzero()[:, 0]

    def alive(self, idx: Tensor, cost: int = 1) -> Tensor:
        """Row mask of :meth:`active` for the images ``idx``."""
        return self.open[idx] & (self.queries[idx] + cost * self.eot <= self.max_queries)

    def all_alive(self, idx: Tensor, cost: int = 1) -> bool:
        """True when every image of ``idx`` is certainly still active (no tensor work); False
        means "check with :meth:`alive`"."""
        v = self._valid
        return (
            v is not None
            and v[0] is idx
            and v[1] == self._events
            and self._spent + cost * self.eot <= self.max_queries
        )

    def remaining(self, idx: Tensor) -> Tensor:
        """Charged queries each image may still spend."""
        return self.max_queries - self.queries[idx]

    def project(self, idx: Tensor, x: Tensor) -> Tensor:
        """Queries projected onto their image's epsilon ball and [0, 1] (``x`` is (A, ...) or
        (A, R, ...) as in :meth:`margin`). Exact, bit for bit, for points already inside, so an
        attack's stored point is the very point that was queried."""
        b = self._rows(idx)[1:]
        grouped = x.dim() == self.images.dim() + 1
        if grouped:
            b = tuple(t.unsqueeze(1) for t in b)
        if self.norm == "linf":
            return torch.clamp(x, min=b[0], max=b[1])
        x = x.clamp(0.0, 1.0)
        d = x - b[0]
        norms = d.flatten(2 if grouped else 1).norm(dim=-1)
        out = norms > self.eps * (1 + _SNAP)
        scale = (self.eps / norms.clamp(min=1e-12)).view(*norms.shape, 1, 1, 1)
        return select(out, (b[0] + d * scale).clamp(0.0, 1.0), x)

    def report_best(self, idx: Tensor, x: Tensor) -> None:
        """Record an attack's best point for images it stops attacking (their ``adv`` if never
        fooled); projected, so a sloppy attack cannot return a point outside the ball."""
        if idx.numel():
            self.best[idx] = self.project(idx, x)

    # ------------------------------------------------------------------ the protocol
    def start(self) -> None:
        """Charge one clean query per image and set aside those already misclassified.

        The clean query is charged (``eot`` queries) because a real attacker must spend it to
        know whether to attack. A misclassified clean query is settled by the same criterion as
        an attack query, so a randomized model is not blamed for one unlucky forward. The same
        forward (plus one uncharged probe forward when ``eot == 1``, counted in
        ``probe_queries``) detects randomized models: two identical queries that differ.
        """
        n, m = self.n, self.eot
        if m > self.max_queries:
            raise BudgetError(f"max_queries={self.max_queries} cannot pay one eot={m} query")
        self.queries += m
        self._spent = m
        raw = self._forward(self.images.repeat_interleave(m, 0) if m > 1 else self.images)
        raw = raw.view(n, m, -1)
        first = raw[:, 0]
        if m > 1:
            second = raw[:, 1]
        else:
            second = self._forward(self.images)
            self.probe_queries = n
        scale = 1.0 + float(first.abs().amax())
        self.randomized = bool((first - second).abs().amax() > 1e-5 * scale)
        wrong = self._reduce(raw)[1] != self.labels
        if self.criterion == "vote" and bool(wrong.any()):
            w = wrong.nonzero()[:, 0]
            wrong[w] = self._vote(self.images[w], w)
        self.clean_correct = ~wrong
        self.open = self.clean_correct.clone()
        self._events += 1
        if self.criterion == "none" and self.randomized:
            warnings.warn(
                "criterion='none' assumes a deterministic model, but this one answers identical "
                "queries differently; one misclassified query will count as success",
                stacklevel=3,
            )

    def result(self, **meta: Any) -> AttackResult:
        """The per-image outcome: fooled images get the verified query, others the best point."""
        return AttackResult(
            adv=select(self.success, self.adv, self.best),
            success=self.success.clone(),
            queries=self.queries.clone(),
            verify_queries=self.verify_queries.clone(),
            clean_correct=self.clean_correct.clone(),
            fooled_at=self.fooled_at.clone(),
            labels=self.labels.clone(),
            randomized=self.randomized,
            probe_queries=self.probe_queries,
            **meta,
        )

    # ------------------------------------------------------------------ internals
    def _rows(self, idx: Tensor) -> tuple[Tensor, ...]:
        """(labels, lower, upper) for Linf or (labels, images) for L2, gathered at ``idx``.

        Attacks reuse one idx tensor until their active set shrinks, so gathering once per idx
        object keeps the projection to one elementwise op on the hot path.
        """
        if self._cache is None or self._cache[0] is not idx:
            if self.norm == "linf":
                b = (self.labels[idx], self.lower[idx], self.upper[idx])
            else:
                b = (self.labels[idx], self.images[idx])
            self._cache = (idx, b)
        return self._cache[1]

    def _forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            if x.shape[0] <= self.max_batch:
                return self._model(x)
            return torch.cat([self._model(c) for c in x.split(self.max_batch)])

    def _reduce(self, raw: Tensor) -> tuple[Tensor | None, Tensor]:
        """EOT: (Q, M, K) raw logits -> mean logits (score) or majority label (decision)."""
        if raw.shape[1] == 1:
            z = raw[:, 0]
            return z, z.argmax(1)
        if self.kind == "score":
            z = raw.mean(1)
            return z, z.argmax(1)
        counts = F.one_hot(raw.argmax(2), raw.shape[2]).sum(1)
        return None, counts.argmax(1)  # ties go to the lowest class index

    def _vote(self, x: Tensor, imgs: Tensor) -> Tensor:
        """The 9 re-queries of every point in one uncharged forward (split only beyond
        ``max_batch``); True where at least 5 of the 9 are misclassified."""
        self.verify_queries[imgs] += VOTES
        lab = self._forward(x.repeat_interleave(VOTES, 0)).argmax(1).view(-1, VOTES)
        return (lab != self.labels[imgs].unsqueeze(1)).sum(1) >= MAJORITY

    def _query(self, idx: Tensor, x: Tensor) -> tuple[Tensor | None, Tensor]:
        grouped = x.dim() == self.images.dim() + 1
        a, r, m = idx.shape[0], (x.shape[1] if grouped else 1), self.eot
        if idx.dim() != 1 or x.shape[0] != a or x.shape[-3:] != self.images.shape[1:]:
            raise ValueError(f"need x of shape (A, [R,] C, H, W) for A={a} image indices")
        rm = r * m
        if self.all_alive(idx, r):
            cost = self._valid[2] * rm if rm != 1 else self._valid[2]
        else:
            counts = torch.bincount(idx, minlength=self.n)
            cost = counts * rm if rm != 1 else counts
            # One check for all three refusals: a finished image may get 0 queries, an open one
            # r * m (more means a repeated index), and no image may pass its budget.
            bad = (cost > self.open * rm) | (self.queries + cost > self.max_queries)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise BudgetError(
                    f"query for image {i} refused: finished={not bool(self.open[i])}, charged "
                    f"{int(self.queries[i])} + {int(cost[i])} > max_queries={self.max_queries} "
                    f"(or the index repeats)"
                )
            self._valid = (idx, self._events, counts)
        self.queries = self.queries + cost
        self._spent += rm
        fooled_ok = None
        if self.kind == "score":
            xq = self.project(idx, x)
        else:
            xq = x.clamp(0.0, 1.0)
            xp = self.project(idx, xq)
            fooled_ok = (xq - xp).flatten(xq.dim() - 3).abs().amax(-1) <= _SNAP  # inside the ball
            xq = select(fooled_ok, xp, xq)
        flat = xq.flatten(0, 1) if grouped else xq
        raw = self._forward(flat.repeat_interleave(m, 0) if m > 1 else flat)
        z, lab = self._reduce(raw.view(a * r, m, -1))
        fooled = (lab.view(a, r) != self._rows(idx)[0].unsqueeze(1)).view(*xq.shape[:-3])
        if fooled_ok is not None:
            fooled &= fooled_ok
        if bool(fooled.any()):
            self._settle(idx, xq, fooled.view(a, r), cost)
        shape = xq.shape[:-3]
        return (None if z is None else z.view(*shape, -1)), lab.view(shape)

    def _settle(self, idx: Tensor, xq: Tensor, fooled: Tensor, cost: Tensor) -> None:
        """Verify each image's first fooling query of this call and record the successes."""
        r = fooled.shape[1]
        hit = fooled.any(1).nonzero()[:, 0]
        first = fooled[hit].int().argmax(1)  # argmax returns the first maximal index
        pts = xq.view(-1, *self.images.shape[1:])[hit * r + first]
        imgs = idx[hit]
        if self.criterion == "vote":
            ok = self._vote(pts, imgs)
            imgs, pts, first = imgs[ok], pts[ok], first[ok]
            if imgs.numel() == 0:
                return
        # Charged count at the fooling query = charged before this call + its rank among the
        # image's R queries of this call (NES sends its probes together).
        self.fooled_at[imgs] = self.queries[imgs] - cost[imgs] + (first + 1) * self.eot
        self.adv[imgs] = pts
        self.success[imgs] = True
        self.open[imgs] = False
        self._events += 1


def shrink(
    oracle: QueryOracle,
    idx: Tensor,
    state: Sequence[Tensor],
    cost: int = 1,
    best: int | Callable[[list[Tensor]], Tensor] | None = 0,
) -> tuple[Tensor, list[Tensor]]:
    """Drop finished images from an attack's compact per-image state.

    Attacks keep their state only for the images they still attack, so the hot path never
    gathers from full-size tensors. The active set only shrinks; images that leave without being
    fooled hand their best point to the oracle: ``state[best]``, or ``best(state_rows)``.
    """
    if oracle.all_alive(idx, cost):
        return idx, list(state)
    keep = oracle.alive(idx, cost)
    if bool(keep.all()):
        return idx, list(state)
    if best is not None:
        gone = [t[~keep] for t in state]
        oracle.report_best(idx[~keep], gone[best] if isinstance(best, int) else best(gone))
    return idx[keep], [t[keep] for t in state]


class Attack:
    """A black-box attack: hyperparameters plus ``run(oracle)``; it never sees the model.

    Subclasses declare ``name``, ``kind`` (``"score"`` or ``"decision"``), the ``norms`` they
    support, and per-norm ``defaults`` (mirrored in ``configs/attack/<name>.yaml``).
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    norms: ClassVar[tuple[str, ...]]
    defaults: ClassVar[dict[str, dict[str, Any]]]

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

    def run(self, oracle: QueryOracle) -> None:
        """Attack every active image of ``oracle`` until fooled or out of budget."""
        raise NotImplementedError

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
    attack: str = ""
    norm: str = "linf"
    eps: float = 0.0
    max_queries: int = 0
    criterion: str = "vote"
    eot: int = 1
    seed: int = 0
    randomized: bool = False
    probe_queries: int = 0
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

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

    def summary(self) -> dict[str, Any]:
        """Scalars for tables and loggers (RND's failure rate and mean queries included)."""
        n = self.success.numel()
        correct = int(self.clean_correct.sum())
        fooled = int(self.success.sum())
        q_ok = self.fooled_at[self.success].float()
        return {
            "attack": self.attack,
            "norm": self.norm,
            "eps": self.eps,
            "max_queries": self.max_queries,
            "criterion": self.criterion,
            "eot": self.eot,
            "seed": self.seed,
            "randomized": self.randomized,
            "n_images": n,
            "clean_accuracy": correct / n if n else math.nan,
            "robust_accuracy": self.robust_accuracy(),
            "success_rate": fooled / correct if correct else math.nan,
            "failure_rate": 1 - fooled / correct if correct else math.nan,
            "mean_queries_success": float(q_ok.mean()) if fooled else math.nan,
            "median_queries_success": float(q_ok.median()) if fooled else math.nan,
            "mean_queries": float(self.queries.float().mean()) if n else math.nan,
            "verify_queries": int(self.verify_queries.sum()),
            "probe_queries": self.probe_queries,
            "seconds": self.seconds,
            "params": dict(self.params),
        }
