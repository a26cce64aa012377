"""How much does a loaded adapter depend on which SVD routine decomposed the base weights?

An adapter stores trained singular values; ``U`` and ``Vh`` are recomputed from the base weights
where it is loaded. Another LAPACK (MKL vs OpenBLAS), another driver (gesdd vs gesvd), a transposed
call, another precision or another thread count may return other singular vectors wherever
singular values are close. This script trains a short VectorFit run on a real model, then swaps in
the factors of each SVD routine reachable on this CPU, keeps the trained singular values, and
measures:

* the largest output difference against the model as trained (absolute and relative to max|logit|);
* the largest relative deviation of any layer's trained weight as the adapter's load check
  (``vectorfit.base_check``) estimates it, and whether that check would warn;
* the smallest relative gaps ``(s_i - s_{i+1}) / s_i`` between neighbouring singular values of the
  base weights (where the basis is least determined).

Usage (numbers in benchmarks/SVD_DRIVERS.md)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/svd_drivers.py --model minilm
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/svd_drivers.py --model smollm2 --steps 20

scipy (gesvd) is optional: ``--scipy-path DIR`` adds a folder holding it (e.g. one made with
``pip install --target DIR scipy``) without installing it into the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vectorfit import VectorFitConfig, base_check, get_vectorfit_model, target_module_names  # noqa: E402
from vectorfit.layer import svd_fp32  # noqa: E402

SVD = Callable[[torch.Tensor], tuple]

TEXTS = [
    "a gripping, funny and moving film", "dull, plodding and far too long", "the best thing I have seen this year",
    "a tedious mess with no redeeming qualities", "warm, clever and beautifully acted", "I walked out after an hour",
    "an inventive script and a great cast", "flat jokes and wooden performances",
]
HELD_OUT = ["a small miracle of a movie", "painfully boring from start to finish", "it has its moments", "not for me"]


def _np(fn) -> SVD:
    def svd(m: torch.Tensor):
        U, S, Vh = fn(m.detach().float().numpy())
        return torch.from_numpy(np.ascontiguousarray(U)), torch.from_numpy(S), torch.from_numpy(np.ascontiguousarray(Vh))

    return svd


def _threads(n: int) -> SVD:
    def svd(m):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return torch.linalg.svd(m.float(), full_matrices=False)
        finally:
            torch.set_num_threads(old)

    return svd


def drivers(scipy_path: str | None) -> dict[str, SVD]:
    """Every SVD routine reachable here; the first is the library's own (the one that trained)."""
    out: dict[str, SVD] = {
        "vectorfit svd_fp32 (torch/MKL gesdd, wide matrices transposed) = training": svd_fp32,
        "torch/MKL gesdd, never transposed": lambda m: torch.linalg.svd(m.float(), full_matrices=False),
        "torch/MKL gesdd, always transposed": lambda m: tuple(
            t.t().contiguous() if i != 1 else t for i, t in enumerate(reversed(torch.linalg.svd(m.float().t(), full_matrices=False)))
        ),
        "torch/MKL gesdd in float64, cast to float32": lambda m: tuple(t.float() for t in torch.linalg.svd(m.double(), full_matrices=False)),
        "numpy/OpenBLAS gesdd": _np(lambda a: np.linalg.svd(a, full_matrices=False)),
    }
    if os.cpu_count() and os.cpu_count() > 1:
        out[f"torch/MKL gesdd, {min(4, os.cpu_count())} threads"] = _threads(min(4, os.cpu_count()))
    if scipy_path:
        sys.path.insert(0, scipy_path)
    try:
        import scipy.linalg as sl

        out["scipy/OpenBLAS gesdd"] = _np(lambda a: sl.svd(a, full_matrices=False, lapack_driver="gesdd"))
        out["scipy/OpenBLAS gesvd"] = _np(lambda a: sl.svd(a, full_matrices=False, lapack_driver="gesvd"))
    except ImportError:
        print("(scipy not found: gesvd skipped; see --scipy-path)")
    return out


def load(name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == "minilm":
        from vectorfit_recipes.models import model_path

        path = str(model_path("minilm"))
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        return model, AutoTokenizer.from_pretrained(path), ["classifier"]
    import _smollm2

    _smollm2._cache().mkdir(parents=True, exist_ok=True)  # model_dir() expects the folder to exist
    path = str(_smollm2.model_dir())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path), None


def batch(tok, texts, causal: bool, labels=None):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    b = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=32)
    if causal:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    elif labels is not None:
        b["labels"] = torch.tensor(labels)
    return b


def relative_gaps(s: torch.Tensor) -> torch.Tensor:
    s = s.double()
    return (s[:-1] - s[1:]) / s[:-1].clamp_min(1e-300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    ap.add_argument("--steps", type=int, default=40, help="AdamW steps of the short training run")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--scipy-path", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.time()
    base, tok, heads = load(args.model)
    base.eval()
    causal = heads is None
    config = VectorFitConfig(variant="no_avf", modules_to_save=heads, svd_cache=False)
    matrices = {}  # the base target matrices (d_out x d_in), copied before wrapping: what every SVD below decomposes
    for n in target_module_names(base, config):
        m = base.get_submodule(n)
        matrices[n] = (m.weight.t() if type(m).__name__ == "Conv1D" else m.weight).detach().float().clone()
    vf = get_vectorfit_model(base, config)
    layers = {n: l for n, l in vf.vectorfit_layers() if l.sigma is not None}

    train = batch(tok, TEXTS, causal, labels=[1, 0, 1, 0, 1, 0, 1, 0])
    held = batch(tok, HELD_OUT, causal)
    held.pop("labels", None)
    opt = torch.optim.AdamW([p for p in vf.parameters() if p.requires_grad], lr=args.lr)
    vf.train()
    for _ in range(args.steps):
        vf(**train).loss.backward()
        opt.step()
        opt.zero_grad()
    vf.eval()
    moved = max(float((l.sigma.detach() - l.sigma0).abs().max() / l.sigma0.max()) for l in layers.values())

    with torch.no_grad():
        ref = vf(**held).logits.double()
        with vf.disable_adapter():  # the original singular values: any valid SVD rebuilds the base weight
            ref0 = vf(**held).logits.double()
    sigs = {n: base_check.signature(l.U, l.sigma, l.Vh) for n, l in layers.items()}
    trained_U = {n: (l.U.clone(), l.Vh.clone()) for n, l in layers.items()}
    print(f"model {args.model}: {len(layers)} decomposed matrices, {args.steps} training steps at lr {args.lr}, "
          f"largest singular-value change {moved:.3f} of the layer's largest; torch {torch.__version__}, numpy {np.__version__}")

    # Gaps between neighbouring singular values of the base weights.
    gaps = {n: relative_gaps(l.sigma0) for n, l in layers.items()}
    all_gaps = torch.cat(list(gaps.values()))
    worst = min(gaps, key=lambda n: float(gaps[n].min()))
    print("\nneighbouring singular values, relative gap (s_i - s_i+1) / s_i over all layers:")
    print(f"  smallest {float(all_gaps.min()):.2e} (in {worst}); pairs below 1e-3: {int((all_gaps < 1e-3).sum())}, "
          f"below 1e-4: {int((all_gaps < 1e-4).sum())}, below 1e-5: {int((all_gaps < 1e-5).sum())}, "
          f"below 1e-6: {int((all_gaps < 1e-6).sum())} of {all_gaps.numel()}; median {float(all_gaps.median()):.2e}")

    print("\n(logit differences against the model as trained, on held-out inputs; 'base' = the same with the original")
    print("singular values, i.e. the round-off floor of swapping the SVD when nothing was trained)")
    print(f"\n| SVD routine | max abs logit diff | rel. to max abs logit | base: rel. diff | max layer deviation (load check) | layers over {base_check.SIGNATURE_RTOL:g} | SVD time |")
    print("|---|---|---|---|---|---|---|")
    for label, fn in drivers(args.scipy_path).items():
        t = time.time()
        with torch.no_grad():
            for n, l in layers.items():
                U, S, Vh = fn(matrices[n])
                l.U.copy_(U.to(l.U.dtype))
                l.Vh.copy_(Vh.to(l.Vh.dtype))
            elapsed = time.time() - t
            out = vf(**held).logits.double()
            with vf.disable_adapter():
                out0 = vf(**held).logits.double()
        devs = {n: base_check.deviation(base_check.signature(l.U, l.sigma, l.Vh), base_check.encode(sigs[n])) for n, l in layers.items()}
        worst_layer = max(devs, key=devs.get)
        diff = float((out - ref).abs().max())
        diff0 = float((out0 - ref0).abs().max()) / float(ref0.abs().max())
        print(f"| {label} | {diff:.2e} | {diff / float(ref.abs().max()):.2e} | {diff0:.2e} | {devs[worst_layer]:.2e} ({worst_layer.split('.', 1)[1] if '.' in worst_layer else worst_layer}) "
              f"| {sum(d > base_check.SIGNATURE_RTOL for d in devs.values())} | {elapsed:.1f} s |")
    with torch.no_grad():
        for n, l in layers.items():
            l.U.copy_(trained_U[n][0])
            l.Vh.copy_(trained_U[n][1])
    print(f"\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
