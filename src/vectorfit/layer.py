"""The VectorFit layer: peft's tuner layer for a linear map kept as its thin SVD.

    y = U diag(s) Vh x + b        U: d_out x r, Vh: r x d_in, r = min(d_out, d_in)

One class serves ``nn.Linear`` and Hugging Face's GPT-2 ``Conv1D`` (a linear map whose weight is
stored transposed): both are the matrix ``d_out x d_in`` here. The arithmetic lives in
:mod:`vectorfit.functional` (torch only); this file is the peft contract around it.

What is stored, and why:

* ``U``, ``Vh``: frozen factors in the base weight's dtype, shared by every adapter of the layer.
  They are frozen *parameters* (``requires_grad=False``), so FSDP shards them and DDP never
  re-broadcasts them, but they are kept out of ``state_dict``: everything frozen is rebuilt from the
  base model, and checkpoints hold only what training changes.
* The base layer's dense weight is released once it is decomposed (it would double the memory);
  ``base_layer.weight`` is then a one-element NaN placeholder of the right shape, dtype and device,
  so code that only reads its metadata works and code that would compute with it fails loudly.
  :meth:`unload_and_optionally_merge_module` puts a real weight back (``U diag(s0) Vh``, or the
  merged one) when peft hands the base layer back.
* Per adapter, in peft's ``ParameterDict`` s named by :attr:`adapter_layer_names`: the singular
  values ``vectorfit_sigma`` (``s`` itself, or ``z`` with ``s = s0 (1 + z)`` for the relative form)
  and the bias ``vectorfit_bias`` (absolute, initialised to the base bias or 0). Both float32: the
  optimizer updates them in full precision for bf16/fp16 models too.

A layer whose singular values no adapter trains (f1/f2 in ``sigma_attn_bias``) is not decomposed:
it keeps its dense weight and trains only a bias.

With several active adapters, or with a merged set, the layer computes with
``s = s0 + sum_a (s_a - s0)`` and ``b = b0 + sum_a (b_a - b0)``: all adapters share ``U`` and
``Vh``, so this is exactly the sum of their weight updates.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import Tensor, nn

from .functional import mixed_rows_linear, svd_conv2d, svd_fp32, svd_linear  # noqa: F401  (svd_fp32: public here too)
from .targets import is_conv1d, is_conv2d

#: peft's name for "no adapter" in a mixed batch (``adapter_names=[..., "__base__", ...]``).
BASE = "__base__"
SIGMA, BIAS = "sigma", "bias"


def matrix_of(module: nn.Module) -> Tensor:
    """The ``d_out x d_in`` matrix of a Linear, a (transposed) Conv1D, or a Conv2d: its kernel
    ``(out, in/groups, kh, kw)`` as ``out x (in/groups * kh * kw)`` (a view; a grouped or depthwise
    convolution is one matrix, as its weight tensor is one)."""
    if is_conv1d(module):
        return module.weight.t()
    if is_conv2d(module):
        return module.weight.reshape(module.weight.shape[0], -1)
    return module.weight


def _placeholder(shape: tuple, like: Tensor) -> Tensor:
    # One element, expanded: metadata (shape, dtype, device) of the released weight at no memory.
    return torch.full((), float("nan"), dtype=like.dtype, device=like.device).expand(*shape)


def _hide_factors(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for name in ("U", "Vh"):
        state_dict.pop(prefix + name, None)


def _fill_factors(module: nn.Module, state_dict: dict, prefix: str, *_: Any) -> None:
    # Checkpoints never hold U / Vh (see above): they keep their values on a strict load.
    for name in ("U", "Vh"):
        if module._parameters.get(name) is not None:
            state_dict.setdefault(prefix + name, module._parameters[name])


class VectorFitLayer(nn.Module, BaseTunerLayer):
    """peft tuner layer ``y = U diag(s) Vh x + b`` over a Linear or Conv1D ``base_layer``.

    Args:
        base_layer: the layer to adapt (``nn.Linear`` or ``Conv1D``); its weight is released once decomposed.
        adapter_name: the first adapter's name.
        train_sigma: whether this adapter trains the singular values here.
        train_bias: whether this adapter trains the bias here.
        sigma_param: ``"absolute"`` or ``"relative"`` (see :class:`~vectorfit.VectorFitConfig`).
        decompose: returns ``(U, S, Vh)`` of the base matrix in float32 (the SVD cache); called once,
            when an adapter first trains singular values on this layer.
    """

    adapter_layer_names = ("vectorfit_sigma", "vectorfit_bias")
    other_param_names = ("vectorfit_sigma_param",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, train_sigma: bool, train_bias: bool,
                 sigma_param: str = "absolute", decompose: Optional[Callable[[], tuple]] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.vectorfit_sigma = nn.ParameterDict({})
        self.vectorfit_bias = nn.ParameterDict({})
        self.vectorfit_sigma_param: dict[str, str] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.conv1d = is_conv1d(base_layer)
        self.conv2d = is_conv2d(base_layer)
        self.kernel_shape = tuple(base_layer.weight.shape)  # a Conv2d's (out, in/groups, kh, kw)
        w = matrix_of(base_layer)
        self.out_features, self.in_features = w.shape
        self.had_bias = base_layer.bias is not None
        self.decomposed = False
        self.register_parameter("U", None)
        self.register_parameter("Vh", None)
        self.register_buffer("sigma0", None, persistent=False)
        b0 = base_layer.bias.detach().float().clone() if self.had_bias else torch.zeros(self.out_features, device=w.device)
        self.register_buffer("bias0", b0, persistent=False)
        self.register_buffer("_merged_weight", None, persistent=False)
        self.register_buffer("_merged_bias", None, persistent=False)
        self._register_state_dict_hook(_hide_factors)
        self._register_load_state_dict_pre_hook(_fill_factors, with_module=True)
        self.__dict__["_rows"] = None  # (adapter names, row index) during a mixed-adapter batch
        self.__dict__["_merged_from"] = None  # see _vector_versions
        self.update_layer(adapter_name, train_sigma, train_bias, sigma_param, decompose)

    # ------------------------------------------------------------------ adapters
    @property
    def _available_adapters(self) -> set[str]:
        return set(self.vectorfit_sigma) | set(self.vectorfit_bias) | set(self.vectorfit_sigma_param)

    def _decompose(self, decompose: Optional[Callable[[], tuple]]) -> None:
        """Replace the dense base weight by its factors (once per layer)."""
        base = self.base_layer
        w = matrix_of(base)
        U, S, Vh = decompose() if decompose is not None else svd_fp32(w)
        dtype, device = w.dtype, w.device
        self.U = nn.Parameter(U.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        self.Vh = nn.Parameter(Vh.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
        self.sigma0 = S.to(device=device, dtype=torch.float32).clone()
        shape = tuple(base.weight.shape)
        base._parameters["weight"] = None  # released; the key keeps its place in the state-dict order
        base.__dict__["weight"] = _placeholder(shape, self.U)  # found before Module.__getattr__
        self.decomposed = True

    def update_layer(self, adapter_name: str, train_sigma: bool, train_bias: bool, sigma_param: str = "absolute",
                     decompose: Optional[Callable[[], tuple]] = None, inference_mode: bool = False) -> None:
        """Add adapter ``adapter_name``'s vectors at their pre-trained values (exact at init)."""
        if sigma_param not in ("absolute", "relative"):
            raise ValueError(f"VectorFitLayer: sigma_param={sigma_param!r} is invalid; use 'absolute' or 'relative'")
        if train_sigma and not self.decomposed:
            self._decompose(decompose)
        device = self.bias0.device
        if train_sigma:
            init = torch.zeros_like(self.sigma0) if sigma_param == "relative" else self.sigma0.clone()
            self.vectorfit_sigma[adapter_name] = nn.Parameter(init)
        if train_bias:
            self.vectorfit_bias[adapter_name] = nn.Parameter(self.bias0.clone().to(device))
        self.vectorfit_sigma_param[adapter_name] = sigma_param
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # ------------------------------------------------------------------ vectors
    def sigma_of(self, adapter_name: str) -> Optional[Tensor]:
        """The singular values adapter ``adapter_name`` computes with (``BASE``: ``s0``); ``None``
        where it trains none here (then it computes with ``s0`` on a decomposed layer)."""
        if adapter_name == BASE or adapter_name not in self.vectorfit_sigma:
            return None
        p = self.vectorfit_sigma[adapter_name]
        return self.sigma0 * (1.0 + p) if self.vectorfit_sigma_param[adapter_name] == "relative" else p

    def bias_of(self, adapter_name: str) -> Optional[Tensor]:
        """The trained bias of ``adapter_name`` here, or ``None`` (then the base bias applies)."""
        if adapter_name == BASE:
            return None
        return self.vectorfit_bias[adapter_name] if adapter_name in self.vectorfit_bias else None

    def _base_bias(self) -> Optional[Tensor]:
        return self.base_layer.bias

    def effective_vectors(self, adapter_names: list[str]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(s, b)`` of the sum of the given adapters' updates (``s`` ``None`` on a dense layer; ``b``
        ``None`` when the base has no bias and no adapter trains one)."""
        sig = [s for s in (self.sigma_of(a) for a in adapter_names) if s is not None]
        bia = [b for b in (self.bias_of(a) for a in adapter_names) if b is not None]
        if not self.decomposed:
            s = None
        elif len(sig) == 1:
            s = sig[0]
        else:
            s = self.sigma0 + sum(x - self.sigma0 for x in sig) if sig else self.sigma0
        if len(bia) == 1:
            b = bia[0]
        elif bia:
            b = self.bias0 + sum(x - self.bias0 for x in bia)
        else:
            b = self._base_bias()
        return s, b

    def dense_weight(self, sigma: Optional[Tensor] = None) -> Tensor:
        """``U diag(sigma) Vh`` (``d_out x d_in``; computed in float32, cast to the storage dtype);
        ``sigma=None``: the pre-trained ``s0``. A dense layer returns its base matrix."""
        if not self.decomposed:
            return matrix_of(self.base_layer)
        s = (self.sigma0 if sigma is None else sigma).detach().float()
        return ((self.U.float() * s) @ self.Vh.float()).to(self.U.dtype)

    @property
    def sigma(self) -> Optional[Tensor]:
        """The singular values the active adapter(s) compute with (``None`` on a dense, bias-only layer)."""
        return self.effective_vectors(self.active_adapters)[0] if self.decomposed else None

    def delta_weight(self) -> Tensor:
        """``W - W0 = U diag(s - s0) Vh`` of the active adapter(s), float32 (zero on a bias-only layer)."""
        s = self.sigma
        if s is None:
            return torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.bias0.device)
        return (self.U.float() * (s.detach().float() - self.sigma0)) @ self.Vh.float()

    def get_delta_weight(self, adapter_name: str) -> Tensor:
        """``U diag(s - s0) Vh`` of one adapter in float32 (zero where it trains no singular values)."""
        s = self.sigma_of(adapter_name)
        if s is None:
            dev = self.bias0.device
            return torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=dev)
        return (self.U.float() * (s.detach() - self.sigma0)) @ self.Vh.float()

    # ------------------------------------------------------------------ merge / unload
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters' vectors into one dense weight (forward then costs one matmul)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        names = self.merged_adapters + adapter_names
        with torch.no_grad():
            s, b = self.effective_vectors(names)
            w = self.dense_weight(s) if s is not None else None
            if safe_merge and ((w is not None and not torch.isfinite(w).all()) or (b is not None and not torch.isfinite(b).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {adapter_names} seem to be broken")
            self._merged_weight = w
            self._merged_bias = b.detach().clone() if b is not None else None
        self.merged_adapters.extend(adapter_names)
        self.__dict__["_merged_from"] = self._vector_versions(self.merged_adapters)

    def unmerge(self) -> None:
        """Back to the factorised form (merging never changed the trained vectors)."""
        self._merged_weight = None
        self._merged_bias = None
        self.merged_adapters = []
        self.__dict__["_merged_from"] = None

    def _vector_versions(self, names: list[str]) -> tuple:
        """What the merged weight was computed from: each merged vector's identity and in-place
        version counter (``Tensor._version``, bumped by ``copy_``, optimizer steps, ``load_state_dict``)."""
        out = []
        for d in (self.vectorfit_sigma._parameters, self.vectorfit_bias._parameters):
            for a in names:
                p = d.get(a)
                out.append(None if p is None else (id(p), p._version))
        return tuple(out)

    def _refresh_merge(self) -> None:
        # The merged vectors changed after merge(): peft's load_adapter into the merged adapter (a
        # Trainer's resume or best-model reload does that), a hot-swap, an optimizer step. Computing
        # with the old dense weight would silently mix two adapters; merge again from the vectors.
        names = list(self.merged_adapters)
        self.unmerge()
        self.merge(adapter_names=names)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]) -> nn.Module:
        """The base layer again, holding the merged weight and bias (``merge``) or the original ones.

        A decomposed weight is rebuilt as ``U diag(s) Vh`` in float32: equal to the original to
        float32 round-off (about 1e-7 relative), not bit for bit. A bias trained on a layer that had
        none is kept by a merge (the tuner then sets the model config's bias flags).
        """
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            s, b = self.effective_vectors(self.merged_adapters) if self.merged_adapters else (None, self._base_bias())
        else:
            s, b = None, self._base_bias()
        base = self.base_layer
        with torch.no_grad():
            if self.decomposed:
                w = self.dense_weight(s if merge else None)
                base.__dict__.pop("weight", None)
                w = w.t() if self.conv1d else w.reshape(self.kernel_shape)
                base.weight = nn.Parameter(w.contiguous(), requires_grad=False)
            if merge and b is not None and b is not base.bias:
                dtype = base.weight.dtype
                base.bias = nn.Parameter(b.detach().to(dtype).clone(), requires_grad=False)
        return base

    # ------------------------------------------------------------------ device moves
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to()/.half() would materialise the expanded placeholder as a full weight: keep it out of
        # the move and make a new one that follows U.
        placeholder = self.base_layer.__dict__.pop("weight", None) if self.decomposed else None
        try:
            out = super()._apply(fn, recurse)
        finally:
            if placeholder is not None:
                ref = self.U if self.U is not None else placeholder
                self.base_layer.__dict__["weight"] = _placeholder(tuple(placeholder.shape), ref)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self._base_forward(x)
        if self.merged:
            if self.__dict__.get("_merged_from") != self._vector_versions(self.merged_adapters):
                self._refresh_merge()
            w = self._merged_weight if self._merged_weight is not None else matrix_of(self.base_layer)
            return self._apply_weight(x, w, self._merged_bias)
        if adapter_names is not None:
            return self._mixed_forward(x, adapter_names)
        active = self.active_adapters
        if len(active) == 1:
            # The common case, read from the module dicts directly: generation runs this once per layer
            # and token, where each nn.Module attribute lookup is a measurable share of a tiny GEMV.
            a = active[0]
            sig, bia = self.vectorfit_sigma._parameters, self.vectorfit_bias._parameters
            p = sig.get(a)
            if p is not None and self.vectorfit_sigma_param.get(a) == "relative":
                p = self._relative_sigma(a, p)
            b = bia.get(a)
            if b is None:
                b = self.base_layer.bias
        else:
            p, b = self.effective_vectors(active)
        if not self.decomposed:
            return self._apply_weight(x, matrix_of(self.base_layer), b)
        if p is None:
            p = self.sigma0
        if self.conv2d:
            return svd_conv2d(x, self.U, self.Vh, p, b, self.base_layer._conv_forward, self.kernel_shape, owner=self)
        return svd_linear(x, self.U, self.Vh, p, b, owner=self)

    def _apply_weight(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        """The base layer's operation with the ``d_out x d_in`` matrix ``w`` and bias ``b``."""
        if self.conv2d:
            # _conv_forward applies the base layer's stride, padding (and padding mode), dilation, groups.
            return self.base_layer._conv_forward(x, w.reshape(self.kernel_shape).to(x.dtype), b.to(x.dtype) if b is not None else None)
        return F.linear(x, w, b.to(x.dtype) if b is not None else None)

    def _relative_sigma(self, adapter_name: str, z: Tensor) -> Tensor:
        """``s0 (1 + z)``. Without a gradient one tensor is kept and updated in place, so the
        inference cache of the rebuilt weight (keyed by that tensor, matched by value; see
        functional.py) serves repeated calls."""
        if torch.is_grad_enabled() and z.requires_grad:
            return self.sigma0 * (1.0 + z)
        kept = self.__dict__.get("_sigma_eval")
        fits = (kept is not None and kept[0] == adapter_name and kept[1].shape == z.shape
                and kept[1].dtype == z.dtype and kept[1].device == z.device)
        if fits and torch.equal(kept[1], z):
            return kept[2]
        with torch.no_grad():
            s = self.sigma0 * (1.0 + z)
            if not fits:
                self.__dict__["_sigma_eval"] = (adapter_name, z.detach().clone(), s)
                return s
            kept[1].copy_(z)
            kept[2].copy_(s)
            return kept[2]

    def _base_forward(self, x: Tensor) -> Tensor:
        """The pre-trained layer (``disable_adapter``): ``U diag(s0) Vh x + b0``, or the dense base."""
        b = self._base_bias()
        if not self.decomposed:
            return self._apply_weight(x, matrix_of(self.base_layer), b)
        if self.conv2d:
            return self._apply_weight(x, self.dense_weight(), b)
        b = b.to(x.dtype) if b is not None else None
        return F.linear(F.linear(x, self.Vh) * self.sigma0.to(x.dtype), self.U, b)

    def _mixed_forward(self, x: Tensor, adapter_names: list[str]) -> Tensor:
        """One pass over a batch whose rows use different adapters: ``y_i = U (s_a(i) * Vh x_i) + b_a(i)``."""
        names = list(dict.fromkeys(adapter_names))
        index = torch.tensor([names.index(n) for n in adapter_names], device=x.device)
        if x.dim() < 2 or x.shape[0] % index.numel():
            raise ValueError(
                f"mixed-adapter batch: this layer got input of shape {tuple(x.shape)}, whose first dimension is not a "
                f"multiple of the {index.numel()} adapter_names given (one name per row of the batch)"
            )
        # generate() may repeat each row (beams, num_return_sequences) with repeat_interleave.
        index = index.repeat_interleave(x.shape[0] // index.numel())
        pairs = [self.effective_vectors([n]) if n != BASE else (self.sigma0, self._base_bias()) for n in names]
        if self.conv2d:  # one convolution per adapter over its rows (the kernel differs per adapter)
            out = None
            for i, (s, b) in enumerate(pairs):
                rows = torch.nonzero(index == i).flatten()
                if rows.numel():
                    w = self.dense_weight(s) if self.decomposed else matrix_of(self.base_layer)
                    y = self._apply_weight(x[rows], w, b)
                    out = y.new_empty((x.shape[0], *y.shape[1:])) if out is None else out
                    out[rows] = y
            return out
        biases = [b for _, b in pairs]
        if any(b is not None for b in biases):
            B = torch.stack([(b if b is not None else torch.zeros_like(self.bias0)).float() for b in biases])
        else:
            B = None
        if not self.decomposed:
            return mixed_rows_linear(x, index, B, W=matrix_of(self.base_layer))
        S = torch.stack([s.float() for s, _ in pairs])
        return mixed_rows_linear(x, index, B, U=self.U, Vh=self.Vh, S=S)

    def extra_repr(self) -> str:
        mode = "decomposed" if self.decomposed else "dense (bias only)"
        if self.conv2d:
            return f"kernel={self.kernel_shape} (matrix {self.out_features} x {self.in_features}), {mode}, merged={self.merged}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {mode}, merged={self.merged}"
