"""The ``vectorfit`` command fails early and plainly, says what it wrote, and has what a package is
expected to have: early checks of the flags, the report of what was saved, the OpenMP thread
policy, and the license, type marker, changelog and version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vectorfit
from vectorfit_recipes import cli
from vectorfit_recipes import train as train_mod

REPO = Path(__file__).resolve().parent.parent
TINY = ["--max-steps", "1", "--max-train-examples", "16", "--max-eval-examples", "8", "--batch-size", "8",
        "--eval-batch-size", "8", "--max-len", "16", "--no-eval-before", "--no-select-on-validation", "--no-progress"]


@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if a run starts: every check below must come before any data or model is loaded."""
    def run(*_a, **_k):
        raise AssertionError("the run started; the flag should have been rejected before loading anything")

    monkeypatch.setattr(train_mod, "run", run)


def _error_of(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vectorfit train"), err[:200]  # the subcommand's usage, not the top-level one
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("vectorfit train: error: "), err[-500:]
    return errors[0]


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "-0.01"], "--lr -0.01: the learning rate must be a finite number > 0"),
    (["--lr", "nan"], "--lr nan: the learning rate must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf:"),
    (["--avf-beta", "1.5"], "--avf-beta 1.5: the EMA factor must be in [0, 1)"),
    (["--avf-beta", "nan"], "--avf-beta nan:"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be a finite number >= 0"),
    (["--avf-k", "0"], "--avf-k must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--device", "nonsense"], "--device 'nonsense': not a torch device"),
])
def test_bad_values_are_rejected_before_loading_anything(capsys, no_run, flags, expected):
    assert expected in _error_of(capsys, ["train", *flags])


def test_cuda_on_a_cpu_build_is_rejected_up_front(capsys, no_run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "--device cuda:" in _error_of(capsys, ["train", "--device", "cuda"])


def test_avf_k_is_checked_against_the_models_vectors(capsys, no_run):
    from vectorfit_recipes.models import model_path

    model_path("minilm")  # cached (fetched once per test session): the count needs the architecture only
    capsys.readouterr()  # the fetch's own messages
    err = _error_of(capsys, ["train", "--avf-k", "100000"])
    assert "--avf-k 100000: must be less than the 72 vectors that --method vectorfit trains on --model minilm" in err
    assert "use 1..71" in _error_of(capsys, ["train", "--avf-k", "72"])


def test_unwritable_outputs_are_rejected_up_front(capsys, no_run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert f"--output {a_file}/r.json: {a_file} is a file" in _error_of(capsys, ["train", "--output", f"{a_file}/r.json"])
    assert f"--output {tmp_path}: it is a folder" in _error_of(capsys, ["train", "--output", str(tmp_path)])
    assert f"--save-adapter {a_file}: it is a file; give a folder" in _error_of(capsys, ["train", "--save-adapter", str(a_file)])
    assert "--save-adapter /proc/vectorfit/adapter: cannot write in /proc" in _error_of(
        capsys, ["train", "--save-adapter", "/proc/vectorfit/adapter"])
    same = str(tmp_path / "x")
    assert "are the same path" in _error_of(capsys, ["train", "--output", same, "--save-adapter", same])
    assert list(tmp_path.iterdir()) == [a_file]  # the write probes left nothing behind


def test_good_paths_pass_the_checks(tmp_path):
    from vectorfit_recipes.train_config import TrainConfig

    cfg = TrainConfig(output=str(tmp_path / "new" / "deeper" / "r.json"), save_adapter=str(tmp_path / "adapter"))
    cfg.validate()
    cfg.check_environment()
    assert list(tmp_path.iterdir()) == []  # checking creates nothing


def test_a_run_says_what_it_saved(capsys, tmp_path):
    assert cli.main(["train", *TINY]) == 0
    assert "nothing was saved: add --output FILE.json" in capsys.readouterr().out
    adapter = tmp_path / "adapter"
    assert cli.main(["train", *TINY, "--save-adapter", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert f"adapter saved to {adapter.resolve()} (" in out and "VectorFitModel.from_pretrained(base_model" in out
    assert "nothing was saved" not in out


# ------------------------------------------------------------------------------- threads (item 1)
def _spincount(stderr: str) -> str:
    """libgomp's effective spin count, as it prints it with OMP_DISPLAY_ENV=VERBOSE (the last one: a
    re-started process prints twice)."""
    found = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    assert found, stderr[-2000:]
    return found[-1]


@pytest.mark.parametrize("command", [
    [str(Path(sys.executable).with_name("vectorfit"))],
    [sys.executable, "-m", "vectorfit"],
    [sys.executable, "-m", "vectorfit_recipes"],
])
def test_the_command_makes_openmp_threads_sleep_unless_told_otherwise(command):
    if not Path(command[0]).exists():
        pytest.skip("console script not installed")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    proc = subprocess.run(command + ["--version"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"vectorfit {vectorfit.__version__} (torch ")
    assert "OMP_WAIT_POLICY=PASSIVE" in proc.stdout
    assert _spincount(proc.stderr) == "0"  # the OpenMP runtime itself saw PASSIVE (its default spins 300000 rounds)
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # a setting of the user's is kept
    proc = subprocess.run(command + ["--version"], env=env, capture_output=True, text=True, timeout=300)
    assert "OMP_WAIT_POLICY=ACTIVE" in proc.stdout and _spincount(proc.stderr) != "0"


# --------------------------------------------------------------------------- package (item 7)
def test_license_typed_marker_changelog_and_version_agree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == {"text": "Apache-2.0"}
    assert meta["project"]["version"] == vectorfit.__version__
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["vectorfit"]
    assert (Path(vectorfit.__file__).parent / "py.typed").is_file()
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{vectorfit.__version__}]" in changelog


def test_report_and_bench_help_give_defaults_inside_the_repository(capsys):
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Markdown report" in out and f"(default: {REPO / 'benchmarks' / 'RESULTS.md'})" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"here {REPO / 'benchmarks' / 'results'}" in out


def test_paths_named_in_the_readme_docs_and_docstrings_exist():
    texts = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    named: set = set()
    for path in texts:
        text = path.read_text()
        named |= set(re.findall(r"`((?:src|benchmarks|examples|tests)/[^`\s*]+)`", text))
    assert "src/vectorfit_recipes/configs/methods.json" in named  # where the docs send readers for the rates
    missing = sorted(p for p in named if not (REPO / p.rstrip("/")).exists())
    assert not missing, f"README/docs name paths that do not exist: {missing}"
    from vectorfit_recipes import assets

    for doc_path in re.findall(r"``([\w./-]+\.md)``", assets.__doc__):
        assert (REPO / doc_path).exists(), f"assets docstring points at {doc_path}, which is not in the repository"
