"""The ``vectorfit`` command refuses what it cannot use, in one line, and never runs a planted file.

Checkpoints are read as tensors and plain data only; ``generate`` refuses adapters that would change
nothing or are damaged, and merged models given as adapters; ``report`` checks ``--out`` first and
skips unusable result files; ``bench`` checks its numbers and ``--results``; ``data fetch`` says when
the cache folder cannot be made; the SVD progress display writes two lines, not one per update, into
a log. Everything runs for real: tiny models, real files, real subprocesses.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_bert
from vectorfit import VectorFitConfig, get_vectorfit_model
from vectorfit_recipes import bench, bench_status, checkpoint, cli
from vectorfit_recipes.train_config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
TINY = ["--max-steps", "1", "--max-train-examples", "16", "--max-eval-examples", "8", "--batch-size", "8",
        "--eval-batch-size", "8", "--max-len", "16", "--no-eval-before", "--no-select-on-validation", "--no-progress"]


def _env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)


def _one_error(err: str, prefix: str) -> str:
    """The single ``error:`` line of ``err``, which must start with ``prefix``; no traceback."""
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(prefix), err[-1000:]
    return lines[0]


def _usage_error(capsys, argv: list, command: str) -> str:
    """``vectorfit COMMAND ...`` ends as argparse ends a bad flag: usage, one error line, status 2."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"usage: vectorfit {command}" in err, err[-1000:]
    return _one_error(err, f"vectorfit {command}: error: ")


# ------------------------------------------------------------------------------ 1. checkpoints
class _Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could do with any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _tiny_state(seed: int = 0):
    """A tiny model with AVF-free VectorFit, its optimizer after one step, and a data-order generator."""
    torch.manual_seed(seed)
    model = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", svd_cache=False, progress=False))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=torch.randint(0, 50, (2, 6))).logits.sum().backward()
    opt.step()
    return model, opt, torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("how", ["torch.save", "plain pickle"])
def test_a_planted_checkpoint_is_refused_and_its_code_never_runs(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "r.json.ckpt"
    cfg = TrainConfig()
    blob = {"format": checkpoint.FORMAT, "identity": checkpoint.identity(cfg), "loop": _Payload(marker)}
    if how == "torch.save":
        torch.save(blob, path)
    else:  # torch.load also reads an old-style bare pickle
        path.write_bytes(pickle.dumps(blob))
    model, opt, gen = _tiny_state()
    with pytest.raises(checkpoint.UnsafeCheckpoint, match=r"refusing to load checkpoint .*r\.json\.ckpt.*could run "
                                                           r"code.*Delete it"):
        checkpoint.load(path, cfg, model, opt, gen, log=lambda *_: None)
    assert not marker.exists()
    assert path.exists()  # left for the user to look at, not overwritten


def test_train_stops_at_a_planted_checkpoint_with_one_line(tmp_path, capsys):
    """The whole command: ``vectorfit train --output X`` with a planted ``X.ckpt`` beside it."""
    marker = tmp_path / "MARKER"
    out = tmp_path / "r.json"
    torch.save({"format": checkpoint.FORMAT, "loop": _Payload(marker)}, checkpoint.checkpoint_path(str(out)))
    assert cli.main(["train", *TINY, "--output", str(out)]) == 2
    line = _one_error(capsys.readouterr().err, "vectorfit: error: refusing to load checkpoint")
    assert f"{out}.ckpt" in line and not marker.exists() and not out.exists()


def test_a_checkpoint_is_tensors_and_plain_data_and_restores_every_stream(tmp_path):
    path = tmp_path / "r.json.ckpt"
    cfg = TrainConfig(output=str(tmp_path / "r.json"))
    model, opt, gen = _tiny_state()
    torch.randperm(5, generator=gen)
    random.seed(3)
    np.random.seed(4)
    np.random.normal()  # numpy keeps a cached Gaussian: part of its state
    state = checkpoint.LoopState(step=1, perm=[3, 1, 2], losses=[0.5], curve=[{"step": 1, "test": 0.5}],
                                 best_state=[p.detach().clone() for p in model.parameters() if p.requires_grad])
    checkpoint.save(path, cfg, state, model, opt, gen)
    # what weights_only accepts by default (no numpy, no custom classes): nothing to allow-list
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"format", "identity", "loop", "model", "optimizer", "rng"}
    expected = (torch.rand(3, generator=gen), torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))

    fresh, fresh_opt, fresh_gen = _tiny_state(seed=1)  # other weights, moments and streams
    lines: list = []
    resumed = checkpoint.load(path, cfg, fresh, fresh_opt, fresh_gen, log=lines.append)
    assert resumed is not None and resumed.step == 1 and resumed.perm == [3, 1, 2] and resumed.resumed_from == [1]
    assert lines == [f"[vectorfit] resuming from {path} at step 1"]
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert str(opt.state_dict()) == str(fresh_opt.state_dict())
    got = (torch.rand(3, generator=fresh_gen), torch.rand(3), random.random(), np.random.normal(), np.random.rand(2))
    for a, b in zip(expected, got):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_written_before_the_plain_form_still_resumes(tmp_path):
    """Runs stopped by the previous version kept numpy's state as an array: they resume."""
    path = tmp_path / "r.json.ckpt"
    cfg = TrainConfig(output=str(tmp_path / "r.json"))
    model, opt, gen = _tiny_state()
    np.random.seed(7)
    blob = {"format": checkpoint.FORMAT, "identity": checkpoint.identity(cfg),
            "loop": {"step": 2}, "model": checkpoint._model_state(model), "optimizer": opt.state_dict(),
            "rng": {"generator": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate(),
                    "numpy": np.random.get_state()}}
    torch.save(blob, path)
    expected = np.random.rand(3)
    np.random.seed(8)
    state = checkpoint.load(path, cfg, *_tiny_state(seed=1), log=lambda *_: None)
    assert state is not None and state.step == 2 and np.array_equal(np.random.rand(3), expected)


# ------------------------------------------------------------------------------ 2, 5, 8. generate
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(base folder with tokenizer, VectorFit adapter trained on it, that adapter merged and saved as a
    full model without tokenizer)."""
    from test_generation import _save_tiny_llama
    from transformers import AutoModelForCausalLM

    from conftest import train_steps

    root = tmp_path_factory.mktemp("hardening")
    base = _save_tiny_llama(root / "base", 0)
    vf = get_vectorfit_model(AutoModelForCausalLM.from_pretrained(base), VectorFitConfig(progress=False))
    ids = torch.randint(4, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    vf.train()
    train_steps(vf, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, steps=3, lr=5e-3)
    vf.save_pretrained(root / "adapter")
    vf.eval()
    vf.merge_and_unload().save_pretrained(root / "merged")
    return base, root / "adapter", root / "merged"


def _generate_error(capsys, argv: list) -> str:
    return _usage_error(capsys, ["generate", *argv], "generate")


def _jsonl(capsys, argv: list) -> list:
    assert cli.main(["generate", *argv, "--jsonl", "--max-new-tokens", "5", "--no-chat"]) == 0
    captured = capsys.readouterr()
    return [json.loads(line)["output"] for line in captured.out.splitlines()], captured.err


def test_a_params_adapter_that_holds_no_tensor_is_refused(llama, tmp_path, capsys):
    from safetensors.torch import save_file

    base, _, _ = llama
    (tmp_path / "empty").mkdir()
    save_file({}, str(tmp_path / "empty" / "model.safetensors"))
    err = _generate_error(capsys, ["--model", str(base), "--prompt", "w5", "--adapter", str(tmp_path / "empty")])
    assert f"{tmp_path / 'empty' / 'model.safetensors'} holds no tensors, so it would change nothing" in err


@pytest.mark.parametrize("kind", ["params", "vectorfit", "peft"])
def test_a_damaged_safetensors_adapter_is_refused_naming_the_file(llama, tmp_path, capsys, kind):
    import shutil

    base, adapter, _ = llama
    folder = tmp_path / kind
    if kind == "params":
        folder.mkdir()
        weights = folder / "model.safetensors"
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    elif kind == "vectorfit":
        shutil.copytree(adapter, folder)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=1, target_modules=["q_proj"])) \
            .save_pretrained(folder)
        weights = folder / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    err = _generate_error(capsys, ["--model", str(base), "--prompt", "w5", "--adapter", str(folder)])
    assert f"cannot use --adapter {folder}" in err and str(weights) in err, err


def test_a_merged_model_is_refused_as_an_adapter_and_needs_a_tokenizer_as_a_model(llama, capsys):
    base, adapter, merged = llama
    err = _generate_error(capsys, ["--model", str(base), "--prompt", "w5", "--adapter", str(merged)])
    assert f"--adapter {merged}: this folder is a merged (full) model" in err and f"pass it as --model {merged}" in err
    err = _generate_error(capsys, ["--model", str(merged), "--prompt", "w5"])
    assert f"--model {merged}: the folder has no tokenizer files" in err and "--tokenizer" in err
    # as the messages say: the merged folder as --model, the tokenizer from the base it was trained on
    prompts = ["--prompt", "w5 w6 w7", "--prompt", "w9 w10"]
    with_adapter, _ = _jsonl(capsys, ["--model", str(base), "--adapter", str(adapter), *prompts])
    as_model, err = _jsonl(capsys, ["--model", str(merged), "--tokenizer", str(base), *prompts])
    assert as_model == with_adapter and any(with_adapter), err
    err = _generate_error(capsys, ["--model", str(base), "--tokenizer", str(merged), "--prompt", "w5"])
    assert f"--tokenizer {merged}: the folder has no tokenizer files" in err


# ------------------------------------------------------------------------------ 3. report
def _result(run: bench.Run, test: float) -> dict:
    return {"task": run.task, "model": run.model, "method": run.method, "seed": run.seed, "lr": run.lr,
            "metric": "accuracy", "test": test, "validation": test, "trainable_params": 5, "total_params": 10,
            "train_seconds": 1.0, "config": {"epochs": 1}}


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_report_refuses_an_unusable_out_in_one_line(tmp_path, capsys):
    results = tmp_path / "results"
    _write(bench.runs_of("main")[0].path(results), _result(bench.runs_of("main")[0], 0.7))
    a_file = _write(tmp_path / "a_file", "x")
    base = ["report", "--results", str(results), "--suites", "main", "--notes", str(tmp_path / "none.md")]
    cases = [(tmp_path, f"--out {tmp_path}: it is a folder; give the report's file name"),
             (a_file / "R.md", f"--out {a_file}/R.md: {a_file} is a file"),
             (Path("/proc/vectorfit/R.md"), "--out /proc/vectorfit/R.md: cannot write in /proc")]
    for out, expected in cases:
        assert expected in _usage_error(capsys, [*base, "--out", str(out)], "report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "results"]  # no plots/ made on the way


def test_report_skips_unusable_result_files_with_a_warning_each(tmp_path, capsys):
    results = tmp_path / "results"
    good, *bad_runs = bench.runs_of("main")[:6]
    _write(good.path(results), _result(good, 0.7))
    bad = {
        "a JSON list": ([_result(bad_runs[0], 0.6)], "holds a JSON list, not an object"),
        "a string metric": ({**_result(bad_runs[1], 0.6), "test": "0.6"}, "'test' is '0.6'; a finite number"),
        "no task": ({k: v for k, v in _result(bad_runs[2], 0.6).items() if k != "task"}, "'task' is missing"),
        "a NaN metric": ({**_result(bad_runs[3], 0.6), "validation": float("nan")}, "'validation' is nan"),
        "not JSON": ("{", "cannot be read as JSON"),
    }
    paths = {what: _write(run.path(results), content) for (what, (content, _)), run in zip(bad.items(), bad_runs)}
    out = tmp_path / "R.md"
    assert cli.main(["report", "--results", str(results), "--out", str(out), "--suites", "main",
                     "--notes", str(tmp_path / "none.md")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("vectorfit report: skipping ")]
    assert len(warnings) == len(bad), err
    for what, (_, why) in bad.items():
        assert any(f"skipping {paths[what]}: {why}" in w for w in warnings), (what, warnings)
    text = out.read_text()
    assert "from 1 result files" in text and "| VectorFit | 70.00 (n=1) |" in text


def test_a_partial_curve_file_that_is_unusable_is_skipped_too(tmp_path, capsys):
    from vectorfit_recipes import report_curves

    run = bench.runs_of("curves-rates")[0]
    part = _write(checkpoint.partial_path(str(run.path(tmp_path))),
                  {**_result(run, 0.5), "partial": True, "curve": [{"step": 2, "test": "high"}]})
    assert report_curves.load_partials(tmp_path, "curves-rates") == []
    err = capsys.readouterr().err
    assert f"vectorfit report: skipping {part}: the 'curve' point at step 2 has test 'high'" in err


# ------------------------------------------------------------------------------ 4. bench
@pytest.mark.parametrize("flags, expected", [
    (["--threads", "0"], "--threads 0: must be >= 1"),
    (["--threads", "-2"], "--threads -2: must be >= 1"),
    (["--limit", "-1"], "--limit -1: must be >= 0"),
    (["--jobs", "0"], "--jobs 0: must be >= 1"),
    (["--stop-at-step", "0"], "--stop-at-step 0: must be >= 1"),
])
def test_bench_rejects_numbers_out_of_range(tmp_path, capsys, flags, expected):
    argv = ["bench", "--suite", "smoke", "--results", str(tmp_path), "--dry-run", *flags]
    assert expected in _usage_error(capsys, argv, "bench")
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_a_results_folder_it_cannot_write(tmp_path, capsys):
    a_file = _write(tmp_path / "a_file", "x")
    for results, expected in ((a_file / "results", f"--results {a_file}/results: {a_file} is a file"),
                              (a_file, f"--results {a_file}: it is a file; give a folder"),
                              (Path("/proc/vectorfit"), "--results /proc/vectorfit: cannot write in /proc")):
        argv = ["bench", "--suite", "smoke", "--results", str(results), "--limit", "1"]
        assert expected in _usage_error(capsys, argv, "bench")
    with pytest.raises(SystemExit, match="--threads 0: must be >= 1"):  # the Python API checks the same
        bench.run_suite("smoke", tmp_path, threads=0, log=lambda *_: None)


def test_bench_status_counts_a_damaged_result_as_done_without_failing(tmp_path, capsys):
    first, second = bench.runs_of("smoke")[:2]
    _write(first.path(tmp_path), "[1, 2]")
    _write(second.path(tmp_path), "{")
    assert cli.main(["bench", "--suite", "smoke", "--results", str(tmp_path), "--status"]) == 0
    assert [row["state"] for row in bench_status.status("smoke", tmp_path)] == ["done", "done"]


# ------------------------------------------------------------------------------ 6. data fetch
def test_data_fetch_with_a_cache_under_a_file_says_so_in_one_line(tmp_path):
    a_file = _write(tmp_path / "a_file", "x")
    env = _env(VECTORFIT_CACHE=str(a_file / "cache"))
    env.pop("VECTORFIT_ASSETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "vectorfit_recipes", "data", "fetch", "movie"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_error(proc.stderr, "vectorfit: error: cannot use the cache folder")
    assert f"$VECTORFIT_CACHE={a_file / 'cache'}" in line and f"{a_file} is a file" in line
    assert "point VECTORFIT_CACHE" in line


# ------------------------------------------------------------------------------ 7. progress in logs
PROGRESS_SCRIPT = """
import sys, time
from vectorfit import progress
progress.DELAY_S = 0.0
if sys.argv[1] == "bar":
    bar = progress.svd_bar(20, True)
    for _ in range(20):
        time.sleep(0.12)  # slower than tqdm's refresh interval: a bar would redraw at every step
        bar.update(1)
    bar.close()
else:
    import torch, transformers as T
    from vectorfit import VectorFitConfig, get_vectorfit_model
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=48, max_position_embeddings=64)
    get_vectorfit_model(T.BertForSequenceClassification(cfg), VectorFitConfig(svd_cache=False, progress=True))
"""


@pytest.mark.parametrize("how", ["bar", "model"])
def test_the_svd_progress_writes_two_lines_into_a_log(tmp_path, how):
    env = _env()
    env.pop("VECTORFIT_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-c", PROGRESS_SCRIPT, how], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # a terminal shows each carriage return as a redraw; a log file, as a line of its own
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr) if "VectorFit: fingerprint + SVD" in line]
    total = 20 if how == "bar" else 12  # 2 layers x (q, k, v, o, f1, f2)
    assert len(lines) == 2, proc.stderr[-2000:]
    assert f"{total} matrices to decompose" in lines[0] and re.search(rf"{total}/{total} matrices in \d", lines[1])
