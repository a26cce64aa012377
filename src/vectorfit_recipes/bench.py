"""``vectorfit bench --suite NAME``: run a named matrix of (task, model, method, seed), resumably.

Each run is one ``vectorfit train`` in a fresh subprocess (so peak memory is per run and nothing
leaks between runs) writing one JSON file. Its path names the run's identity, so a stopped suite
restarts where it stopped and suites that share runs compute them once:

    <results>/<task>/<model>/<method>/lr<lr>-seed<seed>-<settings hash>.json
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional



@dataclass(frozen=True)
class Run:
    task: str
    model: str
    method: str
    seed: int
    lr: float
    settings: tuple  # sorted (flag, value) pairs
    # the suite's name for its "options" entry (e.g. recipe's "relative"): shown, not part of the
    # identity (the settings are), so two suites naming the same settings differently share the run
    option: str = field(default="", compare=False)

    @property
    def shown_method(self) -> str:
        """The method, with the option's name when the suite has several (``vectorfit[relative]``)."""
        return f"{self.method}[{self.option}]" if self.option else self.method

    @property
    def label(self) -> str:
        """``task/method/lr/seed``, for progress lines."""
        return f"{self.task}/{self.shown_method}/lr{self.lr:g}/seed{self.seed}"

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings).encode()).hexdigest()[:8]

    def path(self, root: Path) -> Path:
        return root / self.task / self.model / self.method / f"lr{self.lr:g}-seed{self.seed}-{self.settings_hash()}.json"

    def argv(self, output: Path) -> list[str]:
        args = ["train", "--task", self.task, "--model", self.model, "--method", self.method,
                "--seed", str(self.seed), "--lr", repr(self.lr), "--output", str(output), "--no-progress"]
        for k, v in self.settings:
            flag = k.replace("_", "-")
            if isinstance(v, bool):  # BooleanOptionalAction flags take no value
                args.append(f"--{flag}" if v else f"--no-{flag}")
            else:
                args += [f"--{flag}", "none" if v is None else str(v)]
        return args


def suites() -> dict[str, dict]:
    text = resources.files("vectorfit_recipes").joinpath("configs/suites.json").read_text()
    return json.loads(text)["suites"]


def runs_of(name: str) -> list[Run]:
    """Every run of suite ``name``, in execution order: seed-major, then each method's first rate
    before any method's second, so a suite stopped early still covers every method and task."""
    table = suites()
    if name not in table:
        raise SystemExit(f"vectorfit bench: unknown suite {name!r}; known: {', '.join(sorted(table))}")
    s = table[name]
    settings = tuple(sorted(s.get("settings", {}).items()))
    from . import methods as methods_mod  # (torch): not needed to list the suites, as `--help` does

    mt = methods_mod.method_table()
    out: list[tuple[int, int, Run]] = []
    for seed in s["seeds"]:
        for task in s["tasks"]:
            for model in s["models"]:
                for method in s["methods"]:
                    if method in s.get("lrs", {}):  # the suite's own rates (e.g. a sweep at another budget)
                        lrs = s["lrs"][method]
                    elif s.get("lr_sweep"):
                        lrs = mt[method].get("sweep", [mt[method]["lr"]])
                    else:
                        lrs = [mt[method]["lr"]]
                    # "method_settings": a method's own settings (e.g. a budget-dependent schedule);
                    # "options": named extra settings, each a run of its own (e.g. a recipe variant)
                    own = s.get("method_settings", {}).get(method, {})
                    options = s.get("options", {"": {}})
                    for opt_name, opt in options.items():
                        st = tuple(sorted({**dict(settings), **own, **opt}.items()))
                        shown = opt_name if len(options) > 1 else ""
                        out += [(seed, rank, Run(task, model, method, seed, float(lr), st, shown))
                                for rank, lr in enumerate(lrs)]
    return [r for _, _, r in sorted(out, key=lambda x: (x[0], x[1]))]  # stable: keeps task/method order


def read_at_step(name: str) -> Optional[int]:
    """The step a suite reads its runs at (``"read_at_step"`` in suites.json), if it has one.

    Such a suite is a table at one budget read off learning curves: its runs carry the settings of a
    curve suite, so they are that suite's runs (computed once), and each counts as done once its
    curve has reached the step; ``bench`` takes its runs only that far unless told otherwise."""
    step = suites()[name].get("read_at_step")
    return None if step is None else int(step)


def curve_point(d: Optional[dict], step: int) -> Optional[dict]:
    """A result's (or ``.partial``'s) learning-curve point at ``step``; ``None`` if it has none."""
    for p in (d or {}).get("curve") or []:
        if p.get("step") == step:
            return p
    return None


def runs_training_under(results: Path) -> list[str]:
    """The result files under ``results`` whose runs another process is training now (it holds the
    run's ``.lock``), relative to ``results``."""
    from .checkpoint import output_busy

    outputs = (Path(str(lock)[: -len(".lock")]) for lock in Path(results).glob("**/*.json.lock"))
    return sorted(str(out.relative_to(results)) for out in outputs if output_busy(str(out)))


def select(runs: list[Run], only: Optional[dict], suite: str = "") -> list[Run]:
    """The runs whose method, task, seed, rate and option are among ``only``'s (e.g. ``{"methods":
    ["vectorfit"], "lrs": ["3e-3"]}``, ``{"options": ["relative"]}``); order kept. A value the suite
    does not have is an error that lists the ones it has. Rates compare as numbers, so ``3e-3`` and
    ``0.003`` are the same rate."""
    if not only:
        return runs
    fields = {"methods": "method", "tasks": "task", "seeds": "seed", "lrs": "lr", "options": "option"}
    keep = runs
    for key, values in only.items():
        if key not in fields:
            raise SystemExit(f"vectorfit bench: unknown filter {key!r}; use one of {', '.join(fields)}")
        if key == "lrs":
            values = [_rate(v) for v in values]
        have = sorted({str(getattr(r, fields[key])) for r in runs})
        wanted = {str(v).strip() for v in values}
        unknown = sorted(wanted - set(have))
        if unknown:
            its = f"its {key}: {', '.join(have)}" if have != [""] else "it has no named options"
            raise SystemExit(f"vectorfit bench: suite {suite} has no {key} {', '.join(unknown)}; {its}")
        keep = [r for r in keep if str(getattr(r, fields[key])) in wanted]
    return keep


def _rate(text) -> float:
    """``--lrs``' value as the float a suite's run carries (``"3e-3"`` -> ``0.003``)."""
    try:
        return float(str(text).strip())
    except ValueError:
        raise SystemExit(f"vectorfit bench: --lrs takes learning rates such as 3e-3, got {text!r}") from None


def read_partial(path: Path) -> Optional[dict]:
    """An unfinished run's ``.partial`` file (``None``: missing or unreadable)."""
    from .checkpoint import partial_path

    try:
        d = json.loads(partial_path(str(path)).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def last_step(d: Optional[dict]) -> Optional[int]:
    """The last step a result or ``.partial`` records: its last curve point or where it stopped."""
    try:
        steps = [p["step"] for p in d.get("curve") or []] + ([d["stopped_at"]] if d.get("stopped_at") else [])
    except (KeyError, TypeError, AttributeError):
        return None
    return max(steps) if steps else None


def reached_step(path: Path) -> Optional[int]:
    """The step an unfinished run has reached by its ``.partial`` file: where ``--stop-at-step``
    stopped it, else its last learning-curve step (``None``: no readable partial)."""
    return last_step(read_partial(path))


def check_arguments(jobs: int = 1, threads: Optional[int] = None, limit: Optional[int] = None,
                    stop_at_step: Optional[int] = None, results: Optional[Path] = None) -> None:
    """The numbers ``bench`` takes are in range, and ``results`` (unless ``None``: nothing is written,
    as with ``--dry-run``) is a folder that can be written, before any run starts.

    A value out of range was silently taken for something else (``--threads 0``: torch's default,
    ``--limit -1``: every run but the last), and an unwritable folder failed with a traceback.

    Raises:
        ValueError: naming the flag, the value and what to give instead.
    """
    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: must be >= 1 (runs at once; 2 on a 2-core machine)")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: must be >= 1 (torch threads per run); leave it out for the default")
    if limit is not None and limit < 0:
        raise ValueError(f"--limit {limit}: must be >= 0 (the most missing runs to start); leave it out for all")
    if stop_at_step is not None and stop_at_step < 1:
        raise ValueError(f"--stop-at-step {stop_at_step}: must be >= 1")
    if results is not None:
        from .train_config import _check_writable

        _check_writable(str(results), "--results", folder=True)


def run_suite(name: str, results: Path, dry_run: bool = False, limit: Optional[int] = None, log: Any = print,
              jobs: int = 1, threads: Optional[int] = None, only: Optional[dict] = None,
              stop_at_step: Optional[int] = None) -> int:
    """Run the missing runs of a suite. Returns the number of failed runs.

    Args:
        name: a suite of ``configs/suites.json``.
        results: the results folder (one JSON file per run).
        dry_run: only list the missing runs' commands.
        limit: run at most this many missing runs.
        jobs: runs at once, each in its own process. Two one-thread runs use a 2-core machine
            better than one two-thread run, and keep threads from spin-waiting against each other.
        threads: torch threads per run; none = 1 when ``jobs > 1`` or when another process trains a run
            under ``results`` (another bench: torch's default of a thread per core would oversubscribe
            the cores), else torch's default. Not part of a run's identity: it changes the speed, not
            the numbers.
        only: run only some of the suite's runs (:func:`select`), e.g. ``{"methods": ["vectorfit"]}``.
        stop_at_step: take every run only this far (``vectorfit train --stop-at-step``; the checkpoint
            stays, so a later bench without it continues each run to its full budget). Runs that have
            reached the step already are skipped. Breadth first: every run of a suite to 1,024 steps
            before any goes on to 2,048.

    A run that another process is training now (it holds the run's lock, see
    ``checkpoint.output_lock``) is skipped, so two benches over one results folder share the work.
    """
    try:
        check_arguments(jobs, threads, limit, stop_at_step, None if dry_run else results)
    except ValueError as e:
        raise SystemExit(f"vectorfit bench: {e}") from None
    if stop_at_step is None:  # a suite read at one step needs its runs no further
        stop_at_step = read_at_step(name)
    todo = _missing(name, results, only, stop_at_step, log)
    if limit is not None:
        todo = todo[:limit]
    if threads is None and jobs > 1:
        threads = 1
    elif threads is None and (elsewhere := runs_training_under(results)):
        # torch's default (one thread per core) beside another bench's runs oversubscribes the cores
        threads = 1
        log(f"[bench] {len(elsewhere)} run(s) under {results} are training in other processes "
            f"(e.g. {elsewhere[0]}): each run gets 1 thread (pass --threads to choose)")
    extra = ["--threads", str(threads)] if threads else []
    if stop_at_step is not None:
        extra += ["--stop-at-step", str(stop_at_step)]
    if dry_run:
        for r in todo:
            log("  vectorfit " + " ".join(r.argv(r.path(results)) + extra))
        return 0
    return _run_processes(name, todo, results, jobs, extra, stop_at_step)


def _missing(name: str, results: Path, only: Optional[dict], stop_at_step: Optional[int], log: Any) -> list:
    """The suite's runs (those ``only`` selects) that have no result yet and that no other process is
    training; with ``stop_at_step``, also leaving out the unfinished runs that have reached it."""
    from .checkpoint import output_busy

    runs = select(runs_of(name), only, name)
    todo = [r for r in runs if not r.path(results).exists()]
    busy = [r for r in todo if output_busy(str(r.path(results)))]
    # with --stop-at-step N, an unfinished run that has reached step N counts as done for now
    far = [r for r in todo if stop_at_step is not None and (reached_step(r.path(results)) or 0) >= stop_at_step]
    todo = [r for r in todo if r not in busy and r not in far]
    scope = f"{name} ({'; '.join(f'{k} ' + ','.join(map(str, v)) for k, v in only.items())})" if only else name
    log(f"[bench] suite {scope}: {len(runs) - len(todo) - len(busy)} of {len(runs)} runs already done"
        + (f" ({len(far)} of them only to step {stop_at_step})" if far else "")
        + f", {len(todo)} to go; results in {results}")
    for r in busy:
        log(f"[bench] skipping {r.label}: another process is training it")
    return todo


def _outcome(r: Run, returncode: int, results: Path, stop_at_step: Optional[int], seconds: float) -> bool:
    """Say how a finished run's process ended; True if it failed. Its log is kept only then."""
    from tqdm.auto import tqdm

    out, log_path = r.path(results), r.path(results).with_suffix(".log")
    reached = reached_step(out) if stop_at_step is not None and not out.exists() else None
    if returncode == 0 and reached is not None and reached >= stop_at_step:
        log_path.unlink()
        tqdm.write(f"[bench] {r.task:<12} {r.method:<16} lr {r.lr:<7g} seed {r.seed}: stopped at step "
                   f"{reached} as asked in {seconds:.0f}s (checkpoint kept)")
        return False
    if returncode != 0 or not out.exists():
        tqdm.write(f"[bench] FAILED ({returncode}) {r}; log: {log_path}")
        return True
    log_path.unlink()
    res = json.loads(out.read_text())
    tqdm.write(f"[bench] {r.task:<12} {r.method:<16} lr {r.lr:<7g} seed {r.seed}: test {res['metric']} "
               f"{res['test']:.4f} (val {res['validation']:.4f}) in {seconds:.0f}s")
    return False


def _run_processes(name: str, todo: list, results: Path, jobs: int, extra: list,
                   stop_at_step: Optional[int]) -> int:
    """Train ``todo``, each run as ``vectorfit train`` in its own process, ``jobs`` at a time; the
    number that failed. A SIGTERM to this process stops its runs too (their .partial curves and
    checkpoints stay)."""
    import os
    import signal

    from tqdm.auto import tqdm

    from .checkpoint import output_busy

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning
    failed = 0
    running: list[tuple[Run, subprocess.Popen, Any, float]] = []
    bar = tqdm(total=len(todo), desc=f"bench {name}", dynamic_ncols=True)

    def reap() -> None:
        """Wait for one of the running processes to end and account for it."""
        nonlocal failed
        while True:
            done = next((i for i, (_, proc, _, _) in enumerate(running) if proc.poll() is not None), None)
            if done is not None:
                break
            time.sleep(1.0)
        r, proc, f, t = running.pop(done)
        f.close()
        failed += _outcome(r, proc.returncode, results, stop_at_step, time.perf_counter() - t)
        bar.update(1)

    def stop(signum: int, _frame: Any) -> None:  # `kill` of the bench stops its runs too (finally below)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for r in todo:
            while len(running) >= jobs:
                reap()
            out = r.path(results)
            if out.exists() or output_busy(str(out)):  # finished or started by another bench meanwhile
                tqdm.write(f"[bench] skipping {r.label}: done or being trained by another process")
                bar.update(1)
                continue
            bar.set_postfix_str(r.label)
            out.parent.mkdir(parents=True, exist_ok=True)
            f = open(out.with_suffix(".log"), "w")
            proc = subprocess.Popen([sys.executable, "-m", "vectorfit_recipes", *r.argv(out), *extra],
                                    stdout=f, stderr=subprocess.STDOUT, env=env)
            running.append((r, proc, f, time.perf_counter()))
        while running:
            reap()
    finally:
        signal.signal(signal.SIGTERM, previous)
        for _, proc, f, _ in running:  # interrupted: stop the children; their .partial curves stay
            proc.terminate()
            f.close()
        bar.close()
    return failed
