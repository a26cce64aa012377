"""Fast forward/backward for ``y = U diag(s) Vh x + b`` (the VectorFit layer); torch only.

Notation: ``x`` is ``N x a`` (N tokens, a = d_in), ``U`` is ``c x r`` (c = d_out), ``Vh`` is
``r x a``, ``r = min(a, c)``, ``G = dL/dy`` is ``N x c``. Costs are in multiply-adds (MACs).

Two exact ways to compute the layer and its gradients
======================================================

(a) factorised -- never forms ``W``::

        forward    h = x Vh^T                       N r a
                   y = h (U diag s)^T + b           N r c      (s folded into the c x r matrix U,
                                                                not into the N x r activation)
        backward   P = G U                          N c r      (only if x or s needs a gradient)
                   dx = P (diag(s) Vh)              N r a      (only if x needs a gradient)
                   ds = sum_n P * h                 N r        (one fused pass, no N x r temporary
                                                                beyond P)
        saved:     h (N x r) -- not x. For an MLP down-projection (a = 4c) that is 4x less than
                   what LoRA or a dense weight gradient keeps (x itself). In low-memory mode: x
                   instead, when that costs no more memory (see below), and h is recomputed in
                   the backward (N r a more MACs).

(b) dense -- rebuilds ``W = U diag(s) Vh`` once per forward::

        forward    W = (U diag s) Vh                r c a      (amortised over the N tokens)
                   y = x W^T + b                    N a c
        backward   dx = G W                         N c a      (only if x needs a gradient)
                   M = G^T x                        N c a      (only if s needs a gradient)
                   ds = diag(U^T M V)               r c a      (U^T M, then a row-wise dot with Vh)
        saved:     x (shared with every other consumer of x: q, k, v keep ONE copy between them)
                   and W (c x a, a weight-sized buffer per layer, only when dx is needed) -- or,
                   in low-memory mode, not W: the backward rebuilds it (another r c a MACs).

        ``ds`` via ``G^T x`` costs N c a + r c a; the alternative through the projections,
        ``sum_n (G U) * (x V)``, costs N r (a + c), which is never cheaper when r = min(a, c)
        and N >= r, so the dense path always uses ``G^T x``.

Training (x, s need gradients), with r = min(a, c):

        factorised  2 N r (a + c)
        dense       3 N a c + 2 r a c

  * square layers (a = c = r = d: attention q, k, v, o): factorised 4 N d^2, dense
    3 N d^2 + 2 d^3  ->  dense is cheaper as soon as N > 2 d (e.g. minilm, d = 384, N = 32 x 64 =
    2048: 3.4 vs 4 N d^2, i.e. 16% fewer MACs, and one big GEMM instead of two thin ones).
  * rectangular layers (a != c, e.g. MLP up/down 384 <-> 1536): with r = min(a, c) the factorised
    path is 2 N r (a + c) = 2.5 N a c for a 1:4 shape, against 3 N a c + ... for dense:
    factorised always wins (and saves less activation memory, see above).
  * grouped-query k/v projections (Llama: 576 -> 192) are rectangular too: factorised.

Inference (no gradient needed): factorised costs N r (a + c), dense N a c once ``W`` exists. ``W``
is cached on the layer (keyed by the values of sigma -- not its version counter, which ``.data``
edits do not bump -- and by the factors' storage and the dtype) while sigma does not change, so evaluation and generation cost one GEMM per layer, like the base model. The cache is
dropped as soon as the layer runs with gradients again (training must not pay its memory).

The cost model is the MAC count above; ``DENSE_BIAS`` documents the per-layer timings that
validate it (``benchmarks/speed.py --layers``).

Low-memory mode (:func:`low_memory`, or ``VECTORFIT_LOW_MEMORY=1``), off by default
---------------------------------------------------------------------------------------
It trades multiply-adds for activation memory in two ways; the numbers stay the same (the
recomputed tensors are computed by the same operations as in the forward pass).

1. The dense path does not keep ``W``. Saving it keeps one weight-sized buffer per dense-path
   layer alive from the forward to the backward pass: d^2 floats against the N d of the input it
   multiplies, i.e. a fraction d / N of that layer's activation memory. Rebuilding ``W`` in the
   backward instead costs r c a MACs, a fraction d / (3 N) of the layer's training work.
2. A layer keeps its input ``x`` for ``ds`` rather than ``h = Vh x`` (N x r, a tensor nobody else
   keeps) when that costs no more memory: when ``r == a`` (``x`` is no larger than ``h``: square
   and widening layers), or when an earlier VectorFit layer of the same forward pass already keeps
   this very tensor (k, v after q; up after gate: then it is free). The input is often kept anyway
   -- shared by q, k, v or by gate, up, or kept by the attention kernel (the o-projection's input
   is the saved output of ``scaled_dot_product_attention``) -- while ``h`` never is. The factorised
   path then recomputes ``h`` in the backward (N r a MACs), unless the dense path (which keeps
   ``x`` as well) costs fewer MACs; :func:`choose_path` counts the recomputation.
   Measured on SmolLM2 (decoder-only, N = 1024): 180 MB less kept for the backward, peak memory
   1.146 -> 1.045 of LoRA r=1's, for ~10% more GEMM multiply-adds. Where the input is private
   and ``r == a`` (a BERT-style intermediate projection) the memory is the same and the
   recomputation is paid for nothing.

Both trades grow with d / N (1) or are a fixed fraction of the layer's work (2), so no shape tells
which one a user would rather pay; the default keeps ``W`` and ``h`` (speed). The measured trade
(memory saved, time paid) is in ``benchmarks/SPEED.md``.

Not done: fusing q, k, v (they share their input) into one call. Measured on the minilm shape
(N = 2048, three 384x384 dense layers, fwd+bwd): 68.9 ms separately vs 66.7 ms fused (-3%, within
noise, ~1% of a training step), while Hugging Face models call the three modules separately, so a
fused path would have to stash outputs between module calls keyed on the input tensor -- fragile
for a gain we cannot measure reliably.

Precision: everything runs in the *compute dtype* -- the activation dtype, or the autocast dtype
when CPU/CUDA autocast is on (the same casting ``F.linear`` does under autocast). ``sigma`` and
``bias`` are float32 parameters: they are cast inside the function and their gradients are summed
in float32 and returned in float32.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

__all__ = [
    "svd_fp32",
    "svd_linear",
    "svd_linear_reference",
    "choose_path",
    "force_path",
    "low_memory",
    "low_memory_enabled",
    "PATHS",
    "DENSE_BIAS",
    "LOW_MEMORY_DENSE_BIAS",
]

PATHS = ("auto", "factorised", "dense", "reference")

#: Multiplier on the dense path's MAC count before comparing with the factorised one (< 1 favours
#: dense). Measured (``benchmarks/speed.py --layers``, AMD EPYC, AVX-512, 1 thread, fwd+bwd, ms):
#:
#:     shape (N, d_in -> d_out)   fp32 factorised / dense    bf16 factorised / dense   MAC model f/d
#:     2048, 384 -> 384              28.5 / 23.0  (0.81)        14.8 / 11.6  (0.78)      4 / 3.375 (0.84)
#:     2048, 768 -> 768              98.1 / 91.3  (0.93)        50.8 / 48.2  (0.95)      4 / 3.75  (0.94)
#:     1024, 576 -> 576              30.5 / 31.2  (1.02)        15.0 / 15.7  (1.05)      4 / 4.125 (1.03)
#:     2048, 384 -> 1536             70.1 / 93.5                32.6 / 44.5              factorised
#:     2048, 1536 -> 384             67.1 / 88.2                33.0 / 44.2              factorised
#:     1024, 576 -> 192 (GQA k/v)     7.1 /  8.7                 3.9 /  4.7              factorised
#:
#: The plain MAC model predicts the measured ratio within ~3%, so no correction is applied.
DENSE_BIAS = 1.0

#: Multiplier on the dense path's MAC count in low-memory mode. It was 0.95 (near-ties went to the
#: dense path, which keeps the shared input ``x`` where the factorised path kept ``h = Vh x``); since
#: the factorised path keeps ``x`` too in low-memory mode whenever that is no larger (see
#: :func:`svd_linear`), both paths keep the same thing there and the plain MAC count decides.
LOW_MEMORY_DENSE_BIAS = 1.0

_forced: Optional[str] = None
_low_memory: Optional[bool] = None


_env_policy: Optional[str] = None  # VECTORFIT_LAYER_PATH, read once (see _policy)


def _policy() -> str:
    """The path every layer uses: :func:`force_path` inside its block, else ``VECTORFIT_LAYER_PATH``
    (read once per process, when a layer first needs it: generation asks once per layer and
    token, and an environment lookup costs about as much as the cached-weight check itself)."""
    global _env_policy
    if _forced is not None:
        return _forced
    if _env_policy is None:
        p = os.environ.get("VECTORFIT_LAYER_PATH", "auto").strip().lower() or "auto"
        if p not in PATHS:
            raise ValueError(f"VECTORFIT_LAYER_PATH={p!r}; expected one of {PATHS}")
        _env_policy = p
    return _env_policy


@contextlib.contextmanager
def force_path(path: str) -> Iterator[None]:
    """Make every VectorFit layer use ``path`` (one of :data:`PATHS`) inside the block (tests,
    benchmarks). ``"reference"`` is the straightforward ``F.linear(F.linear(x, Vh) * s, U, b)``."""
    global _forced
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    old, _forced = _forced, path
    try:
        yield
    finally:
        _forced = old


def low_memory_enabled() -> bool:
    """Whether low-memory mode is on (:func:`low_memory`, else ``VECTORFIT_LOW_MEMORY``)."""
    if _low_memory is not None:
        return _low_memory
    v = os.environ.get("VECTORFIT_LOW_MEMORY", "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"VECTORFIT_LOW_MEMORY={v!r}; expected 1/true/yes/on or 0/false/no/off")


@contextlib.contextmanager
def low_memory(enabled: bool = True) -> Iterator[None]:
    """Train in low-memory mode inside the block (see the module docstring): the dense path keeps
    no weight-sized buffer between forward and backward, at the price of rebuilding ``W``.

    The mode is read when a layer runs its forward pass; the backward follows what the forward
    saved, so only the forward pass needs to run inside the block."""
    global _low_memory
    old, _low_memory = _low_memory, bool(enabled)
    try:
        yield
    finally:
        _low_memory = old


def choose_path(
    n: int,
    d_in: int,
    d_out: int,
    rank: int,
    need_x: bool,
    need_s: bool,
    low_mem: Optional[bool] = None,
    keep_input: Optional[bool] = None,
) -> str:
    """``"factorised"`` or ``"dense"`` for one training call (see the module docstring).

    Args:
        n: tokens in the call; d_in, d_out, rank: the layer's shape.
        need_x, need_s: whether the input and the singular values need gradients.
        low_mem: low-memory mode; ``None`` reads the current setting.
        keep_input: whether the call must keep its input ``x`` rather than ``h = Vh x`` for the
            backward (low-memory mode only; the factorised path then recomputes ``h``, ``N r a``
            more MACs). ``None``: low-memory mode and ``rank == d_in`` (``x`` no larger than ``h``).

    Returns:
        The path with fewer multiply-adds (weighted by ``DENSE_BIAS``, or by
        ``LOW_MEMORY_DENSE_BIAS`` in low-memory mode).
    """
    low_mem = low_memory_enabled() if low_mem is None else low_mem
    a, c, r = d_in, d_out, rank
    if keep_input is None:
        keep_input = low_mem and r == a
    fact = n * r * (a + c)  # forward
    dense = r * c * a + n * a * c
    if need_x or need_s:
        fact += n * c * r
    if need_x:
        fact += n * r * a
        dense += n * c * a + (r * c * a if low_mem else 0)  # dx = G W (W rebuilt in low-memory mode)
    if need_s:
        fact += n * r + (n * r * a if low_mem and keep_input else 0)  # elementwise pass; recomputed h
        dense += n * c * a + r * c * a
    return "dense" if dense * (LOW_MEMORY_DENSE_BIAS if low_mem else DENSE_BIAS) < fact else "factorised"


# ------------------------------------------------------------------------------------- autograd
def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


class _Factorised(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, U: Tensor, Vh: Tensor, s: Tensor, b: Optional[Tensor], keep_input: bool) -> Tensor:  # type: ignore[override]
        dt = U.dtype
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        x2d = _cast(x2d, dt)
        sc = s.to(dt)
        h = x2d @ Vh.t()
        Us = U * sc  # c x r, cheap; keeps the N x r activation free of an elementwise pass
        y = torch.addmm(b.to(dt), h, Us.t()) if b is not None else h @ Us.t()
        # ds needs h = x Vh^T: keep h (default), or keep x and recompute h in the backward
        # (keep_input: low-memory mode, where x is kept anyway or is no larger than h).
        ctx.keep_input = keep_input and need_s
        kept = (x2d if ctx.keep_input else h) if need_s else None
        ctx.save_for_backward(kept, U, Vh, sc if need_x else None)
        ctx.has_b = b is not None
        return y

    @staticmethod
    def backward(ctx, G: Tensor):  # type: ignore[override]
        kept, U, Vh, sc = ctx.saved_tensors
        need_x, _, _, need_s, need_b, _ = ctx.needs_input_grad
        G = _cast(G, U.dtype)
        dx = ds = db = None
        if need_x or need_s:
            P = G @ U
            if need_x:
                dx = P @ (Vh * sc[:, None])
            if need_s:
                h = kept @ Vh.t() if ctx.keep_input else kept  # the forward's h, kept or recomputed
                ds = _colsum_product(P, h)
        if need_b and ctx.has_b:
            db = G.sum(0, dtype=torch.float32)
        return dx, None, None, ds, db, None


class _Dense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, U: Tensor, Vh: Tensor, s: Tensor, b: Optional[Tensor], low_mem: bool) -> Tensor:  # type: ignore[override]
        dt = U.dtype
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        x2d = _cast(x2d, dt)
        sc = s.to(dt)
        W = (U * sc) @ Vh
        y = torch.addmm(b.to(dt), x2d, W.t()) if b is not None else x2d @ W.t()
        # dx = G W needs W: keep it (default), or in low-memory mode keep only the r-vector of
        # singular values it was built from and rebuild W in the backward (r c a MACs).
        keep_w = need_x and not low_mem
        ctx.save_for_backward(
            x2d if need_s else None, U, Vh, W if keep_w else None, sc if need_x and not keep_w else None
        )
        ctx.has_b = b is not None
        return y

    @staticmethod
    def backward(ctx, G: Tensor):  # type: ignore[override]
        x2d, U, Vh, W, sc = ctx.saved_tensors
        need_x, _, _, need_s, need_b, _ = ctx.needs_input_grad
        G = _cast(G, U.dtype)
        dx = ds = db = None
        if need_x:
            dx = G @ (W if W is not None else (U * sc) @ Vh)  # the forward's W, kept or rebuilt
        if need_s:
            M = G.t() @ x2d  # c x a: the dense weight gradient
            c, r = U.shape
            a = Vh.shape[1]
            if r * a <= c * r:
                ds = _rowdot(U.t() @ M, Vh)  # r x a
            else:
                ds = _rowdot((M @ Vh.t()).t(), U.t())  # (c x r)^T
        if need_b and ctx.has_b:
            db = G.sum(0, dtype=torch.float32)
        return dx, None, None, ds, db, None


def _colsum_product(P: Tensor, h: Tensor) -> Tensor:
    """``(P * h).sum(0)`` in float32: the singular-value gradient from the projections."""
    return torch.mul(P, h).sum(0, dtype=torch.float32)


def _rowdot(A: Tensor, B: Tensor) -> Tensor:
    """``(A * B).sum(1)`` in float32 (``A``, ``B``: ``r x k``)."""
    return torch.mul(A, B).sum(1, dtype=torch.float32)


# ------------------------------------------------------------------------------------- entry
def _compute_dtype(x: Tensor, storage: torch.dtype) -> Optional[torch.dtype]:
    """The dtype the matmuls run in, or ``None`` when the straightforward path must decide (a
    dtype mismatch it would report as an error, or a dtype autocast does not touch)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype if x.dtype == storage else None


def svd_linear_reference(x: Tensor, U: Tensor, Vh: Tensor, s: Tensor, b: Optional[Tensor]) -> Tensor:
    """The straightforward implementation: ``F.linear(F.linear(x, Vh) * s, U, b)``."""
    F = torch.nn.functional
    return F.linear(F.linear(x, Vh) * s.to(x.dtype), U, b.to(x.dtype) if b is not None else None)


def _same_sigma(entry, key: tuple, s: Tensor) -> bool:
    """Whether a cache entry ``(key, sigma copy, ...)`` was made for these factors and these values
    of ``s``. The values are compared, not ``s._version``: edits through ``s.data`` (EMA / SWA
    swaps, clamps) do not bump the version counter and would serve a stale ``W``. Comparing r
    floats costs nothing next to the GEMM the cache saves (on a GPU it is one host sync per layer)."""
    return entry is not None and entry[0] == key and torch.equal(entry[1], s)


def _dense_key(U: Tensor, Vh: Tensor, s: Tensor, dtype: torch.dtype) -> tuple:
    # U and Vh are frozen buffers: their storage and version identify them (a .to() or a reload
    # gives new storage). sigma is what changes, and it is matched by value (_same_sigma).
    return (s.data_ptr(), U.data_ptr(), U._version, Vh.data_ptr(), Vh._version, dtype, s.device)


def _dense_cache_hit(owner, x: Tensor, U: Tensor, Vh: Tensor, s: Tensor) -> Optional[Tensor]:
    """The cached ``W`` if it serves this no-grad call exactly (same factors, same values of
    ``s``, same compute dtype, the ``"auto"`` path), else ``None``; never builds anything."""
    entry = owner.__dict__.get("_vf_dense_cache")
    if entry is None:
        return None
    dtype = _compute_dtype(x, U.dtype)
    if dtype is None or _policy() != "auto" or not _same_sigma(entry, _dense_key(U, Vh, s, dtype), s):
        return None
    return entry[2]


def _cached_dense_weight(owner, U: Tensor, Vh: Tensor, s: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    key = _dense_key(U, Vh, s, dtype)
    cache = getattr(owner, "_vf_dense_cache", None)
    if _same_sigma(cache, key, s):
        return cache[2]
    # Build W the second time the same sigma is seen (or at once when rebuilding costs less than
    # the factorised pass it replaces): a lone small no-grad call does not pay for a rebuild.
    seen = getattr(owner, "_vf_dense_seen", None)
    if _same_sigma(seen, key, s):
        with torch.no_grad():
            W = ((U.to(torch.float32) * s.to(torch.float32)) @ Vh.to(torch.float32)).to(dtype)
        owner._vf_dense_cache = (key, seen[1], W)
        return W
    owner._vf_dense_seen = (key, s.detach().clone())
    return None


def drop_cache(owner) -> None:
    """Forget ``owner``'s cached dense weight (frees its memory)."""
    if getattr(owner, "_vf_dense_cache", None) is not None:
        owner._vf_dense_cache = None
    owner._vf_dense_seen = None


def _cast_factors(owner, U: Tensor, Vh: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``U`` and ``Vh`` in the compute dtype, for a training call.

    Under autocast the frozen float32 factors would be cast on every forward pass (autocast caches
    casts of trainable leaves only): 2 d^2 values per square layer and step, ~3% of a bf16 minilm
    step. The cast copies are kept on the layer instead. They cost no extra peak memory: every
    training forward saves them for its backward anyway, so at the peak they exist either way."""
    if U.dtype == dtype:
        return U, Vh
    if owner is None:
        return U.to(dtype), Vh.to(dtype)
    key = (U.data_ptr(), U._version, Vh.data_ptr(), Vh._version, dtype, U.device)
    cache = getattr(owner, "_vf_cast_cache", None)
    if cache is None or cache[0] != key:
        cache = (key, U.to(dtype), Vh.to(dtype))
        owner._vf_cast_cache = cache
    return cache[1], cache[2]


def svd_linear(
    x: Tensor,
    U: Tensor,
    Vh: Tensor,
    s: Tensor,
    b: Optional[Tensor],
    owner: Optional[object] = None,
) -> Tensor:
    """``y = U diag(s) Vh x + b`` by the cheapest exact path for this call.

    Args:
        x: ``(..., d_in)`` activations.
        U, Vh: frozen factors (``d_out x r``, ``r x d_in``) in the storage dtype.
        s: singular values (float32 parameter, ``r``).
        b: bias (float32, ``d_out``) or ``None``.
        owner: an object (the layer) that may hold a cached dense weight for no-grad calls.
    """
    if owner is not None and torch.compiler.is_compiling():
        # Under torch.compile the graph is the optimisation; the value-matched caches (storage
        # pointers, a comparison of s) would only add guards and recompile whenever s changes.
        owner = None
    if owner is not None and not torch.is_grad_enabled():
        # Generation calls each layer once per new token on a handful of rows, so what this
        # function does besides the GEMM is the cost: a cache hit goes straight to F.linear.
        W = _dense_cache_hit(owner, x, U, Vh, s)
        if W is not None:
            return torch.nn.functional.linear(x, W, _cast(b, W.dtype))
    policy = _policy()
    dtype = _compute_dtype(x, U.dtype)
    if policy == "reference" or dtype is None:
        return svd_linear_reference(x, U, Vh, s, b)
    c, r = U.shape
    a = Vh.shape[1]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, a)
    n = x2d.shape[0]
    need_grad = torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or (b is not None and b.requires_grad))
    dev = x.device.type

    if not need_grad:
        # Inference: one GEMM with the cached W (see _cached_dense_weight), else the cheaper path.
        if owner is not None and owner.__dict__.get("_vf_cast_cache") is not None:
            owner._vf_cast_cache = None  # training's cast factors: inference keeps W instead
        W = _cached_dense_weight(owner, U, Vh, s, dtype) if owner is not None and policy == "auto" else None
        xc = _cast(x2d, dtype)
        bc = _cast(b, dtype)
        U, Vh = _cast(U, dtype), _cast(Vh, dtype)
        if W is None and (policy == "dense" or (policy == "auto" and r * c * a + n * a * c < n * r * (a + c))):
            W = (U * s.to(dtype)) @ Vh
        if W is not None:
            y = torch.addmm(bc, xc, W.t()) if bc is not None else xc @ W.t()
        else:
            h = xc @ Vh.t()
            Us = U * s.to(dtype)
            y = torch.addmm(bc, h, Us.t()) if bc is not None else h @ Us.t()
        return y.reshape(*lead, c)

    if owner is not None:
        drop_cache(owner)
    U, Vh = _cast_factors(owner, U, Vh, dtype)  # autocast: cast like F.linear would (kept, see there)
    low_mem = low_memory_enabled()  # read once: the path choice and what _Dense keeps must agree
    need_s = s.requires_grad
    # Low-memory mode keeps x instead of h = Vh x for ds when that is no larger (r == a) or when x is
    # kept anyway by an earlier VectorFit layer of this forward pass (q -> k, v; gate -> up).
    # (Under torch.compile only the shape rule applies: no storage pointers, no Python-side state.)
    shareable = (low_mem and need_s and x.dtype == dtype and not torch.compiler.is_compiling()
                 and x2d.data_ptr() == x.data_ptr())  # x itself, not a cast or reshaped copy
    keep_input = low_mem and need_s and (r == a or (shareable and _kept_by_earlier_layer(x)))
    if policy == "auto":
        policy = choose_path(n, a, c, r, x.requires_grad, need_s, low_mem, keep_input)
    with torch.autocast(dev, enabled=False):
        if policy == "dense":
            y = _Dense.apply(x2d, U, Vh, s, b, low_mem)
        else:
            y = _Factorised.apply(x2d, U, Vh, s, b, keep_input)
    if shareable and (policy == "dense" or keep_input):
        _note_kept_input(x)
    return y.reshape(*lead, c)


def svd_conv2d(x: Tensor, U: Tensor, Vh: Tensor, s: Tensor, b: Optional[Tensor], conv: Callable,
               kernel_shape: tuple, owner: Optional[object] = None) -> Tensor:
    """A 2-D convolution whose kernel is ``U diag(s) Vh`` reshaped to ``kernel_shape``.

    The kernel is rebuilt (``r c k`` multiply-adds, k = in/groups * kh * kw) and the layer's own
    convolution runs once: the base convolution's cost plus, in training, autograd's kernel gradient
    (what full fine-tuning computes too) and ``ds = diag(U^T dW Vh^T)``. Why not the other exact
    form, a ``Vh`` convolution into r channels followed by a 1x1 ``U diag(s)`` convolution: it needs
    no kernel gradient (``Vh`` is frozen), but adds an r x c pointwise convolution at every output
    pixel, forward and twice backward, and cannot express groups (depthwise convolutions) or padding
    modes in its first step. Measured on MobileNetV2 (benchmarks/conv_speed.py, SPEED.md), the
    rebuilt kernel is 1.59x faster on the 3x3 stem and about level on the 1x1 layers (the two-conv
    form wins on the late and projection layers, where a batch has fewer output pixels than the layer
    has output channels; choosing per layer would save 1-4% of a step). Without a gradient the
    rebuilt kernel is cached while ``s`` does not change (as for the linear layer).

    Args:
        x: ``(N, C_in, H, W)`` input.
        U, Vh: frozen factors (``c x r``, ``r x k``) in the storage dtype.
        s: singular values (float32, ``r``).
        b: bias (float32, ``c``) or ``None``.
        conv: ``conv(x, weight, bias)``, the base layer's ``_conv_forward`` (stride, padding,
            padding mode, dilation and groups as the base layer has them).
        kernel_shape: the base kernel's shape ``(c, in/groups, kh, kw)``.
        owner: the layer, which may keep the rebuilt kernel for no-grad calls.
    """
    if owner is not None and torch.compiler.is_compiling():
        owner = None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = U.dtype if autocast else x.dtype  # under autocast the convolution casts its kernel itself
    need_grad = torch.is_grad_enabled() and (x.requires_grad or s.requires_grad or (b is not None and b.requires_grad))
    W = None
    if not need_grad and owner is not None:
        W = _cached_dense_weight(owner, U, Vh, s, dtype)
    elif owner is not None:
        drop_cache(owner)
    if W is None:
        if need_grad:
            W = ((U.float() * s.float()) @ Vh.float()).to(dtype)
        else:
            with torch.no_grad():
                W = ((U.float() * s.float()) @ Vh.float()).to(dtype)
    return conv(x, W.reshape(kernel_shape), _cast(b, W.dtype) if not autocast else b)


# Low-memory mode: the last input a VectorFit layer kept for its backward (x itself, not a copy),
# so that the next layer reading the same tensor (k, v after q; up after gate) keeps it too, for
# free, instead of its own projection. Weak: it never keeps a tensor alive; per thread.
_last_kept = threading.local()


def _kept_by_earlier_layer(x: Tensor) -> bool:
    last = getattr(_last_kept, "entry", None)
    return last is not None and last[0]() is x and last[1] == x._version


def _note_kept_input(x: Tensor) -> None:
    _last_kept.entry = (weakref.ref(x), x._version)


def mixed_rows_linear(
    x: Tensor,
    rows: Tensor,
    B: Optional[Tensor],
    U: Optional[Tensor] = None,
    Vh: Optional[Tensor] = None,
    S: Optional[Tensor] = None,
    W: Optional[Tensor] = None,
) -> Tensor:
    """A linear map whose singular values and bias differ per batch row (mixed-adapter batches).

    Args:
        x: ``batch x ... x d_in``.
        rows: ``batch`` indices into the stacks below (which vector set each row uses).
        B: ``n_sets x d_out`` biases, or ``None``.
        U, Vh, S: shared factors and ``n_sets x r`` singular values (decomposed layer), or
        W: the shared dense weight (a bias-only layer; ``U``, ``Vh``, ``S`` then ``None``).

    Returns:
        ``batch x ... x d_out``: row ``i`` is ``U (S[rows[i]] * Vh x_i) + B[rows[i]]``.
    """
    F = torch.nn.functional
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
    if W is not None:
        y = F.linear(x, W)
    else:
        y = F.linear(F.linear(x, Vh) * S.to(x.dtype)[rows].view(shape), U)
    return y if B is None else y + B.to(x.dtype)[rows].view(shape)


def svd_fp32(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``matrix`` computed in float32 whatever its dtype.

    Args:
        matrix: a ``d_out x d_in`` tensor.

    Returns:
        ``(U, S, Vh)`` in float32 with ``matrix ~= U @ diag(S) @ Vh``.
    """
    m = matrix.detach().to(torch.float32)
    if m.shape[0] < m.shape[1]:
        # LAPACK is ~1.5x faster on tall matrices than on wide ones (measured: 768x3072 0.30 s,
        # its transpose 0.19 s), so decompose W^T = U' S Vh' and read W = Vh'^T S U'^T.
        Ut, S, Vht = torch.linalg.svd(m.t(), full_matrices=False)
        return Vht.t().contiguous(), S, Ut.t().contiguous()
    return torch.linalg.svd(m, full_matrices=False)
