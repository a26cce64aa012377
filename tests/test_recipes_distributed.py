"""``vectorfit train`` under ``torch.distributed.run`` (2 real processes, gloo, CPU) against one process
with the same global batch, on a tiny slice of the real movie data with the real MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vectorfit_recipes.train import TrainConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from dist_recipe_driver import load_without_dropout  # noqa: E402

# Batches of 7 from 64 examples: shares of 3 and 4, and a last batch of 1 that one rank has no share of.
SETTINGS = dict(max_train_examples=64, max_eval_examples=24, batch_size=7, eval_batch_size=24, max_len=32,
                epochs=2, avf_k=2, threads=1, progress=False)


def _flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() if k != "progress"
            for x in (f"--{k.replace('_', '-')}", str(v))] + ["--no-progress"]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path, monkeypatch):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).parent / "dist_recipe_driver.py"), "train", *_flags(SETTINGS),
           "--output", str(out / "result.json"), "--save-adapter", str(out / "adapter")]
    env = dict(os.environ, OMP_NUM_THREADS="1", VECTORFIT_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads((out / "result.json").read_text())

    # The reference: one process, the whole batch, the same model (dropout 0), in this interpreter.
    monkeypatch.setattr("vectorfit_recipes.models.load_model", load_without_dropout)
    one = run(TrainConfig(**SETTINGS, save_adapter=str(tmp_path / "one")), log=lambda *_: None)

    assert two["processes"] == 2 and "processes" not in one
    assert two["steps"] == one["steps"] == 20
    assert one["avf"]["history"] and two["avf"]["history"] == one["avf"]["history"]
    for key in ("test_before", "test", "validation", "best_epoch"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert [v["accuracy"] for v in two["validation_history"]] == pytest.approx(
        [v["accuracy"] for v in one["validation_history"]], abs=1e-4)
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-4)
    a, b = load_file(out / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("attention.self.key.vectorfit_bias"):
            # Softmax ignores a constant added to every score, and q.(k + b) adds q.b to all of them:
            # the key bias's true gradient is 0, its computed one is round-off, and AdamW turns any
            # round-off into steps of about lr. So it differs between any two summation orders.
            continue
        # summation order differs (shares, all-reduce): round-off, amplified a little by 20 AdamW steps
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)

    # Only rank 0 wrote or logged: the result and the adapter, no checkpoint, each line once.
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "result.json"]
    assert proc.stdout.count("test accuracy after fine-tuning") == 1
    assert proc.stdout.count("adapter saved to") == 1


@pytest.mark.slow
def test_accelerate_launch_runs_data_parallel(tmp_path):
    """``accelerate launch -m vectorfit train`` on the CPU. accelerate's ``--cpu`` flag starts ONE
    process (several only through mpirun); ``--multi_gpu`` is its torchrun launcher, which on a
    machine without GPUs starts CPU processes with torchrun's variables (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT), which the recipe reads. The numbers are the torchrun test's
    business (same code path); this checks that the launcher starts a 2-process gloo run of the
    real command, with dropout, in which only rank 0 evaluates and writes."""
    pytest.importorskip("accelerate")
    out = tmp_path / "acc"
    small = dict(max_train_examples=16, max_eval_examples=8, batch_size=8, eval_batch_size=8, max_len=16,
                 epochs=2, avf_k=2, threads=1, progress=False)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "vectorfit", "train", *_flags(small), "--output", str(out / "result.json")]
    env = dict(os.environ, OMP_NUM_THREADS="1", VECTORFIT_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2 and result["steps"] == 4
    assert "data parallel over 2 processes (gloo)" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["result.json"]
    assert proc.stdout.count("test accuracy after fine-tuning") == 1
