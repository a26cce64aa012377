"""Pretrained models that ship inside PyPI packages, loaded offline."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import assets

__all__ = ["ModelInfo", "MODELS", "POOLINGS", "MODEL_KINDS", "get_model_info", "model_path", "set_offline",
           "load_tokenizer", "load_model", "load_causal_lm", "use_mean_pooling"]

#: ``encoder``: a sentence encoder, loaded with a new sequence-classification head (classification
#: and regression tasks); ``causal``: a decoder-only language model, loaded as it is (generation tasks).
MODEL_KINDS = ("encoder", "causal")

#: How the sequence-classification head reads the encoder: ``mean`` = the attention-masked mean of the
#: last hidden states (the pooling these sentence-transformers checkpoints were trained with, see
#: their ``1_Pooling/config.json``); ``pooler`` = transformers' default, ``tanh(dense(h_CLS))``, whose
#: dense layer the sentence-transformers training never used and which only full fine-tuning trains.
POOLINGS = ("mean", "pooler")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    asset: str
    subdir: str
    description: str
    kind: str = "encoder"  # one of MODEL_KINDS


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in [
        ModelInfo("minilm", "minilm", "model",
                  "all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M params); the default"),
        ModelInfo("mpnet", "mpnet", "model",
                  "all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 109.5M params); ~8x slower than minilm"),
        ModelInfo("smollm2", "smollm2", "model",
                  "SmolLM2-135M-Instruct (Llama causal LM, 30 layers, hidden 576, 134.5M params, no biases; "
                  "de-quantised from a 4-bit GGUF); generation tasks only", kind="causal"),
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


def _resolve_path(name_or_path: str | os.PathLike) -> Path:
    """A key of :data:`MODELS` -> its cached folder; anything else must be a local Hugging Face folder."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return model_path(name_or_path)
    p = Path(name_or_path).expanduser()
    if not (p / "config.json").is_file():
        raise ValueError(f"{str(name_or_path)!r} is neither a known model ({', '.join(sorted(MODELS))}) nor a "
                         f"local Hugging Face model folder (a folder with a config.json)")
    return p


def load_tokenizer(name: str | os.PathLike) -> Any:
    """The tokenizer of a model of :data:`MODELS`, or of a local Hugging Face folder."""
    set_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_resolve_path(name)))


def load_causal_lm(name_or_path: str | os.PathLike, **kwargs: Any) -> Any:
    """An fp32 ``AutoModelForCausalLM`` (``smollm2``, or a local Hugging Face folder), in eval mode.

    SmolLM2 is a Llama: its linear layers (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``)
    have no biases, and its output head is tied to the input embeddings.
    """
    set_offline()
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(name_or_path, str) and name_or_path in MODELS and get_model_info(name_or_path).kind != "causal":
        raise ValueError(f"model {name_or_path!r} is a sentence encoder, not a causal language model; "
                         f"causal models: {', '.join(m.name for m in MODELS.values() if m.kind == 'causal')}")
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(_resolve_path(name_or_path)), **kwargs).eval()


def load_model(name: str, num_labels: int, pooling: str = "mean", **kwargs: Any) -> Any:
    """``AutoModelForSequenceClassification`` with a new head of ``num_labels`` outputs.

    Args:
        name: a key of :data:`MODELS`.
        num_labels: head outputs; ``1`` makes a regression head (MSE loss).
        pooling: one of :data:`POOLINGS`. ``mean`` replaces a BERT-style ``pooler`` by
            :class:`MaskedMeanPooler` (no parameters), so every method's head is the same single
            linear ``classifier`` over the features the checkpoint was trained to produce.
        **kwargs: passed to ``from_pretrained``.

    Returns:
        The model. The head is initialised from torch's global RNG: seed before calling.
    """
    set_offline()
    from transformers import AutoModelForSequenceClassification

    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not known; choose one of {', '.join(POOLINGS)}")
    if num_labels == 1:
        kwargs.setdefault("problem_type", "regression")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_path(name)), num_labels=num_labels, **kwargs)
    if pooling == "mean":
        use_mean_pooling(model)
    return model


@functools.lru_cache(maxsize=None)
def _mean_pooler_class() -> type:
    # Built on first use: this module is imported by `vectorfit --help`, which should not load torch.
    import torch
    from torch import nn

    class MaskedMeanPooler(nn.Module):
        """Mean of the last hidden states over the real (attention-mask 1) tokens.

        transformers calls a BERT pooler with the hidden states only, so a forward pre-hook on the
        encoder hands it the attention mask of the same call (``self.mask``)."""

        def __init__(self) -> None:
            super().__init__()
            self.mask: Any = None

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            if self.mask is None:
                return hidden.mean(dim=1)
            m = self.mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)

    return MaskedMeanPooler


def use_mean_pooling(model: Any) -> Any:
    """Replace the ``pooler`` of a BERT-style ``*ForSequenceClassification`` model in place by a
    parameter-free masked mean (see :data:`POOLINGS`). Raises ``ValueError`` for models whose head
    does not read a ``pooler`` (e.g. MPNet's own classification head)."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(f"{type(model).__name__} has no BERT-style pooler to replace; use pooling='pooler'")
    pooler = _mean_pooler_class()()
    encoder.pooler = pooler

    def remember_mask(module: Any, args: tuple, kwargs: dict) -> None:
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
    return model
