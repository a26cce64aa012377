"""The report's plots (matplotlib, imported inside each function so that the tables need none):

1. metric vs. trainable parameters (log x), one point per method (paper fig. 1);
2. training strength per vector, layer x vector type, VectorFit with and without AVF (fig. 3);
3. singular values of dW = W_final - W_init for a few layers, VectorFit vs. full fine-tuning (fig. 9).

The learning-curve plots live with the curve tables, in ``report_curves.py``.
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Optional

from .report_common import LABELS, _method_key, _one_lr, strength_spread

# Short names for vector types in the heat-map (module tail -> label), BERT-like and MPNet names.
_VECTOR_TYPES = [
    (r"attention\.self\.query|attention\.attn\.q|self_attn\.q_proj", "q"),
    (r"attention\.self\.key|attention\.attn\.k|self_attn\.k_proj", "k"),
    (r"attention\.self\.value|attention\.attn\.v|self_attn\.v_proj", "v"),
    (r"attention\.output\.dense|attention\.attn\.o|self_attn\.o_proj", "o"),
    (r"intermediate\.dense|mlp\.up_proj", "f1"),
    (r"(?<!attention\.)output\.dense|mlp\.down_proj", "f2"),
]



def _vector_type(name: str) -> Optional[tuple[int, str]]:
    m = re.search(r"\.(\d+)\.(.+)\.(sigma|bias)$", name)
    if not m:
        return None
    layer, tail, kind = int(m.group(1)), m.group(2), m.group(3)
    for pattern, short in _VECTOR_TYPES:
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", tail):
            return layer, f"{short}.{'Σ' if kind == 'sigma' else 'b'}"
    return layer, f"{tail}.{kind}"


def plot_params(agg: dict, suite: str, out: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in agg if k[0] == suite]
    tasks = sorted({k[1] for k in keys})
    methods = sorted({k[3] for k in keys}, key=_method_key)
    one = _one_lr(keys)
    pts = []
    for m in methods:
        ks = [k for k in keys if k[3] == m]
        if len(ks) != len(tasks) or any((k[1], k[2], m) not in one for k in ks):
            continue  # not run on every task, or a learning-rate sweep
        pts.append((m, agg[ks[0]]["trainable"], statistics.fmean(100 * agg[k]["test"][0] for k in ks)))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    # Variants with the same parameter count (VectorFit with and without AVF) often land within a
    # hair of each other; stack their labels downwards instead of printing one over the other.
    span = (max(p[2] for p in pts) - min(p[2] for p in pts)) or 1.0
    placed: list = []
    for m, n, score in sorted(pts, key=lambda p: (p[1], -p[2])):
        vf = m in ("vectorfit", "no_avf", "sigma", "sigma_attn", "sigma_attn_bias")
        ax.scatter([n], [score], s=60, marker="*" if vf else "o", color="tab:red" if vf else "tab:blue", zorder=3)
        crowd = sum(1 for n2, s2 in placed if n2 == n and abs(s2 - score) < 0.04 * span)
        ax.annotate(LABELS.get(m, m), (n, score), textcoords="offset points", xytext=(5, 4 - 10 * crowd),
                    fontsize=8)
        placed.append((n, score))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale, incl. the task head)")
    ax.set_ylabel(f"average test metric × 100 ({len(tasks)} tasks)")
    ax.set_title(f"Metric vs. trainable parameters — suite '{suite}'")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / f"{suite}_metric_vs_params.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


#: Which suite the diagnostic plots (heat-map, spectra) are drawn from, first that has the runs:
#: the converged suite read at its budget (the headline comparison at a realistic budget), then the longest curves.
DIAGNOSTIC_SUITES = ("converged", "curves", "curves-rates", "main", "ablation")


def _suites_by_preference(results: list[dict]) -> list[str]:
    present = {r["_suite"] for r in results}
    return [s for s in DIAGNOSTIC_SUITES if s in present] + sorted(present - set(DIAGNOSTIC_SUITES))


def _source(suite: str, runs: list[dict]) -> str:
    """One sentence naming the runs a diagnostic plot was drawn from: suite, task, seed, rate, steps.

    Runs read at one step of a longer curve (``_read_at``, from ``report_curves.read_at``) say so:
    their values are the curve point's there, not the end of their training.
    """
    at = runs[0].get("_read_at")
    if at is not None:
        each = "; ".join(f"{LABELS.get(r['method'], r['method'])}: seed {r['seed']}, lr {r['lr']:g}" for r in runs)
        return f"Drawn from suite `{suite}`, task {runs[0]['task']}, each run as it stood at step {at:,} ({each})."
    each = "; ".join(f"{LABELS.get(r['method'], r['method'])}: seed {r['seed']}, lr {r['lr']:g}, {r['steps']:,} steps"
                     for r in runs)
    return f"Drawn from suite `{suite}`, task {runs[0]['task']}, each run at the end of its training ({each})."


def plot_strengths(results: list[dict], out: Path, task: Optional[str] = None) -> Optional[tuple[Path, str]]:
    """Heat-maps of the final training strength per vector, with and without AVF (one seed).

    Returns:
        The plot's path and a caption naming the runs drawn and giving each panel's coefficient of variation
        (``strength_spread``, as in the balance table), or ``None`` when no suite has such a pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick, suite = {}, ""
    for suite in _suites_by_preference(results):  # both panels from one suite (same budget and head)
        pick = {}
        runs = [r for r in results if r["_suite"] == suite and r["method"] in ("vectorfit", "no_avf")
                and r.get("training_strengths") and (task is None or r["task"] == task)]
        # the pair must differ only by AVF: same task, seed and rate
        pairs = sorted(((a, b) for a in runs for b in runs if a["method"] == "vectorfit" and b["method"] == "no_avf"
                        and (a["task"], a["seed"], a["lr"]) == (b["task"], b["seed"], b["lr"])),
                       key=lambda ab: ab[0]["seed"])  # stable: the suite's own task order
        if pairs:
            pick = {"vectorfit": pairs[0][0], "no_avf": pairs[0][1]}
        if len(pick) == 2:
            break
    if len(pick) < 2:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    cvs = {}
    for ax, method in zip(axes, ("no_avf", "vectorfit")):
        r = pick[method]
        cells, drawn = {}, {}
        for name, v in r["training_strengths"].items():
            lt = _vector_type(name)
            if lt is not None:
                cells[lt], drawn[name] = v, v
        layers = sorted({l for l, _ in cells})
        types = [t for _, s in _VECTOR_TYPES for t in (f"{s}.Σ", f"{s}.b") if any(tt == t for _, tt in cells)]
        grid = [[cells.get((l, t), math.nan) for t in types] for l in layers]
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(types)), types, rotation=45, fontsize=8)
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_ylabel("layer")
        # the balance table's own measure over the drawn vectors, so that caption and table agree
        spread = strength_spread(drawn)
        cvs[method] = spread["cv"] if spread else math.nan
        ax.set_title(f"{LABELS[method]} — {r['task']}, seed {r['seed']}\nmean |v0 − v| "
                     f"(coefficient of variation {cvs[method]:.2f})", fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out / "training_strength_heatmap.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path, (_source(suite, [pick["vectorfit"], pick["no_avf"]]) + " Coefficient of variation over the vectors that "
                  f"moved (the balance table's measure): {cvs['vectorfit']:.2f} with AVF, {cvs['no_avf']:.2f} without.")


def plot_spectra(results: list[dict], out: Path) -> Optional[tuple[Path, str]]:
    """Singular values of dW for the layers both VectorFit and full fine-tuning recorded.

    Returns:
        The plot's path and a sentence naming the runs drawn, or ``None`` when no suite has both.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pick, tasks, suite = {}, [], ""
    for suite in _suites_by_preference(results):  # VectorFit and full fine-tuning from one suite
        pick = {}
        for r in sorted((r for r in results if r["_suite"] == suite), key=lambda r: r["seed"]):
            if r["method"] in ("vectorfit", "full") and r.get("delta_spectra"):
                pick.setdefault((r["task"], r["method"]), r)
        tasks = [t for t in sorted({t for t, _ in pick}) if (t, "vectorfit") in pick and (t, "full") in pick]
        if tasks:
            break
    if not tasks:
        return None
    task = tasks[0]
    vf, ft = pick[(task, "vectorfit")]["delta_spectra"], pick[(task, "full")]["delta_spectra"]
    layers = [n for n in vf if n in ft]
    if not layers:
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.4), squeeze=False)
    for ax, name in zip(axes[0], layers):
        for spec, label, color in ((vf[name], "VectorFit", "tab:red"), (ft[name], "Full FT", "tab:blue")):
            top = max(spec) or 1.0
            ax.plot(range(1, len(spec) + 1), [s / top for s in spec], label=label, color=color)
        ax.set_yscale("log")
        ax.set_title(name.replace("encoder.layer.", "L").replace("attention.", "att."), fontsize=8)
        ax.set_xlabel("index")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("σ_i(ΔW) / σ_max")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Spectrum of ΔW = W_final − W_init ({task}, seed {pick[(task, 'vectorfit')]['seed']})", fontsize=10)
    fig.tight_layout()
    path = out / "delta_w_spectra.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path, _source(suite, [pick[(task, "vectorfit")], pick[(task, "full")]])
