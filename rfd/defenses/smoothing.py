"""Randomized smoothing with certified L2 radii (Cohen, Rosenfeld, Kolter, ICML 2019).

The smoothed classifier answers ``g(x) = argmax_c P(f(x + sigma * z) = c)``, z ~ N(0, I). If the
top class has probability ``p_A > 1/2`` under the noise, ``g`` cannot change within the L2 ball
of radius ``sigma * Phi^-1(p_A)`` around x. ``p_A`` is unknown, so :func:`certify` estimates a
one-sided Clopper-Pearson lower bound from Monte-Carlo counts and claims the radius only when that
bound exceeds 1/2: the certificate then holds with probability at least ``1 - alpha`` over the
noise. :func:`predict` is Cohen's PREDICT: the majority class, or an abstention (-1) when a
binomial test cannot tell it from the runner-up at level ``alpha``.

Every noise draw comes from :class:`rfd.rng.KeyedRNG` keyed by (seed, image, sample index), so the
results do not depend on ``batch_size``. scipy is not used: the binomial tail is summed exactly
in float64 from ``lgamma``, and the Clopper-Pearson bound is found by bisection on it.

:class:`Smoothing` (``--defense smoothing``) answers queries with the smoothed classifier: each
query costs the defender ``n`` base forwards (plus the shared one), which ``forwards_per_query``
reports beside the attacker's query count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rfd.checks import check_int, check_positive
from rfd.defenses.base import Defense
from rfd.models import eval_mode, model_device
from rfd.rng import KeyedRNG, row_keys

ABSTAIN = -1
Forward = Callable[[Tensor], Tensor]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"smoothing alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


# --------------------------------------------------------------------------- binomial statistics


def binom_sf(k: Tensor, n: int, p: Tensor) -> Tensor:
    """P(X >= k) for X ~ Binomial(n, p), exactly (a float64 log-sum of the pmf), elementwise
    over ``k`` and ``p`` of the same shape (U,)."""
    k, p = k.double().view(-1, 1), p.double().view(-1, 1)
    j = torch.arange(n + 1, dtype=torch.float64, device=k.device)
    log_choose = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)
    # xlogy: 0 * log(0) = 0, so p = 0 and p = 1 are exact
    log_pmf = log_choose + torch.xlogy(j, p) + torch.xlogy(n - j, 1 - p)
    log_pmf = log_pmf.masked_fill(j < k, -math.inf)
    return torch.logsumexp(log_pmf, dim=1).exp().clamp(max=1.0)


def clopper_pearson_lower(k: Tensor, n: int, alpha: float) -> Tensor:
    """The one-sided (1 - alpha) Clopper-Pearson lower bound on p from k successes in n trials.

    It is the p at which P(X >= k) = alpha (equivalently the alpha-quantile of Beta(k, n-k+1));
    0 for k = 0. Found by 64 bisection steps on the exact tail, which is increasing in p; the lower
    end of the bracket is returned, so the bound is never optimistic.
    """
    alpha = _check_alpha(alpha)
    k = torch.as_tensor(k).long().cpu()
    out = torch.zeros(k.shape, dtype=torch.float64)
    uniq = k.unique()
    uniq = uniq[uniq > 0]
    per = max(1, (1 << 22) // (n + 1))  # bound the (U, n + 1) work array to ~32 MB
    for start in range(0, uniq.numel(), per):
        ks = uniq[start : start + per]
        lo = torch.zeros(ks.shape, dtype=torch.float64)
        hi = torch.ones(ks.shape, dtype=torch.float64)
        for _ in range(64):
            mid = (lo + hi) / 2
            below = binom_sf(ks, n, mid) < alpha
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        for kv, bound in zip(ks.tolist(), lo.tolist(), strict=True):
            out[k == kv] = bound
    return out


def binom_test_two_sided(k: Tensor, m: Tensor) -> Tensor:
    """The two-sided p-value of k successes in m trials against p = 1/2 (elementwise):
    ``min(1, 2 P(X >= max(k, m - k)))``, exact for the symmetric null."""
    k, m = torch.as_tensor(k).long().cpu(), torch.as_tensor(m).long().cpu()
    out = torch.ones(k.shape, dtype=torch.float64)
    for mv in m.unique().tolist():
        sel = m == mv
        top = torch.maximum(k[sel], mv - k[sel])
        out[sel] = (2 * binom_sf(top, mv, torch.full(top.shape, 0.5))).clamp(max=1.0)
    return out


# --------------------------------------------------------------------------- noisy samples


def noisy_logits(
    x: Tensor, rng: KeyedRNG, sigma: float, n: int, forward: Forward, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(row index, logits)`` per chunk of the ``rows x n`` noisy copies ``x[r] + sigma * z``.

    Sample ``s`` of row ``r`` draws ``z`` from ``rng[r].stream(s)``: a function of the row's key
    and the sample index alone, so chunking (``batch_size``) never changes a draw.
    """
    total = x.shape[0] * n
    for start in range(0, total, batch_size):
        j = torch.arange(start, min(start + batch_size, total), device=x.device)
        r, s = j // n, j % n
        z = rng[r].stream(s).normal(x.shape[1:]).to(x.dtype)
        yield r, forward(x[r] + sigma * z)


def vote_counts(
    x: Tensor, rng: KeyedRNG, sigma: float, n: int, forward: Forward, batch_size: int
) -> Tensor:
    """(rows, K) int64: how many of each row's n noisy copies the base model puts in each class."""
    counts: Tensor | None = None
    for r, z in noisy_logits(x, rng, sigma, n, forward, batch_size):
        if counts is None:
            counts = torch.zeros(x.shape[0], z.shape[1], dtype=torch.long, device=x.device)
        counts.index_put_((r, z.argmax(1)), torch.ones_like(r), accumulate=True)
    assert counts is not None
    return counts


def _counts(
    model: nn.Module, images: Tensor, sigma: float, n: int, batch_size: int, seed: int,
    stage: str, ids: Tensor | None,
) -> Tensor:  # fmt: skip
    """Votes of ``n`` noisy copies per image, noise keyed by (seed, ids, stage, sample)."""
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"smoothing needs a non-empty image batch, got {tuple(images.shape)}")
    device = model_device(model)
    images = images.to(device)
    ids = torch.arange(images.shape[0]) if ids is None else torch.as_tensor(ids)
    rng = KeyedRNG(row_keys(seed, ids.to(device))).stream("smoothing", stage)
    with eval_mode(model), torch.no_grad():
        return vote_counts(images, rng, sigma, n, model, batch_size)


def predict(
    model: nn.Module,
    images: Tensor,
    sigma: float,
    n: int,
    alpha: float,
    batch_size: int = 1000,
    seed: int = 0,
    ids: Tensor | None = None,
) -> Tensor:
    """Cohen's PREDICT: the Monte-Carlo majority class of the smoothed classifier, or -1.

    Abstains when a two-sided binomial test of the top two counts cannot reject that they are
    equally likely at level ``alpha``; otherwise the answer is wrong with probability <= alpha.

    Args:
        model: the base classifier (called in eval mode under no_grad).
        images: (B, C, H, W) in the model's input range.
        sigma: noise std; n: noisy samples per image; alpha: the test's level.
        batch_size: noisy copies per forward (results do not depend on it).
        seed: noise seed; ids: per-image noise keys (default: positions 0..B-1; pass dataset
            indices so an image gets the same noise in any batch).

    Returns:
        (B,) int64 class indices, -1 for abstentions.
    """
    sigma, n, alpha = (
        check_positive(sigma, "smoothing sigma"),
        check_int(n, "smoothing n"),
        _check_alpha(alpha),
    )
    counts = _counts(
        model, images, sigma, n, check_int(batch_size, "smoothing batch_size"), seed, "predict", ids
    ).cpu()
    top2 = counts.topk(min(2, counts.shape[1]), dim=1)
    n_a = top2.values[:, 0]
    n_b = top2.values[:, 1] if counts.shape[1] > 1 else torch.zeros_like(n_a)
    pval = binom_test_two_sided(n_a, n_a + n_b)
    return torch.where(pval <= alpha, top2.indices[:, 0], torch.full_like(n_a, ABSTAIN))


def certify(
    model: nn.Module,
    images: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch_size: int = 1000,
    seed: int = 0,
    ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cohen's CERTIFY: the smoothed prediction with a certified L2 radius, or an abstention.

    ``n0`` selection samples pick the candidate class c_A; ``n`` fresh samples count it, and
    p_A's one-sided Clopper-Pearson lower bound at level ``alpha`` gives the radius
    ``sigma * Phi^-1(p_A)``. With p_A <= 1/2 nothing is certified: the prediction is -1 and its
    radius 0.0 (a radius is never reported for an abstention). Selection and estimation use
    independent noise, as the proof requires. Arguments as in :func:`predict`.

    Returns:
        ``(prediction, radius)``: (B,) int64 with -1 for abstain, (B,) float32 radii.
    """
    sigma, alpha = check_positive(sigma, "smoothing sigma"), _check_alpha(alpha)
    n0, n, bs = (
        check_int(n0, "smoothing n0"),
        check_int(n, "smoothing n"),
        check_int(batch_size, "smoothing batch_size"),
    )
    select = _counts(model, images, sigma, n0, bs, seed, "select", ids).cpu()
    c_a = select.argmax(1)
    counts = _counts(model, images, sigma, n, bs, seed, "estimate", ids).cpu()
    p_a = clopper_pearson_lower(counts.gather(1, c_a.view(-1, 1)).view(-1), n, alpha)
    ok = p_a > 0.5
    radius = torch.where(ok, sigma * torch.special.ndtri(p_a.clamp(0.5, 1.0)), 0.0)
    return torch.where(ok, c_a, torch.full_like(c_a, ABSTAIN)), radius.float()


# --------------------------------------------------------------------------- the query defense


class Smoothing(Defense):
    """Answer every query with the smoothed classifier (Cohen et al. 2019), n samples per query.

    Without gradients (every query of a black-box attack) the logits are
    ``log((counts + 0.5) / (n + 0.5 K))`` over the n noisy copies' votes: finite, monotone in the
    votes, so their argmax is the Monte-Carlo majority (the smoothed prediction) and score-based
    attacks see vote shares. Under ``torch.is_grad_enabled()`` (white-box attacks) the answer is
    instead the log of the mean softmax over the n noisy copies, the differentiable "soft"
    smoothed classifier (Salman et al., NeurIPS 2019), since votes have no gradient. So call it
    under ``torch.no_grad()`` for the majority answer.

    Args:
        model: the base classifier (best trained with Gaussian noise of the same sigma).
        seed: seed of the defense's own generator (``None``: fresh OS entropy).
        sigma: noise std in pixel units (> 0).
        n: noisy samples per query (>= 1); the defender pays n + 1 base forwards per query.
        batch_size: noisy copies per base forward (results do not depend on it).
    """

    name = "smoothing"
    title = "Smoothing"
    order = 50

    def __init__(
        self,
        model: nn.Module,
        seed: int | None = None,
        sigma: float = 0.25,
        n: int = 100,
        batch_size: int = 1000,
    ) -> None:
        super().__init__(model, seed)
        self.sigma = check_positive(sigma, "smoothing sigma")
        self.n = check_int(n, "smoothing n")
        self.batch_size = check_int(batch_size, "smoothing batch_size")
        self.layers = ["input"]

    @property
    def randomized(self) -> bool:
        return True

    @property
    def forwards_per_query(self) -> float:
        return float(self.n + 1)  # +1: the rows also ride in the shared forward

    def row_model(self, x: Tensor, rng: KeyedRNG, forward: Forward) -> Tensor:
        if not torch.is_grad_enabled():
            counts = vote_counts(x, rng, self.sigma, self.n, forward, self.batch_size)
            return ((counts.float() + 0.5) / (self.n + 0.5 * counts.shape[1])).log()
        probs: Tensor | None = None
        for r, z in noisy_logits(x, rng, self.sigma, self.n, forward, self.batch_size):
            p = F.softmax(z.float(), dim=1)
            probs = p.new_zeros(x.shape[0], p.shape[1]) if probs is None else probs
            probs = probs.index_add(0, r, p)  # out of place: autograd keeps every chunk
        assert probs is not None
        return (probs / self.n).clamp_min(1e-12).log()

    def extra_repr(self) -> str:
        return f"defense={self.name!r}, sigma={self.sigma}, n={self.n}"
