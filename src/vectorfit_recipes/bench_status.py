"""Where a suite stands, read from its result files (nothing is run or changed): ``vectorfit bench
--status``. One line per run (done, running, stopped, not started; its numbers or the training it
still needs), then what the unfinished runs still cost in core-hours, estimated from the pace that
like runs recorded, on the wall clock and, where runs record it, in CPU time."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from .bench import curve_point, last_step, read_at_step, read_partial, runs_of, select

WALL, CPU = "train_seconds", "train_cpu_seconds"  # the two clocks a run's optimisation time is kept on


def _timed(d: dict, clock: str = WALL) -> list[dict]:
    """A result's (or ``.partial``'s) curve points that carry their optimisation time on ``clock``."""
    return [p for p in d.get("curve") or [] if p.get(clock) is not None]


def _pace(d: Optional[dict], clock: str = WALL) -> Optional[float]:
    """Optimisation seconds a step on ``clock`` (:data:`WALL` or :data:`CPU`): a finished result's
    over its whole run; an unfinished run's recent pace, over its last curve interval (between its
    last two timed points). ``None`` where the file does not tell."""
    try:
        if not d.get("partial") and d.get(clock) is not None and d.get("steps"):
            return float(d[clock]) / int(d["steps"])
        timed = _timed(d, clock)
        if len(timed) < 2:
            return None
        a, b = timed[-2:]
        return (b[clock] - a[clock]) / (b["step"] - a["step"])
    except (KeyError, TypeError, AttributeError, ValueError, ZeroDivisionError):
        return None


def _left(d: Optional[dict], upto: Optional[int] = None, clock: str = WALL, from_start: bool = False) -> Optional[float]:
    """Training seconds (on ``clock``) from the last curve point (``from_start``: from step 0, for a
    run with no checkpoint to resume from) to step ``upto`` (default: the run's end)."""
    pace = _pace(d, clock)
    try:
        total = int(d["total_steps"])
        last = 0 if from_start else _timed(d, clock)[-1]["step"]
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        return None
    if pace is None:
        return None
    return max((total if upto is None else min(total, upto)) - last, 0) * pace


def training_left(path: Path) -> Optional[float]:
    """Seconds of optimisation an unfinished run still needs, at the pace of its last curve interval
    (the ``train_seconds`` of its last two ``.partial`` curve points; evaluation and start-up not
    counted). ``None``: no partial, or fewer than two timed points."""
    return _left(read_partial(path))


def status(name: str, results: Path, only: Optional[dict] = None, at_step: Optional[int] = None) -> list[dict]:
    """Where each run of a suite stands, read from its files (nothing is run or changed).

    Args:
        at_step: count a run done once its curve reaches this step, with its numbers there (what
            ``bench --stop-at-step`` takes runs to); default: the suite's ``read_at_step``, if any.

    Returns:
        One dict per run, in execution order: ``run``, ``state`` (``"done"``, ``"running"``: another
        process holds its lock, ``"stopped"``: a curve or checkpoint is left from an interrupted
        run, ``"not started"``), ``step`` (the last learning-curve step measured, if any),
        ``restarts`` (a stopped run with no checkpoint: it trains again from step 0),
        ``left_s`` (an unfinished run's :func:`training_left`, to ``at_step`` if given, from step 0
        for one that restarts; for a running one, less the time since its ``.partial`` was
        written or, if later, since its process started), ``pace_s`` (its optimisation seconds a step, see :func:`_pace`, if measured),
        ``cpu_left_s`` and ``cpu_pace_s`` (the same in CPU seconds, where the run records them; for a
        running one, less that time scaled by its CPU-to-wall share a step) and, when done, ``test``
        and ``validation``.
    """
    from .checkpoint import checkpoint_path, lock_path, output_busy, partial_path, resume_path

    at = at_step if at_step is not None else read_at_step(name)
    out = []
    for r in select(runs_of(name), only, name):
        path = r.path(results)
        row: dict[str, Any] = {"run": r, "state": "not started", "step": None, "left_s": None, "pace_s": None,
                               "cpu_left_s": None, "cpu_pace_s": None}
        if path.exists():
            try:
                res = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError):  # ValueError: JSONDecodeError
                res = None
            if not isinstance(res, dict):  # a damaged file: the run counts as done, without numbers
                res = {}  # (`vectorfit report` skips it and names it)
            row.update(state="done", step=res.get("steps"), test=res.get("test"), validation=res.get("validation"),
                       pace_s=_pace(res), cpu_pace_s=_pace(res, CPU))
            if at is not None:  # the suite's numbers are the curve's at its step, not the run's last
                p = curve_point(res, at) or {}
                row.update(step=at, test=p.get("test"), validation=p.get("validation"))
        else:
            part = read_partial(path)  # read once for all of them
            row["step"], row["left_s"], row["pace_s"] = last_step(part), _left(part, at), _pace(part)
            row["cpu_left_s"], row["cpu_pace_s"] = _left(part, at, CPU), _pace(part, CPU)
            p = curve_point(part, at) if at is not None else None
            if p is not None:  # far enough for this suite; whatever it trains on does not change it
                row.update(state="done", step=at, test=p.get("test"), validation=p.get("validation"), left_s=None,
                           cpu_left_s=None)
            elif output_busy(str(path)):
                row["state"] = "running"
                if row["left_s"] is not None:
                    # it has trained on since its last curve point, or since it started if it resumed
                    # after that point (the lock file's time is when its holder took it)
                    try:
                        began = max(partial_path(str(path)).stat().st_mtime, lock_path(str(path)).stat().st_mtime)
                        since = max(time.time() - began, 0.0)
                        row["left_s"] = max(row["left_s"] - since, 0.0)
                        if row["cpu_left_s"] is not None and row["pace_s"]:
                            # its CPU clock ran at its own share of the wall clock since then
                            share = row["cpu_pace_s"] / row["pace_s"]
                            row["cpu_left_s"] = max(row["cpu_left_s"] - since * share, 0.0)
                    except OSError:  # it finished meanwhile (its partial and lock are removed)
                        row["left_s"] = row["cpu_left_s"] = None
            elif partial_path(str(path)).exists() or checkpoint_path(str(path)).exists():
                row["state"] = "stopped"
                ckpt = resume_path(str(path), r.method)
                if ckpt is None or not ckpt.exists():
                    # nothing to resume from (a fresh clone lacks the checkpoints git ignores; AdaLoRA
                    # keeps none): the next invocation trains from step 0, its curve so far redone
                    row["restarts"] = True
                    row["left_s"], row["cpu_left_s"] = _left(part, at, from_start=True), _left(part, at, CPU, True)
        out.append(row)
    return out


def _shape(settings: dict) -> tuple:
    """What a step's cost depends on besides task, model and method: the batch and its length."""
    from .train_config import TrainConfig

    return tuple(settings.get(k, getattr(TrainConfig, k)) for k in ("batch_size", "max_len"))


def _one_thread_runs(results: Path) -> list[tuple[tuple, dict]]:
    """Every one-thread result and ``.partial`` under ``results``, read, with the keys its pace
    counts under in :func:`measured_paces`. Runs on more threads go at another pace and are left out."""
    out = []
    for f in sorted(Path(results).glob("*/*/*/*.json*")):
        if not f.name.endswith((".json", ".json.partial")):
            continue
        try:
            d = json.loads(f.read_text())
            cfg = d["config"]
            threads = d.get("threads", cfg.get("threads"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        if threads == 1:
            task, model, method = f.relative_to(results).parts[:3]
            shape = _shape(cfg)
            out.append((((task, model, method, shape), ("", model, method, shape), (task, model, "", shape)), d))
    return out


def measured_paces(results: Path, clock: str = WALL,
                   runs: Optional[list[tuple[tuple, dict]]] = None) -> dict[tuple, list[float]]:
    """The pace (:func:`_pace` on ``clock``) of every one-thread run under ``results``, finished or
    not, keyed by ``(task, model, method, (batch size, length))`` and pooled over any task
    (``task=""``) and over any method (``method=""``): what :func:`time_left` estimates a run that
    has not started from. ``runs``: :func:`_one_thread_runs` of ``results`` if read already (one
    read of the folder for both clocks)."""
    out: dict[tuple, list[float]] = {}
    for keys, d in runs if runs is not None else _one_thread_runs(results):
        pace = _pace(d, clock)
        if pace is not None:
            for key in keys:
                out.setdefault(key, []).append(pace)
    return out


def time_left(rows: list[dict], paces: dict[tuple, list[float]], at_step: Optional[int] = None,
              clock: str = WALL) -> dict:
    """The optimisation time the unfinished runs of :func:`status`'s ``rows`` still need, one
    thread each (so: core-seconds; evaluation and start-up not counted), on ``clock``: :data:`WALL`,
    the pace the runs had on this machine as it was, or :data:`CPU`, their CPU time, close to what a
    quiet core would take (``paces`` must be :func:`measured_paces` on the same clock).

    A run with an estimate of its own (``left_s``, or ``cpu_left_s`` for CPU) counts with it. Any
    other unfinished run counts its steps still to go (to ``at_step`` or its ``max_steps``, whichever
    comes first) at the median of ``paces`` (:func:`measured_paces`) of runs of its task, model and
    method with its batch shape; failing that, its model and method on any task; failing that, any
    method on its task and model. On the wall clock that is the pace like runs had on this machine,
    under whatever ran beside them.

    Returns:
        ``seconds`` (the sum), ``runs`` (how many it covers), ``borrowed`` (how many of those took
        other runs' pace) and ``unknown`` (unfinished runs with no step budget or no pace to go by).
    """
    import statistics

    out = {"seconds": 0.0, "runs": 0, "borrowed": 0, "unknown": 0}
    for row in rows:
        if row["state"] == "done":
            continue
        r = row["run"]
        own = row.get("left_s" if clock == WALL else "cpu_left_s")
        if own is not None:
            out["seconds"] += own
            out["runs"] += 1
            continue
        settings = dict(r.settings)
        budgets = [int(b) for b in (settings.get("max_steps"), at_step) if b is not None]
        h = _shape(settings)
        pace = (paces.get((r.task, r.model, r.method, h)) or paces.get(("", r.model, r.method, h))
                or paces.get((r.task, r.model, "", h)))
        if not budgets or not pace:
            out["unknown"] += 1
            continue
        out["seconds"] += max(min(budgets) - (row["step"] or 0), 0) * statistics.median(pace)
        out["runs"] += 1
        out["borrowed"] += 1
    return out


def print_status(name: str, results: Path, only: Optional[dict] = None, log: Any = print,
                 at_step: Optional[int] = None) -> None:
    """``vectorfit bench --status``: one line per run of the suite (see :func:`status`)."""
    rows = status(name, results, only, at_step)
    counts = {k: sum(r["state"] == k for r in rows) for k in ("done", "running", "stopped", "not started")}
    log(f"[bench] suite {name}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; results in {results}")
    width = max([16] + [len(row["run"].shown_method) for row in rows])
    for row in rows:
        r = row["run"]
        where = f"step {row['step']}" if row["step"] is not None else ""
        score = (f"test {row['test']:.4f} (val {row['validation']:.4f})"
                 if row["state"] == "done" and row.get("test") is not None else "")
        if row["left_s"] is not None:
            score = f"~{row['left_s'] / 60:.0f} min of training left"
        if row.get("restarts"):
            score = "no checkpoint: trains again from step 0" + (f", {score}" if score else "")
        log(f"  {row['state']:<11} {r.task:<12} {r.shown_method:<{width}} lr {r.lr:<7g} seed {r.seed}  {where:<10} {score}".rstrip())
    at = at_step if at_step is not None else read_at_step(name)
    runs = _one_thread_runs(results)  # read once, for both clocks
    left = time_left(rows, measured_paces(results, WALL, runs), at)
    if left["unknown"] and not left["runs"]:
        log(f"[bench] training left: not known yet ({left['unknown']} run(s) with no pace or step budget to go by)")
    elif left["runs"]:
        how = [f"{left['borrowed']} at the pace of like runs under {results}"] if left["borrowed"] else []
        how += [f"{left['unknown']} not counted: no pace or step budget to go by"] if left["unknown"] else []
        log(f"[bench] training left: about {left['seconds'] / 3600:.1f} core-hours for {left['runs']} run(s)"
            + (f" ({'; '.join(how)})" if how else "")
            + "; N one-thread runs at once on N cores take about 1/N of it")
    cpu = time_left(rows, measured_paces(results, CPU, runs), at, CPU)
    if cpu["runs"]:  # runs trained since results record CPU time: what a quiet machine would take
        log(f"[bench] at the CPU time a step took (a quiet core's pace): about {cpu['seconds'] / 3600:.1f} "
            f"core-hours for {cpu['runs']} run(s)"
            + (f" ({cpu['unknown']} not counted: no CPU time recorded for them or like runs)"
               if cpu["unknown"] else ""))
