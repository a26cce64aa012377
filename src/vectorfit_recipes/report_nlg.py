"""The text-generation section of the report: ``bbc-headline`` with SmolLM2.

The two generation suites share one section. ``nlg-rates`` sweeps each method's rate on seed 0 and
``nlg`` repeats each chosen rate over three seeds, sharing its seed-0 runs with the sweep. The
section has:

* one table of every (method, rate). It gives test ROUGE-1/2/L (mean ± std over the seeds run) and
  validation ROUGE-L, which chooses the rate. The floor comes first: the instruct model before
  fine-tuning (``benchmarks/nlg_floor.py``, measured once).
* sample headlines side by side. Each sample shows the article's head and the reference, then the
  floor's output and each method's output at its chosen rate, seed 0. They are the same test
  articles for all.

Result files keep ROUGE on its own ×100 scale, in ``result["rouge"]``, which is read here as it is.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .report_common import LABELS, _mean_std, _method_key

__all__ = ["SUITES", "chosen_rates", "nlg_section"]

#: The suites this section reports; the report shows them here and not as ordinary suites.
SUITES = ("nlg-rates", "nlg")
KEYS = ("rouge1", "rouge2", "rougeL")
N_SHOWN = 4  # sample articles shown side by side


def _runs(results: list[dict]) -> list[dict]:
    """The generation suites' runs, each once (a seed-0 run belongs to both suites)."""
    seen: dict[str, dict] = {}
    for r in results:
        if r.get("_suite") in SUITES and r.get("rouge"):
            seen.setdefault(r["_path"], r)
    return list(seen.values())


def _ms(xs: list[float]) -> str:
    """ROUGE (already x 100) as mean ± std over seeds; one seed has no spread and prints none."""
    mean, std = _mean_std(xs)
    return f"{mean:.2f}" if len(xs) < 2 else f"{mean:.2f} ± {std:.2f}"


def chosen_rates(runs: list[dict]) -> dict[str, float]:
    """Each method's rate with the best seed-0 validation ROUGE-L (the sweep's choice)."""
    best: dict[str, tuple[float, float]] = {}
    for r in runs:
        if r["seed"] != 0:
            continue
        v = r["rouge"]["validation"]["rougeL"]
        if r["method"] not in best or v > best[r["method"]][0]:
            best[r["method"]] = (v, r["lr"])
    return {m: lr for m, (_, lr) in best.items()}


def nlg_section(results: list[dict], floor_path: Optional[Path] = None) -> list[str]:
    """Markdown lines of the generation section; empty if no generation run has finished."""
    runs = _runs(results)
    if not runs:
        return []
    floor = json.loads(floor_path.read_text()) if floor_path is not None and floor_path.exists() else None
    chosen = chosen_rates(runs)
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["method"], r["lr"])].append(r)
    cfg = runs[0]["config"]
    gen = runs[0].get("generation", {})
    lines = [
        "## Generation: BBC article → headline (`bbc-headline`, SmolLM2-135M-Instruct)", "",
        "Commands: `vectorfit bench --suite nlg-rates --jobs 2` (seed 0, each method at one or two rates), "
        "`vectorfit bench --suite nlg --jobs 2` (the chosen rates, seeds 0–2), `python benchmarks/nlg_floor.py` "
        "(the model before fine-tuning). Test and validation are 100 articles each; ROUGE-1/2/L are F1 × 100 "
        f"(`rouge-score`, stemmed); decoding is greedy, at most {gen.get('max_new_tokens', '?')} new tokens. "
        f"Training: {cfg.get('max_train_examples')} articles cut to {cfg.get('max_len')} tokens, batch "
        f"{cfg.get('batch_size')}, {cfg.get('epochs')} epoch(s); validation ROUGE-L chooses the rate (and the epoch). "
        "This is an offline stand-in for the paper's XSum/CNN-DM experiments: another dataset, a 135M model, "
        "and a budget of tens of steps, not epochs.", "",
        "| method | lr | seeds | test ROUGE-1 | test ROUGE-2 | test ROUGE-L | validation ROUGE-L | trainable params | train s (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if floor is not None:
        t, v = floor["test"], floor["validation"]
        lines.append(f"| before fine-tuning (floor) | | | {t['rouge1']:.2f} | {t['rouge2']:.2f} | {t['rougeL']:.2f} "
                     f"| {v['rougeL']:.2f} | 0 | |")
    for (m, lr), rs in sorted(groups.items(), key=lambda kv: (_method_key(kv[0][0]), kv[0][1])):
        rs = sorted(rs, key=lambda r: r["seed"])
        test = [[r["rouge"]["test"][k] for r in rs] for k in KEYS]
        val = [r["rouge"]["validation"]["rougeL"] for r in rs]
        mark = " (chosen)" if chosen.get(m) == lr and len({lr2 for (m2, lr2) in groups if m2 == m}) > 1 else ""
        secs = statistics.median(r["train_seconds"] for r in rs)
        lines.append(f"| {LABELS.get(m, m)} | {lr:g}{mark} | {','.join(str(r['seed']) for r in rs)} | "
                     + " | ".join(_ms(x) for x in test)
                     + f" | {_ms(val)} | {rs[0]['trainable_params']:,} | {secs:.0f} |")
    lines += ["", "Mean ± std over the seeds listed (one seed: no spread). A rate marked *chosen* has the best "
              "seed-0 validation ROUGE-L of its method; the `nlg` suite runs that rate on three seeds.", ""]
    lines += _samples(runs, chosen, floor)
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _samples(runs: list[dict], chosen: dict[str, float], floor: Optional[dict]) -> list[str]:
    shown = {r["method"]: r for r in runs if r["seed"] == 0 and chosen.get(r["method"]) == r["lr"] and r.get("samples")}
    if not shown:
        return []
    methods = sorted(shown, key=_method_key)
    first = shown[methods[0]]["samples"]
    lines = ["### Sample headlines (test articles, seed 0, each method at its chosen rate)", ""]
    for i, s in enumerate(first[:N_SHOWN]):
        lines += [f"**Article {i + 1}:** {_cell(s['input_head'])}", "", "| | headline |", "|---|---|",
                  f"| reference | {_cell(s['reference'])} |"]
        fs = (floor or {}).get("samples_test", [])
        if i < len(fs) and fs[i]["reference"] == s["reference"]:
            lines.append(f"| before fine-tuning | {_cell(fs[i]['output'])} |")
        for m in methods:
            ss = shown[m]["samples"]
            if i < len(ss) and ss[i]["reference"] == s["reference"]:  # the same article for every method
                lines.append(f"| {LABELS.get(m, m)} | {_cell(ss[i]['output'])} |")
        lines.append("")
    return lines
