#!/usr/bin/env python
"""Adapter arithmetic on real adapters (the exact weighted adapters): interpolation, sum and negation, with the metric.

Every VectorFit adapter of one base shares ``U`` and ``Vh``, so ``add_weighted_adapter`` is exact:
the combined adapter's weight update is ``sum_j w_j dW_j``, nothing approximated. What such a
combination *does* to a task is an empirical question; this script measures it on two adapters
trained on the same task from different seeds (so the heads have the same shape and are combined
too, parameter by parameter from the original head):

* ``a``, ``b``: each adapter alone;
* ``(1-t) a + t b`` for t = 0.25, 0.5, 0.75: interpolation (a "soup" of two fine-tunes);
* ``a + b``: the sum of both updates (each task vector at full weight);
* ``-a``: negation, the update of ``a`` subtracted from the base (its head too).

Each is evaluated on the whole validation and test splits. The adapters come from the main job's
command (``vectorfit train ... --save-adapter DIR``); with ``--train`` the script runs those two
trainings first (two one-thread processes side by side, about 10 minutes on 2 cores).

Usage::

    python benchmarks/task_arithmetic.py --train                # movie, minilm, seeds 0 and 1
    python benchmarks/task_arithmetic.py --adapters A_DIR B_DIR --task movie

Writes ``benchmarks/task_arithmetic/<task>-<model>.json`` (``--json``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _train(task: str, model: str, seeds: list[int], out: Path, extra: list[str]) -> list[Path]:
    """Train one adapter per seed with the main job's command, all at once (one thread each)."""
    dirs, procs = [], []
    for seed in seeds:
        d = out / f"seed{seed}"
        dirs.append(d)
        if (d / "adapter_config.json").exists():
            print(f"[task_arithmetic] {d} exists: reused")
            continue
        cmd = [sys.executable, "-m", "vectorfit", "train", "--task", task, "--model", model, "--method", "vectorfit",
               "--seed", str(seed), "--threads", "1", "--no-progress", "--save-adapter", str(d),
               "--output", str(out / f"seed{seed}.json"), *extra]
        print("[task_arithmetic] " + shlex.join(cmd))
        log = open(out / f"seed{seed}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log, d))
    for p, log, d in procs:
        rc = p.wait()
        log.close()
        if rc != 0:
            raise SystemExit(f"training of {d} failed (exit code {rc}); see {d}.log")
    return dirs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="movie", help="a classification task of the data registry (default: movie)")
    ap.add_argument("--model", default="minilm", help="a recipes model (default: minilm)")
    ap.add_argument("--adapters", nargs=2, metavar=("A_DIR", "B_DIR"),
                    help="two VectorFit adapters trained on --task/--model (same pooling)")
    ap.add_argument("--train", action="store_true", help="train the two adapters first (seeds 0 and 1)")
    ap.add_argument("--train-args", default="", help="extra `vectorfit train` flags for --train, one string")
    ap.add_argument("--work", default=str(HERE / "task_arithmetic" / "adapters"),
                    help="where --train puts its adapters and training logs (default: benchmarks/task_arithmetic/adapters)")
    ap.add_argument("--pooling", default="mean", choices=["mean", "pooler"], help="as the adapters were trained")
    ap.add_argument("--max-len", type=int, default=64, help="tokens per sentence, as the adapters were trained")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the evaluation")
    ap.add_argument("--json", default=None, help="output file (default: benchmarks/task_arithmetic/<task>-<model>.json)")
    args = ap.parse_args(argv)
    if bool(args.adapters) == bool(args.train):
        ap.error("give either --adapters A_DIR B_DIR or --train")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from vectorfit import VectorFitModel
    from vectorfit_recipes import models as models_mod
    from vectorfit_recipes.train import evaluate, prepare_data
    from vectorfit_recipes.train_config import TrainConfig

    if args.train:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        dirs = _train(args.task, args.model, [0, 1], work, shlex.split(args.train_args))
    else:
        dirs = [Path(d) for d in args.adapters]

    cfg = TrainConfig(task=args.task, model=args.model, max_len=args.max_len, max_eval_examples=None,
                      pooling=args.pooling)
    data = prepare_data(cfg, log=lambda m: None)
    if data.info.is_generation:
        raise SystemExit(f"--task {args.task}: a generation task; this script evaluates classification/regression")
    base = models_mod.load_model(args.model, data.info.num_labels, pooling=args.pooling)
    model = VectorFitModel.from_pretrained(base, dirs[0], adapter_name="a")
    model.load_adapter(dirs[1], "b")
    combos = {
        "a": None, "b": None,
        "0.75 a + 0.25 b": (["a", "b"], [0.75, 0.25]),
        "0.5 a + 0.5 b": (["a", "b"], [0.5, 0.5]),
        "0.25 a + 0.75 b": (["a", "b"], [0.25, 0.75]),
        "a + b": (["a", "b"], [1.0, 1.0]),
        "-a": (["a"], [-1.0]),
    }
    names = {}
    for i, (label, spec) in enumerate(combos.items()):
        if spec is None:
            names[label] = label
        else:
            names[label] = f"combo{i}"
            model.add_weighted_adapter(spec[0], spec[1], names[label])
    metric = data.info.metric
    rows = []
    t0 = time.perf_counter()
    for label, name in names.items():
        model.set_adapter(name)
        val = evaluate(model, data.validation, metric, 128, "cpu")
        test = evaluate(model, data.test, metric, 128, "cpu")
        rows.append({"adapter": label, "validation": val, "test": test})
        print(f"[task_arithmetic] {label:>18}: validation {100 * val:.1f}, test {100 * test:.1f}")
    eval_s = time.perf_counter() - t0

    out = Path(args.json) if args.json else HERE / "task_arithmetic" / f"{args.task}-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "task": args.task, "model": args.model, "metric": metric, "adapters": [os.path.relpath(d) for d in dirs],
        "n_validation": len(data.validation), "n_test": len(data.test), "rows": rows,
        "eval_seconds": eval_s, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    print(f"\n| adapter | validation {metric} x100 | test {metric} x100 |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['adapter']} | {100 * r['validation']:.1f} | {100 * r['test']:.1f} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
