#!/usr/bin/env python
"""Many adapters on one base: mixed-adapter batches, VectorFit vs peft LoRA r=1.

For each model (``minilm`` sequence classification, ``smollm2`` causal LM) and a batch of 16 rows
spread over 1, 4 and 16 different adapters, in one run and interleaved round-robin (so that drift
of a shared machine hits every method alike), the median over ``--reps`` of:

* ``vf_single``: VectorFit, the whole batch with the one active adapter (the reference);
* ``vf_mixed``: VectorFit, one pass with ``adapter_names`` (one per row);
* ``vf_separate``: VectorFit, each adapter's rows as their own batch after ``set_adapter``;
* ``lora_mixed`` / ``lora_separate``: the same with peft LoRA r=1 on the same targets;
* for ``smollm2`` also generation tokens/s of ``vf_mixed`` and ``lora_mixed`` (greedy, KV cache).

Plus the memory of 16 loaded adapters against 1: the bytes of the adapter tensors (exact) and the
process RSS growth (noisy: it moves with the allocator, by up to the size of the factors); with
``--memory-only``, the exact bytes of every tensor the model holds with 1 and with 16 adapters. Adapters are random (non-zero) vectors: a speed benchmark.

Targets of mixed-adapter batches: ``vf_mixed`` with 16 adapters <= 1.2x ``vf_single``; ``vf_mixed``
faster than ``lora_mixed``. Needs a quiet machine: do not run it next to other jobs.

Usage::

    python benchmarks/many_adapters.py                          # both models, timings
    python benchmarks/many_adapters.py --models minilm --reps 5
    python benchmarks/many_adapters.py --check                  # correctness only, no timing
    python benchmarks/many_adapters.py --memory-only            # exact tensor bytes, 1 vs 16 adapters

Writes ``benchmarks/many_adapters/<model>.json`` (``--out``) with the exact command, versions and
machine information.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (model loading, inputs, machine info: shared with the speed benchmark)
from _memory import status_kb  # noqa: E402

ROWS = 16
SPREADS = (1, 4, 16)
SEQ = {"minilm": 64, "smollm2": 64}
NEW_TOKENS = 16


def _rss_mb() -> float:
    return status_kb("VmRSS") / 1024


@torch.no_grad()
def build_vectorfit(base: torch.nn.Module, n: int) -> torch.nn.Module:
    """VectorFit with adapters ``a0 .. a{n-1}``, each with random vectors and head."""
    from vectorfit import VectorFitConfig, get_vectorfit_model

    heads = speed.head_names(base)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", modules_to_save=heads or None), adapter_name="a0")
    for i in range(1, n):
        vf.add_adapter(f"a{i}", VectorFitConfig(variant="no_avf", modules_to_save=heads or None))
    g = torch.Generator().manual_seed(0)
    for name in vf.peft_config:
        for t in _adapter_params(vf, name):
            if t.is_floating_point():
                t.mul_(1 + 0.05 * torch.randn(t.shape, generator=g))
    return vf.eval()


def build_lora(base: torch.nn.Module, n: int) -> torch.nn.Module:
    """peft LoRA r=1 on the same targets with adapters ``a0 .. a{n-1}`` (non-zero B: random init)."""
    from peft import LoraConfig, get_peft_model

    heads = speed.head_names(base)
    cfg = LoraConfig(r=1, lora_dropout=0.0, target_modules=speed.target_names(base), modules_to_save=heads or None,
                     init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", copy.deepcopy(cfg))
    return model.eval()


def _adapter_params(vf: torch.nn.Module, name: str) -> list:
    """Adapter ``name``'s own tensors: its vectors (``...vectorfit_sigma.<name>``) and head copies
    (``...modules_to_save.<name>.*``), every one a registered parameter of the peft model."""
    return [p for n, p in vf.named_parameters() if n.endswith(f".{name}") or f".modules_to_save.{name}." in n]


def adapter_bytes(vf: torch.nn.Module, name: str) -> int:
    return sum(t.numel() * t.element_size() for t in _adapter_params(vf, name))


def model_tensor_bytes(vf: torch.nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds: parameters, buffers (U, Vh, sigma0),
    the vectors of every adapter (active or waiting) and every adapter's heads. Exact, unlike RSS."""
    storages: dict = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()

    for m in vf.modules():  # every adapter's vectors and heads are registered parameters (peft)
        for t in [*m._parameters.values(), *m._buffers.values()]:
            add(t)
    return sum(storages.values())


def memory_only(model_name: str) -> dict:
    """Exact tensor bytes of a model with 1 and with 16 adapters (no timing; seconds to run)."""
    base = speed.load_base(model_name)
    one = model_tensor_bytes(build_vectorfit(copy.deepcopy(base), 1))
    many = build_vectorfit(copy.deepcopy(base), max(SPREADS))
    sixteen = model_tensor_bytes(many)
    return {"model": model_name, "adapter_bytes_each": adapter_bytes(many, "a0"), "model_bytes_1_adapter": one,
            f"model_bytes_{max(SPREADS)}_adapters": sixteen,
            "bytes_per_extra_adapter": (sixteen - one) / (max(SPREADS) - 1)}


def separate(model: torch.nn.Module, batch: dict, names: list) -> Callable[[], Any]:
    """Each adapter's rows as their own batch."""
    groups = {n: torch.tensor([i for i, m in enumerate(names) if m == n]) for n in dict.fromkeys(names)}

    def run() -> None:
        for n, rows in groups.items():
            model.set_adapter(n)
            model(**{k: v[rows] for k, v in batch.items()})

    return run


def time_interleaved(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, called round-robin."""
    times: dict = {k: [] for k in fns}
    with torch.no_grad():
        for r in range(warmup + reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                if r >= warmup:
                    times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def check(model_name: str) -> None:
    """Mixed batches equal per-adapter batches for both methods (run before trusting timings)."""
    base = speed.load_base(model_name)
    batch = {k: v for k, v in speed.make_batch(base, ROWS, 16).items() if k != "labels"}
    names = [f"a{i % 4}" for i in range(ROWS)]
    for label, model in (("vectorfit", build_vectorfit(copy.deepcopy(base), 4)), ("lora", build_lora(copy.deepcopy(base), 4))):
        with torch.no_grad():
            mixed = model(**batch, adapter_names=names).logits
            for n in dict.fromkeys(names):
                rows = torch.tensor([i for i, m in enumerate(names) if m == n])
                model.set_adapter(n)
                alone = model(**{k: v[rows] for k, v in batch.items()}).logits
                err = float((mixed[rows] - alone).abs().max() / alone.abs().max())
                if err > 1e-4:
                    raise SystemExit(f"{model_name} {label}: mixed batch differs from adapter {n}'s own batch by {err:.1e}")
        print(f"{model_name} {label}: mixed batch == per-adapter batches")


def run_model(model_name: str, reps: int) -> dict:
    base = speed.load_base(model_name)
    batch = {k: v for k, v in speed.make_batch(base, ROWS, SEQ[model_name]).items() if k != "labels"}
    rss0 = _rss_mb()
    vf1 = build_vectorfit(copy.deepcopy(base), 1)
    rss1 = _rss_mb()
    vf = build_vectorfit(copy.deepcopy(base), max(SPREADS))
    rss16 = _rss_mb()
    lora = build_lora(copy.deepcopy(base), max(SPREADS))
    res: dict = {
        "model": model_name, "rows": ROWS, "seq": SEQ[model_name],
        "memory": {"adapter_bytes_each": adapter_bytes(vf, "a0"), "rss_mb_vf_1_adapter": round(rss1 - rss0, 1),
                   "rss_mb_vf_16_adapters": round(rss16 - rss1, 1)},
        "forward_s": {}, "generate_tokens_per_s": {},
    }
    del vf1
    for k in SPREADS:
        names = [f"a{i % k}" for i in range(ROWS)]
        vf.set_adapter("a0")
        lora.set_adapter("a0")
        fns = {
            "vf_single": lambda: vf(**batch),
            "vf_mixed": lambda: vf(**batch, adapter_names=names),
            "vf_separate": separate(vf, batch, names),
            "lora_mixed": lambda: lora(**batch, adapter_names=names),
            "lora_separate": separate(lora, batch, names),
        }
        res["forward_s"][str(k)] = t = time_interleaved(fns, reps)
        t["vf_mixed_over_single"] = t["vf_mixed"] / t["vf_single"]
        t["vf_mixed_over_lora_mixed"] = t["vf_mixed"] / t["lora_mixed"]
        print(model_name, k, "adapters:", {n: round(v, 5) for n, v in t.items()}, flush=True)
        if speed.is_causal(base):
            prompt = {"input_ids": batch["input_ids"][:, :16], "attention_mask": batch["attention_mask"][:, :16]}
            kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            gen = {"vf_mixed": lambda: vf.generate(**prompt, adapter_names=names, **kw),
                   "lora_mixed": lambda: lora.generate(**prompt, adapter_names=names, **kw)}
            g = time_interleaved(gen, max(1, reps // 4), warmup=1)
            res["generate_tokens_per_s"][str(k)] = {n: ROWS * NEW_TOKENS / s for n, s in g.items()}
    return res


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="only check mixed batches against per-adapter batches")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the exact tensor bytes of 1 vs 16 loaded adapters (writes <out>/memory.json)")
    ap.add_argument("--out", default=str(HERE / "many_adapters"))
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.check:
        for m in models:
            check(m)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        rows = [memory_only(m) for m in models]
        for r in rows:
            print(r)
        tmp = out / ".memory.json.tmp"
        tmp.write_text(json.dumps({"command": shlex.join([sys.executable, *sys.argv]), "rows": rows,
                                   "versions": speed.versions()}, indent=1))
        os.replace(tmp, out / "memory.json")
        return
    for m in models:
        res = run_model(m, args.reps)
        res.update(command=shlex.join([sys.executable, *sys.argv]), versions=speed.versions(),
                   machine=speed.machine_info(), loadavg=speed.loadavg())
        tmp = out / f".{m}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / f"{m}.json")  # atomic: a killed run leaves the previous file whole


if __name__ == "__main__":
    main()
