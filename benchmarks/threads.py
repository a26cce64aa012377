#!/usr/bin/env python
"""Thread oversubscription on a shared CPU: torch threads 1 vs 2, OpenMP spin vs passive wait.

The measurements behind the ``vectorfit`` command's OpenMP thread policy. Every measurement runs in
a *fresh* process, because ``OMP_WAIT_POLICY`` is read once, when the OpenMP runtime starts (i.e.
when torch is imported), and cannot be changed later.

Two measurements per condition:

* ``svd``: one thin SVD (``vectorfit.layer.svd_fp32``) of a real MiniLM-L6 384 x 384 matrix
  (layer 0's query weight): the first call, and the median of the next five;
* ``steps``: the main job (``vectorfit train``'s defaults: MiniLM, movie sentences, batch 32, 64
  tokens, the ``vectorfit`` method) cut to ``--steps`` optimizer steps, seconds per step from the
  run's own ``train_seconds`` (SVD cache warm, no evaluation before, one small evaluation after).

Conditions: torch threads {1, 2} x ``OMP_WAIT_POLICY`` {unset (the runtime's default), PASSIVE},
interleaved (one measurement of each condition per round), on the machine as it is plus, with
``--load N``, N single-threaded busy processes started by this script (each multiplies 512 x 512
matrices in a loop with one thread: the shape of a single-threaded training job sharing the
machine). The 1-minute load average and the other processes' CPU use are recorded before each
measurement, because on a shared machine they are the condition being measured.

Usage::

    .venv/bin/python benchmarks/threads.py                 # quiet machine
    .venv/bin/python benchmarks/threads.py --load 1        # one competing single-threaded process

Prints a Markdown table and writes the raw numbers as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_SVD_CHILD = r"""
import json, statistics, time, torch
from safetensors.torch import load_file
from vectorfit.layer import svd_fp32
from vectorfit_recipes.models import model_path
torch.set_num_threads(int(__THREADS__))
sd = load_file(str(model_path("minilm") / "model.safetensors"))
w = next(v for k, v in sd.items() if k.endswith("layer.0.attention.self.query.weight")).float()
assert tuple(w.shape) == (384, 384), w.shape
t = time.perf_counter(); svd_fp32(w); first = time.perf_counter() - t
rest = []
for _ in range(5):
    t = time.perf_counter(); svd_fp32(w); rest.append(time.perf_counter() - t)
print(json.dumps({"first_s": first, "median_next5_s": statistics.median(rest)}))
"""

_STEPS_CHILD = r"""
import json
from vectorfit_recipes.train import run
from vectorfit_recipes.train_config import TrainConfig
cfg = TrainConfig(max_steps=int(__STEPS__), threads=int(__THREADS__), eval_before=False,
                  select_on_validation=False, max_eval_examples=64, progress=False)
r = run(cfg, log=lambda *a: None)
print(json.dumps({"steps": r["steps"], "train_s": r["train_seconds"],
                  "s_per_step": r["train_seconds"] / r["steps"], "threads": r["threads"]}))
"""

_LOADER = r"""
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    b = a @ a
"""


def _loadavg() -> float:
    return os.getloadavg()[0]


def _others() -> list[str]:
    """Other processes using CPU right now (``ps``), to record what the machine was doing."""
    try:
        out = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except OSError:
        return []
    rows = [line.strip()[:120] for line in out.splitlines()[1:] if line.strip()]
    return [r for r in rows if float(r.split()[0]) >= 20.0 and "ps -eo" not in r][:4]


def _child(code: str, threads: int, policy: str | None, steps: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("OMP_NUM_THREADS", None)  # threads are set with torch.set_num_threads in the child
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    src = code.replace("__THREADS__", str(threads)).replace("__STEPS__", str(steps))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", src], env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=int, default=0, help="single-threaded busy processes to run meanwhile (default: 0)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps of the main job per measurement (default: 6)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds: measurements per condition, interleaved (default: 2)")
    ap.add_argument("--what", default="svd,steps", help="svd, steps or both (default: svd,steps)")
    ap.add_argument("--out", default=None, help="JSON file for the raw numbers (default: print only)")
    args = ap.parse_args()

    loaders = [subprocess.Popen([sys.executable, "-c", _LOADER], env=dict(os.environ, OMP_NUM_THREADS="1"))
               for _ in range(args.load)]
    rows = []
    try:
        if loaders:
            time.sleep(5)  # let the load average see them
        conditions = [(t, p) for p in (None, "PASSIVE") for t in (1, 2)]
        for what in args.what.split(","):
            code = _SVD_CHILD if what == "svd" else _STEPS_CHILD
            for rep in range(args.repeats):
                for threads, policy in conditions:
                    la, others = _loadavg(), _others()
                    r = _child(code, threads, policy, args.steps)
                    row = {"what": what, "repeat": rep, "threads": threads, "omp_wait_policy": policy or "unset",
                           "load": args.load, "loadavg_before": la, "busy_before": others, **r}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        for p in loaders:  # only the processes this script started
            p.kill()
            p.wait()

    print("\n| what | threads | OMP_WAIT_POLICY | competing processes | median | all |")
    print("|---|---|---|---|---|---|")
    for what, key in (("svd", "median_next5_s"), ("svd", "first_s"), ("steps", "s_per_step")):
        for threads, policy in [(t, p) for p in ("unset", "PASSIVE") for t in (1, 2)]:
            vals = [r[key] for r in rows if r["what"] == what and r["threads"] == threads and r["omp_wait_policy"] == policy]
            if vals:
                label = {"median_next5_s": "SVD 384x384 (median of 5)", "first_s": "SVD 384x384 (first call)",
                         "s_per_step": "main job, s/step"}[key]
                print(f"| {label} | {threads} | {policy} | {args.load} | {statistics.median(vals):.3f} s | "
                      f"{', '.join(f'{v:.3f}' for v in vals)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"argv": sys.argv, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
