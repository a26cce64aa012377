"""The VectorFit layer: a linear map kept as its thin SVD, training only singular values and bias.

This file knows only torch. It does not care where the matrix came from (``nn.Linear``, a
transposed GPT-2 ``Conv1D``, later a flattened ``Conv2d``): it receives a ``d_out x d_in`` matrix.

    y = U diag(sigma) Vh x + bias        U: d_out x r, Vh: r x d_in, r = min(d_out, d_in)

Storage: ``U`` and ``Vh`` are frozen buffers in the base weight's dtype; ``sigma`` and ``bias`` are
float32 parameters (the optimizer updates them in full precision even for bf16/fp16 models) and
are cast to the activation dtype in the forward pass.

Several adapters (see :mod:`vectorfit.adapters`) share ``U``, ``Vh`` and ``sigma0``; each owns its
own vector parameters. The active adapter's are registered as the layer's parameters under their usual
names (``sigma``/``sigma_delta``, ``bias``), so optimizers, AVF and checkpoints see exactly what a
single-adapter layer shows; the others wait in ``_adapters``.

A layer whose singular values are not trained (e.g. f1/f2 in the ``sigma_attn_bias`` variant) is
never decomposed: it keeps its dense weight and trains only its bias ("bias-only" mode), so it
costs neither an SVD nor extra memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import mixed_rows_linear, svd_linear

#: peft's name for "no adapter" in a mixed batch (``adapter_names=[..., "__base__", ...]``).
BASE = "__base__"
_VECTOR_NAMES = ("sigma", "sigma_delta", "bias")


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


class SVDLinear(nn.Module):
    """A linear layer ``y = U diag(sigma) Vh x + bias`` with frozen ``U``, ``Vh``.

    Args:
        weight: the base weight as a ``d_out x d_in`` matrix (not modified).
        bias: the base bias (``d_out``) or ``None``.
        train_sigma: decompose and train the singular values.
        train_bias: train the bias; a layer without one gets a zero bias.
        svd: a precomputed ``(U, S, Vh)`` of ``weight`` in float32 (e.g. from the disk cache);
            computed here when ``None``.
        sigma_param: ``"absolute"``: the parameter is ``sigma`` itself. ``"relative"``: the
            parameter is ``sigma_delta`` (zeros at init) and ``sigma = sigma0 * (1 + sigma_delta)``
            is computed from it (``layer.sigma`` still reads the effective singular values).
        adapter_name: the name of the adapter these first vectors belong to.
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Optional[Tensor],
        train_sigma: bool,
        train_bias: bool,
        svd: Optional[tuple[Tensor, Tensor, Tensor]] = None,
        sigma_param: str = "absolute",
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if sigma_param not in ("absolute", "relative"):
            raise ValueError(f"SVDLinear: sigma_param={sigma_param!r} is invalid; use 'absolute' or 'relative'")
        if weight.dim() != 2:
            raise ValueError(f"SVDLinear expects a 2-D weight matrix, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.had_bias = bias is not None
        self.train_sigma = bool(train_sigma)
        self.train_bias = bool(train_bias)
        self.merged = False
        self.disabled = False
        dtype, device = weight.dtype, weight.device

        # Non-persistent buffers: everything frozen comes from the base model and is rebuilt from
        # it, so checkpoints and adapters hold only what training changed.
        if self.train_sigma:
            U, S, Vh = svd if svd is not None else svd_fp32(weight)
            self.register_buffer("U", U.to(device=device, dtype=dtype).contiguous(), persistent=False)
            self.register_buffer("Vh", Vh.to(device=device, dtype=dtype).contiguous(), persistent=False)
            self.register_buffer("sigma0", S.to(device=device, dtype=torch.float32).clone(), persistent=False)
            if sigma_param == "relative":
                # `sigma` is then computed in __getattr__ from this parameter (see sigma_param above)
                self.sigma_delta = nn.Parameter(torch.zeros_like(self.sigma0))
            else:
                self.sigma = nn.Parameter(S.to(device=device, dtype=torch.float32).clone())
            self.weight = None
        else:
            self.register_buffer("weight", weight.detach().clone(), persistent=False)
            self.sigma = None

        b0 = bias.detach().to(torch.float32) if bias is not None else None
        if self.train_bias:
            if b0 is None:
                b0 = torch.zeros(self.out_features, device=device, dtype=torch.float32)
            self.register_buffer("bias0", b0.clone(), persistent=False)
            self.bias = nn.Parameter(b0.clone())
        else:
            self.bias0 = None
            # A bias that is not trained is frozen base state; keep it out of checkpoints.
            self.register_buffer("bias", b0.clone() if b0 is not None else None, persistent=False)
        # Plain attributes (not registered): only the active adapter's vectors are module parameters.
        self.__dict__["_adapters"] = {adapter_name: self._registered_vectors()}
        self.__dict__["_active"] = adapter_name
        self.__dict__["_rows"] = None  # (adapter names, row index) during a mixed-adapter batch

    # ------------------------------------------------------------------ several adapters
    def _registered_vectors(self) -> dict[str, nn.Parameter]:
        return {k: self._parameters[k] for k in _VECTOR_NAMES if self._parameters.get(k) is not None}

    def add_vectors(self, name: str, sigma_param: str = "absolute") -> dict[str, nn.Parameter]:
        """Create the vectors of a new adapter ``name`` at their pre-trained values (not activated).

        Args:
            name: the adapter's name.
            sigma_param: ``"absolute"`` or ``"relative"``, as in the constructor.

        Returns:
            ``{parameter name: parameter}`` of the new adapter (trainable).
        """
        if sigma_param not in ("absolute", "relative"):
            raise ValueError(f"SVDLinear: sigma_param={sigma_param!r} is invalid; use 'absolute' or 'relative'")
        vecs: dict[str, nn.Parameter] = {}
        if self.train_sigma:
            key = "sigma_delta" if sigma_param == "relative" else "sigma"
            vecs[key] = nn.Parameter(torch.zeros_like(self.sigma0) if key == "sigma_delta" else self.sigma0.clone())
        if self.train_bias:
            vecs["bias"] = nn.Parameter(self.bias0.clone())
        self._adapters[name] = vecs
        return vecs

    def set_active(self, name: str) -> None:
        """Register adapter ``name``'s vectors as this layer's parameters (a merged layer is re-merged
        with them)."""
        if name == self._active:
            return
        was_merged = self.merged
        self.unmerge()
        for k in self._adapters[self._active]:
            self._parameters.pop(k, None)
        self._parameters.update(self._adapters[name])
        self.__dict__["_active"] = name
        if was_merged:
            self.merge()

    def drop_vectors(self, name: str) -> None:
        """Forget adapter ``name`` (never the active one: activate another first)."""
        if name == self._active:
            raise ValueError(f"cannot drop the active adapter {name!r} of a layer; activate another one first")
        self._adapters.pop(name, None)

    def effective_vectors(self, name: str) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(sigma, bias)`` that adapter ``name`` computes with (``BASE``: the pre-trained ones);
        ``sigma`` is ``None`` for a bias-only layer."""
        if name == BASE:
            return (self.sigma0 if self.train_sigma else None), self.current_bias(original=True)
        vecs = self._adapters[name]
        s = self.sigma0 * (1.0 + vecs["sigma_delta"]) if "sigma_delta" in vecs else vecs.get("sigma")
        return s, vecs.get("bias", self.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .to()/.half()/.cuda() reach registered parameters only: move the waiting adapters too,
        # keeping their Parameter objects (an optimizer may hold them), as torch does by default.
        out = super()._apply(fn, recurse)
        self._adapters[self._active] = self._registered_vectors()  # torch may have made new objects
        with torch.no_grad():
            for name, vecs in self._adapters.items():
                if name != self._active:
                    for p in vecs.values():
                        p.data = fn(p.data)
        return out

    # ------------------------------------------------------------------ parameterisation
    def __getattr__(self, name: str):  # type: ignore[override]
        # Only reached when normal lookup fails; with sigma_param="relative" there is no `sigma`
        # parameter, and `layer.sigma` is the effective (differentiable) s0 * (1 + z).
        if name == "sigma":
            params = self.__dict__.get("_parameters", {})
            if "sigma_delta" in params:
                return self.sigma0 * (1.0 + params["sigma_delta"])
        return super().__getattr__(name)

    @property
    def relative_sigma(self) -> bool:
        return "sigma_delta" in self._parameters

    def trained_attr(self, attr: str) -> str:
        """The name of the parameter that trains vector ``attr`` (``"sigma"`` or ``"bias"``)."""
        return "sigma_delta" if attr == "sigma" and self.relative_sigma else attr

    def _forward_sigma(self) -> Tensor:
        """The singular values for a forward pass. With the relative form and no gradient needed,
        one tensor is kept and updated in place, so the inference cache of the rebuilt weight
        (keyed by the tensor and matched by value, see functional.py) serves repeated calls."""
        if not self.relative_sigma:
            return self.sigma
        z = self._parameters["sigma_delta"]
        if torch.is_grad_enabled() and z.requires_grad:
            return self.sigma0 * (1.0 + z)
        # (z it was computed from, s): an unchanged z (compared by value, like sigma in
        # functional.py) costs one comparison per call instead of recomputing s and comparing it.
        kept = self.__dict__.get("_sigma_eval")
        fits = (kept is not None and kept[0].shape == z.shape and kept[0].dtype == z.dtype
                and kept[0].device == z.device)  # s follows from z and the frozen sigma0
        if fits and torch.equal(kept[0], z):
            return kept[1]
        with torch.no_grad():
            s = self.sigma0 * (1.0 + z)
            if not fits:
                object.__setattr__(self, "_sigma_eval", (z.detach().clone(), s))
                return s
            kept[0].copy_(z)
            kept[1].copy_(s)  # the same tensor: the cached W stays keyed to it
            return kept[1]

    # ------------------------------------------------------------------ weights
    def dense_weight(self, original: bool = False) -> Tensor:
        """The effective ``d_out x d_in`` weight (computed in float32, cast to the storage dtype).

        Args:
            original: use the singular values before fine-tuning instead of the current ones.
        """
        if self.sigma is None:
            return self.weight
        s = self.sigma0 if original else self.sigma
        w = (self.U.to(torch.float32) * s.detach().to(torch.float32)) @ self.Vh.to(torch.float32)
        return w.to(self.U.dtype)

    def current_bias(self, original: bool = False) -> Optional[Tensor]:
        if original and self.bias0 is not None:
            return self.bias0
        return self.bias

    def delta_weight(self) -> Tensor:
        """``W_final - W_init = U diag(sigma - sigma0) Vh`` in float32 (zero in bias-only mode)."""
        if self.sigma is None:
            return torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=self.weight.device)
        return (self.U.to(torch.float32) * (self.sigma.detach() - self.sigma0)) @ self.Vh.to(torch.float32)

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Fold the trained singular values into one dense weight; forward then costs one matmul.
        Merging twice is a no-op."""
        if self.merged or self.sigma is None:
            self.merged = True
            return
        self.register_buffer("merged_weight", self.dense_weight(), persistent=False)
        self.merged = True

    def unmerge(self) -> None:
        """Back to the factorised form (the trained vectors were never changed by merging)."""
        if self.merged and self.sigma is not None:
            del self.merged_weight
        self.merged = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        disabled = self.disabled
        if self._rows is not None and not disabled:
            return self._mixed_forward(x)
        if self.train_sigma and not disabled and not self.merged:
            # The fast path (custom autograd, factorised or dense per call; a cached W when no
            # gradient is needed): see functional.py. The tensors are read from the module's dicts:
            # generation runs this once per layer and token, where each nn.Module attribute lookup
            # (two Python frames through __getattr__) is a measurable share of a one-token GEMV.
            # (FSDP's prepare_fsdp turns U, Vh into frozen parameters: then the usual lookup.)
            params, buffers = self._parameters, self._buffers
            s = params["sigma"] if "sigma" in params else self._forward_sigma()
            bias = params["bias"] if "bias" in params else buffers["bias"] if "bias" in buffers else self.bias
            U = buffers["U"] if "U" in buffers else self.U
            Vh = buffers["Vh"] if "Vh" in buffers else self.Vh
            return svd_linear(x, U, Vh, s, bias, owner=self)
        bias = self.current_bias(original=disabled)
        if bias is not None:
            bias = bias.to(x.dtype)
        if not self.train_sigma:
            return F.linear(x, self.weight, bias)
        if self.merged and not disabled:
            return F.linear(x, self.merged_weight, bias)
        s = self.sigma0.to(x.dtype)
        # Two thin matmuls with the original singular values.
        return F.linear(F.linear(x, self.Vh) * s, self.U, bias)

    def _mixed_forward(self, x: Tensor) -> Tensor:
        """One pass over a batch whose rows use different adapters: ``y_i = U (s_a(i) * Vh x_i) + b_a(i)``."""
        names, index = self._rows
        if x.dim() < 2 or x.shape[0] % index.numel():
            raise ValueError(
                f"mixed-adapter batch: this layer got input of shape {tuple(x.shape)}, whose first dimension is not a "
                f"multiple of the {index.numel()} adapter_names given (one name per row of the batch)"
            )
        # generate() may repeat each row (beams, num_return_sequences) with repeat_interleave.
        index = index.to(x.device).repeat_interleave(x.shape[0] // index.numel())
        pairs = [self.effective_vectors(n) for n in names]
        biases = [b for _, b in pairs]
        B = torch.stack([b.to(torch.float32) for b in biases]) if biases[0] is not None else None
        if not self.train_sigma:
            return mixed_rows_linear(x, index, B, W=self.weight)
        S = torch.stack([s.to(torch.float32) for s, _ in pairs])
        return mixed_rows_linear(x, index, B, U=self.U, Vh=self.Vh, S=S)

    def extra_repr(self) -> str:
        mode = "sigma+bias" if self.train_sigma and self.train_bias else "sigma" if self.train_sigma else "bias"
        rel = ", sigma=relative" if self.relative_sigma else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, trains={mode}{rel}, merged={self.merged}"
