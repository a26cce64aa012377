#!/usr/bin/env python
"""Two processes x one thread against one process x two threads on the main job (the measured cost of the
multiple-processes support).

Both conditions run the real command, ``vectorfit train`` (MiniLM, movie sentences, the ``vectorfit``
method, batch 32, 64 tokens), with the same global batch, the same data order and the same number
of optimizer steps, each in fresh processes:

* ``2 proc x 1 thread``: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m vectorfit
  train --threads 1 ...`` (gloo; each rank takes half of every batch, gradients are all-reduced once
  per step; only rank 0 evaluates and writes; see ``src/vectorfit_recipes/distributed.py``);
* ``1 proc x 2 threads``: ``python -m vectorfit train --threads 2 ...``.

Reported per run: samples/s = steps x batch / ``train_seconds`` (rank 0's optimisation time: forward,
backward, the all-reduce and the optimizer step; evaluation excluded), the whole command's wall time
(start-up, SVD, data, evaluation included), rank 0's peak RSS, and the test metric after the last
step (``--no-select-on-validation``: no epoch selection, so both conditions are tested after exactly
the same number of steps). The metrics are statistically, not numerically, comparable: under two
processes each rank draws its own dropout masks. The conditions are interleaved (one run of each per
round); the 1-minute load average and the busy processes are recorded before each run, because this
measurement is only meaningful on a quiet machine.

Usage (quiet machine; about 10 minutes with the defaults)::

    .venv/bin/python benchmarks/multiprocess_speed.py

Prints a Markdown table and writes the raw numbers to ``benchmarks/speed/multiprocess.json``
(``--out``). ``--steps 4 --max-train-examples 128 --max-eval-examples 64 --repeats 1 --out /tmp/x.json``
is a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from threads import _loadavg, _others  # noqa: E402  (same records as benchmarks/threads.py)

CONDITIONS = {
    "2 proc x 1 thread": dict(processes=2, threads=1),
    "1 proc x 2 threads": dict(processes=1, threads=2),
}


def _command(processes: int, threads: int, args: argparse.Namespace, seed: int, out: Path) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    flags = ["train", "--model", "minilm", "--task", "movie", "--method", "vectorfit", "--seed", str(seed),
             "--threads", str(threads), "--batch-size", str(args.batch_size), "--max-len", str(args.max_len),
             "--no-eval-before", "--no-select-on-validation", "--no-progress", "--output", str(out)]
    if args.steps is not None:
        flags += ["--max-steps", str(args.steps)]
    if args.max_train_examples is not None:
        flags += ["--max-train-examples", str(args.max_train_examples)]
    if args.max_eval_examples is not None:
        flags += ["--max-eval-examples", str(args.max_eval_examples)]
    return launcher + ["-m", "vectorfit", *flags]


def _run(name: str, args: argparse.Namespace, seed: int, rep: int) -> dict:
    cond = CONDITIONS[name]
    env = dict(os.environ, OMP_NUM_THREADS=str(cond["threads"]), VECTORFIT_PROGRESS="0")
    with tempfile.TemporaryDirectory(prefix="vf-mp-speed-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = _command(cond["processes"], cond["threads"], args, seed, out)
        la, busy = _loadavg(), _others()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(out.read_text())
    assert r.get("processes", 1) == cond["processes"], (name, r.get("processes"))
    return {
        "condition": name, "repeat": rep, "seed": seed, **cond, "steps": r["steps"], "batch_size": args.batch_size,
        "train_seconds": r["train_seconds"], "samples_per_s": r["steps"] * args.batch_size / r["train_seconds"],
        "s_per_step": r["train_seconds"] / r["steps"], "command_wall_s": wall, "peak_rss_mb_rank0": r.get("peak_rss_mb"),
        "metric": r["metric"], "test": r["test"], "final_train_loss": r["final_train_loss"],
        "n_train": r["n_train"], "n_test": r["n_test"], "loadavg_before": la, "busy_before": busy,
        "command": " ".join(["python", *cmd[1:]]).replace(str(out), "<tmp>/result.json"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the main job's 2 epochs, 126 steps)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds, one run per condition each, interleaved (default: 2)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, each run in every round (default: 0)")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (default: 32, the main job's)")
    ap.add_argument("--max-len", type=int, default=64, help="tokens (default: 64, the main job's)")
    ap.add_argument("--max-train-examples", type=int, default=None, help="default: the command's (2000)")
    ap.add_argument("--max-eval-examples", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--out", default=str(HERE / "speed" / "multiprocess.json"), help="JSON file for the raw numbers")
    args = ap.parse_args()

    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    t_all = time.perf_counter()
    for rep in range(args.repeats):
        for seed in seeds:
            for name in CONDITIONS:
                row = _run(name, args, seed, rep)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "busy_before"}), flush=True)

    print(f"\nmain job, {rows[0]['steps']} steps of a global batch of {args.batch_size} "
          f"({rows[0]['n_train']} training examples, test on {rows[0]['n_test']}), seeds {args.seeds}, "
          f"{args.repeats} round(s); load average before the runs: "
          f"{min(r['loadavg_before'] for r in rows):.2f}-{max(r['loadavg_before'] for r in rows):.2f}\n")
    print("| condition | samples/s (median) | each run | s/step (median) | command wall (median) | "
          "peak RSS rank 0 | test metric after the last step |")
    print("|---|---|---|---|---|---|---|")
    for name in CONDITIONS:
        rs = [r for r in rows if r["condition"] == name]
        each = ", ".join(f"{r['samples_per_s']:.1f}" for r in rs)
        tests = ", ".join(f"{r['test']:.4f}" for r in rs)
        sps = statistics.median(r["samples_per_s"] for r in rs)
        step = statistics.median(r["s_per_step"] for r in rs)
        wall = statistics.median(r["command_wall_s"] for r in rs)
        rss = max(r["peak_rss_mb_rank0"] or 0 for r in rs)
        print(f"| {name} | {sps:.1f} | {each} | {step:.3f} s | {wall:.0f} s | {rss:.0f} MB | {tests} ({rs[0]['metric']}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]], "total_wall_s": time.perf_counter() - t_all,
        "cpu_count": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"\nraw numbers: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
