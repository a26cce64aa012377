"""The `vectorfit` command: flags from TrainConfig, and one real end-to-end run on a tiny slice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vectorfit_recipes import cli
from vectorfit_recipes.train import TrainConfig

RESULT_KEYS = {
    "schema_version", "task", "model", "method", "method_config", "seed", "metric", "test_before", "test",
    "validation", "trainable_params", "total_params", "adapter_bytes", "steps", "train_seconds",
    "train_cpu_seconds", "wall_seconds", "peak_rss_mb", "avf", "training_strengths", "config", "versions",
}

# a few optimizer steps on a tiny slice of the real data
TINY = ["--max-steps", "3", "--max-train-examples", "64", "--max-eval-examples", "24", "--batch-size", "8",
        "--eval-batch-size", "24", "--max-len", "32", "--avf-start", "2", "--avf-interval", "1",
        "--avf-num-freezes", "2", "--no-progress"]


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_dataclass_arguments(p, TrainConfig)
    return p


def test_every_field_is_a_flag_with_help():
    p = _train_parser()
    by_dest = {a.dest: a for a in p._actions}
    for f in dataclasses.fields(TrainConfig):
        assert f.name in by_dest, f"no flag for {f.name}"
        assert f.metadata.get("help"), f"no help text for {f.name}"
        assert f"--{f.name.replace('_', '-')}" in by_dest[f.name].option_strings
    # defaults of the parser are the dataclass defaults
    assert cli.dataclass_from_args(TrainConfig, p.parse_args([])) == TrainConfig()


def test_flags_parse_to_typed_config():
    p = _train_parser()
    cfg = cli.dataclass_from_args(TrainConfig, p.parse_args(
        ["--task", "bbc", "--seed", "3", "--lr", "0.01", "--max-train-examples", "none", "--no-eval-before",
         "--avf-start", "7"]))
    assert cfg.task == "bbc" and cfg.seed == 3 and cfg.lr == 0.01
    assert cfg.max_train_examples is None and cfg.eval_before is False and cfg.avf_start == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--method", "not-a-method"])


def test_no_command_means_train():
    assert cli.normalize_argv([]) == ["train"]
    assert cli.normalize_argv(["--seed", "1"]) == ["train", "--seed", "1"]
    assert cli.normalize_argv(["--help"]) == ["--help"]
    assert cli.normalize_argv(["data", "list"]) == ["data", "list"]
    ns = cli.build_parser().parse_args(cli.normalize_argv([]))
    assert ns.command == "train" and cli.dataclass_from_args(TrainConfig, ns) == TrainConfig()


def test_help_and_data_list(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--max-len" in out and "--method" in out and "--seed" in out
    assert cli.main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "movie" in out and "minilm" in out and "vaderSentiment==3.3.2" in out


def _vectorfit_command() -> list[str]:
    script = Path(sys.executable).with_name("vectorfit")
    if script.exists():  # the installed console script
        return [str(script)]
    return [sys.executable, "-m", "vectorfit_recipes"]


def test_output_into_a_closed_pipe_ends_quietly_like_a_unix_tool(tmp_path):
    """`vectorfit data list | head -1`: the reader goes away before the command writes. The command
    must end with SIGPIPE's status (141), as `cat` would, not with a BrokenPipeError traceback."""
    cmd = _vectorfit_command() + ["data", "list"]
    reader, writer = os.pipe()
    os.close(reader)  # no reader left: the command's first write fails with EPIPE
    try:
        proc = subprocess.run(cmd, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(writer)
    assert proc.returncode == 141, proc.stderr[-2000:]  # (a command that wrote nothing would return 0)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr[-2000:]


def test_train_end_to_end_subprocess(tmp_path):
    out = tmp_path / "result.json"
    adapter = tmp_path / "adapter"
    cmd = _vectorfit_command() + ["train", *TINY, "--output", str(out), "--save-adapter", str(adapter)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "test accuracy before fine-tuning" in proc.stdout
    assert "test accuracy after fine-tuning" in proc.stdout
    assert "trainable parameters: 35,330" in proc.stdout  # 6 x (2,304 singular values + 3,456 biases) + head 770

    r = json.loads(out.read_text())
    assert RESULT_KEYS <= set(r)
    assert (r["task"], r["model"], r["method"], r["metric"], r["steps"]) == ("movie", "minilm", "vectorfit", "accuracy", 3)
    assert 0.0 <= r["test"] <= 1.0 and 0.0 <= r["test_before"] <= 1.0
    assert r["trainable_params"] == 35330 and r["total_params"] > 22_000_000
    assert r["n_train"] == 64 and r["n_test"] == 24
    assert r["avf"]["schedule"] == [2, 3]
    assert len(r["avf"]["history"]) == 2
    assert len(r["training_strengths"]) == 6 * 12  # 6 layers x 6 targets x (sigma, bias)
    assert r["config"]["max_steps"] == 3
    assert (adapter / "adapter_config.json").is_file()
    assert 0 < r["adapter_bytes"] < 1_000_000


def test_train_is_deterministic_in_process():
    from vectorfit_recipes.train import run

    p = _train_parser()
    args = TINY[:] + ["--max-steps", "2", "--no-eval-before", "--no-select-on-validation"]
    cfg = cli.dataclass_from_args(TrainConfig, p.parse_args(args))
    a = run(cfg, log=lambda *_: None)
    b = run(cfg, log=lambda *_: None)
    assert a["test"] == b["test"] and a["final_train_loss"] == b["final_train_loss"]
    assert a["training_strengths"] == b["training_strengths"]
    assert a["avf"]["history"] == b["avf"]["history"]


def test_low_memory_flag_trains_identically_and_is_restored():
    """``--low-memory`` changes what the VectorFit layers keep for the backward, not the numbers; the
    process-wide setting is restored after the run."""
    import dataclasses as dc

    from vectorfit.functional import low_memory_enabled
    from vectorfit_recipes.train import run

    p = _train_parser()
    # 32 x 64 tokens: minilm's attention projections take the dense path, whose saved state differs
    args = TINY[:] + ["--max-steps", "2", "--batch-size", "32", "--max-len", "64", "--no-eval-before",
                      "--no-select-on-validation"]
    cfg = cli.dataclass_from_args(TrainConfig, p.parse_args(args + ["--low-memory"]))
    assert cfg.low_memory is True
    low = run(cfg, log=lambda *_: None)
    assert low_memory_enabled() is False
    default = run(dc.replace(cfg, low_memory=False), log=lambda *_: None)
    assert low["test"] == default["test"] and low["final_train_loss"] == default["final_train_loss"]
    assert low["training_strengths"] == default["training_strengths"]
