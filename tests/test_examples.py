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
    tested = {"train_plain_loop.py", "train_with_trainer.py", "sft_with_trl.py", "dreambooth_unet.py"}
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
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    assert '"peft_type": "VECTORFIT"' in (out_dir / "adapter_config.json").read_text()
    checkpoints = sorted(p for p in out_dir.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints and all((c / "adapter_model.safetensors").is_file() for c in checkpoints)
    assert "test_accuracy" in proc.stdout and "predictions for two new sentences" in proc.stdout


@pytest.mark.slow
def test_sft_example_with_trl(tmp_path):
    """TRL's SFTTrainer with a VectorFit peft_config, on a tiny random Llama with a byte-level chat
    tokenizer (SmolLM2 needs the gguf package, which the test install does not have) and real BBC data."""
    from test_recipes_nlg import make_tiny_llama, make_tokenizer

    tok = make_tokenizer()
    model_dir = tmp_path / "tiny"
    make_tiny_llama(len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    proc = _run("sft_with_trl.py", ["--model", str(model_dir), "--max-steps", "4", "--train-examples", "16",
                                    "--article-tokens", "24"], tmp_path)
    assert "AVF steps taken: [2, 3, 4]" in proc.stdout  # 4 steps: AVF from 40% of the run, every step after
    adapter = tmp_path / "out" / "sft"
    assert '"peft_type": "VECTORFIT"' in (adapter / "adapter_config.json").read_text()
    assert (adapter / "adapter_model.safetensors").stat().st_size < 300_000
    assert "generated:" in proc.stdout


@pytest.mark.slow
def test_dreambooth_unet_example(tmp_path):
    """DreamBooth with prior preservation on a tiny random Stable-Diffusion-style pipeline that the test
    builds (no diffusion weights ship in any package reachable here): 2 instance images, 2 of the 3
    class images on disk (the example generates the third), 2 steps at 32 px. A smoke test of the
    code path: the adapter it saves loads onto the pipeline's UNet and changes its output."""
    pytest.importorskip("diffusers")
    import math
    import re

    import peft
    import torch
    from diffusers import UNet2DConditionModel
    from test_diffusers import make_tiny_sd_pipeline, write_images

    helptext = _run("dreambooth_unet.py", ["--help"], tmp_path).stdout
    flags = ["--pipeline", "--instance-dir", "--instance-prompt", "--class-dir", "--class-prompt", "--num-class-images",
             "--prior-loss-weight", "--lr", "--batch-size", "--max-steps", "--resolution", "--output", "--seed"]
    assert all(f in helptext for f in flags) and "smoke test" in helptext and "(paper" in helptext

    make_tiny_sd_pipeline(tmp_path / "pipe")
    write_images(tmp_path / "instance", 2, seed=0)
    write_images(tmp_path / "class", 2, seed=1)
    proc = _run("dreambooth_unet.py", [
        "--pipeline", str(tmp_path / "pipe"), "--instance-dir", str(tmp_path / "instance"),
        "--instance-prompt", "a photo of sks dog", "--class-dir", str(tmp_path / "class"),
        "--class-prompt", "a photo of dog", "--num-class-images", "3", "--class-inference-steps", "2",
        "--max-steps", "2", "--batch-size", "2", "--resolution", "32", "--output", str(tmp_path / "adapter"),
        "--sample-prompt", "a photo of sks dog", "--seed", "0"], tmp_path)
    out = proc.stdout
    assert "generating 1 class images" in out and len(list((tmp_path / "class").glob("*.png"))) == 3
    assert "trainable params:" in out
    losses = [float(x) for x in re.findall(r"step \d+/2: loss (\S+)", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out
    assert "AVF steps taken: [2]" in out  # 2 steps: AVF from 40% of the run (at least step 2)
    adapter = tmp_path / "adapter"
    assert '"peft_type": "VECTORFIT"' in (adapter / "adapter_config.json").read_text()
    assert (adapter / "sample.png").is_file()

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    g = torch.Generator().manual_seed(0)
    x, t, e = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 16, 16, generator=g)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=e).sample
        loaded = peft.PeftModel.from_pretrained(unet, adapter)
        after = loaded(x, t, encoder_hidden_states=e).sample
    assert torch.isfinite(after).all() and not torch.equal(after, before)
