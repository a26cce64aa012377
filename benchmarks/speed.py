#!/usr/bin/env python
"""Training speed, memory, setup and inference cost: VectorFit vs peft LoRA r=1, BitFit, full FT.

The speed and memory targets' measurement. For each configuration it measures, in one run:

* train-step time (forward + backward + AdamW step, the VectorFit run with AVF active), median over
  steps after warm-up, in train mode (dropout as the model ships) and in eval mode (no dropout: the
  layers' own cost, undiluted). The methods -- and the two modes -- are INTERLEAVED round-robin, one
  step each, so that drift of a shared machine hits all of them alike;
* peak training memory, each method in a fresh subprocess (see ``_memory_child``);
* VectorFit twice: as shipped (``vectorfit``) and in low-memory mode (``vectorfit_lowmem``, the
  dense path rebuilds W in the backward instead of keeping it), so that trade is measured too;
* setup time: VectorFit cold (empty SVD cache: fingerprint + SVD + cache write) and warm (from the
  cache), against plain ``torch.linalg.svd`` over the same matrices; LoRA's ``get_peft_model``;
* inference time (no grad, eval) of the merged VectorFit model (``merge_and_unload``) against the
  unmodified base model, plus the unmerged VectorFit model and merged LoRA for reference.

Configurations: 1 minilm sequence classification 32x64 fp32; 2 BERT-base-size random init 16x128
fp32; 3 smollm2 (135M Llama) causal LM 4x256 fp32; 4 = 1 under bf16 autocast.

Inputs are random token ids (a speed benchmark: the values do not matter, the shapes do).

Usage::

    python benchmarks/speed.py                      # all configs, default settings
    python benchmarks/speed.py --configs 1,4 --quick
    python benchmarks/speed.py --layers             # per-layer timings behind the path selector
    python benchmarks/speed.py --profile --configs 1  # per-op time and GEMM multiply-adds per method
    python benchmarks/speed.py --configs 3 --memory-only  # peak memory (+ exact saved-for-backward) only
    VECTORFIT_LAYER_PATH=reference python benchmarks/speed.py ...   # the straightforward layer

Writes ``benchmarks/speed/<config>.json`` (``--out`` to change) with the exact command, versions and
machine information.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _memory import status_kb, trim  # noqa: E402

# vectorfit_lowmem: the same VectorFit model trained in low-memory mode (vectorfit.low_memory).
VECTORFIT_METHODS = ("vectorfit", "vectorfit_lowmem")
METHODS = (*VECTORFIT_METHODS, "lora", "bitfit", "full")

CONFIGS: dict[str, dict[str, Any]] = {
    "1": dict(name="minilm-seqcls-32x64-fp32", model="minilm", batch=32, seq=64, autocast=False),
    "2": dict(name="bertbase-random-16x128-fp32", model="bert-base", batch=16, seq=128, autocast=False),
    "3": dict(name="smollm2-causal-4x256-fp32", model="smollm2", batch=4, seq=256, autocast=False),
    "4": dict(name="minilm-seqcls-32x64-bf16-autocast", model="minilm", batch=32, seq=64, autocast=True),
}

# (warm-up steps, timed steps) per method and mode; setup repetitions; inference repetitions.
DEFAULTS = {"1": (3, 15, 3, 10), "2": (1, 5, 2, 5), "3": (1, 5, 2, 5), "4": (3, 15, 3, 10)}
QUICK = {"1": (1, 4, 1, 3), "2": (1, 2, 1, 2), "3": (1, 2, 1, 2), "4": (1, 4, 1, 3)}


# ================================================================================ models and data
def load_base(model: str) -> torch.nn.Module:
    import transformers as T

    T.logging.set_verbosity_error()
    if model == "minilm":
        from vectorfit_recipes import models

        torch.manual_seed(0)  # the new classifier head
        m = T.AutoModelForSequenceClassification.from_pretrained(str(models.model_path("minilm")), num_labels=2)
    elif model == "bert-base":
        torch.manual_seed(0)
        m = T.BertForSequenceClassification(T.BertConfig(num_labels=2))  # hidden 768, 12 layers, ffn 3072
    elif model == "smollm2":
        import _smollm2

        m = T.AutoModelForCausalLM.from_pretrained(str(_smollm2.model_dir()), dtype=torch.float32)
    else:
        raise ValueError(model)
    return _materialise(m)


def _materialise(m: torch.nn.Module) -> torch.nn.Module:
    """Copy every weight into ordinary memory.

    ``from_pretrained`` on CPU leaves the tensors inside ONE private mmap of the safetensors file; a
    weight that is replaced (VectorFit drops each target's dense W for its U, Vh) cannot give its
    pages back while any other tensor of the file lives. Copying first -- what ``model.to("cuda")``
    does on a GPU -- makes the memory figures measure the methods, not the loader; it is applied to
    every method alike. (Without it VectorFit's peak grows by the size of the target weights.)"""
    with torch.no_grad():
        for t in list(m.parameters()) + [b for b in m.buffers() if b is not None]:
            t.data = t.data.clone()
    gc.collect()
    return m


def load_config(model: str) -> Any:
    """The model's config only (a holder with ``.config``), to build inputs without the weights."""
    import types

    import transformers as T

    if model == "minilm":
        from vectorfit_recipes import models

        c = T.AutoConfig.from_pretrained(str(models.model_path("minilm")))
    elif model == "bert-base":
        c = T.BertConfig(num_labels=2)
    else:
        import _smollm2

        c = T.AutoConfig.from_pretrained(str(_smollm2.model_dir()))
    return types.SimpleNamespace(config=c)


def is_causal(model: Any) -> bool:
    return model.config.model_type == "llama"


def make_batch(model: Any, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = ids.clone() if is_causal(model) else torch.randint(0, 2, (batch,), generator=g)
    return out


def target_names(model: torch.nn.Module) -> list[str]:
    from vectorfit.targets import find_targets

    return [n for n, _, _ in find_targets(model)]


def head_names(model: torch.nn.Module) -> list[str]:
    return [] if is_causal(model) else ["classifier"]


# ================================================================================ methods
class Run:
    """One method on its own copy of the base model, with its optimizer."""

    def __init__(self, method: str, base: torch.nn.Module, total_steps: int = 1000, cache_dir: Optional[str] = None) -> None:
        self.method = method
        self.avf = None
        t0 = time.perf_counter()
        self.model = build(method, base, cache_dir)
        self.setup_s = time.perf_counter() - t0
        if method in VECTORFIT_METHODS:
            self.avf = self.model.avf
        self.low_memory = method == "vectorfit_lowmem"
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        # SPEC: AdamW (0.9, 0.999), no weight decay; lr 1e-3 for text tasks.
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        self.step_no = 0

    def step(self, batch: dict, autocast: bool) -> float:
        from vectorfit import low_memory

        self.step_no += 1
        with low_memory(self.low_memory), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = self.model(**batch).loss
        loss.backward()
        if self.avf is not None:
            self.avf.step(self.step_no)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def build(method: str, base: torch.nn.Module, cache_dir: Optional[str] = None) -> torch.nn.Module:
    """``method`` applied to ``base`` (modified in place)."""
    heads = head_names(base)
    if method in VECTORFIT_METHODS:
        from vectorfit import AVFConfig, VectorFitConfig, get_vectorfit_model

        # AVF active during the timed steps: an AVF step every 2 optimizer steps from step 2 on.
        cfg = VectorFitConfig(variant="vectorfit", modules_to_save=heads or None, cache_dir=cache_dir,
                              avf=AVFConfig(start_step=2, interval=2, num_freezes=10_000))
        return get_vectorfit_model(base, cfg)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=1, lora_dropout=0.0, target_modules=target_names(base), modules_to_save=heads or None)
        return get_peft_model(base, cfg)
    if method == "bitfit":
        names = target_names(base)
        for p in base.parameters():
            p.requires_grad_(False)
        n = 0
        for name in names:
            b = base.get_submodule(name).bias
            if b is not None:
                b.requires_grad_(True)
                n += 1
        for h in heads:
            base.get_submodule(h).requires_grad_(True)
        if n == 0:
            raise RuntimeError("BitFit: the target modules have no biases")
        return base
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    raise ValueError(method)


def has_target_biases(base: torch.nn.Module) -> bool:
    return any(base.get_submodule(n).bias is not None for n in target_names(base))


def runnable_methods(methods: list, base: torch.nn.Module) -> list:
    """``methods`` without BitFit where the target modules have no biases (Llama)."""
    return [m for m in methods if m != "bitfit" or has_target_biases(base)]


# ================================================================================ helpers
def median(xs: list) -> Optional[float]:
    return statistics.median(xs) if xs else None


def loadavg() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
        isa = sorted({f for f in flags.split() if f.startswith(("avx512", "amx", "avx2"))})
    except OSError:
        isa = []
    mem = None
    try:
        mem = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1]) // 1024
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "isa": isa,
            "torch_threads": torch.get_num_threads(), "mem_total_mb": mem, "python": platform.python_version()}


def versions() -> dict:
    import peft
    import transformers

    import vectorfit

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "vectorfit": vectorfit.__version__}


# ================================================================================ measurements
def measure_steps(runs: dict, batch: dict, autocast: bool, warmup: int, steps: int) -> dict:
    """Median step time per method and mode, all interleaved round-robin."""
    times: dict = {m: {"train": [], "eval": []} for m in runs}
    order = list(runs)
    for i in range(warmup + steps):
        for mode in ("train", "eval"):
            for k, m in enumerate(order if i % 2 == 0 else order[::-1]):  # alternate the order too
                r = runs[m]
                r.model.train(mode == "train")
                gc.collect()
                gc.disable()
                t0 = time.perf_counter()
                r.step(batch, autocast)
                dt = time.perf_counter() - t0
                gc.enable()
                if i >= warmup:
                    times[m][mode].append(dt)
    return {m: {mode: {"median_s": median(v), "min_s": min(v) if v else None, "n": len(v), "raw_s": v}
                for mode, v in d.items()} for m, d in times.items()}


def paired_quartiles(a: list, b: list) -> Optional[list]:
    """Quartiles (25/50/75%) of the round-by-round ratios a[i] / b[i]: the methods run one step
    each per round, so a ratio within a round shares that round's machine state."""
    if not a or len(a) != len(b):
        return None
    r = sorted(x / y for x, y in zip(a, b))
    if len(r) < 2:
        return [r[0]] * 3
    q = statistics.quantiles(r, n=4, method="inclusive")
    return [q[0], q[1], q[2]]


def measure_setup(base: torch.nn.Module, reps: int) -> dict:
    """VectorFit cold (empty cache) and warm (cache filled) setup against torch.linalg.svd, and
    LoRA's setup; interleaved."""
    names = target_names(base)
    mats = [base.get_submodule(n).weight.detach() for n in names]
    out: dict = {"vectorfit_cold_s": [], "vectorfit_warm_s": [], "torch_svd_s": [], "lora_s": []}
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="vf-bench-svd-") as d:
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            build("vectorfit", m, cache_dir=d)
            out["vectorfit_cold_s"].append(time.perf_counter() - t0)
            del m
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            build("vectorfit", m, cache_dir=d)
            out["vectorfit_warm_s"].append(time.perf_counter() - t0)
            del m
        t0 = time.perf_counter()
        for w in mats:
            torch.linalg.svd(w.to(torch.float32), full_matrices=False)
        out["torch_svd_s"].append(time.perf_counter() - t0)
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        build("lora", m)
        out["lora_s"].append(time.perf_counter() - t0)
        del m
        trim()
    res = {k: median(v) for k, v in out.items()}
    res["raw"] = out
    res["warm_over_cold"] = res["vectorfit_warm_s"] / res["vectorfit_cold_s"]
    res["cold_over_torch_svd"] = res["vectorfit_cold_s"] / res["torch_svd_s"]
    return res


def measure_inference(base: torch.nn.Module, runs: dict, batch: dict, autocast: bool, reps: int) -> dict:
    """No-grad eval forward: unmodified base vs merged VectorFit (and unmerged VF, merged LoRA)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    models: dict[str, torch.nn.Module] = {"base": copy.deepcopy(base)}
    if "vectorfit" in runs:
        vf = runs["vectorfit"].model
        models["vectorfit_unmerged"] = vf
        models["vectorfit_merged"] = copy.deepcopy(vf).merge_and_unload()
    if "lora" in runs:
        models["lora_merged"] = copy.deepcopy(runs["lora"].model).merge_and_unload()
    times: dict = {k: [] for k in models}
    for m in models.values():
        m.eval()
    with torch.no_grad():
        for i in range(reps + 1):
            for k, m in (list(models.items()) if i % 2 == 0 else list(models.items())[::-1]):
                gc.collect()
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    m(**inputs)
                if i > 0:
                    times[k].append(time.perf_counter() - t0)
    res = {k: median(v) for k, v in times.items()}
    res["merged_over_base"] = res["vectorfit_merged"] / res["base"] if "vectorfit_merged" in res else None
    res["raw"] = times
    return res


def measure_memory(cfg_key: str, method: str, steps: int) -> dict:
    """Run ``method`` for a few steps in a fresh interpreter and report its memory (see
    ``_memory_child``)."""
    env = dict(os.environ)
    # A fixed mmap threshold: every large tensor is mmapped and unmapped when freed, so the resident
    # set follows the live tensors instead of glibc's heap high-water mark (same for all methods).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", f"{cfg_key}:{method}:{steps}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _memory_child(spec: str) -> None:
    """Peak resident memory of one method: the kernel's high-water mark (VmHWM), reset through
    ``/proc/self/clear_refs`` after imports, so it covers the model, the adapter, gradients,
    optimizer state and activations of the training steps -- and nothing of another method.

    Reported: ``peak_mb`` = VmHWM during setup + training minus the resident set with the base
    model loaded (what training this way costs on top of holding the base model: VectorFit's SVD
    factors net of the dense weights they replace, adapters, gradients, optimizer state,
    activations; the base model itself is the same for every method and would only dilute the
    ratios; and a loader residue -- transformers keeps the safetensors file mapped -- is excluded
    this way too), and
    ``train_peak_over_setup_mb`` = VmHWM during the training steps minus the resident set right
    after setup (activations, gradients, optimizer state). We use RSS rather than the torch profiler
    because it also sees what the profiler cannot attribute (MKL/oneDNN scratch, allocator slack)
    and costs nothing while the steps run."""
    cfg_key, method, steps = spec.split(":")
    cfg = CONFIGS[cfg_key]
    import transformers  # noqa: F401  (imports before the baseline)
    import peft  # noqa: F401

    import vectorfit  # noqa: F401

    batch = make_batch(load_config(cfg["model"]), cfg["batch"], cfg["seq"])
    base = load_base(cfg["model"])
    trim()
    rss0 = status_kb("VmRSS")  # interpreter + libraries + the base model
    Path("/proc/self/clear_refs").write_text("5")
    run = Run(method, base)
    del base
    trim()
    rss_setup = status_kb("VmRSS")
    hwm_setup = status_kb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")
    run.model.train()
    for _ in range(int(steps)):
        run.step(batch, cfg["autocast"])
    hwm_train = status_kb("VmHWM")
    saved_mb = _saved_for_backward_mb(run, batch, cfg["autocast"])  # after the peak was read
    print(json.dumps({
        "peak_mb": (max(hwm_setup, hwm_train) - rss0) / 1024,
        "train_peak_mb": (hwm_train - rss0) / 1024,
        "setup_peak_mb": (hwm_setup - rss0) / 1024,
        "after_setup_mb": (rss_setup - rss0) / 1024,
        "train_peak_over_setup_mb": (hwm_train - rss_setup) / 1024,
        "saved_for_backward_mb": saved_mb,
        "steps": int(steps),
    }))


def _saved_for_backward_mb(run: "Run", batch: dict, autocast: bool) -> float:
    """What autograd keeps between one training forward and its backward: the distinct storages of
    the saved tensors, less the model's own parameters and buffers (an exact count, not RSS)."""
    from vectorfit import low_memory

    own = {t.untyped_storage().data_ptr() for t in list(run.model.parameters()) + list(run.model.buffers())}
    seen: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), low_memory(run.low_memory), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = run.model(**batch).loss
    del loss
    return sum(seen.values()) / 2 ** 20


# ================================================================================ one configuration
def run_config(key: str, args: argparse.Namespace) -> dict:
    cfg = CONFIGS[key]
    warmup, steps, setup_reps, inf_reps = (QUICK if args.quick else DEFAULTS)[key]
    if args.steps is not None:
        steps = args.steps
    print(f"\n=== config {key}: {cfg['name']} (warm-up {warmup}, steps {steps}) ===", flush=True)
    t_start = time.time()
    load0 = loadavg()
    torch.manual_seed(0)
    base = load_base(cfg["model"])
    base.train()
    batch = make_batch(base, cfg["batch"], cfg["seq"])
    methods = runnable_methods(args.methods, base)
    skipped = {m: "the target modules have no biases" for m in args.methods if m not in methods}
    result: dict = {"config": key, **cfg, "methods": methods, "skipped": skipped,
                    "warmup": warmup, "steps": steps}

    # Memory first, in fresh processes (before this process grows).
    mem = {}
    if not args.no_memory:
        for m in methods:
            mem[m] = measure_memory(key, m, args.memory_steps)
            print(f"  memory {m:10s} {mem[m].get('peak_mb', float('nan')):9.1f} MB peak", flush=True)
    result["memory"] = mem
    if args.memory_only:
        result["loadavg_start"], result["loadavg_end"] = load0, loadavg()
        result["wall_s"] = time.time() - t_start
        result["ratios"] = ratios(result)
        return result

    setup = measure_setup(base, setup_reps) if not args.no_setup else {}
    if setup:
        print(f"  setup: vectorfit cold {setup['vectorfit_cold_s']:.2f}s warm {setup['vectorfit_warm_s']:.2f}s "
              f"torch.svd {setup['torch_svd_s']:.2f}s lora {setup['lora_s']:.2f}s", flush=True)
    result["setup"] = setup

    # One model per method, trained interleaved; the VectorFit SVDs come from the cache filled above.
    with tempfile.TemporaryDirectory(prefix="vf-bench-svd-") as d:
        runs = {m: Run(m, copy.deepcopy(base), cache_dir=d if m in VECTORFIT_METHODS else None) for m in methods}
    for r in runs.values():
        result.setdefault("trainable_params", {})[r.method] = r.trainable
    steps_res = measure_steps(runs, batch, cfg["autocast"], warmup, steps)
    result["step"] = steps_res
    result["inference"] = measure_inference(base, runs, batch, cfg["autocast"], inf_reps) if not args.no_inference else {}
    result["loadavg_start"], result["loadavg_end"] = load0, loadavg()
    result["wall_s"] = time.time() - t_start
    result["ratios"] = ratios(result)
    return result


def ratios(res: dict) -> dict:
    out: dict = {}
    st = res.get("step", {})
    for ref in ("lora", "full"):
        if ref not in st:
            continue
        for m in st:
            for mode in ("train", "eval"):
                a, b = st[m][mode]["median_s"], st[ref][mode]["median_s"]
                if a and b:
                    out[f"step_{mode}_{m}_over_{ref}"] = a / b
                    q = paired_quartiles(st[m][mode].get("raw_s", []), st[ref][mode].get("raw_s", []))
                    if q is not None and m != ref:
                        out[f"step_{mode}_{m}_over_{ref}_paired_quartiles"] = q
    mem = res.get("memory", {})
    if "lora" in mem and "peak_mb" in mem["lora"]:
        for m in mem:
            if "peak_mb" in mem[m]:
                out[f"peak_mem_{m}_over_lora"] = mem[m]["peak_mb"] / mem["lora"]["peak_mb"]
    s = res.get("setup", {})
    if s:
        out["setup_warm_over_cold"] = s["warm_over_cold"]
        out["setup_cold_over_torch_svd"] = s["cold_over_torch_svd"]
    inf = res.get("inference", {})
    if inf.get("merged_over_base"):
        out["inference_merged_over_base"] = inf["merged_over_base"]
    return out


def print_table(res: dict) -> None:
    st, mem = res.get("step", {}), res.get("memory", {})
    print(f"\n{res['name']}  (loadavg start {res['loadavg_start']}, end {res['loadavg_end']})")
    if not st:  # --memory-only
        print(f"{'method':16s} {'peak MB':>8s} {'/lora':>6s} {'after setup':>11s} {'saved for bwd':>13s}")
        for m, v in mem.items():
            r = res["ratios"].get(f"peak_mem_{m}_over_lora")
            print(f"{m:16s} {v.get('peak_mb', float('nan')):8.1f} {r if r else float('nan'):6.3f} "
                  f"{v.get('after_setup_mb', float('nan')):11.1f} {v.get('saved_for_backward_mb', float('nan')):13.1f}")
        return
    print(f"{'method':16s} {'train ms':>9s} {'/lora':>6s} {'/full':>6s} {'eval ms':>9s} {'/lora':>6s} {'/full':>6s} {'peak MB':>8s} {'/lora':>6s} {'trainable':>10s}")
    for m in st:
        row = [f"{m:16s}"]
        for mode in ("train", "eval"):
            v = st[m][mode]["median_s"]
            row.append(f"{v * 1e3:9.1f}")
            for ref in ("lora", "full"):
                r = res["ratios"].get(f"step_{mode}_{m}_over_{ref}")
                row.append(f"{r:6.3f}" if r else f"{'-':>6s}")
        pk = mem.get(m, {}).get("peak_mb")
        row.append(f"{pk:8.1f}" if pk else f"{'-':>8s}")
        r = res["ratios"].get(f"peak_mem_{m}_over_lora")
        row.append(f"{r:6.3f}" if r else f"{'-':>6s}")
        row.append(f"{res.get('trainable_params', {}).get(m, 0):10,d}")
        print(" ".join(row))
    for m in st:
        q = res["ratios"].get(f"step_train_{m}_over_lora_paired_quartiles")
        if q:
            print(f"{m} / lora train step, round by round: quartiles {q[0]:.3f} {q[1]:.3f} {q[2]:.3f}")
    s = res.get("setup")
    if s:
        print(f"setup: vectorfit cold {s['vectorfit_cold_s']:.3f}s, warm {s['vectorfit_warm_s']:.3f}s "
              f"(warm/cold {s['warm_over_cold']:.3f}), torch.linalg.svd {s['torch_svd_s']:.3f}s "
              f"(cold/svd {s['cold_over_torch_svd']:.3f}), lora {s['lora_s']:.3f}s")
    inf = res.get("inference")
    if inf:
        print("inference (no grad): " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in inf.items() if isinstance(v, float) and k != "merged_over_base")
              + f"; merged/base {inf['merged_over_base']:.3f}")
    for m, why in res.get("skipped", {}).items():
        print(f"({m} skipped: {why})")


# ================================================================================ per-layer timings
def layer_bench(args: argparse.Namespace) -> dict:
    """Forward+backward of one layer on the shapes of the benchmark models, every path forced,
    against LoRA r=1 and a full (trainable W) linear; interleaved, medians."""
    import torch.nn.functional as F

    from vectorfit.functional import choose_path, force_path, low_memory, svd_linear

    shapes = [(2048, 384, 384), (2048, 384, 1536), (2048, 1536, 384), (2048, 768, 768), (2048, 768, 3072),
              (2048, 3072, 768), (1024, 576, 576), (1024, 576, 192), (1024, 576, 1536), (1024, 1536, 576)]
    reps = 3 if args.quick else 9
    out = []
    for autocast in (False, True):
        for n, a, c in shapes:
            torch.manual_seed(0)
            W = torch.randn(c, a) / a ** 0.5
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            s, b = torch.nn.Parameter(S.clone()), torch.nn.Parameter(torch.zeros(c))
            x, G = torch.randn(n, a, requires_grad=True), torch.randn(n, c)
            A, B = torch.nn.Parameter(torch.randn(1, a) * 0.01), torch.nn.Parameter(torch.zeros(c, 1))
            Wp, b0 = torch.nn.Parameter(W.clone()), torch.zeros(c)

            def one(meth: str) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    if meth == "lora":
                        y = F.linear(x, W, b0) + F.linear(F.linear(x, A), B) * 8.0
                    elif meth == "full":
                        y = F.linear(x, Wp, b0)
                    elif meth == "dense_lowmem":
                        with force_path("dense"), low_memory():
                            y = svd_linear(x, U, Vh, s, b)
                    else:
                        with force_path(meth):
                            y = svd_linear(x, U, Vh, s, b)
                y.backward(G.to(y.dtype))
                for t in (x, s, b, A, B, Wp):
                    t.grad = None

            meths = ["lora", "full", "reference", "factorised", "dense", "dense_lowmem"]
            t: dict = {m: [] for m in meths}
            for i in range(reps + 1):
                for m in (meths if i % 2 == 0 else meths[::-1]):
                    t0 = time.perf_counter()
                    one(m)
                    if i:
                        t[m].append(time.perf_counter() - t0)
            med = {m: median(v) * 1e3 for m, v in t.items()}
            pick = choose_path(n, a, c, min(a, c), True, True, low_mem=False)
            pick_lm = choose_path(n, a, c, min(a, c), True, True, low_mem=True)
            row = {"n": n, "d_in": a, "d_out": c, "autocast_bf16": autocast, "ms": med, "auto_picks": pick,
                   "auto_picks_low_memory": pick_lm,
                   "best_of_two": min(("factorised", "dense"), key=lambda m: med[m])}
            out.append(row)
            print(f"{'bf16' if autocast else 'fp32'} N={n:5d} {a:5d}->{c:5d} " + " ".join(f"{m}={v:7.2f}" for m, v in med.items())
                  + f"  auto={pick:10s} (low-memory: {pick_lm}) best={row['best_of_two']:10s} "
                  f"auto/lora={med[pick] / med['lora']:.2f}", flush=True)
    return {"layers": out}


# ================================================================================ where the time goes
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_config(key: str, args: argparse.Namespace) -> dict:
    """Per-op CPU time and GEMM multiply-adds of a few train-mode steps of each method (torch
    profiler, ``with_flops``), to show where VectorFit's extra step time goes.

    The profiler's FLOP count of ``mm``/``addmm``/``bmm`` is 2 x multiply-adds; it is exact for
    these ops, so the GEMM work of each method is counted, not estimated. Profiled steps run
    slower than unprofiled ones: compare the methods with each other, not with the step table."""
    from torch.profiler import ProfilerActivity, profile

    cfg = CONFIGS[key]
    steps = 2 if args.quick else 4
    torch.manual_seed(0)
    base = load_base(cfg["model"])
    base.train()
    batch = make_batch(base, cfg["batch"], cfg["seq"])
    methods = runnable_methods(args.methods, base)
    out: dict = {"config": key, **cfg, "profiled_steps": steps, "methods": {}}
    print(f"\n=== profile, config {key}: {cfg['name']} ({steps} train-mode steps per method) ===", flush=True)
    for m in methods:
        run = Run(m, copy.deepcopy(base))
        run.model.train()
        for _ in range(2):  # warm-up (allocator, oneDNN primitives, AVF schedule)
            run.step(batch, cfg["autocast"])
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            for _ in range(steps):
                run.step(batch, cfg["autocast"])
        ops = {}
        for e in prof.key_averages():
            ops[e.key] = {"self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps,
                          "gflop": (e.flops or 0) / 1e9 / steps}
        gemm_ms = sum(v["self_ms"] for k, v in ops.items() if k in GEMM_OPS)
        gemm_gmac = sum(v["gflop"] for k, v in ops.items() if k in GEMM_OPS) / 2
        total_ms = sum(v["self_ms"] for v in ops.values())
        rng_ms = ops.get("aten::bernoulli_", {}).get("self_ms", 0.0)
        out["methods"][m] = {"total_ms": total_ms, "gemm_ms": gemm_ms, "gemm_gmac": gemm_gmac,
                             "dropout_rng_ms": rng_ms, "other_ms": total_ms - gemm_ms - rng_ms,
                             "gemm_gmac_per_s": gemm_gmac / (gemm_ms / 1e3) if gemm_ms else None,
                             "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["self_ms"])[:25])}
        del run, prof
        gc.collect()
        trim()  # give the freed model back: four BERT-base runs in one process can exhaust 24 GB
    ref = out["methods"].get("lora")
    print(f"{'method':16s} {'step ms':>8s} {'GEMM ms':>8s} {'GEMM GMAC':>10s} {'GMAC/s':>7s} {'dropout':>8s} {'other ms':>9s}"
          + ("  vs lora: GEMM GMAC, step" if ref else ""))
    for m, r in out["methods"].items():
        line = (f"{m:16s} {r['total_ms']:8.1f} {r['gemm_ms']:8.1f} {r['gemm_gmac']:10.2f} {r['gemm_gmac_per_s']:7.1f} "
                f"{r['dropout_rng_ms']:8.1f} {r['other_ms']:9.1f}")
        if ref:
            line += f"  {r['gemm_gmac'] / ref['gemm_gmac']:.3f}, {r['total_ms'] / ref['total_ms']:.3f}"
        print(line, flush=True)
    return out


# ================================================================================ main
def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1,2,3,4", help="comma-separated subset of 1,2,3,4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per method and mode (default per config)")
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="few steps: a smoke run, numbers are noisy")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=str(HERE / "speed"), help="folder for the JSON results")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-setup", action="store_true")
    p.add_argument("--no-inference", action="store_true")
    p.add_argument("--memory-only", action="store_true",
                   help="peak memory only (each method in a fresh process): no setup, step or inference timing")
    p.add_argument("--layers", action="store_true", help="per-layer path timings instead of the model configs")
    p.add_argument("--profile", action="store_true",
                   help="where the time goes: per-op CPU time and GEMM multiply-adds per method (torch profiler)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])])
    env_note = {k: os.environ[k] for k in ("VECTORFIT_LAYER_PATH", "VECTORFIT_LOW_MEMORY", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    common = {"command": command, "env": env_note, "versions": versions(), "machine": machine_info(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
              "layer_path": os.environ.get("VECTORFIT_LAYER_PATH", "auto")}
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    if args.layers:
        res = {**common, **layer_bench(args)}
        (outdir / "layers.json").write_text(json.dumps(res, indent=1))
        print(f"wrote {outdir / 'layers.json'}")
        return
    for key in [k.strip() for k in args.configs.split(",") if k.strip()]:
        if args.profile:
            res = {**common, **profile_config(key, args)}
            path = outdir / f"profile-{key}-{res['name']}.json"
            path.write_text(json.dumps(res, indent=1))
            print(f"wrote {path}", flush=True)
            continue
        res = {**common, **run_config(key, args)}
        print_table(res)
        path = outdir / f"{key}-{res['name']}.json"
        path.write_text(json.dumps(res, indent=1))
        print(f"wrote {path} ({res['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
