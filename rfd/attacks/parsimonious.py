"""Parsimonious black-box attack: lazy-greedy local search over the vertices of the Linf box.

Moon, An, Song. "Parsimonious Black-Box Adversarial Attacks via Efficient Combinatorial
Optimization." ICML 2019.

The perturbation is restricted to the vertices ``{x - eps, x + eps}`` (clipped to [0, 1]) and
built block by block: the image is split into square blocks, one per channel, and a block is
either in the working set (``+eps``) or not (``-eps``; the start is all ``-eps``). The blocks are
shuffled and taken in mini-batches of ``batch_size``; on each mini-batch the attack runs one
round of accelerated lazy-greedy insertion then deletion. When a pass over all blocks is done the
block side halves (down to 1 pixel, after which the blocks are only reshuffled).

Lazy greedy, as in the authors' code: every candidate of the mini-batch (blocks not in the set
for insertion, in the set for deletion) is evaluated once; the best one is flipped (even when
that raises the loss: the published code does so unconditionally, in both rounds); then the
candidate with the best stored gain is re-evaluated against the current point and flipped if
its new gain is still no worse than the next stored gain and not positive, pushed back with its
new gain if it is worse than the next one, and the round stops at the first re-evaluated best
with a positive gain (or when no candidate is left).

This implementation is that algorithm as a per-image state machine with one query per step:
phases START (the all ``-eps`` vertex), INSERT-EVAL (one candidate per step, in slot order),
INSERT-LAZY (one re-evaluation per step), DELETE-EVAL, DELETE-LAZY; the priority queue is a
per-image array of stored gains over the mini-batch's slots (``+inf`` = not queued), and
"pop the best" is an argmin. Steps that send no query (flipping the best evaluated candidate,
moving to the next phase, batch or block size) are resolved at the end of ``observe``.

Differences from the published code, and why:

- The loss is rfd's margin ``z_y - max_{i != y} z_i``: the published code's ``cw`` loss option
  (``log p_y - log max p_other``, the same quantity); its default is cross-entropy.
- The published code re-queries the current point at the start of every mini-batch; here the
  stored margin of the current point is used (it was observed when the point was kept), which
  saves one query per mini-batch. Only the all ``-eps`` start is queried.
- Candidates are evaluated one per step rather than 100 per forward: the same queries, counted
  one by one, so the engine stops an image at its first fooling query.
- The shuffled block order is drawn per image from its own keyed RNG (a key taken at the step a
  pass starts), not from ``np.random.seed(index)``, so it does not depend on batch packing.
- Block side: the authors use 4 at 32px (CIFAR-10) and 32 at 299px (ImageNet). Here it is a
  fraction of the image side, ``block_frac = 1/8`` (4/32), rounded half up: 4 px at 28 and 32px,
  28 at 224px. With the published ``max_iters = 1`` one insertion and one deletion round run per
  mini-batch.

Success under ``success="improved"`` (the published code's rule) follows the authors' early
stopping, which depends on the phase rather than on a stored loss: a fooled start or a fooled
candidate of an evaluation round returns success whatever its loss, while a fooled re-evaluated
candidate counts only if the lazy step accepts it (its gain is no worse than the best other stored
gain and not positive; one pushed back or ending the round does not count, even if its loss is
below the current one). :meth:`Parsimonious.incumbent` returns the threshold that makes the
engine's ``margin < incumbent`` exactly that test: ``+inf`` in the start and evaluation phases, and
in a lazy phase the smallest margin the acceptance test rejects. So even a deterministic model can
see a later success under ``improved`` than under ``any``: a fooled candidate that is pushed back
is only counted when it is popped again and accepted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rfd.attacks.base import Attack, Reply, State, View
from rfd.rng import KeyedRNG

START, INS_EVAL, INS_LAZY, DEL_EVAL, DEL_LAZY = 0, 1, 2, 3, 4
INF = float("inf")
# the integer type of each float type's bit pattern, for stepping through floats in order
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}  # fmt: skip


def _ceil_div(a: Tensor | int, b: Tensor) -> Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def _float_key(x: Tensor) -> Tensor:
    """int64 keys in the order of the floats ``x`` (no NaN): adjacent floats get adjacent keys,
    both zeros 0."""
    bits = _BITS[x.dtype]
    i = x.view(bits).long()
    return torch.where(i < 0, -(i & torch.iinfo(bits).max), i)


def _key_float(k: Tensor, dtype: torch.dtype) -> Tensor:
    """The floats of keys ``k`` (:func:`_float_key` inverted)."""
    bits = _BITS[dtype]
    return torch.where(k < 0, torch.iinfo(bits).min - k, k).to(bits).view(dtype)


def first_rejected(loss: Tensor, cap: Tensor) -> Tensor:
    """Per row, the smallest float ``t`` (dtype of ``loss``) with ``t - loss > cap`` in float
    arithmetic, so that ``m - loss <= cap`` holds exactly for the margins ``m < t``.

    Float subtraction rounds monotonically in ``m``, so the accepted margins are all those below
    one float; that float is found by bisection over the floats in order (at most 64 halvings).
    The closed form ``loss + cap`` is not it: near ``m = 0`` (where fooling happens) many floats
    ``m`` round to the same ``m - loss``, e.g. ``loss = 1``, ``cap = -1 - 2**-23`` accepts every
    ``m < -2**-24`` in float32, 2**23 floats above ``loss + cap = -2**-23``. A NaN ``loss`` or
    ``cap`` rejects everything (``-inf``), as the comparison does.
    """
    dt = loss.dtype
    lo = _float_key(torch.full_like(loss, -INF))  # -inf - loss <= cap for every finite loss
    hi = _float_key(torch.full_like(loss, INF))  # rejected, or +inf (loss = +inf accepts all)
    while True:
        gap = hi - 1 > lo  # (hi - lo overflows int64 for float64 keys)
        if not bool(gap.any()):
            break
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without int64 overflow
        rej = (_key_float(mid, dt) - loss) > cap
        hi = torch.where(gap & rej, mid, hi)
        lo = torch.where(gap & ~rej, mid, lo)
    return torch.where(loss.isnan() | cap.isnan(), -INF, _key_float(hi, dt))


class Parsimonious(Attack):
    """Parsimonious attack (Moon et al., ICML 2019), score-based, Linf.

    Hyperparameters (the authors' code): ``block_frac``, the initial block side as a fraction of
    the image side (4 px of 32 on CIFAR-10: 1/8); ``batch_size``, blocks per mini-batch of the
    local search (64).
    """

    name = "parsimonious"
    title = "Parsim"
    order = 90
    kind = "score"
    norms = ("linf",)
    defaults: dict[str, dict[str, Any]] = {"linf": {"block_frac": 0.125, "batch_size": 64}}

    def __init__(
        self, norm: str = "linf", block_frac: float | None = None, batch_size: int | None = None
    ) -> None:
        super().__init__(norm, block_frac=block_frac, batch_size=batch_size)
        if not 0 < self.block_frac <= 1:
            raise ValueError(f"parsimonious block_frac must be in (0, 1], got {self.block_frac}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(
                f"parsimonious batch_size must be an integer >= 1, got {self.batch_size}"
            )
        self.batch_size = int(self.batch_size)

    def initial_block(self, h: int, w: int) -> int:
        return max(1, int(math.floor(self.block_frac * min(h, w) + 0.5)))

    # State: ``up`` the vertex as 0/1 per pixel (1 = +eps), ``loss`` its margin (+inf until the
    # start is answered), ``bs`` the block side, ``key`` the RNG key of the current pass's
    # shuffle, ``batch`` the mini-batch within the pass, ``ids`` its block ids (-1 = empty
    # slot), ``score`` per slot (EVAL phases: the evaluated margin; LAZY phases: the stored gain;
    # +inf: not queued), ``ptr`` the next slot to evaluate, ``slot`` the slot the next query
    # flips (-1: none, the START query), ``phase``.
    def init(self, view: View) -> State:
        x0 = view.x0
        a, c, h, w = x0.shape
        dev = x0.device
        zero = torch.zeros(a, dtype=torch.long, device=dev)
        state = {
            "up": torch.zeros((a, c * h * w), dtype=x0.dtype, device=dev),
            "loss": torch.full((a,), INF, device=dev),
            "bs": torch.full((a,), self.initial_block(h, w), dtype=torch.long, device=dev),
            "key": view.rng.keys.clone(),
            "batch": zero,
            "ids": torch.zeros((a, self.batch_size), dtype=torch.long, device=dev),
            "score": torch.full((a, self.batch_size), INF, device=dev),
            "ptr": zero.clone(),
            "slot": torch.full((a,), -1, dtype=torch.long, device=dev),
            "phase": zero.clone(),
        }
        self._load_batch(state, torch.ones(a, dtype=torch.bool, device=dev), x0.shape)
        return state

    # ------------------------------------------------------------------ blocks
    def _grid(self, bs: Tensor, shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        _, c, h, w = shape
        nbh, nbw = _ceil_div(h, bs), _ceil_div(w, bs)
        return nbh, nbw, c * nbh * nbw

    def _load_batch(self, state: State, m: Tensor, shape: torch.Size) -> None:
        """Block ids of the current mini-batch for images ``m`` (in place): slice
        ``batch * B : (batch + 1) * B`` of the pass's shuffle."""
        idx = m.nonzero()[:, 0]
        if idx.numel() == 0:
            return
        bsz = self.batch_size
        bs, batch, key = state["bs"][idx], state["batch"][idx], state["key"][idx]
        ids = torch.full((idx.numel(), bsz), -1, dtype=torch.long, device=bs.device)
        for side in torch.unique(bs).tolist():
            g = (bs == side).nonzero()[:, 0]
            nb = int(self._grid(torch.tensor(side), shape)[2])
            u = KeyedRNG(key[g]).stream("parsimonious-order").uniform(nb, torch.float64)
            perm = torch.argsort(u, dim=1, stable=True)
            pos = batch[g].unsqueeze(1) * bsz + torch.arange(bsz, device=bs.device)
            ok = pos < nb
            got = perm.gather(1, pos.clamp(max=nb - 1))
            ids[g] = torch.where(ok, got, -1)
        state["ids"][idx] = ids

    def _block_mask(self, bid: Tensor, bs: Tensor, shape: torch.Size) -> Tensor:
        """(A, C*H*W) 0/1 mask of block ``bid`` (A,) at side ``bs`` (A,)."""
        a, c, h, w = shape
        nbh, nbw, _ = self._grid(bs, shape)
        ch = torch.div(bid, nbh * nbw, rounding_mode="floor")
        r = bid % (nbh * nbw)
        i0 = torch.div(r, nbw, rounding_mode="floor") * bs
        j0 = (r % nbw) * bs
        dev = bid.device
        rows = torch.arange(h, device=dev).unsqueeze(0)
        cols = torch.arange(w, device=dev).unsqueeze(0)
        rin = (rows >= i0.unsqueeze(1)) & (rows < (i0 + bs).unsqueeze(1))  # (A, H)
        cin = (cols >= j0.unsqueeze(1)) & (cols < (j0 + bs).unsqueeze(1))  # (A, W)
        cm = torch.arange(c, device=dev).unsqueeze(0) == ch.unsqueeze(1)  # (A, C)
        mask = cm.view(a, c, 1, 1) & rin.view(a, 1, h, 1) & cin.view(a, 1, 1, w)
        return mask.flatten(1)

    def _in_set(self, state: State, shape: torch.Size) -> Tensor:
        """(A, B) whether each slot's block is in the working set: the sign of its first pixel
        (as the published code reads it)."""
        _, c, h, w = shape
        ids, bs = state["ids"], state["bs"].unsqueeze(1)
        nbh, nbw, _ = self._grid(bs, shape)
        cid = ids.clamp(min=0)
        ch = torch.div(cid, nbh * nbw, rounding_mode="floor")
        r = cid % (nbh * nbw)
        first = ch * h * w + torch.div(r, nbw, rounding_mode="floor") * bs * w + (r % nbw) * bs
        return state["up"].gather(1, first) > 0.5

    def _flip(self, state: State, m: Tensor, slot: Tensor, shape: torch.Size) -> Tensor:
        """``up`` with the block at ``slot`` flipped where ``m``."""
        bid = state["ids"].gather(1, slot.clamp(min=0).view(-1, 1))[:, 0]
        mask = self._block_mask(bid.clamp(min=0), state["bs"], shape) & m.unsqueeze(1)
        up = state["up"]
        return (up - mask.to(up.dtype)).abs()

    def _vertex(self, view: View, up: Tensor) -> Tensor:
        return torch.lerp(view.lower, view.upper, up.view_as(view.x0))

    # ------------------------------------------------------------------ protocol
    def propose(self, view: View, state: State) -> Tensor:
        slot = state["slot"]
        up = self._flip(state, slot >= 0, slot, view.x0.shape)
        return self._vertex(view, up)

    def observe(self, view: View, state: State, reply: Reply) -> State:
        shape = view.x0.shape
        m = reply.margin[:, 0]
        phase, slot, loss = state["phase"], state["slot"], state["loss"]
        new = {k: state[k].clone() for k in ("up", "loss", "bs", "key", "batch", "ids", "score",
                                              "ptr", "slot", "phase")}  # fmt: skip
        a = m.shape[0]
        rows = torch.arange(a, device=m.device)
        sl = slot.clamp(min=0)
        start = phase == START
        new["loss"] = torch.where(start, m, loss)
        new["phase"] = torch.where(start, INS_EVAL, phase)
        ev = (phase == INS_EVAL) | (phase == DEL_EVAL)
        # EVAL: record the candidate's margin, move the pointer past it
        score = new["score"]
        score[rows[ev], sl[ev]] = m[ev]
        new["ptr"] = torch.where(ev, slot + 1, new["ptr"])
        # LAZY: pop the candidate, compare its fresh gain with the best remaining stored gain
        lazy = (phase == INS_LAZY) | (phase == DEL_LAZY)
        if bool(lazy.any()):
            gain = m - loss
            rest = score.clone()
            rest[rows, sl] = INF
            top = rest.min(1).values
            fits = gain <= top  # an empty queue (top = inf) always fits
            accept = lazy & fits & (gain <= 0)
            stop = lazy & fits & (gain > 0)
            push = lazy & ~fits
            score[rows[accept], sl[accept]] = INF
            score[rows[push], sl[push]] = gain[push]
            new["up"] = self._flip(new, accept, slot, shape)
            new["loss"] = torch.where(accept, m, new["loss"])
            # a stopped round drops its queue and moves on
            score[stop] = INF
            new["phase"] = torch.where(stop, new["phase"] + 1, new["phase"])  # -> DEL_EVAL / past
            new["ptr"] = torch.where(stop, 0, new["ptr"])
        new["score"] = score
        self._settle(view, new)
        return new

    def _settle(self, view: View, s: State) -> None:
        """Resolve the steps that send no query until every image has its next query (in place):
        find the next candidate to evaluate, flip the best evaluated one, move to the next phase,
        mini-batch, pass or block side."""
        shape = view.x0.shape
        a = s["phase"].shape[0]
        rows = torch.arange(a, device=s["phase"].device)
        ar = torch.arange(self.batch_size, device=rows.device).unsqueeze(0)
        todo = s["phase"] != START
        for _ in range(16):
            if not bool(todo.any()):
                return
            phase = s["phase"]
            # past DEL_LAZY: the next mini-batch (and at the end of a pass, the next block side)
            nxt = todo & (phase > DEL_LAZY)
            if bool(nxt.any()):
                nb = self._grid(s["bs"], shape)[2]
                batch = s["batch"] + 1
                wrap = nxt & (batch * self.batch_size >= nb)
                s["batch"] = torch.where(nxt, torch.where(wrap, 0, batch), s["batch"])
                s["bs"] = torch.where(
                    wrap, torch.div(s["bs"], 2, rounding_mode="floor").clamp(min=1), s["bs"]
                )
                s["key"] = torch.where(wrap, view.rng.keys, s["key"])
                self._load_batch(s, nxt, shape)
                s["phase"] = torch.where(nxt, INS_EVAL, phase)
                s["ptr"] = torch.where(nxt, 0, s["ptr"])
                s["score"][nxt] = INF
                phase = s["phase"]
            ev = todo & ((phase == INS_EVAL) | (phase == DEL_EVAL))
            if bool(ev.any()):
                inset = self._in_set(s, shape)
                want = torch.where((phase == INS_EVAL).unsqueeze(1), ~inset, inset)
                elig = want & (s["ids"] >= 0) & (ar >= s["ptr"].unsqueeze(1))
                has = elig.any(1)
                first = elig.to(torch.uint8).argmax(1)
                found = ev & has
                s["slot"] = torch.where(found, first, s["slot"])
                todo = todo & ~found
                # evaluation done: flip the best evaluated candidate (the published code does so
                # even when its gain is positive); its margin was observed at exactly that point
                done = ev & ~has
                queued = torch.isfinite(s["score"]).any(1)
                pick = done & queued
                if bool(pick.any()):
                    best = s["score"].argmin(1)
                    # the kept point's margin is the value observed at exactly that point
                    vbest = s["score"].gather(1, best.view(-1, 1))[:, 0]
                    s["up"] = self._flip(s, pick, best, shape)
                    gains = s["score"] - s["loss"].unsqueeze(1)  # stored gains, as the heap
                    s["score"] = torch.where(pick.unsqueeze(1), gains, s["score"])
                    s["loss"] = torch.where(pick, vbest, s["loss"])
                    s["score"][rows[pick], best[pick]] = INF
                    s["phase"] = torch.where(pick, phase + 1, s["phase"])  # -> LAZY
                empty = done & ~queued
                s["phase"] = torch.where(empty, phase + 2, s["phase"])  # -> next EVAL / past
                s["ptr"] = torch.where(empty, 0, s["ptr"])
                phase = s["phase"]
            lz = todo & ((phase == INS_LAZY) | (phase == DEL_LAZY))
            if bool(lz.any()):
                queued = torch.isfinite(s["score"]).any(1)
                go = lz & queued
                s["slot"] = torch.where(go, s["score"].argmin(1), s["slot"])
                todo = todo & ~go
                out = lz & ~queued
                s["phase"] = torch.where(out, phase + 1, s["phase"])
                s["ptr"] = torch.where(out, 0, s["ptr"])
        raise RuntimeError("parsimonious: the phase machine did not settle")  # pragma: no cover

    def best(self, view: View, state: State) -> Tensor:
        return self._vertex(view, state["up"])

    def incumbent(self, view: View, state: State) -> Tensor:
        """The margin a fooling query must be below to count under ``success="improved"``: the
        authors' early-stopping rule (see the module docstring), not the stored loss.

        Start and evaluation phases: ``+inf``, since the published code returns success at any
        fooled query there. Lazy phases: the query re-evaluates the candidate at ``slot`` and
        ``observe`` accepts it iff ``m - loss <= top`` and ``m - loss <= 0`` (``top`` the best
        other stored gain), i.e. ``m - loss <= min(top, 0)``; :func:`first_rejected` turns that
        into the exact bound of ``m < incumbent``, computed in the dtype the engine's margins
        meet the state's loss in (the images' dtype, promoted with the loss's).
        """
        phase, loss = state["phase"], state["loss"]
        dt = torch.promote_types(loss.dtype, view.x0.dtype)
        out = torch.full(loss.shape, INF, dtype=dt, device=loss.device)
        lazy = (phase == INS_LAZY) | (phase == DEL_LAZY)
        if not bool(lazy.any()):
            return out
        idx = lazy.nonzero()[:, 0]
        rest = state["score"][idx].clone()  # the stored gains still queued besides the popped one
        rest[torch.arange(idx.numel(), device=idx.device), state["slot"][idx]] = INF
        cap = rest.min(1).values.clamp(max=0.0).to(dt)
        out[idx] = first_rejected(loss[idx].to(dt), cap)
        return out
