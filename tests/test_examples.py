"""Every script in examples/ runs (in a real subprocess, on the real MiniLM and movie data, with a
tiny slice so that CI stays fast), and leaves the adapter it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = ["--train-examples", "48", "--epochs", "1", "--eval-examples", "24"]


def _run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_every_example_is_tested():
    tested = {"train_plain_loop.py", "train_with_trainer.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.slow
def test_plain_loop_example(tmp_path):
    proc = _run("train_plain_loop.py", TINY + ["--batch-size", "16"], tmp_path)
    out = proc.stdout
    assert "trainable params:" in out and "test accuracy before:" in out and "test accuracy of the merged model:" in out
    assert "AVF steps: [2, 3]" in out  # 3 steps: AVF from 40% of the run, every step after
    adapter = tmp_path / "out" / "plain_loop_adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 300_000


@pytest.mark.slow
def test_trainer_example(tmp_path):
    proc = _run("train_with_trainer.py", TINY, tmp_path)
    out_dir = tmp_path / "out" / "trainer"
    files = {p.name for p in out_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "vectorfit_avf_state.safetensors"} <= files
    assert "model.safetensors" not in files
    checkpoints = sorted(p for p in out_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints and all((c / "adapter_model.safetensors").is_file() for c in checkpoints)
    assert "test_accuracy" in proc.stdout and "predictions for two new sentences" in proc.stdout
