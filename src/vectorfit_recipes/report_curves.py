"""Learning curves in the report: runs trained with ``--eval-steps`` carry validation and test at
each checkpoint step (``result["curve"]``). This module turns them into tables (the metric at every
budget, the rate each method's best validation picks, the step at which a method first reaches 99% of
its own best) and plots (metric vs. optimizer steps, log x, mean and min-max band over seeds).

A run at a constant learning rate without warm-up is, at each checkpoint, the run that would have
stopped there; AVF runs use the schedule of the longest budget (their AVF steps are recorded in
``result["avf"]["schedule"]``).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .report_common import LABELS, ORDER, _fmt, as_fractions, best_rate, paired_cell, paired_stats
from .report_files import read_result


def _method_key(m: str) -> tuple:
    base = m.split("+")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), m)

__all__ = ["curve_groups", "curve_tables", "curve_paired", "paired_rates", "plot_curves", "choose_rates", "rates_from",
           "late_mean", "load_partials", "read_at"]


def _label(key: str) -> str:
    base, *opts = key.split("+")
    return " ".join([LABELS.get(base, base), *opts])


def load_partials(root: Path, suite: str) -> list[dict]:
    """Curves of runs of ``suite`` that have not finished (``<result>.partial``, written at each
    checkpoint), tagged ``_suite`` and ``_partial``; finished runs are not repeated."""
    from .bench import runs_of
    from .checkpoint import partial_path

    out = []
    for run in runs_of(suite):
        final = run.path(Path(root))
        part = partial_path(str(final))
        if final.exists() or not part.exists():
            continue
        r = read_result(part, partial=True)  # None: unusable, skipped with a warning naming it
        if r is None:
            continue
        out.append({**as_fractions(r), "_suite": suite, "_partial": True, "_path": str(part),
                    "trainable_params": r.get("trainable_params")})
    return out


def read_at(results: list[dict], suite: str, step: int) -> list[dict]:
    """The runs of ``suite`` as if each had stopped at ``step``: a suite with ``"read_at_step"``.

    A constant-rate run is, at each checkpoint, the run that would have stopped there, so a table at
    one budget can be read off learning curves, finished or still going. Each run's ``test``,
    ``validation``, ``train_seconds`` and (where the point has them) ``training_strengths`` and
    ``delta_spectra`` (recorded where a run stopped) become its curve point's at ``step``; a run
    whose curve has not reached ``step`` is left out. What a
    run measured only at its end (training strengths before curve points recorded them, ΔW spectra,
    peak memory, adapter size) is dropped unless it ended at ``step``. Parameter counts an
    older ``.partial`` lacks are taken from a finished run of the same task, model and method.

    Returns:
        Result dicts in the shape ``report.aggregate`` takes, tagged ``_suite`` and ``_read_at``.
    """
    from .bench import curve_point

    sizes = {(r["task"], r["model"], r["method"]): (r["trainable_params"], r.get("total_params"))
             for r in results if not r.get("_partial") and r.get("trainable_params")}
    out = []
    for r in results:
        p = curve_point(r, step) if r["_suite"] == suite else None
        if p is None:
            continue
        key = (r["task"], r["model"], r["method"])
        trainable, total = ((r["trainable_params"], r.get("total_params")) if r.get("trainable_params")
                            else sizes.get(key, (None, None)))
        # a curve point from before points were timed has no time: the run's own is its time to the
        # end, which is this step's only if the run ended here
        ended_here = not r.get("_partial") and r.get("steps") == step
        at = {**r, "test": p["test"], "validation": p["validation"], "steps": step, "_read_at": step,
              "train_seconds": p.get("train_seconds", r.get("train_seconds") if ended_here else None),
              "trainable_params": trainable, "total_params": total}
        if not ended_here:
            for k in ("training_strengths", "delta_spectra", "peak_rss_mb", "adapter_bytes", "avf"):
                at.pop(k, None)
        for k in ("training_strengths", "delta_spectra"):  # recorded at the point itself: the step's own
            if p.get(k):
                at[k] = p[k]
        out.append(at)
    return out


def cut_at(results: list[dict], suite: str, step: int) -> list[dict]:
    """The runs of ``suite`` with their learning curves cut at ``step``: the curves of a suite read at one step.

    A run whose curve reaches ``step`` counts as finished there (it is the run that would have stopped
    there); one that has not yet keeps its mark of a run still going. Runs without a curve are dropped.
    """
    out = []
    for r in results:
        curve = [p for p in r.get("curve") or [] if p["step"] <= step] if r["_suite"] == suite else []
        if curve:
            out.append({**r, "curve": curve, "_partial": bool(r.get("_partial")) and curve[-1]["step"] < step})
    return out


def method_label(r: dict) -> str:
    """The method's key, with the recipe options that differ from the paper's form appended
    (``vectorfit+relative``, ``vectorfit+bias_lr×0.1``), so option runs are not pooled together."""
    c = r.get("config") or {}
    out = r["method"]
    if c.get("sigma_param", "absolute") != "absolute":
        out += f"+{c['sigma_param']}"
    if c.get("bias_lr_scale", 1.0) != 1.0:
        out += f"+bias_lr×{c['bias_lr_scale']:g}"
    if c.get("head_lr") is not None:
        out += f"+head_lr={c['head_lr']:g}"
    return out


def curve_groups(results: list[dict], suite: str) -> dict[tuple, dict]:
    """(task, model, method, lr) -> {"steps": [...], "validation"/"test": {step: [per-seed values]},
    "seeds": [...], "metric": ...}, over the runs of ``suite`` that recorded a curve."""
    out: dict[tuple, dict] = {}
    for r in results:
        if r["_suite"] != suite or not r.get("curve"):
            continue
        g = out.setdefault((r["task"], r["model"], method_label(r), r["lr"]),
                           {"validation": defaultdict(list), "test": defaultdict(list), "seeds": [],
                            "metric": r["metric"], "trainable": r["trainable_params"],
                            "avf": (r.get("avf") or {}).get("schedule")})
        g["seeds"].append(r["seed"])
        if r.get("_partial"):
            g.setdefault("partial_at", []).append(r["curve"][-1]["step"])
        for p in r["curve"]:
            g["validation"][p["step"]].append(p["validation"])
            g["test"][p["step"]].append(p["test"])
    for g in out.values():
        n = len(g["seeds"])
        # only the steps every seed reached (a run that is still going must not bias a mean)
        g["steps"] = sorted(s for s, v in g["validation"].items() if len(v) == n)
    return out


def _mean_curve(g: dict, split: str) -> list[float]:
    return [statistics.fmean(g[split][s]) for s in g["steps"]]


def first_step_within(g: dict, frac: float = 0.99, split: str = "validation") -> Optional[int]:
    """First checkpoint whose mean metric reaches ``frac`` of the best mean over the curve."""
    curve = _mean_curve(g, split)
    if not curve:
        return None
    best = max(curve)
    return next(s for s, v in zip(g["steps"], curve) if v >= frac * best)


def choose_rates(groups: dict[tuple, dict]) -> dict[tuple, float]:
    """(task, model, method) -> the rate whose mean validation at the longest common budget is best.

    Ties go to the smaller rate (the safer one). Only rates whose curves reach the same longest step
    compete, so a run still in progress cannot win or lose by being shorter."""
    by: dict[tuple, list] = defaultdict(list)
    for (task, model, method, lr), g in groups.items():
        if g["steps"]:
            by[(task, model, method)].append((lr, g))
    out = {}
    for key, cands in by.items():
        last = max(g["steps"][-1] for _, g in cands)
        out[key] = best_rate({lr: statistics.fmean(g["validation"][last]) for lr, g in cands if g["steps"][-1] == last})
    return out


def _still_training(groups: dict[tuple, dict], method: tuple) -> bool:
    """Whether a rate of ``(task, model, method)`` is unfinished: its chosen rate is 'so far'."""
    return any(g.get("partial_at") for k, g in groups.items() if k[:3] == method)


def rates_from(results: list[dict], groups: dict[tuple, dict], source: str) -> tuple[dict[tuple, float], set]:
    """The rate of each (task, model, method) of ``groups`` as suite ``source`` (a rate sweep) chose it.

    A sweep run on one task chooses for every task: the ``curves`` suite runs its seeds and tasks at
    the rates ``curves-rates`` chose on movie's seed 0, and must not choose again among its own
    runs, whose seeds and lengths differ (a rate kept at one seed for reference would win or lose on
    another footing). A method the source did not choose for keeps :func:`choose_rates`' choice
    among the suite's own runs.

    Returns:
        ``(chosen, so_far)``: the rates, and the keys whose choice in ``source`` may still change
        (another of its rates is still training).
    """
    src_groups = curve_groups(results, source)
    src = choose_rates(src_groups)
    chosen, so_far = choose_rates(groups), set()
    for task, model, method in {k[:3] for k in groups}:
        pick = [(k, lr) for k, lr in src.items() if k == (task, model, method)] or \
               [(k, lr) for k, lr in src.items() if k[1:] == (model, method)]
        if len({lr for _, lr in pick}) == 1 and (task, model, method, pick[0][1]) in groups:
            chosen[(task, model, method)] = pick[0][1]
            if _still_training(src_groups, pick[0][0]):
                so_far.add((task, model, method))
    return chosen, so_far


def late_mean(g: dict, window: int = 3, split: str = "validation") -> Optional[float]:
    """Mean over seeds and over the last ``window`` checkpoints of a curve (``None`` if shorter).

    A second reading of the rate choice: one checkpoint of one seed moves by 1-2 points between
    neighbouring steps, so a rate that wins at the last step only may have won by noise."""
    curve = _mean_curve(g, split)
    return statistics.fmean(curve[-window:]) if len(curve) >= window else None


def _rate_check_lines(groups: dict[tuple, dict], task: str, model: str, window: int = 3) -> list[str]:
    """Each method's finished rates side by side: validation at the longest budget (the rule that
    chooses) and its mean over the last ``window`` checkpoints (a check on it), with a line for every
    method where the two pick different rates."""
    chosen = choose_rates(groups)
    rows, disagree = [], []
    for (t, m, method), lr_chosen in sorted(chosen.items(), key=lambda kv: _method_key(kv[0][2])):
        if (t, m) != (task, model):
            continue
        cands = [(k[3], g) for k, g in groups.items() if k[:3] == (t, m, method) and g["steps"]]
        last = max(g["steps"][-1] for _, g in cands)
        full = sorted((lr, g) for lr, g in cands if g["steps"][-1] == last and not g.get("partial_at"))
        if len(full) < 2:
            continue
        late = {lr: late_mean(g, window) for lr, g in full}
        at = {lr: statistics.fmean(g["validation"][last]) for lr, g in full}
        mark = " **chosen so far** |" if _still_training(groups, (t, m, method)) else " **chosen** |"
        for lr, g in full:
            lm = late[lr]
            rows.append(f"| {_label(method)} | {lr:g} | {100 * at[lr]:.2f} | "
                        + (f"{100 * lm:.2f}" if lm is not None else "") + " |"
                        + (mark if lr == lr_chosen else " |"))
        if all(v is not None for v in late.values()):
            by_late = best_rate(late)
            if by_late != lr_chosen:
                disagree.append(f"* {_label(method)}: the two readings disagree. The last step prefers {lr_chosen:g} "
                                f"({100 * at[lr_chosen]:.2f} against {100 * at[by_late]:.2f}), the mean of the last "
                                f"{window} checkpoints {by_late:g} ({100 * late[by_late]:.2f} against "
                                f"{100 * late[lr_chosen]:.2f}): the choice rests on one checkpoint.")
    if not rows:
        return []
    return ([f"#### {task} ({model}): rate choice, validation × 100 at the longest budget and its mean over the "
             f"last {window} checkpoints (a check on the choice)", "",
             "| method | lr | at the longest budget | last-checkpoints mean | |", "|---|---|---|---|---|"]
            + rows + [""] + (disagree + [""] if disagree else
                             ["Both readings choose the same rate for every method with 2+ finished rates.", ""]))


def paired_rates(groups: dict[tuple, dict], reference: str = "vectorfit",
                 chosen: Optional[dict[tuple, float]] = None) -> dict[tuple, tuple[float, float]]:
    """(task, model, method) -> (the reference's rate, the method's rate) that :func:`curve_paired` compares.

    A baseline is compared at its chosen rate against the reference at the reference's chosen rate:
    each method as a user would run it. A variant of the reference (a VectorFit ablation such as
    ``no_avf``, or a recipe option such as ``vectorfit+relative``) isolates one component, so it is
    compared against the reference at the variant's own rate; pairing it with the reference's chosen
    rate would mix a rate difference into the component's effect. Without the reference at that rate
    the variant has no pair.
    """
    from .methods import VECTORFIT_METHODS

    chosen = chosen if chosen is not None else choose_rates(groups)
    out = {}
    for (task, model, method), lr in chosen.items():
        ref_lr = chosen.get((task, model, reference))
        if method == reference or ref_lr is None:
            continue
        if method.split("+")[0] in VECTORFIT_METHODS:
            ref_lr = lr
            if (task, model, reference, lr) not in groups:
                continue
        out[(task, model, method)] = (ref_lr, lr)
    return out


def curve_paired(groups: dict[tuple, dict], reference: str = "vectorfit", split: str = "test",
                 chosen: Optional[dict[tuple, float]] = None) -> dict[tuple, dict[int, dict]]:
    """(task, model, method) -> {step: the reference's metric minus the method's, paired by seed}.

    Each method at its chosen rate (``chosen``, by default :func:`choose_rates`), against the reference at
    the rate :func:`paired_rates` names; only seeds both ran and steps both reached. A run of seed s
    sees the same data order and head initialisation whatever the method, so the per-seed difference
    removes what the seeds do to both alike. Values: ``mean``, ``std`` (metric units), ``wins``
    (seeds where the reference is strictly better) and ``n``.
    """
    out: dict[tuple, dict[int, dict]] = {}
    for (task, model, method), (ref_lr, lr) in paired_rates(groups, reference, chosen).items():
        ref, other = groups[(task, model, reference, ref_lr)], groups[(task, model, method, lr)]
        rows: dict[int, dict] = {}
        for step in sorted(set(ref["steps"]) & set(other["steps"])):
            by_seed = dict(zip(ref["seeds"], ref[split][step]))
            diffs = [by_seed[sd] - v for sd, v in zip(other["seeds"], other[split][step]) if sd in by_seed]
            if diffs:
                rows[step] = paired_stats(diffs)
        if rows:
            out[(task, model, method)] = rows
    return out


def _paired_lines(groups: dict[tuple, dict], task: str, model: str, chosen: dict[tuple, float],
                  reference: str = "vectorfit") -> list[str]:
    """The paired table of one task, shown once some method shares two or more seeds with the reference."""
    paired = {k: v for k, v in curve_paired(groups, reference, chosen=chosen).items() if k[:2] == (task, model)}
    if not any(d["n"] > 1 for rows in paired.values() for d in rows.values()):
        return []  # one seed: the difference is already in the tables above
    steps = sorted({s for rows in paired.values() for s in rows})
    rates = paired_rates(groups, reference, chosen)
    ref = _label(reference)
    lines = [f"#### {task} ({model}): {ref} minus each method at its chosen rate, paired by seed "
             f"(test × 100; positive = {ref} better; in brackets: seeds won / seeds)", "",
             f"{ref} at its chosen rate against the baselines; a variant of {ref} against {ref} at the "
             "variant's own rate, so that its row measures the variant's component alone.", "",
             "| method | rates compared | " + " | ".join(str(s) for s in steps) + " |",
             "|---" * (len(steps) + 2) + "|"]
    for key in sorted(paired, key=lambda k: _method_key(k[2])):
        cells = [paired_cell(paired[key].get(s)) for s in steps]
        ref_lr, lr = rates[key]
        lines.append(f"| {_label(key[2])} | {ref_lr:g} − {lr:g} | " + " | ".join(cells) + " |")
    return lines + [""]


def curve_tables(results: list[dict], suite: str, rates_chosen_by: Optional[str] = None) -> list[str]:
    """The tables of a learning-curve suite: each task's metric at every budget (validation, then test),
    the rate choice and, once two seeds are shared, the paired differences to VectorFit.

    Args:
        results: finished and unfinished runs, each tagged ``_suite`` (``results`` may hold other suites').
        suite: the suite to tabulate.
        rates_chosen_by: a rate-sweep suite whose choice (:func:`rates_from`) marks the chosen rates
            and picks the paired rates, instead of choosing among ``suite``'s own runs; its runs must
            be in ``results``. No rate-choice table then: the choice is the other suite's.
    """
    groups = curve_groups(results, suite)
    if not groups:
        return []
    if rates_chosen_by:
        chosen, so_far = rates_from(results, groups, rates_chosen_by)
        where = f" in {rates_chosen_by}"
    else:
        chosen = choose_rates(groups)
        so_far = {k for k in chosen if _still_training(groups, k)}
        where = ""
    lines: list[str] = []
    for task, model in sorted({(k[0], k[1]) for k in groups}):
        keys = sorted((k for k in groups if k[:2] == (task, model)), key=lambda k: (_method_key(k[2]), k[3]))
        steps = sorted({s for k in keys for s in groups[k]["steps"]})
        metric = groups[keys[0]]["metric"]
        for split in ("validation", "test"):
            lines += [f"#### {task} ({model}): {split} {metric} × 100 after N optimizer steps (mean ± std over seeds)", "",
                      "| method | lr | seeds | " + " | ".join(str(s) for s in steps) + " | 99% of own best at |",
                      "|---|---|---|" + "---|" * (len(steps) + 1)]
            for k in keys:
                g = groups[k]
                mark = ""
                if chosen.get(k[:3]) == k[3] and sum(kk[:3] == k[:3] for kk in keys) > 1:
                    # another rate still training may yet beat it
                    mark = f" **(chosen so far{where})**" if k[:3] in so_far else f" **(chosen{where})**"
                cells = []
                for s in steps:
                    vals = g[split].get(s, [])
                    ok = s in g["steps"]
                    cells.append(_fmt(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                      len(vals)) if ok else "")
                # an unfinished curve's best so far is not its best: no "99% of best" for it yet
                reach = None if g.get("partial_at") else first_step_within(g, split=split)
                if g.get("partial_at"):
                    mark += f" (unfinished: {len(g['partial_at'])} run(s), at step {max(g['partial_at'])} so far)"
                lines.append(f"| {_label(k[2])}{mark} | {k[3]:g} | {len(g['seeds'])} | " + " | ".join(cells)
                             + f" | {reach if reach is not None else ''} |")
            lines.append("")
        if not rates_chosen_by:
            lines += _rate_check_lines(groups, task, model)
        lines += _paired_lines(groups, task, model, chosen)
    return lines


def _draw(ax, g: dict, split: str, label: str, color, style: str = "-", lw: float = 1.4) -> None:
    """One curve: the mean over seeds, and the min..max band when there are several seeds."""
    ax.plot(g["steps"], [100 * y for y in _mean_curve(g, split)], linestyle=style, color=color, marker="o", ms=3,
            label=f"{label} (n={len(g['seeds'])})", lw=lw)
    if len(g["seeds"]) > 1:
        lo = [100 * min(g[split][s]) for s in g["steps"]]
        hi = [100 * max(g[split][s]) for s in g["steps"]]
        ax.fill_between(g["steps"], lo, hi, color=color, alpha=0.12)


def _panels(groups: dict[tuple, dict], task: str, one_panel: bool = False) -> list[list[tuple]]:
    """The keys drawn in each panel of a task's row. One panel for all methods when each has one rate
    or ``one_panel`` (the curves suite, whose few extra rates are drawn dashed); a panel per method
    when some method has several (a rate sweep: a dozen curves in one panel cannot be read)."""
    keys = sorted((k for k in groups if k[0] == task and groups[k]["steps"]), key=lambda k: (_method_key(k[2]), k[3]))
    methods = sorted({k[2] for k in keys}, key=_method_key)
    if one_panel or all(sum(k[2] == m for k in keys) == 1 for m in methods):
        return [keys]
    return [[k for k in keys if k[2] == m] for m in methods]


def plot_curves(results: list[dict], suite: str, out: Path, split: str = "test", wrap: int = 3,
                rates_chosen_by: Optional[str] = None) -> Optional[Path]:
    """Metric vs. optimizer steps (log x); line = mean over seeds, band = min..max over seeds.

    One panel per task when each method has one rate, or when ``rates_chosen_by`` names the sweep
    that chose them (:func:`rates_from`; a method's other rates are drawn dashed). In a rate sweep
    each method gets its own panel with all its rates (the chosen one bold) and VectorFit's chosen
    curve in grey for reference, ``wrap`` panels to a row, a task's panels starting on a new row,
    one y scale per task."""
    groups = curve_groups(results, suite)
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({k[0] for k in groups})
    layout = {t: _panels(groups, t, one_panel=bool(rates_chosen_by)) for t in tasks}
    single = all(len(p) == 1 for p in layout.values())
    ncols = len(tasks) if single else min(wrap, max(len(p) for p in layout.values()))
    # grid cells (row, col) of each task's panels
    cells: list[tuple[str, list[tuple], int, int]] = []
    row = 0
    for t in tasks:
        for i, keys in enumerate(layout[t]):
            cells.append((t, keys, 0 if single else row + i // ncols, tasks.index(t) if single else i % ncols))
        row += 0 if single else -(-len(layout[t]) // ncols)
    nrows = 1 if single else row
    fig, axes = plt.subplots(nrows, ncols, figsize=((6.2 if single else 4.6) * ncols, 4.2 * nrows), squeeze=False)
    methods = sorted({k[2] for k in groups}, key=_method_key)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    chosen = rates_from(results, groups, rates_chosen_by)[0] if rates_chosen_by else choose_rates(groups)
    metric = next(iter(groups.values()))["metric"]
    used = set()
    for task, keys, r, c in cells:
        ax = axes[r][c]
        used.add((r, c))
        lrs = sorted(k[3] for k in keys)
        for k in keys:
            if single:  # a method's second rate, kept for reference, is drawn dashed and named by its rate
                several = sum(kk[2] == k[2] for kk in keys) > 1
                main = not several or chosen.get(k[:3]) == k[3]
                _draw(ax, groups[k], split, f"{_label(k[2])} lr {k[3]:g}" if several else _label(k[2]), colors[k[2]],
                      "-" if main else "--", lw=(2.2 if k[2] == "vectorfit" else 1.4) if main else 1.0)
            else:
                is_chosen = chosen.get(k[:3]) == k[3] and len(lrs) > 1
                style = "-" if is_chosen or len(lrs) == 1 else ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)))[lrs.index(k[3]) % 4]
                note = ((" (chosen so far)" if _still_training(groups, k[:3]) else " (chosen)") if is_chosen
                        else " (unfinished)" if groups[k].get("partial_at") else "")
                _draw(ax, groups[k], split, f"lr {k[3]:g}{note}", colors[k[2]], style, lw=2.2 if is_chosen else 1.2)
        if single:
            ax.set_title(f"{task}: learning curves — suite '{suite}'", fontsize=10)
        else:
            ref_lr = chosen.get((task, keys[0][1], "vectorfit"))
            ref = groups.get((task, keys[0][1], "vectorfit", ref_lr)) if ref_lr is not None else None
            if ref is not None and keys[0][2] != "vectorfit":
                _draw(ax, ref, split, f"VectorFit lr {ref_lr:g}", "0.6", "-", lw=1.0)
            ax.set_title(f"{task}: {_label(keys[0][2])}", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("optimizer steps (batch 32; log scale)")
        ax.set_ylabel(f"{split} {metric} × 100")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if single else 1, loc="lower right")
    if not single:  # one y scale per task, so that panels compare at a glance
        for task in tasks:
            task_axes = [axes[r][c] for t, _, r, c in cells if t == task]
            lo = min(a.get_ylim()[0] for a in task_axes)
            hi = max(a.get_ylim()[1] for a in task_axes)
            for a in task_axes:
                a.set_ylim(lo, hi)
        fig.suptitle(f"suite '{suite}': each method at each rate (grey: VectorFit at its chosen rate)", fontsize=11)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    fig.tight_layout()
    path = out / f"{suite}_curves_{split}.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
