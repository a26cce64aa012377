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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from . import methods as methods_mod


@dataclass(frozen=True)
class Run:
    task: str
    model: str
    method: str
    seed: int
    lr: float
    settings: tuple  # sorted (flag, value) pairs

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.settings).encode()).hexdigest()[:8]

    def path(self, root: Path) -> Path:
        return root / self.task / self.model / self.method / f"lr{self.lr:g}-seed{self.seed}-{self.settings_hash()}.json"

    def argv(self, output: Path) -> list[str]:
        args = ["train", "--task", self.task, "--model", self.model, "--method", self.method,
                "--seed", str(self.seed), "--lr", repr(self.lr), "--output", str(output), "--no-progress"]
        for k, v in self.settings:
            args += [f"--{k.replace('_', '-')}", str(v)]
        return args


def suites() -> dict[str, dict]:
    text = resources.files("vectorfit_recipes").joinpath("configs/suites.json").read_text()
    return json.loads(text)["suites"]


def runs_of(name: str) -> list[Run]:
    """Every run of suite ``name``, in execution order (seed-major, so early stops still cover all
    methods and tasks with at least one seed)."""
    table = suites()
    if name not in table:
        raise SystemExit(f"vectorfit bench: unknown suite {name!r}; known: {', '.join(sorted(table))}")
    s = table[name]
    settings = tuple(sorted(s.get("settings", {}).items()))
    mt = methods_mod.method_table()
    out = []
    for seed in s["seeds"]:
        for task in s["tasks"]:
            for model in s["models"]:
                for method in s["methods"]:
                    lrs = mt[method].get("sweep", [mt[method]["lr"]]) if s.get("lr_sweep") else [mt[method]["lr"]]
                    out += [Run(task, model, method, seed, float(lr), settings) for lr in lrs]
    return out


def run_suite(name: str, results: Path, dry_run: bool = False, limit: Optional[int] = None, log: Any = print) -> int:
    """Run the missing runs of a suite. Returns the number of failed runs."""
    from tqdm.auto import tqdm

    todo = [r for r in runs_of(name) if not r.path(results).exists()]
    total = len(runs_of(name))
    log(f"[bench] suite {name}: {total - len(todo)} of {total} runs already done, {len(todo)} to go; results in {results}")
    if limit is not None:
        todo = todo[:limit]
    if dry_run:
        for r in todo:
            log("  vectorfit " + " ".join(r.argv(r.path(results))))
        return 0
    failed = 0
    bar = tqdm(todo, desc=f"bench {name}", dynamic_ncols=True)
    for r in bar:
        bar.set_postfix_str(f"{r.task}/{r.method}/lr{r.lr:g}/s{r.seed}")
        out = r.path(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        log_path = out.with_suffix(".log")
        t = time.perf_counter()
        with open(log_path, "w") as f:
            rc = subprocess.call([sys.executable, "-m", "vectorfit_recipes", *r.argv(out)], stdout=f, stderr=subprocess.STDOUT)
        if rc != 0 or not out.exists():
            failed += 1
            tqdm.write(f"[bench] FAILED ({rc}) {r}; log: {log_path}")
        else:
            log_path.unlink()
            res = json.loads(out.read_text())
            tqdm.write(f"[bench] {r.task:<12} {r.method:<16} lr {r.lr:<7g} seed {r.seed}: test {res['metric']} "
                       f"{res['test']:.4f} (val {res['validation']:.4f}) in {time.perf_counter() - t:.0f}s")
    return failed
