#!/usr/bin/env python
"""Convolutions: VectorFit's Conv2d layers against peft LoRA (and full fine-tuning) on MobileNetV2.

MobileNetV2 with torchvision's ImageNet weights (``vectorfit_recipes.vision``), a new 10-class head
(in ``modules_to_save`` for the adapter methods), batch 32 of random images, cross-entropy on random
labels, at 64x64 and 128x128. For each method, in one run:

* train-step time: forward + backward + AdamW step (VectorFit with AVF active, an AVF step every 2
  steps), train mode (BatchNorm in training mode, dropout as the model ships). All methods live in one
  process and are INTERLEAVED round-robin, one step each (A B C A B C ...), so that drift of a shared
  machine hits them alike; medians over the steps after warm-up;
* peak memory: each method in a fresh subprocess, the kernel's resident high-water mark (VmHWM, reset
  through ``/proc/self/clear_refs`` after loading the base model) during setup and the training steps,
  minus the resident set with the base model loaded: what training this way costs on top of holding
  the base model. Also ``saved``: the exact bytes autograd keeps between a forward and its backward;
* setup time (``get_peft_model``; VectorFit's includes the SVD of every target, no SVD cache).

Methods: ``full`` (every parameter), ``vectorfit`` (all 52 convolutions under ``features``: the 3x3
stem, 17 depthwise 3x3, 34 pointwise 1x1; + the head), ``vectorfit_nodw`` (the same without the 17
depthwise convs), ``lora_r1`` / ``lora_r8`` (peft LoRA on that same 35-conv subset: peft's LoRA Conv2d
refuses a conv whose groups do not divide r, i.e. every depthwise conv at r=1 or 8 -- the run
prints peft's own error), ``bitfit`` (the convs have no biases: the BatchNorm shifts + the head), ``head``
(the head alone, a linear probe). ``vectorfit_nodw`` against ``lora_r*`` is the like-for-like comparison.

``--layers`` (on by default) times, per pretrained groups=1 convolution at its real input shape, the
library's forward (``svd_conv2d``: the kernel ``U diag(s) Vh`` is rebuilt and the base convolution runs
once) against the other exact form (a ``Vh`` convolution into r channels followed by a 1x1
``U diag(s)`` convolution, written here only), forward + backward with the input requiring a gradient
(as inside the network), interleaved; totals per layer type (the 3x3 stem, the 1x1 pointwise convs).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conv_speed.py             # ~6 min on 1 thread
    .venv/bin/python benchmarks/conv_speed.py --quick                      # seconds: a smoke run
    .venv/bin/python benchmarks/conv_speed.py --res 64 --methods full,vectorfit,lora_r1 --no-memory

Prints the exact command, versions, machine and load average; ``--out FILE`` also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _memory import status_kb, trim  # noqa: E402

METHODS = ("full", "vectorfit", "vectorfit_nodw", "lora_r1", "lora_r8", "bitfit", "head")
NUM_CLASSES = 10
AVF = dict(start_step=2, interval=2, num_freezes=10_000)  # AVF active during the timed steps


def _set_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


# ================================================================================ methods
def targets(base, subset: str) -> str:
    from vectorfit_recipes import vision

    return vision.CONV_TARGETS if subset == "all" else vision.conv_target_regex(base, ("standard", "pointwise"))


def build(method: str, base) -> Any:
    """``method`` applied to ``base`` (modified in place)."""
    import peft
    import torch
    import vectorfit

    if method in ("vectorfit", "vectorfit_nodw"):
        cfg = vectorfit.VectorFitConfig(target_modules=targets(base, "all" if method == "vectorfit" else "nodw"),
                                        modules_to_save=["classifier.1"], avf=vectorfit.AVFConfig(**AVF))
        return peft.get_peft_model(base, cfg)
    if method.startswith("lora_r"):
        r = int(method[len("lora_r"):])
        cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=targets(base, "nodw"),
                              modules_to_save=["classifier.1"])
        return peft.get_peft_model(base, cfg)
    if method in ("bitfit", "head"):
        for p in base.parameters():
            p.requires_grad_(False)
        base.classifier[1].requires_grad_(True)
        if method == "bitfit":
            for m in base.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.bias.requires_grad_(True)
        return base
    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def lora_on_depthwise() -> str:
    """What peft says when LoRA targets MobileNetV2's depthwise convolutions."""
    import peft
    from vectorfit_recipes import vision

    base = vision.MobileNetV2(NUM_CLASSES)
    out = []
    for r in (1, 8):
        try:
            peft.get_peft_model(base, peft.LoraConfig(r=r, target_modules=vision.conv_target_regex(base, ("depthwise",))))
            out.append(f"r={r}: accepted")
            base = vision.MobileNetV2(NUM_CLASSES)
        except Exception as e:  # noqa: BLE001 - we report whatever peft raises
            out.append(f"r={r}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return "\n  ".join(out)


class Run:
    def __init__(self, method: str, base) -> None:
        import torch

        self.method = method
        t0 = time.perf_counter()
        self.model = build(method, base)
        self.setup_s = time.perf_counter() - t0
        self.avf = getattr(self.model, "avf", None) if method.startswith("vectorfit") else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
        self.step_no = 0
        self.model.train()

    def step(self, x, y) -> float:
        import torch.nn.functional as F

        self.step_no += 1
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.avf is not None:
            self.avf.step(self.step_no)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def batch(batch_size: int, res: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, res, res, generator=g), torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)


# ================================================================================ step times
def measure_steps(methods: list, res: int, batch_size: int, warmup: int, steps: int) -> dict:
    from vectorfit_recipes import vision

    x, y = batch(batch_size, res)
    runs = {m: Run(m, vision.load_mobilenet_v2(NUM_CLASSES)) for m in methods}
    times: dict = {m: [] for m in methods}
    for i in range(warmup + steps):
        for m, run in runs.items():  # round-robin: one step of each method in turn
            t0 = time.perf_counter()
            run.step(x, y)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return {m: {"step_s": statistics.median(times[m]), "steps_s": times[m], "setup_s": runs[m].setup_s,
                "trainable": runs[m].trainable} for m in methods}


# ================================================================================ memory
def _saved_for_backward_mb(model, x, y) -> float:
    """Distinct storages autograd keeps between one training forward and its backward, less the
    model's own parameters and buffers (exact bytes, not RSS)."""
    import torch
    import torch.nn.functional as F

    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def memory_child(spec: str) -> None:
    method, res, batch_size, steps = spec.split(":")
    import peft
    import torch
    import vectorfit
    from vectorfit_recipes import vision

    # Each method's first get_peft_model imports and initialises more of peft (LoRA's first call: ~35
    # MB of libraries): do both once on a tiny net, for every method alike, before the baseline.
    for cfg in (peft.LoraConfig(r=1, target_modules=["0"]), vectorfit.VectorFitConfig(target_modules=["0"], variant="no_avf")):
        peft.get_peft_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), cfg)
    x, y = batch(int(batch_size), int(res))
    base = vision.load_mobilenet_v2(NUM_CLASSES)
    trim()
    rss0 = status_kb("VmRSS")  # interpreter + libraries + the base model + the batch
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    run = Run(method, base)
    del base
    trim()
    rss_setup = status_kb("VmRSS")
    for _ in range(int(steps)):
        run.step(x, y)
    hwm = status_kb("VmHWM")
    saved = _saved_for_backward_mb(run.model, x, y)
    print(json.dumps({"peak_mb": (hwm - rss0) / 1024, "after_setup_mb": (rss_setup - rss0) / 1024, "saved_mb": saved}))


def measure_memory(method: str, res: int, batch_size: int, steps: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
           "--_memory-child", f"{method}:{res}:{batch_size}:{steps}"]
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory child {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ================================================================================ per layer
def two_conv(x, layer, s, b):
    """The other exact form: a ``Vh`` convolution into r channels (the base layer's kernel size,
    stride, padding, dilation), then a 1x1 ``U diag(s)`` convolution (+ bias). groups == 1 and zero
    padding only."""
    import torch.nn.functional as F

    conv = layer.base_layer
    c, cin, kh, kw = layer.kernel_shape
    r = layer.Vh.shape[0]
    h = F.conv2d(x, layer.Vh.reshape(r, cin, kh, kw), None, conv.stride, conv.padding, conv.dilation, 1)
    return F.conv2d(h, (layer.U * s).reshape(c, r, 1, 1), b)


def measure_layers(res: int, batch_size: int, reps: int, warmup: int = 2) -> list:
    """Per groups=1 conv: forward + backward (input and s need gradients) of the library's layer and
    of :func:`two_conv`, interleaved, median seconds; plus the frozen base convolution's."""
    import peft
    import torch
    import vectorfit
    from vectorfit_recipes import vision

    base = vision.load_mobilenet_v2(NUM_CLASSES).train()
    inputs: dict = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: inputs.__setitem__(n, a[0].detach()))
             for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    with torch.no_grad():
        base(batch(batch_size, res)[0])
    for h in hooks:
        h.remove()
    pm = peft.get_peft_model(base, vectorfit.VectorFitConfig(target_modules=targets(base, "nodw")))
    rows = []
    for name, x0 in inputs.items():
        layer = pm.base_model.model.get_submodule(name)
        s = layer.vectorfit_sigma["default"]
        b = layer.vectorfit_bias.get("default")
        x = x0.clone().requires_grad_(True)
        with torch.no_grad():
            ref, alt = layer(x0), two_conv(x0, layer, s, b)
        err = float((alt - ref).norm() / ref.norm())
        weight = layer.base_layer.weight.detach()

        def lib(layer=layer, x=x):
            layer(x).sum().backward()

        def alt_fn(layer=layer, x=x, s=s, b=b):
            two_conv(x, layer, s, b).sum().backward()

        def base_fn(layer=layer, x=x, weight=weight):
            layer.base_layer._conv_forward(x, weight, None).sum().backward()

        fns = {"library": lib, "two_conv": alt_fn, "base": base_fn}
        t: dict = {k: [] for k in fns}
        for i in range(warmup + reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                if i >= warmup:
                    t[k].append(time.perf_counter() - t0)
                x.grad = None
                s.grad = None
                if b is not None:
                    b.grad = None
        conv = layer.base_layer
        c, cin, kh, kw = layer.kernel_shape
        rows.append({"name": name, "type": "3x3" if (kh, kw) != (1, 1) else "1x1", "in": cin, "out": c,
                     "r": layer.Vh.shape[0], "stride": conv.stride[0], "hw": tuple(x0.shape[2:]), "rel_err": err,
                     **{k: statistics.median(v) for k, v in t.items()}})
    return rows


# ================================================================================ report
def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import peft
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "peft": peft.__version__, "loadavg": [round(v, 2) for v in os.getloadavg()]}


def print_table(res: int, batch_size: int, timing: dict, memory: dict) -> None:
    full = timing.get("full", {}).get("step_s")
    print(f"\n### {res}x{res}, batch {batch_size}: train step (median s), setup, peak memory over the loaded base model")
    print("| method | targets | trainable | step s | / full | / lora_r1 | setup s | peak MB | saved MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    tg = {"full": "everything", "vectorfit": "52 convs + head", "vectorfit_nodw": "35 convs (no depthwise) + head",
          "lora_r1": "35 convs (no depthwise) + head", "lora_r8": "35 convs (no depthwise) + head",
          "bitfit": "BN shifts + head", "head": "head"}
    l1 = timing.get("lora_r1", {}).get("step_s")
    for m, t in timing.items():
        mem = memory.get(m, {})
        ratio = f"{t['step_s'] / full:.2f}" if full else "-"
        rl = f"{t['step_s'] / l1:.2f}" if l1 else "-"
        pk = f"{mem['peak_mb']:.0f}" if mem else "-"
        sv = f"{mem['saved_mb']:.0f}" if mem else "-"
        print(f"| {m} | {tg[m]} | {t['trainable']:,} | {t['step_s']:.3f} | {ratio} | {rl} | {t['setup_s']:.2f} | {pk} | {sv} |")


def print_layers(res: int, rows: list) -> None:
    print(f"\n### per layer, {res}x{res}: forward + backward, median ms (input and s need gradients)")
    print("| layers | library (rebuild kernel) | two convs (Vh, then U diag(s)) | two / library | faster form per layer | frozen base conv | max rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    groups = [("3x3 stem (3->32, stride 2)", [r for r in rows if r["type"] == "3x3"]),
              ("all 34 1x1 pointwise (sum)", [r for r in rows if r["type"] == "1x1"])]
    big = sorted((r for r in rows if r["type"] == "1x1"), key=lambda r: -r["library"])[:3]
    groups += [(f"{r['name']} ({r['in']}->{r['out']}, {r['hw'][0]}x{r['hw'][1]})", [r]) for r in big]
    for label, rs in groups:
        lib, alt, bas = (sum(r[k] for r in rs) * 1e3 for k in ("library", "two_conv", "base"))
        best = sum(min(r["library"], r["two_conv"]) for r in rs) * 1e3
        print(f"| {label} | {lib:.2f} | {alt:.2f} | {alt / lib:.2f} | {best:.2f} | {bas:.2f} | {max(r['rel_err'] for r in rs):.1e} |")
    wins = [r["name"] for r in rows if r["two_conv"] < r["library"]]
    print(f"two convs faster on {len(wins)} of {len(rows)} layers" + (f": {', '.join(wins)}" if wins else ""))


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Methods: " + ", ".join(METHODS))
    ap.add_argument("--res", default="64,128", help="input resolutions, comma-separated (default: 64,128)")
    ap.add_argument("--batch", type=int, default=32, help="batch size (default: 32)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per method, not timed (default: 3)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per method, interleaved (default: 20)")
    ap.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory subprocess (default: 3)")
    ap.add_argument("--layer-reps", type=int, default=10, help="timed repetitions per layer and form (default: 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer forward comparison")
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run: 32x32, batch 4, 1 step each")
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    _set_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.quick:
        args.res, args.batch, args.warmup, args.steps, args.memory_steps, args.layer_reps = "32", 4, 1, 1, 1, 1
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    resolutions = [int(r) for r in args.res.split(",")]

    cmd = " ".join(shlex.quote(a) for a in [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", sys.executable, *sys.argv])
    info = machine()
    print(f"command: {cmd}\nmachine: {info}\nthreads: {args.threads}")
    print(f"peft LoRA on the depthwise convs:\n  {lora_on_depthwise()}")
    t_start = time.time()
    results: dict = {"command": cmd, "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "res": {}}
    for res in resolutions:
        timing = measure_steps(methods, res, args.batch, args.warmup, args.steps)
        memory = {} if args.no_memory else {m: measure_memory(m, res, args.batch, args.memory_steps, args.threads) for m in methods}
        layers = [] if args.no_layers else measure_layers(res, args.batch, args.layer_reps)
        print_table(res, args.batch, timing, memory)
        if layers:
            print_layers(res, layers)
        results["res"][res] = {"timing": timing, "memory": memory, "layers": layers}
    results["wall_s"] = time.time() - t_start
    results["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(f"\nwall {results['wall_s']:.0f} s; load average at the end {results['loadavg_end']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
