"""``vectorfit report``: result files -> ``benchmarks/RESULTS.md`` and plots.

Reads every ``*.json`` result under the results folder (one file per run, written by
``vectorfit train --output``), groups runs by (suite, task, model, method), and writes mean ± std
over seeds, one table per task, the average across tasks, paired differences and rate choices.
Learning-curve suites are tabulated by ``report_curves.py``, the plots drawn by ``report_plots.py``
(the only code that needs matplotlib); the labels, method order and cell formats all of them
share are in ``report_common.py``.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from .report_common import (  # noqa: F401 (ORDER re-exported: report.py was their home)
    LABELS, ORDER, _fmt, _mean_std, _method_key, _one_lr, as_fractions, best_rate, paired_cell, paired_stats,
    strength_spread,
)
from .report_files import check_out, read_result, result_problem  # noqa: F401 (re-exported)
from .vision_data import IMAGE_DATASETS


def load_results(root: Path, suite_names: Optional[list[str]] = None, warn: Any = None) -> list[dict]:
    """The result files of each suite (``configs/suites.json``) found under ``root``; a run shared
    by two suites appears once per suite, tagged with ``_suite``. A file that cannot be used is
    skipped with a warning (:func:`read_result`), once even if several suites share it."""
    from .bench import runs_of, suites

    out = []
    read: dict = {}
    for suite in suite_names or sorted(suites()):
        for run in runs_of(suite):
            path = run.path(Path(root))
            if not path.exists():
                continue
            if path not in read:
                read[path] = read_result(path, warn=warn)
            if read[path] is None:
                continue
            out.append({**as_fractions(read[path]), "_suite": suite, "_path": str(path)})
    return out


def aggregate(results: Iterable[dict]) -> dict[tuple, dict]:
    """(suite, task, model, method, lr) -> summary over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["_suite"], r["task"], r["model"], r["method"], r["lr"])].append(r)
    out = {}
    for key, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        test, val = _mean_std([r["test"] for r in runs]), _mean_std([r["validation"] for r in runs])
        out[key] = {
            "n": len(runs), "seeds": [r["seed"] for r in runs], "metric": runs[0]["metric"],
            "test": test, "validation": val, "test_before": runs[0].get("test_before"),
            "trainable": runs[0]["trainable_params"], "total": runs[0]["total_params"],
            "adapter_bytes": runs[0].get("adapter_bytes"),
            # median: a run that shared the machine with other work must not move the figure
            "train_seconds": statistics.median(secs) if (secs := [r["train_seconds"] for r in runs
                                                                  if r.get("train_seconds") is not None]) else None,
            "peak_rss_mb": statistics.fmean(r.get("peak_rss_mb") or 0 for r in runs),
            "lr": runs[0]["lr"], "runs": runs,
        }
    return out


def _suite_tables(agg: dict, suite: str) -> list[str]:
    lines: list[str] = []
    keys = [k for k in agg if k[0] == suite]
    tasks = sorted({k[1] for k in keys})
    models = sorted({k[2] for k in keys})
    for model in models:
        for task in tasks:
            rows = sorted((k for k in keys if k[1] == task and k[2] == model), key=lambda k: (_method_key(k[3]), k[4]))
            if not rows:
                continue
            metric = agg[rows[0]]["metric"]
            lines += [f"#### {task} ({model}, test {metric} × 100, mean ± std over seeds)", "",
                      "| method | test | validation | before FT | trainable params | adapter KB | lr | train s (median) | peak RSS MB |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for k in rows:
                a = agg[k]
                before = "" if a["test_before"] is None else f"{100 * a['test_before']:.2f}"
                kb = "" if a["adapter_bytes"] is None else f"{a['adapter_bytes'] / 1024:,.0f}"
                trainable = "" if a["trainable"] is None else f"{a['trainable']:,}"
                secs = "" if a["train_seconds"] is None else f"{a['train_seconds']:.0f}"
                rss = f"{a['peak_rss_mb']:.0f}" if a["peak_rss_mb"] else ""
                lines.append(
                    f"| {LABELS.get(k[3], k[3])} | {_fmt(*a['test'], a['n'])} | {_fmt(*a['validation'], a['n'])} | {before} | "
                    f"{trainable} | {kb} | {a['lr']:g} | {secs} | {rss} |"
                )
            lines.append("")
        # Average across tasks, mean of the per-task means; the spread is the std over seeds of the
        # per-seed task averages. A suite still being filled has tasks only some methods ran: the
        # average then covers the tasks every method ran (so every method has a row), and only if
        # fewer than two such tasks exist does it fall back to all tasks and the methods that ran them.
        # Each task's mean is over the seeds every averaged method ran on it, so that a method with an
        # extra seed on one task is not averaged over different draws than the others.
        one = _one_lr(keys)
        methods = sorted({k[3] for k in keys if k[2] == model}, key=_method_key)

        def common_seeds(task: str, ms: list[str]) -> set:  # empty when one of ``ms`` did not run ``task``
            if not ms or not all((task, model, m) in one for m in ms):
                return set()
            return set.intersection(*({r["seed"] for r in agg[one[(task, model, m)]]["runs"]} for m in ms))

        shared = [t for t in tasks if common_seeds(t, methods)]
        avg_tasks = shared if len(shared) > 1 else tasks
        complete = [m for m in methods if all((t, model, m) in one for t in avg_tasks)]
        seeds = {t: common_seeds(t, complete) for t in avg_tasks}
        if len(avg_tasks) > 1 and complete and all(seeds.values()):
            left_out = [t for t in tasks if t not in avg_tasks]
            lines += [f"#### Average over {len(avg_tasks)} tasks ({model}: {', '.join(avg_tasks)})", ""]
            if left_out:
                lines += [f"Left out of the average: {', '.join(left_out)} (not every method ran it yet).", ""]
            elif len(complete) < len(methods):
                lines += ["Only the methods that ran every task are averaged; left out: "
                          + ", ".join(LABELS.get(m, m) for m in methods if m not in complete) + ".", ""]
            extra = [t for t in avg_tasks if any(len(agg[one[(t, model, m)]]["runs"]) > len(seeds[t]) for m in complete)]
            if extra:
                lines += ["Each task counts the seeds every method ran on it: " + "; ".join(
                    f"{t}: seed{'s' if len(seeds[t]) > 1 else ''} {', '.join(map(str, sorted(seeds[t])))}"
                    for t in extra) + ".", ""]
            lines += [f"| method | average test × 100 | trainable params (with the {avg_tasks[0]} head) |",
                      "|---|---|---|"]
            for m in complete:
                per_seed, per_task = defaultdict(list), []
                for t in avg_tasks:
                    counted = [r for r in agg[one[(t, model, m)]]["runs"] if r["seed"] in seeds[t]]
                    per_task.append(statistics.fmean(r["test"] for r in counted))
                    for r in counted:
                        per_seed[r["seed"]].append(r["test"])
                full = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(avg_tasks)]
                mean = statistics.fmean(per_task)
                std = statistics.stdev(full) if len(full) > 1 else 0.0
                trainable = agg[one[(avg_tasks[0], model, m)]]["trainable"]
                lines.append(f"| {LABELS.get(m, m)} | {_fmt(mean, std, len(full))} | "
                             + ("" if trainable is None else f"{trainable:,}") + " |")
            lines.append("")
    return lines


def paired_differences(agg: dict, suite: str, reference: str = "vectorfit") -> dict[tuple[str, str, str], dict]:
    """(model, task, method) -> the reference method's test metric minus ``method``'s, paired by seed.

    Runs with the same seed share the data order and the head's initialisation, so the per-seed
    difference removes most of the seed-to-seed variation that both methods see alike. Only seeds
    both methods ran count. Returns ``mean`` and ``std`` of the differences (metric units, not × 100),
    ``wins`` (seeds where the reference is strictly better) and ``n``.
    """
    keys = [k for k in agg if k[0] == suite]
    one = _one_lr(keys)
    out = {}
    for (task, model, method), key in one.items():
        ref_key = one.get((task, model, reference))
        if method == reference or ref_key is None:
            continue
        ref = {r["seed"]: r["test"] for r in agg[ref_key]["runs"]}
        diffs = [ref[r["seed"]] - r["test"] for r in agg[key]["runs"] if r["seed"] in ref]
        if diffs:
            out[(model, task, method)] = paired_stats(diffs)
    return out


def _paired_table(agg: dict, suite: str, reference: str = "vectorfit") -> list[str]:
    diffs = paired_differences(agg, suite, reference)
    if not diffs:
        return []
    lines: list[str] = []
    for model in sorted({k[0] for k in diffs}):
        tasks = sorted({k[1] for k in diffs if k[0] == model})
        methods = sorted({k[2] for k in diffs if k[0] == model}, key=_method_key)
        lines += [f"#### {LABELS.get(reference, reference)} minus each method, paired by seed ({model}; test metric × 100; "
                  f"positive = {LABELS.get(reference, reference)} better; in brackets: seeds won / seeds)", "",
                  "| method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for m in methods:
            cells = [paired_cell(diffs.get((model, t, m))) for t in tasks]
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _by_rate(agg: dict, suite: str) -> dict[tuple, dict]:
    """(task, model, method) -> {lr: the aggregate at that rate}, for ``suite``'s entries of ``agg``."""
    by: dict = defaultdict(dict)
    for k, a in agg.items():
        if k[0] == suite:
            by[(k[1], k[2], k[3])][k[4]] = a
    return by


def rate_choice(agg: dict, suite: str) -> dict[tuple, dict]:
    """(task, model, method) -> ``{"lr": the rate with the best mean validation metric, "n": seeds,
    "rates": {lr: mean validation}}``, for each method ``suite`` ran at two or more rates.

    Only rates run on the same seeds compete (a rate with fewer seeds so far would be judged on
    other data orders); ties go to the smaller rate.
    """
    out = {}
    for key, rates in _by_rate(agg, suite).items():
        if len(rates) < 2:
            continue
        seeds = max((tuple(a["seeds"]) for a in rates.values()), key=len)
        same = {lr: a["validation"][0] for lr, a in rates.items() if tuple(a["seeds"]) == seeds}
        if len(same) >= 2:
            out[key] = {"lr": best_rate(same), "n": len(seeds), "rates": dict(sorted(same.items()))}
    return out


def at_chosen_rates(agg: dict, suite: str, incumbent: Optional[dict] = None) -> dict:
    """``agg`` with each of ``suite``'s methods at one rate, so that a rate check can be paired by seed
    like a one-rate suite: the rate :func:`rate_choice` chose where the method ran several on the same
    seeds; else ``incumbent[method]`` (the rate the suite lists first, the one in use until the check
    decides) or the method's only rate. A method with none of these is dropped."""
    choice = rate_choice(agg, suite)
    keep = {}
    for tmm, lrs in _by_rate(agg, suite).items():
        if tmm in choice:
            keep[tmm] = choice[tmm]["lr"]
        elif (incumbent or {}).get(tmm[2]) in lrs:
            keep[tmm] = incumbent[tmm[2]]
        elif len(lrs) == 1:
            keep[tmm] = next(iter(lrs))
    return {k: a for k, a in agg.items() if k[0] != suite or keep.get((k[1], k[2], k[3])) == k[4]}


def _rate_choice_lines(agg: dict, suite: str) -> list[str]:
    choice = rate_choice(agg, suite)
    if not choice:
        return []
    lines = ["#### Rate choice: mean validation metric × 100 at each rate (rates run on the same seeds)", "",
             "| task | model | method | seeds | validation by rate | best |", "|---|---|---|---|---|---|"]
    for (task, model, method), c in sorted(choice.items(), key=lambda kv: (kv[0][0], kv[0][1], _method_key(kv[0][2]))):
        cells = ", ".join(f"{lr:g}: {100 * v:.2f}" for lr, v in c["rates"].items())
        lines.append(f"| {task} | {model} | {LABELS.get(method, method)} | {c['n']} | {cells} | {c['lr']:g} |")
    return lines + [""]


def pooling_effect(agg: dict, suite: str = "pooling", against: str = "main") -> dict[tuple, dict]:
    """(task, method) -> test metric with mean pooling minus with transformers' pooler, paired by
    seed: the ``pooling`` suite repeats ``main``-suite runs (same rate, data, seed) with mean pooling."""
    out = {}
    for key, a in agg.items():
        if key[0] != suite:
            continue
        ref = agg.get((against, *key[1:]))
        if ref is None:
            continue
        old = {r["seed"]: r["test"] for r in ref["runs"]}
        diffs = [r["test"] - old[r["seed"]] for r in a["runs"] if r["seed"] in old]
        if diffs:
            mean, std = _mean_std(diffs)
            out[(key[1], key[3])] = {"mean": mean, "std": std, "n": len(diffs), "pooler": ref["test"][0],
                                     "mean_pooling": a["test"][0], "wins": sum(d > 0 for d in diffs)}
    return out


def _pooling_table(agg: dict) -> list[str]:
    eff = pooling_effect(agg)
    if not eff:
        return []
    lines = ["#### Mean pooling minus the pooler, paired by seed (test metric × 100; the same 64-step runs otherwise)", "",
             "| task | method | pooler (main suite) | mean pooling | difference | seeds better |", "|---|---|---|---|---|---|"]
    for (task, method), e in sorted(eff.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        diff = f"{100 * e['mean']:+.2f}" + (f" ± {100 * e['std']:.2f}" if e["n"] > 1 else "")
        lines.append(f"| {task} | {LABELS.get(method, method)} | {100 * e['pooler']:.2f} | {100 * e['mean_pooling']:.2f} | "
                     f"{diff} | {e['wins']}/{e['n']} |")
    return lines + [""]


def _balance_table(agg: dict, suite: str, at: Optional[int] = None) -> list[str]:
    """AVF's purpose in numbers: how evenly the trained vectors moved, VectorFit with vs. without AVF.

    Args:
        agg: aggregated runs (``aggregate``), read at ``at`` for a suite read at one step.
        suite: the suite whose rows are shown.
        at: the step the strengths were read at; ``None`` when they are the runs' final ones.
    """
    keys = [k for k in agg if k[0] == suite and k[3] in ("vectorfit", "no_avf")]
    one = _one_lr(keys)
    rows = []
    for (task, model, method), key in sorted(one.items(), key=lambda kv: (kv[0][1], kv[0][0], _method_key(kv[0][2]))):
        spreads = [s for r in agg[key]["runs"] if (s := strength_spread(r.get("training_strengths") or {}))]
        if spreads:
            cv, mx = _mean_std([s["cv"] for s in spreads]), _mean_std([s["max_over_mean"] for s in spreads])
            rows.append(f"| {task} | {LABELS[method]} | {_fmt(*cv, len(spreads), 1.0)} | {_fmt(*mx, len(spreads), 1.0)} |")
    if not rows:
        return []
    when = "at the end of training" if at is None else f"at step {at}"
    return [f"#### Balance of the trained vectors (training strength = mean |change| per element, {when})", "",
            "| task | method | coefficient of variation | max / mean |", "|---|---|---|---|", *rows, ""]


def write_report(results_dir: Path, out_md: Path, notes: Optional[Path] = None, suite_names: Optional[list[str]] = None) -> Path:
    """Write the Markdown report and its plots (next to it, in ``plots/``)."""
    results = load_results(results_dir, suite_names)
    if not results:
        raise SystemExit(f"vectorfit report: no result files under {results_dir}; run `vectorfit bench` first")
    agg = aggregate(results)
    plots = out_md.parent / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    from .report_curves import curve_tables, cut_at, load_partials, plot_curves, read_at
    from .report_plots import plot_params, plot_spectra, plot_strengths

    # "converged" first: the table at a budget where the methods have converged is the headline
    order = ("converged", "converged-ablation", "converged-rates", "converged-rates-score", "curves-rates", "curves",
             "recipe", "vision", "vision-rates", "main-job-rate", "pooling", "main", "ablation", "sweep", "smoke")
    suites: list[str] = []
    # A suite whose runs (finished or not) are all runs of a suite shown above is not repeated: the
    # curves and recipe suites start with curves-rates' runs, and would show the same curves again.
    shown: set = set()
    from .bench import suites as known_suites

    known = known_suites()  # read once: every suite's spec below comes from it
    partials = {name: load_partials(results_dir, name) for name in suite_names or order if name in known}
    read: dict[str, list[dict]] = {}  # suite -> its runs read at its read_at_step (tables and plots share them)

    def runs_read_at(name: str) -> list[dict]:
        if name not in read:
            unfinished = partials[name] if name in partials else load_partials(results_dir, name)
            read[name] = read_at(results + unfinished, name, int(known[name]["read_at_step"]))
        return read[name]

    for name, unfinished in partials.items():
        own = {r["_path"] for r in results if r["_suite"] == name} | {p["_path"] for p in unfinished}
        if own - shown:
            suites.append(name)
            shown |= own
    lines = ["# Benchmark results", "",
             f"Generated by `vectorfit report --results {results_dir}` from {len(results)} result files. "
             "Every number below was measured by this project; none is copied from the paper.", ""]
    if notes is not None and notes.exists():
        lines += [notes.read_text().rstrip(), ""]
    for suite in suites:
        lines += [f"## Suite `{suite}`", ""]
        with_partial = results + partials[suite]
        spec = known[suite]
        source = spec.get("rates_chosen_by")  # a sweep's choice holds here (curves)
        if source:
            with_partial += partials[source] if source in partials else load_partials(results_dir, source)
        own_settings = spec.get("method_settings") or {}
        # the suite's settings as a run records them (defaults filled in), from a run of a method
        # without settings of its own (those are listed apart below)
        runs = [r for r in with_partial if r["_suite"] == suite]
        typical = next((r for r in runs if r.get("method") not in own_settings), runs[0])
        shown = ("epochs", "max_steps", "max_train_examples", "max_eval_examples", "max_len", "batch_size", "pooling",
                 "eval_steps")
        if typical.get("task") in IMAGE_DATASETS:  # an image task: no tokens, no pooling; the image side instead
            shown = tuple(k for k in shown if k not in ("max_len", "pooling")) + ("image_size",)
        settings = {k: v for k, v in typical["config"].items() if k in shown}
        at = None if spec.get("read_at_step") is None else int(spec["read_at_step"])
        budget = spec.get("settings", {}).get("max_steps")
        if at is not None and budget not in (None, at):  # the curves' budget, not the table's
            settings["max_steps"] = f"{budget} (read at step {at})"
        lines += [f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}.", ""]
        if own_settings:  # e.g. VectorFit's budget-dependent AVF schedule: runs of their own
            lines += ["Methods with settings of their own: " + "; ".join(
                f"{LABELS.get(m, m)}: " + ", ".join(f"{k}={v}" for k, v in st.items())
                for m, st in own_settings.items()) + ".", ""]
        if at is not None:  # one budget read off the learning curves (finished runs and runs going on alike)
            sub = aggregate(runs_read_at(suite))
            lines += [f"Every run read at step {at} of its learning curve: the runs this suite shares with the "
                      "curve suites are read there, finished or still training; a run that has not reached it yet "
                      f"is not counted. Training strengths (balance table) are those at step {at}, from runs "
                      "whose curve points record them or that ended there; older runs whose points do not record "
                      "them are left out of that table.", ""]
            lines += _suite_tables(sub, suite) + _rate_choice_lines(sub, suite)
            if any(len(v) > 1 for v in spec.get("lrs", {}).values()):  # a rate check: one rate a method
                sub = at_chosen_rates(sub, suite, {m: float(v[0]) for m, v in spec["lrs"].items()})
                lines += ["Paired below at each method's chosen rate (the rate choice above), or, where the "
                          "rates have not yet run on the same seeds, at the rate the suite lists first.", ""]
            lines += _paired_table(sub, suite) + _balance_table(sub, suite, at)
            p = plot_params(sub, suite, plots)
            if p:
                lines += [f"![metric vs parameters]({p.relative_to(out_md.parent)})", ""]
            if spec.get("curves_in_report"):  # runs no curve suite shows: their curves up to the step, here
                cut = cut_at(with_partial, suite, at)
                lines += [f"The same runs at each checkpoint up to step {at}:", ""] + curve_tables(cut, suite)
                p = plot_curves(cut, suite, plots, "test")
                if p:
                    lines += [f"![test learning curves]({p.relative_to(out_md.parent)})", ""]
            continue
        curves = curve_tables(with_partial, suite, source)
        if curves:  # a learning-curve suite: tables per budget and plots instead of one final number
            if source:
                lines += [f"Each method's rate is the one suite `{source}` chose (best validation at its longest "
                          "budget); a second rate of a method is kept for reference (dashed in the plots).", ""]
            lines += curves
            for split in ("test", "validation"):
                p = plot_curves(with_partial, suite, plots, split, rates_chosen_by=source)
                if p:
                    lines += [f"![{split} learning curves]({p.relative_to(out_md.parent)})", ""]
            continue
        lines += _suite_tables(agg, suite)
        lines += _rate_choice_lines(agg, suite)
        if suite != "sweep":
            lines += _paired_table(agg, suite)
        if suite == "main":
            lines += _balance_table(agg, suite)
        if suite == "pooling":
            lines += _pooling_table(agg)
        p = plot_params(agg, suite, plots)
        if p:
            lines += [f"![metric vs parameters]({p.relative_to(out_md.parent)})", ""]
    from .report_nlg import nlg_section

    lines += nlg_section(results, results_dir.parent / "nlg" / "floor.json")  # both generation suites, once
    # the diagnostic plots see a suite read at one step as its tables do: each run at that step
    # (strengths from the curve point there; ΔW spectra from runs that ended or stopped there)
    diag = [r for r in results if known.get(r["_suite"], {}).get("read_at_step") is None]
    for name in sorted({r["_suite"] for r in results} | set(partials)):
        if known.get(name, {}).get("read_at_step") is not None:
            diag += runs_read_at(name)
    for drawn, title in ((plot_strengths(diag, plots), "Training strength per vector"),
                         (plot_spectra(diag, plots), "Spectrum of ΔW")):
        if drawn:
            p, source = drawn
            lines += [f"## {title}", "", source, "", f"![{title}]({p.relative_to(out_md.parent)})", ""]
    out_md.write_text("\n".join(lines) + "\n")
    return out_md
