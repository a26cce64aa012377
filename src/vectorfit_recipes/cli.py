"""The ``vectorfit`` command.

    vectorfit                      # = vectorfit train: MiniLM on the movie sentences, VectorFit, a few minutes
    vectorfit train [--flags]      # one run; every field of TrainConfig is a flag (see --help)
    vectorfit data list            # assets and datasets, and whether they are in the cache
    vectorfit data fetch [NAME..]  # download + verify + extract (datasets, models or assets; default all but mpnet)
    vectorfit data verify [NAME..] # re-check extracted files against their recorded sha256
    vectorfit bench --suite NAME   # run a named matrix of runs (configs/suites.json), resumably
    vectorfit report               # result files -> benchmarks/RESULTS.md + plots
    vectorfit convert OLD NEW      # a vectorfit 0.1 adapter folder -> peft's layout
    vectorfit generate --model M --adapter DIR --prompt TEXT   # try a trained adapter on a causal LM
    vectorfit --version

Run from the command line, it sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set) before torch loads:
OpenMP threads then sleep instead of spinning while they wait, which keeps a shared CPU from
slowing everything several-fold (benchmarks/THREADS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from .cli_messages import one_line

__all__ = ["main", "add_dataclass_arguments", "dataclass_from_args", "build_parser", "normalize_argv",
           "set_passive_openmp"]

#: The OpenMP setting the command uses unless the environment already has one (see set_passive_openmp).
OMP_DEFAULT = ("OMP_WAIT_POLICY", "PASSIVE")


def set_passive_openmp() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it already.

    With the OpenMP runtime torch ships (GNU libgomp), a thread that waits at a barrier spins for
    300,000 rounds before it sleeps. On a machine whose cores are busy with other processes the
    spinning threads take the CPU from the threads they wait for: measured here, one SVD of a
    384 x 384 matrix took 0.35-1.2 s with 2 threads instead of 0.05 s, and a training step 7-9 s
    instead of 3 s (benchmarks/THREADS.md). PASSIVE makes waiting threads sleep at once.
    The runtime reads the variable once, when torch is imported; child processes (``bench`` runs)
    inherit it.

    Returns:
        Whether the setting can take effect in this process (torch not imported yet).
    """
    name, value = OMP_DEFAULT
    os.environ.setdefault(name, value)
    return "torch" not in sys.modules


def _repo_root() -> Optional[Path]:
    """The source checkout this package runs from (an editable install), or ``None``."""
    root = Path(__file__).resolve().parents[2]  # src/vectorfit_recipes/cli.py -> repository
    return root if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir() else None


def _repo_path(relative: str) -> Path:
    """``relative`` inside the repository when running from a checkout, else in the current folder."""

    root = _repo_root()
    return root / relative if root is not None else Path(relative)


class _VersionAction(argparse.Action):
    """``--version``: the package version, and what the thread settings will be."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        import torch

        import vectorfit

        print(f"vectorfit {vectorfit.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})")
        parser.exit()


# ------------------------------------------------------------------------- dataclass <-> argparse
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is getattr(types, "UnionType")):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _optional_parser(inner: Any) -> Any:
    def parse(s: str) -> Any:
        if s.strip().lower() in ("none", "null", ""):
            return None
        return inner(s)

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field (``max_len`` -> ``--max-len``), typed, with its help text."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        flags = [f"--{f.name.replace('_', '-')}"]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["help"] = f"{help_text} (default: {default})"
        else:
            if tp not in (int, float, str):
                raise TypeError(f"unsupported field type {tp!r} for {cls.__name__}.{f.name}")
            kwargs["type"] = _optional_parser(tp) if optional else tp
            kwargs["metavar"] = tp.__name__.upper()
            if "choices" in f.metadata:
                kwargs["choices"] = list(f.metadata["choices"])
                kwargs.pop("metavar")
            shown = "none" if default is None else default
            kwargs["help"] = f"{help_text} (default: {shown})"
        parser.add_argument(*flags, **kwargs)


def dataclass_from_args(cls: type, ns: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})


# -------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(
        prog="vectorfit",
        description="VectorFit recipes: fine-tune pretrained models on real data with VectorFit "
                    "(singular values + biases, with Adaptive Vector Freezing). Without a command, "
                    "runs `vectorfit train` with its defaults: all-MiniLM-L6-v2 on the movie-sentence "
                    "sentiment data, a few minutes on 2 CPU cores.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version (and torch's thread settings) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser(
        "train", help="fine-tune and evaluate one (task, model, method, seed)",
        description="Fine-tune a pretrained model on a real dataset, evaluate on the test split before "
                    "and after (weights chosen on validation), print the metric, the trainable parameter "
                    "count and the time, and optionally write a JSON result file.",
    )
    add_dataclass_arguments(p_train, TrainConfig)

    p_data = sub.add_parser("data", help="list, fetch or verify the pinned datasets and models")
    dsub = p_data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dsub.add_parser("list", help="show datasets, models and assets and whether they are cached")
    p_fetch = dsub.add_parser("fetch", help="download, check sha256 and extract (once)")
    p_fetch.add_argument("names", nargs="*", help="dataset, model or asset names; default: all except mpnet "
                                                  "(404 MB; name it to fetch it)")
    p_fetch.add_argument("--force", action="store_true", help="re-download and re-extract even if cached")
    p_verify = dsub.add_parser("verify", help="re-check extracted files against their recorded sha256")
    p_verify.add_argument("names", nargs="*", help="names to verify; default: everything cached")

    p_bench = sub.add_parser(
        "bench", help="run a named suite of (task, model, method, seed) runs, skipping finished ones",
        description="Runs every missing run of a suite from configs/suites.json, each as `vectorfit train` in "
                    "a fresh process writing one JSON file; stop it at any time and run it again to resume.",
    )
    from .bench import suites

    suite_names = sorted(suites())
    p_bench.add_argument("--suite", required=True, choices=suite_names, metavar="SUITE",
                         help="a suite of configs/suites.json: " + ", ".join(suite_names))
    results_help = (f"results folder (default: benchmarks/results of the repository this command runs from, "
                    f"here {_repo_path('benchmarks/results')}; a path you give is taken from the current folder)")
    p_bench.add_argument("--results", default=None, help=results_help)
    p_bench.add_argument("--dry-run", action="store_true", help="list the missing runs' commands, run nothing")
    p_bench.add_argument("--status", action="store_true",
                         help="list every run of the suite as done (with its test and validation metric), running "
                              "(another process trains it), stopped (resumes from its checkpoint) or not started, "
                              "with the last learning-curve step reached and, for an unfinished run, the training "
                              "time it still needs at its recent pace; then the core-hours the unfinished runs "
                              "need together (a run not started counts at the pace like one-thread runs measured "
                              "under the results folder); run nothing")
    p_bench.add_argument("--limit", type=int, default=None, help="run at most this many missing runs")
    p_bench.add_argument("--methods", default=None, metavar="M1,M2",
                         help="only the suite's runs of these methods, in the suite's order (e.g. to run the methods "
                              "that decide a question first); default: every method")
    p_bench.add_argument("--stop-at-step", type=int, default=None, metavar="N",
                         help="take every run only to step N, keeping its checkpoint (runs already there are "
                              "skipped); a later bench without it continues each run to its full budget. "
                              "Default: the suite's read_at_step if it has one (converged: 1024), else none. "
                              "With --status: a run that has reached step N shows as done, with its numbers there")
    p_bench.add_argument("--tasks", default=None, metavar="T1,T2", help="only the suite's runs on these tasks")
    p_bench.add_argument("--seeds", default=None, metavar="S1,S2", help="only the suite's runs with these seeds")
    p_bench.add_argument("--options", default=None, metavar="O1,O2",
                         help="only the suite's runs with these of its named options (recipe: paper, relative, "
                              "bias_lr_0.1, head_lr_1e-2, head_lr_1e-4; --status shows them in brackets after the method)")
    p_bench.add_argument("--lrs", default=None, metavar="LR1,LR2",
                         help="only the suite's runs at these learning rates (e.g. 3e-3 to run a method's chosen "
                              "rate's seeds before its other rates)")
    p_bench.add_argument("--jobs", type=int, default=1,
                         help="runs at once, each in its own process (default: %(default)s); 2 on a 2-core machine")
    p_bench.add_argument("--threads", type=int, default=None,
                         help="torch threads per run (default: 1 when --jobs > 1 or when another bench is training "
                              "a run in the same results folder, else torch's default)")

    p_report = sub.add_parser(
        "report", help="turn result files into a Markdown report with tables and plots",
        description="Read every result JSON under --results (written by `vectorfit bench` / `vectorfit train "
                    "--output`), and write a Markdown report: per suite, mean +- std over seeds of each "
                    "(task, method), trainable parameters, and plots (metric vs. trainable parameters, "
                    "training strengths, delta-W spectra) into plots/ next to the report. Default paths are "
                    "inside the repository this command runs from; paths you give are taken from the "
                    "current folder.",
    )
    p_report.add_argument("--results", default=None, help=results_help)
    p_report.add_argument("--out", default=None, help=f"report file; plots go to plots/ beside it "
                                                      f"(default: {_repo_path('benchmarks/RESULTS.md')})")
    p_report.add_argument("--notes", default=None,
                          help=f"hand-written text placed at the top of the report, if the file exists "
                               f"(default: {_repo_path('benchmarks/NOTES.md')})")
    p_report.add_argument("--suites", default=None, help="comma-separated suites to report (default: all with results)")

    from .generate_cli import add_arguments as add_generate_arguments

    p_generate = sub.add_parser(
        "generate", help="generate text with a causal LM and (optionally) a trained adapter",
        description="Load a causal language model (a registered name or a local folder), apply an adapter "
                    "saved by `vectorfit train --save-adapter` (VectorFit, peft, or trained parameters), and "
                    "print the generated continuation of each prompt. Greedy unless --temperature/--top-p.",
    )
    add_generate_arguments(p_generate)

    p_convert = sub.add_parser(
        "convert", help="rewrite a vectorfit 0.1 adapter folder in peft's layout",
        description="Read an adapter folder written by vectorfit 0.1 (\"format\": \"vectorfit-adapter\") and write the "
                    "same adapter, numbers unchanged, as peft's adapter_config.json (peft_type VECTORFIT) and "
                    "adapter_model.safetensors, which PeftModel.from_pretrained loads.",
    )
    p_convert.add_argument("source", help="the vectorfit 0.1 adapter folder")
    p_convert.add_argument("destination", help="folder for the converted adapter (created)")
    from .cache_cli import add_parser as add_cache_parser

    add_cache_parser(sub)
    return parser


def _asset_names(names: Sequence[str], default: Sequence[str]) -> list[str]:
    from . import assets, data, models

    out: list[str] = []
    for n in names or default:
        if n in data.DATASETS:
            a = data.DATASETS[n].asset
        elif n in models.MODELS:
            a = models.MODELS[n].asset
        elif n in assets.ASSETS:
            a = n
        elif n == "all":
            out.extend(a for a in assets.ASSETS if a not in out)
            continue
        else:
            known = sorted(set(data.DATASETS) | set(models.MODELS) | set(assets.ASSETS))
            raise SystemExit(f"vectorfit data: unknown name {n!r}; known: {', '.join(known)}")
        if a not in out:
            out.append(a)
    return out


def _data_command(ns: argparse.Namespace) -> int:
    from . import assets, data, models

    if ns.data_command == "list":
        print(f"cache: {assets.assets_root()}")
        print("\nassets (pinned PyPI archives):")
        for a in assets.ASSETS.values():
            state = "cached" if assets.is_fetched(a) else "not fetched"
            print(f"  {a.name:<16} {state:<12} {a.packages}")
            print(f"  {'':<16} {a.description}")
            print(f"  {'':<16} licence: {a.license}; source: {a.source}")
        print("\ndatasets:")
        for d in data.DATASETS.values():
            labels = ("generation" if d.is_generation else "regression" if d.label_names is None
                      else "/".join(d.label_names))
            print(f"  {d.name:<16} asset {d.asset:<16} metric {d.metric:<9} {labels}")
        print("\nmodels:")
        for m in models.MODELS.values():
            print(f"  {m.name:<16} asset {m.asset:<16} {m.description}")
        return 0
    if ns.data_command == "fetch":
        default = [a for a in assets.ASSETS if a != "mpnet"]
        for name in _asset_names(ns.names, default):
            path = assets.fetch(name, force=ns.force, quiet=False)
            print(f"{name}: {path}")
        return 0
    if ns.data_command == "verify":
        names = _asset_names(ns.names, [a for a in assets.ASSETS if assets.asset_dir(a).exists()])
        if not names:
            print("nothing is cached yet; run `vectorfit data fetch`")
            return 0
        bad = 0
        for name in names:
            ok, msg = assets.verify(name)
            print(("OK    " if ok else "FAIL  ") + msg)
            bad += not ok
        if bad:
            print(f"{bad} asset(s) failed; repair with `vectorfit data fetch --force NAME`")
        return 1 if bad else 0
    raise AssertionError(ns.data_command)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """``vectorfit`` alone, or ``vectorfit --flag ...``, means ``vectorfit train ...``."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["train", *argv]
    return argv


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


@contextlib.contextmanager
def _env(name: str, value: Optional[str]) -> Iterator[None]:
    """Set an environment variable for the duration of the block (nothing if ``value`` is None)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _train_command(ns: argparse.Namespace, train_parser: argparse.ArgumentParser) -> int:
    """``vectorfit train``: every check that needs no data and no model weights first, then the run,
    then where its outputs went."""
    from vectorfit import ConfigError

    from .train import TrainConfig, run

    cfg = dataclass_from_args(TrainConfig, ns)
    try:
        cfg.validate()
        cfg.check_environment()
    except (ValueError, KeyError) as e:
        train_parser.error(one_line(e))
    try:
        # --no-progress also silences the library's SVD progress bar.
        with _env("VECTORFIT_PROGRESS", None if cfg.progress else "0"):
            result = run(cfg)
    except ConfigError as e:  # found once the model is built, still before training (e.g. --avf-k too large)
        train_parser.error(f"stopped before training: {one_line(e)}")
    if result.get("rank", 0) == 0:  # under torchrun only rank 0 saved anything (distributed.py)
        _say_what_was_saved(cfg, result)
    return 0


def _say_what_was_saved(cfg: Any, result: dict) -> None:
    from pathlib import Path

    from .methods import PEFT_METHODS, VECTORFIT_METHODS

    if cfg.save_adapter:
        where = Path(cfg.save_adapter).expanduser().resolve()
        if cfg.method in VECTORFIT_METHODS:
            how = f"VectorFitModel.from_pretrained(base_model, {str(where)!r})"
        elif cfg.method in PEFT_METHODS:
            how = f"peft.PeftModel.from_pretrained(base_model, {str(where)!r})"
        else:
            how = f"safetensors.torch.load_file({str(where / 'model.safetensors')!r}) (trained parameters by name)"
        size = result.get("adapter_bytes") or 0
        print(f"adapter saved to {where} ({size / 1024:.0f} KB); load it with {how}")
    if not cfg.output and not cfg.save_adapter:
        print("nothing was saved: add --output FILE.json to keep the result as JSON, --save-adapter DIR to keep the "
              "trained adapter")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one ``vectorfit`` command; returns the exit status.

    Output piped into a reader that stops early (``vectorfit bench --status | head``) ends the command
    quietly with status 141, as a Unix tool killed by SIGPIPE does, instead of a BrokenPipeError
    traceback.
    """
    try:
        status = _main(argv)
        sys.stdout.flush()  # inside the guard: a block-buffered pipe only fails here, or at exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # 13 = SIGPIPE


def _main(argv: Optional[Sequence[str]]) -> int:
    if argv is None:  # run as a command (not called from Python code that may have loaded torch already)
        set_passive_openmp()
    argv = normalize_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)

    from .assets import AssetError
    from .checkpoint import OutputBusy, UnsafeCheckpoint

    try:
        if ns.command == "train":
            return _train_command(ns, _subparser(parser, "train"))
        if ns.command == "data":
            return _data_command(ns)
        if ns.command == "generate":
            from .generate_cli import generate_command

            return generate_command(ns, _subparser(parser, "generate"))
        if ns.command == "convert":
            from vectorfit import AdapterError, convert_legacy_adapter

            try:
                out = convert_legacy_adapter(ns.source, ns.destination)
            except AdapterError as e:
                print(f"vectorfit: error: {e}", file=sys.stderr)
                return 2
            print(f"converted {ns.source} -> {out} (load it with peft.PeftModel.from_pretrained(base, {str(out)!r}))")
            return 0
        if ns.command == "bench":
            from pathlib import Path

            from .bench import check_arguments, run_suite

            results = Path(ns.results) if ns.results else _repo_path("benchmarks/results")
            try:  # before any run starts (or --status reads anything)
                check_arguments(ns.jobs, ns.threads, ns.limit, ns.stop_at_step,
                                None if ns.status or ns.dry_run else results)
            except ValueError as e:
                _subparser(parser, "bench").error(one_line(e))
            only = {k: getattr(ns, k).split(",") for k in ("methods", "tasks", "seeds", "lrs", "options")
                    if getattr(ns, k)}
            if ns.status:
                from .bench_status import print_status

                print_status(ns.suite, results, only, at_step=ns.stop_at_step)
                return 0
            return 1 if run_suite(ns.suite, results, dry_run=ns.dry_run, limit=ns.limit,
                                  jobs=ns.jobs, threads=ns.threads, only=only, stop_at_step=ns.stop_at_step) else 0
        if ns.command == "cache":
            from .cache_cli import cache_command

            return cache_command(ns)
        if ns.command == "report":
            from pathlib import Path

            from .report import check_out, write_report

            suites = ns.suites.split(",") if ns.suites else None
            out_md = Path(ns.out) if ns.out else _repo_path("benchmarks/RESULTS.md")
            try:
                check_out(out_md)  # before reading results: a typo in --out fails at once
            except ValueError as e:
                _subparser(parser, "report").error(one_line(e))
            out = write_report(Path(ns.results) if ns.results else _repo_path("benchmarks/results"), out_md,
                               Path(ns.notes) if ns.notes else _repo_path("benchmarks/NOTES.md"), suites)
            print(f"report written to {out}")
            return 0
    except (AssetError, OutputBusy, UnsafeCheckpoint) as e:
        print(f"vectorfit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vectorfit: interrupted", file=sys.stderr)
        return 130
    parser.print_help()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
