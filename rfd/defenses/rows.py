"""Defenses applied row by row: one forward batch serves several defenses and keyed noise.

The evaluation runs a model's whole grid (no defense, input noise, feature noise, AAA, ... under
every attack) through shared forward batches, so that a long-surviving image of one cell never
leaves the accelerator idle while other cells still have work. That needs each defense expressed
per row: a defense transforms its rows' inputs, adds noise to its rows' hidden features, and/or
post-processes its rows' logits, while other rows of the same forward pass untouched (adding an
exact zero). Every noise draw comes from :mod:`rfd.rng` keyed by the row's key, so a query's
noise is the same whatever rows share its forward.

A defense takes part by implementing any of (see :class:`rfd.defenses.base.Defense`):

- ``row_input(x, rng) -> x``: transform input rows (input noise);
- ``row_noise() -> list[NoiseSpec]``: noise added to named layers' outputs (feature noise);
- ``row_logits(z) -> z``: post-process logits rows (AAA);
- ``row_model(x, rng, forward) -> z``: answer its rows itself, calling ``forward`` (the undefended
  base model, any number of rows) as often as it needs: randomized smoothing's n noisy samples per
  query. Its rows also ride in the shared forward (whose answer is then replaced), which keeps the
  packing simple at the cost of one extra base forward per query.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from rfd.rng import KeyedRNG, stream_id
from rfd.tensors import put, take

PRECISIONS = ("32", "tf32", "bf16")
# entered channels-last forwards per model: the model's memory format is restored only when the
# last of them leaves (one leaving early would switch it back under the others)
_CHANNELS_LAST: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
DISTRIBUTIONS = ("gaussian", "laplace")


@dataclass(frozen=True)
class NoiseSpec:
    """Noise ``nu * scale * z`` added to the output of the module at ``layer`` (a path in the
    base model), ``z`` of unit variance from ``dist``; ``scale`` is an optional per-channel
    multiplier (channels: dim 1 of (B, C, ...) features, the last dim of (B, N, D) tokens)."""

    layer: str
    nu: float
    dist: str = "gaussian"
    scale: Tensor | None = None


@torch.compiler.disable
def unit_noise(rng: KeyedRNG, shape: Sequence[int], dist: str, dtype: torch.dtype) -> Tensor:
    """Zero-mean, unit-std noise per row; Laplace has the same standard deviation as Gaussian,
    so ``nu`` means the same thing for both.

    Never traced by ``torch.compile`` (a compiled model runs its noise hooks inside the graph):
    on CPU the keyed hash works on numpy words, which dynamo cannot trace, and the draw is eager
    code either way, so the compiled graph breaks around it."""
    z = rng.normal(shape) if dist == "gaussian" else rng.laplace(shape)
    return z.to(dtype)


def channel_view(std: Tensor, like: Tensor) -> Tensor:
    shape = [1] * like.ndim
    shape[-1 if like.ndim == 3 else 1] = -1
    return std.to(like.device, like.dtype).view(shape)


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast for bf16; TF32 matmuls/convolutions for tf32 (CUDA only); nothing for 32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif precision == "tf32" and device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    else:
        yield


def _has(plan: Any, op: str) -> bool:
    """Whether ``plan`` implements a row operation (``Defense`` subclasses list theirs)."""
    return op in getattr(type(plan), "row_ops", ())


class RowForward:
    """Forward rows through one base model, each row under its own defense plan and noise key.

    Used as a context manager: entering registers the noise hooks on the base model (first in
    hook order, so other hooks see the noisy features) and applies ``channels_last``; leaving
    removes every hook and restores the memory format, so the model is left exactly as found.

    Args:
        base: the undefended classifier all plans share.
        plans: defense objects (``None`` or any object without row operations = undefended).
        precision: ``"32"``, ``"tf32"`` (CUDA) or ``"bf16"`` (autocast; logits come back fp32).
        channels_last: run convolutions in NHWC (faster on GPUs with tensor cores).
        compile: ``torch.compile`` the base model (the hooks are traced with it).
    """

    def __init__(
        self,
        base: nn.Module,
        plans: Sequence[Any],
        precision: str = "32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.base, self.plans = base, list(plans)
        self.precision, self.channels_last, self.compile = precision, channels_last, compile
        self.inputs = [p for p, d in enumerate(self.plans) if _has(d, "row_input")]
        self.outputs = [p for p, d in enumerate(self.plans) if _has(d, "row_logits")]
        self.models = [p for p, d in enumerate(self.plans) if _has(d, "row_model")]
        self.layers: dict[str, list[tuple[int, NoiseSpec]]] = {}
        for p, d in enumerate(self.plans):
            for spec in d.row_noise() if _has(d, "row_noise") else []:
                if spec.nu > 0:
                    self.layers.setdefault(spec.layer, []).append((p, spec))
        self._streams = {layer: stream_id(f"layer:{layer}") for layer in self.layers}
        self._handles: list[Any] = []
        # the current call: plan, keys, rows of each plan, and how often each layer has run
        self._call: tuple[Tensor, Tensor, dict[int, Tensor | None], dict[str, int]] | None = None
        # each noise layer's output shape (batch dim dropped), seen by the last call's hook, and
        # the current call's noise drawn before the forward for it (see :meth:`_draw_ahead`)
        self._shapes: dict[str, torch.Size] = {}
        self._ahead: dict[tuple[str, int], Tensor] = {}
        self._model: nn.Module = base
        self._entered = 0

    @property
    def device(self) -> torch.device:
        t = next(iter(self.base.parameters()), None)
        return t.device if t is not None else torch.device("cpu")

    def __enter__(self) -> RowForward:
        if self._entered == 0:
            for layer in self.layers:
                mod = self.base.get_submodule(layer)
                self._handles.append(
                    mod.register_forward_hook(partial(self._hook, layer), prepend=True)
                )
            if self.channels_last:
                users = _CHANNELS_LAST.get(self.base, 0)
                if users == 0:
                    self.base.to(memory_format=torch.channels_last)
                _CHANNELS_LAST[self.base] = users + 1
            self._model = torch.compile(self.base) if self.compile else self.base
        self._entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered -= 1
        if self._entered == 0:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            if self.channels_last:
                users = _CHANNELS_LAST.pop(self.base) - 1
                if users:
                    _CHANNELS_LAST[self.base] = users
                else:
                    self.base.to(memory_format=torch.contiguous_format)
            self._model = self.base

    def rows_of(self, p: int) -> Tensor | None:
        """Row indices of plan ``p`` in the current call (``None``: every row)."""
        assert self._call is not None
        plan, _, cache, _ = self._call
        if p not in cache:
            cache[p] = None if len(self.plans) == 1 else (plan == p).nonzero()[:, 0]
        return cache[p]

    def __call__(self, x: Tensor, plan: Tensor, keys: Tensor, bpda: bool = False) -> Tensor:
        """Logits (rows, K) for rows ``x`` under plans ``plan`` (rows,) and noise keys ``keys``
        (rows,) int64. With ``bpda``, a plan that declares its input transform non-differentiable
        (``differentiable = False``) is applied straight-through: its value forward, the
        gradient of its ``surrogate`` (the identity by default) backward."""
        if not self._entered:
            with self:
                return self(x, plan, keys, bpda)
        self._call = (plan, keys, {}, {})
        try:
            self._draw_ahead()
            if self.inputs:
                x = x.clone()
                for p in self.inputs:
                    idx = self.rows_of(p)
                    if idx is None:
                        x = self._input(p, x, KeyedRNG(keys).stream("input"), bpda)
                    elif idx.numel():
                        rng = KeyedRNG(take(keys, idx)).stream("input")
                        put(x, idx, self._input(p, take(x, idx), rng, bpda))
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision_context(self.precision, x.device):
                z = self._model(x)
            if z.dtype in (torch.bfloat16, torch.float16):
                z = z.float()
            for p in self.outputs:
                idx = self.rows_of(p)
                if idx is None:
                    z = self.plans[p].row_logits(z)
                elif idx.numel():
                    z[idx] = self.plans[p].row_logits(z[idx])
            for p in self.models:
                idx = self.rows_of(p)
                rows = slice(None) if idx is None else idx
                if idx is None or idx.numel():
                    rng = KeyedRNG(keys[rows]).stream("model")
                    out = self.plans[p].row_model(x[rows], rng, self._plain)
                    z = out if idx is None else z.index_put((idx,), out.to(z.dtype))
            return z
        finally:
            self._call = None
            self._ahead.clear()

    def _draw_ahead(self) -> None:
        """Draw the feature noise of this call before the forward, for layers whose output shape
        the last call saw: the same draws the hook would make (same keys, stream and shape), but
        made while the engine's small tensors are still in cache. Drawn inside the hook, right
        after the convolutions have evicted them, the same draw measured 2-3x slower."""
        for layer, shape in self._shapes.items():
            for p, spec in self.layers[layer]:
                z = self._draw(p, spec, (self._streams[layer],), shape, torch.float32)
                if z is not None:
                    self._ahead[(layer, p)] = z

    def _draw(
        self, p: int, spec: NoiseSpec, stream: tuple[int, ...], shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Tensor | None:  # fmt: skip
        """Plan ``p``'s unit noise for its rows of the current call (None: it has none)."""
        assert self._call is not None
        idx, keys = self.rows_of(p), self._call[1]
        if idx is not None and idx.numel() == 0:
            return None
        keys = keys if idx is None else take(keys, idx)
        return unit_noise(KeyedRNG(keys).stream(*stream), shape, spec.dist, dtype)

    def _plain(self, x: Tensor) -> Tensor:
        """The base model alone on ``x`` (no row's noise hooks), in this executor's precision:
        what a ``row_model`` defense calls for its own samples."""
        call, self._call = self._call, None
        try:
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision_context(self.precision, x.device):
                z = self._model(x)
            return z.float() if z.dtype in (torch.bfloat16, torch.float16) else z
        finally:
            self._call = call

    def _input(self, p: int, x: Tensor, rng: KeyedRNG, bpda: bool) -> Tensor:
        plan = self.plans[p]
        out = plan.row_input(x, rng)
        if bpda and not getattr(plan, "differentiable", True) and torch.is_grad_enabled():
            sur = plan.surrogate(x)  # BPDA: the transform's value, the surrogate's gradient
            return sur + (out - sur).detach()
        return out

    def _hook(self, layer: str, module: nn.Module, args: Any, out: Any) -> Tensor | None:
        if self._call is None:  # a forward of the base model outside this executor: untouched
            return None
        if not isinstance(out, Tensor):
            raise TypeError(f"layer {layer!r} returns {type(out).__name__}, not a tensor")
        calls = self._call[3]
        # a module that runs twice in one forward (a shared block) gets fresh noise each time
        n = calls[layer] = calls.get(layer, -1) + 1
        stream = (self._streams[layer],) if n == 0 else (self._streams[layer], n)
        shape = out.shape[1:]
        if n == 0:
            self._shapes[layer] = shape
        for p, spec in self.layers[layer]:
            z = self._ahead.pop((layer, p), None) if n == 0 else None
            if z is not None and z.shape[1:] == shape:
                z = z.to(out.dtype)  # unit_noise draws in float32 and converts the same way
            else:
                z = self._draw(p, spec, stream, shape, out.dtype)
                if z is None:  # no rows of this plan in the call
                    continue
            idx = self.rows_of(p)
            d = spec.nu * z if spec.scale is None else spec.nu * channel_view(spec.scale, z) * z
            out = out + d if idx is None else out.index_add(0, idx, d)
        return out
