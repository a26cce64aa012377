"""What an adapter depends on besides its own vectors, and how loading checks it.

An adapter holds only the trained vectors and the saved heads. Everything else comes from the base
model it is loaded onto, so ``save_pretrained`` records, and ``from_pretrained`` checks:

* **Target weights** (SHA-256 fingerprints, :func:`vectorfit.cache.fingerprint`): a different
  matrix means a different SVD, and the trained singular values mean nothing there. Refused.
* **Every other base tensor** the adapted model computes with (embeddings, LayerNorms, the task head
  when it is not in ``modules_to_save``, biases that are not trained): a different one gives other
  outputs as surely as a different target. Refused, naming the tensors, unless the caller asks for
  a warning instead (``from_pretrained(..., check_base="warn")``).
* **dtype**: fingerprints hash the bytes, so a bf16 copy of an fp32 base never matches. A tensor is
  accepted when it *rounds to* the recorded one (an fp32 upcast of the bf16 base the adapter was
  trained on); one that is narrower than the recorded one cannot be verified, and the error says
  to load the base in the adapter's dtype and cast afterwards.
* **The decomposition itself** (:func:`signature`): the adapter stores singular values, and ``U``,
  ``Vh`` are recomputed at load. Where singular values are close, another LAPACK driver, library or
  device may return singular vectors rotated inside the near-degenerate subspace. That is harmless
  for the base weight (any valid SVD rebuilds it) but not for the trained one once the trained
  singular values of the pair differ. So the adapter stores a 4 x 4 sketch ``Q^T U diag(s) Vh P``
  of each trained weight, with fixed Gaussian probes ``Q``, ``P``, and loading recomputes it: the
  relative difference estimates ``||dW||_F / ||W||_F`` of that layer (an unbiased estimate of the
  squared norm from 16 samples), and a layer beyond :data:`SIGNATURE_RTOL` is reported with its
  measured deviation. Canonicalising the basis instead cannot work: sign flips are harmless anyway,
  and a rotation inside a *near*-degenerate pair is decided by round-off, so no rule applied to
  two different rotations makes them agree.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

import contextlib
from typing import Iterator

from .cache import fingerprint
from .errors import AdapterError

#: Probes per side of the sketch (16 numbers per target in ``adapter_config.json``).
PROBES = 4
#: Relative deviation of a layer's trained weight above which loading warns. A same-machine load
#: reproduces the sketch exactly; every other fp32 SVD routine measured on real MiniLM / SmolLM2
#: weights with a trained adapter (MKL and OpenBLAS, gesdd and gesvd, transposed, float64, more
#: threads) stayed below ~5e-5 (benchmarks/SVD_DRIVERS.md), while a rotated near-degenerate pair
#: gives 1e-2 and more. 1e-3 is about half-precision round-off: below it nothing an fp16 or bf16
#: forward pass computes could tell the difference, so a warning there would only be noise.
SIGNATURE_RTOL = 1e-3
#: The narrower storage dtypes round U and Vh themselves: their tolerance is set by their epsilon.
_STORAGE_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: str) -> Optional[torch.dtype]:
    d = getattr(torch, name, None)
    return d if isinstance(d, torch.dtype) else None


def compare(tensor: Tensor, stored_fp: str, stored_dtype: Optional[str]) -> str:
    """How ``tensor`` relates to the one recorded as ``(stored_fp, stored_dtype)``.

    Returns:
        ``"same"``: identical bytes. ``"rounds"``: another dtype whose values round exactly to the
        recorded tensor (e.g. an fp32 upcast of the bf16 base the adapter was trained on).
        ``"dtype"``: another dtype that cannot be verified against the record (e.g. a bf16 copy of
        the fp32 base: the record has more precision than this tensor). ``"differs"``: other values.
    """
    if fingerprint(tensor) == stored_fp:
        return "same"
    target = _dtype_of(stored_dtype) if stored_dtype else None
    if target is None or target == tensor.dtype:
        return "differs"
    if fingerprint(tensor.detach().to(target)) == stored_fp:
        return "rounds"
    return "dtype"


def dtype_advice(name: str, here: torch.dtype, stored: str) -> str:
    return (
        f"module {name!r} is {dtype_name(here)} here, but the adapter was trained on a {stored} copy of the base "
        f"model; a {dtype_name(here)} copy cannot be checked against it. Load the base model in {stored} "
        f"(e.g. from_pretrained(..., dtype=torch.{stored})), load the adapter onto it, then cast: "
        f"PeftModel.from_pretrained(base, path).merge_and_unload().to(torch.{dtype_name(here)})"
    )


# ------------------------------------------------------------------------------------- other tensors
def _fingerprints(named: dict[str, Tensor]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    by_storage: dict[tuple, str] = {}  # tied weights (embeddings = LM head) are hashed once
    for name, t in named.items():
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if key not in by_storage:
            by_storage[key] = fingerprint(t)
        out[name] = {"fingerprint": by_storage[key], "dtype": dtype_name(t.dtype)}
    return out


def other_tensors(model: nn.Module, skip_modules: list, extra: Optional[dict] = None) -> dict[str, Tensor]:
    """The base tensors (``state_dict`` entries) outside ``skip_modules`` (the targets and the saved
    heads), plus ``extra`` (e.g. target biases the adapter does not train)."""
    prefixes = tuple(m + "." for m in skip_modules)
    named = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(prefixes)}
    named.update(extra or {})
    return {k: v.detach() for k, v in named.items() if isinstance(v, Tensor)}


def other_tensors_of(model: nn.Module, targets: dict, heads: list) -> dict[str, Tensor]:
    """The base tensors an adapter depends on besides its target matrices: everything outside the
    targets and saved heads (a VectorFit layer or a peft head wrapper included), plus the target
    biases it does not train (recorded as ``<target>.bias``).

    Args:
        model: the base model (wrapped or not).
        targets: ``{name: record}`` with each target's ``"bias"`` (trained) flag.
        heads: ``modules_to_save`` entries (names or dotted suffixes).
    """
    names = [n for n, _ in model.named_modules() if n]
    head_names = [n for n in names if any(n == h or n.endswith("." + h) for h in heads)]
    extra = {}
    for n, info in targets.items():
        if info.get("bias", True):
            continue
        try:
            module = model.get_submodule(n)
        except AttributeError:
            continue
        bias = getattr(getattr(module, "base_layer", module), "bias", None)
        if isinstance(bias, Tensor):
            extra[f"{n}.bias"] = bias
    return other_tensors(model, [*targets, *head_names], extra)


_MODE: list[str] = []  # set by allow_base_differences()


@contextlib.contextmanager
def allow_base_differences(mode: str = "warn") -> Iterator[None]:
    """Inside the block, loading an adapter onto a base whose tensors *outside* the adapted matrices
    differ only warns (``mode="warn"``), as ``check_base="warn"`` does for ``from_pretrained``; use it
    around ``model.load_adapter(...)``, which peft gives no such argument. Target matrices must
    always match."""
    if mode not in ("error", "warn"):
        raise ValueError(f"mode={mode!r} is invalid: use 'error' or 'warn'")
    _MODE.append(mode)
    try:
        yield
    finally:
        _MODE.pop()


def mode(configured: str) -> str:
    """The base-check mode in force: :func:`allow_base_differences` if active, else ``configured``."""
    return _MODE[-1] if _MODE else configured


def record_other_tensors(named: dict[str, Tensor]) -> dict[str, dict[str, str]]:
    """``{name: {"fingerprint", "dtype"}}`` for ``adapter_config.json``."""
    return _fingerprints(named)


def check_other_tensors(named: dict[str, Tensor], stored: dict[str, dict]) -> tuple[list[str], list[str], list[str]]:
    """Compare a fresh base model's tensors with the adapter's record.

    Returns:
        ``(differing, missing, unverifiable_dtype)`` tensor names, in the record's order.
    """
    differing, missing, dtype = [], [], []
    memo: dict[tuple, str] = {}
    for name, info in stored.items():
        t = named.get(name)
        if t is None:
            missing.append(name)
            continue
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), info["fingerprint"])
        verdict = memo.get(key) or compare(t, info["fingerprint"], info.get("dtype"))
        memo[key] = verdict
        if verdict == "differs":
            differing.append(name)
        elif verdict == "dtype":
            dtype.append(name)
    return differing, missing, dtype


def module_names(tensor_names: list[str]) -> list[str]:
    """Distinct module names of ``a.b.weight``-style tensor names, in order."""
    return list(dict.fromkeys(n.rpartition(".")[0] or n for n in tensor_names))


# ------------------------------------------------------------------------------------- signatures
@functools.lru_cache(maxsize=64)
def _probes(n: int, side: int) -> Tensor:
    """``n x PROBES`` standard normal probes in float64, the same on every machine: numpy's legacy
    ``RandomState`` stream is frozen by numpy's compatibility policy (torch's generators are not
    promised to be stable across versions)."""
    rs = np.random.RandomState(1_000_003 * side + n)
    return torch.from_numpy(rs.standard_normal((n, PROBES)))


@torch.no_grad()
def signature(U: Tensor, sigma: Tensor, Vh: Tensor) -> Tensor:
    """The ``PROBES x PROBES`` sketch ``Q^T U diag(sigma) Vh P`` in float64 (see the module
    docstring). Costs ``PROBES (c + a) r`` multiply-adds: nothing next to the SVD."""
    c, a = U.shape[0], Vh.shape[1]
    left = _probes(c, 0).to(U.device).t() @ U.double()  # PROBES x r
    right = Vh.double() @ _probes(a, 1).to(Vh.device)  # r x PROBES
    return ((left * sigma.detach().double()) @ right).cpu()


def encode(sketch: Tensor) -> list:
    # 9 significant digits: far below any tolerance, and a compact, stable JSON text.
    return [[float(f"{x:.9g}") for x in row] for row in sketch.tolist()]


def deviation(sketch: Tensor, stored: Any) -> float:
    """Relative Frobenius distance of ``sketch`` to the stored one (``inf`` if it is malformed)."""
    try:
        ref = torch.tensor(stored, dtype=torch.float64)
    except (TypeError, ValueError):
        return math.inf
    if ref.shape != sketch.shape:
        return math.inf
    return float((sketch - ref).norm() / ref.norm().clamp_min(1e-300))


def tolerance(*dtypes: torch.dtype) -> float:
    """:data:`SIGNATURE_RTOL`, or the storage rounding of the narrowest of ``dtypes``."""
    return max([SIGNATURE_RTOL] + [_STORAGE_RTOL.get(d, 0.0) for d in dtypes])


# ------------------------------------------------------------------------------------- load / save
def check_targets(found: dict[str, Tensor], saved: dict[str, dict], adapter_path: Any) -> dict[str, str]:
    """Check the fresh base model's target matrices (``{name: d_out x d_in matrix}``, model order)
    against the adapter's record, before any SVD.

    Returns:
        ``{name: fingerprint}`` of the matrices as they are here (the SVD cache keys).

    Raises:
        AdapterError: naming the first module whose shape, values or dtype do not fit.
    """
    fingerprints = {}
    for name, matrix in found.items():
        info = saved.get(name)
        if info is None:
            continue
        if list(matrix.shape) != info["shape"]:
            raise AdapterError(
                f"base model mismatch at module {name!r}: weight shape {list(matrix.shape)}, the adapter was trained on {info['shape']}"
            )
        verdict = compare(matrix, info["fingerprint"], info.get("dtype"))
        if verdict == "dtype":
            raise AdapterError(dtype_advice(name, matrix.dtype, info["dtype"]))
        if verdict == "differs":
            raise AdapterError(
                f"base model mismatch at module {name!r}: its weights differ from those {adapter_path} "
                "was trained on (fingerprint mismatch); load the adapter onto the same pretrained model"
            )
        fingerprints[name] = info["fingerprint"] if verdict == "same" else fingerprint(matrix)
    return fingerprints


def enforce_other_tensors(named: dict[str, Tensor], stored: dict[str, dict], adapter_path: Any, mode: str) -> None:
    """Refuse (``mode="error"``) or warn (``"warn"``) when base tensors outside the targets differ
    from those the adapter was trained with."""
    from .notices import warn

    differing, missing, dtype = check_other_tensors(named, stored)
    if dtype and not differing and not missing:
        first = dtype[0]
        raise AdapterError(dtype_advice(first.rpartition(".")[0] or first, named[first].dtype, stored[first]["dtype"]))
    if not (differing or missing or dtype):
        return
    parts = []
    if differing:
        mods = module_names(differing)
        parts.append(f"{len(mods)} module(s) hold other weights than the model the adapter was trained with: {mods[:5]}")
    if missing:
        parts.append(f"tensors missing here: {missing[:5]}")
    if dtype:
        parts.append(f"tensors of another dtype: {dtype[:5]}")
    msg = (
        f"the base model differs outside the adapted matrices from the one {adapter_path} was "
        f"trained with ({'; '.join(parts)}), so its outputs would differ too. Usual causes: a newly initialised task "
        "head that was not in modules_to_save (train with modules_to_save=[...] or task_type=... so it is saved), "
        "another checkpoint of the base model, or modules trained outside the adapter"
    )
    if mode == "warn":
        warn(msg + " (loaded anyway: check_base='warn')")
    else:
        raise AdapterError(msg + "; pass check_base='warn' to load anyway")


def check_signatures(views: dict[str, tuple], saved: dict[str, dict]) -> dict[str, float]:
    """Recompute every trained layer's sketch and warn about the layers whose trained weight moved
    beyond tolerance (a different SVD basis than at training).

    Args:
        views: ``{name: (layer, sigma)}``: a decomposed VectorFit layer (``U``, ``Vh``) and the
            singular values being loaded into it.
        saved: the adapter's target records.

    Returns:
        ``{name: relative deviation}`` of every layer checked.
    """
    from .notices import warn

    devs, bad = {}, []
    for name, (layer, sigma) in views.items():
        stored = saved.get(name, {}).get("signature")
        if stored is None:
            continue  # an adapter from before signatures
        dev = deviation(signature(layer.U, sigma, layer.Vh), stored)
        devs[name] = dev
        stored_dtype = _dtype_of(saved[name].get("dtype", "float32")) or torch.float32
        if dev > tolerance(layer.U.dtype, stored_dtype):
            bad.append((dev, name))
    if bad:
        bad.sort(reverse=True)
        worst = ", ".join(f"{n} ({d:.1e})" for d, n in bad[:3])
        warn(
            f"{len(bad)} of {len(devs)} decomposed layers compute a different trained weight than when the adapter "
            f"was saved: relative deviation of the layer's weight (and so of its output) up to {bad[0][0]:.2e}, "
            f"worst {worst}. The SVD here returned other singular vectors where singular values are nearly equal "
            "(another LAPACK driver, library or device than at training). Compare outputs with the training machine's "
            "before relying on them, or ship the merged model (merge_and_unload) instead of the adapter",
        )
    return devs
