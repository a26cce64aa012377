"""What every part of the report shares: method labels and order, mean ± std cells, paired
differences by seed, the rate choice and the spread of training strengths.

``report.py`` (the tables) and its helpers ``report_curves.py``, ``report_plots.py`` and
``report_nlg.py`` all import these from here, so that no helper imports the module that imports it.
``report.py`` re-exports them under their old names.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Optional

__all__ = ["ORDER", "LABELS", "as_fractions", "best_rate", "paired_cell", "paired_stats", "strength_spread"]

#: The order of methods in every table and legend (methods not listed come last).
ORDER = ("vectorfit", "no_avf", "sigma_attn_bias", "sigma", "sigma_attn", "lora_r1", "lora_r8", "adalora",
         "vera", "ia3", "beft", "bitfit", "head", "full")
LABELS = {
    "vectorfit": "VectorFit", "no_avf": "VectorFit (no AVF)", "sigma": "VectorFit(Σ)", "sigma_attn": "VectorFit(Σa)",
    "sigma_attn_bias": "VectorFit(Σa+b)", "lora_r1": "LoRA r=1", "lora_r8": "LoRA r=8", "adalora": "AdaLoRA",
    "vera": "VeRA", "ia3": "IA3", "beft": "BEFT", "bitfit": "BitFit", "head": "Head only",
    "full": "Full FT",
}


def as_fractions(r: dict) -> dict:
    """``r`` with its metric on the 0-1 scale of accuracy, which every table multiplies by 100:
    generation runs record ROUGE already x 100 (``nlg.py``), so their test, validation, before and
    curve values are divided by 100 here (a copy; the file is not touched)."""
    if not str(r.get("metric", "")).startswith("rouge"):
        return r
    r = dict(r)
    for k in ("test", "validation", "test_before"):
        if r.get(k) is not None:
            r[k] = r[k] / 100.0
    if r.get("curve"):
        r["curve"] = [{**p, **{s: p[s] / 100.0 for s in ("validation", "test") if p.get(s) is not None}}
                      for p in r["curve"]]
    return r


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt(mean: float, std: float, n: int, scale: float = 100.0) -> str:
    if n < 2:  # one seed has no spread; printing "± 0.00" would claim one
        return f"{scale * mean:.2f} (n=1)"
    return f"{scale * mean:.2f} ± {scale * std:.2f}" + ("" if n >= 3 else f" (n={n})")


def _method_key(m: str) -> int:
    return ORDER.index(m) if m in ORDER else len(ORDER)


def _one_lr(keys: list) -> dict:
    """(task, model, method) -> key, for methods run at a single learning rate (not a sweep)."""
    by: dict = defaultdict(list)
    for k in keys:
        by[(k[1], k[2], k[3])].append(k)
    return {tmm: ks[0] for tmm, ks in by.items() if len(ks) == 1}


def paired_stats(diffs: list[float]) -> dict:
    """``mean``, ``std``, ``n`` and ``wins`` (differences > 0) of per-seed differences."""
    mean, std = _mean_std(diffs)
    return {"mean": mean, "std": std, "n": len(diffs), "wins": sum(d > 0 for d in diffs)}


def paired_cell(d: Optional[dict]) -> str:
    """A table cell for :func:`paired_stats`: ``+1.23 ± 0.45 (2/3)`` (× 100; no spread for one seed)."""
    if d is None:
        return ""
    return f"{100 * d['mean']:+.2f}" + (f" ± {100 * d['std']:.2f}" if d["n"] > 1 else "") + f" ({d['wins']}/{d['n']})"


def best_rate(scores: dict[float, float]) -> float:
    """The rate with the highest score (mean validation metric); a tie goes to the smaller, safer rate."""
    return max(scores, key=lambda lr: (scores[lr], -lr))


def strength_spread(strengths: dict[str, float]) -> Optional[dict[str, float]]:
    """Coefficient of variation (std / mean) and max / mean of the per-vector training strengths.

    Vectors with exactly zero strength (never moved) are left out. The key biases' gradient is zero up
    to float rounding (softmax ignores a shift shared by every key), but Adam's normalisation still
    moves them a little (at most a few percent of a typical vector's strength in the MiniLM runs), so they
    are counted, in this table and the heat-map alike. ``None`` when fewer than two vectors trained.
    """
    xs = [v for v in strengths.values() if v > 0]
    if len(xs) < 2:
        return None
    mean = statistics.fmean(xs)
    return {"cv": statistics.pstdev(xs) / mean, "max_over_mean": max(xs) / mean}
