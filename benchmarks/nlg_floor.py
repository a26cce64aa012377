#!/usr/bin/env python
"""The floor of the ``nlg`` suite (the text-generation benchmark): SmolLM2-135M-Instruct *before* fine-tuning, with the
suite's own prompt, article cut and evaluation articles, greedy decoding, ROUGE-1/2/L F1 x 100.

Every fine-tuning method must beat this. It is measured once, not per run (the suite sets
``eval_before`` off), because it does not depend on the method or the seed: the same frozen model
sees the same 100 validation and 100 test prompts.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/nlg_floor.py          # ~5 CPU minutes

Writes ``benchmarks/nlg/floor.json`` (``--json``): the suite's settings, the ROUGE of both splits and
the first samples (input head, reference, output), which ``vectorfit report`` shows next to the
suite's results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="nlg", help="suite whose settings define the prompt and articles")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", type=Path, default=HERE / "nlg" / "floor.json", help="where to write the result")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from vectorfit_recipes import bench, models, nlg, train

    torch.set_num_threads(args.threads)
    s = bench.suites()[args.suite]
    settings = s["settings"]
    task, model = s["tasks"][0], s["models"][0]
    cfg = train.TrainConfig(task=task, model=model, max_len=settings["max_len"],
                            max_eval_examples=settings["max_eval_examples"],
                            max_train_examples=settings["max_train_examples"], threads=args.threads)
    data = train.prepare_data(cfg)
    lm = models.load_causal_lm(model)
    lm.eval()
    batch = settings.get("eval_batch_size", 32)
    out: dict = {"suite": args.suite, "task": task, "model": model, "settings": settings,
                 "command": "python benchmarks/nlg_floor.py " + " ".join(sys.argv[1:])}
    t0 = time.time()
    for split, enc in (("validation", data.validation), ("test", data.test)):
        nlg.evaluate(lm, enc, batch, "cpu", progress=True, desc=f"{split} (before)")
        e = enc.evals[-1]
        out[split] = {k: e[k] for k in nlg.ROUGE_KEYS}
        out[f"samples_{split}"] = e["samples"]
        print(f"{split}: " + ", ".join(f"{k} {e[k]:.2f}" for k in nlg.ROUGE_KEYS), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
