"""``TrainConfig``: the settings of one ``vectorfit train`` run; every field is a command-line flag."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from . import data as data_mod
from . import models as models_mod
from .methods import METHODS

__all__ = ["TrainConfig"]


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Settings of one training run. Every field is a command-line flag (``--max-len`` etc.)."""

    task: str = field(default="movie", metadata=_help(
        "dataset to train and evaluate on", choices=tuple(data_mod.DATASETS)))
    model: str = field(default="minilm", metadata=_help(
        "pretrained model", choices=tuple(models_mod.MODELS)))
    method: str = field(default="vectorfit", metadata=_help(
        "fine-tuning method: a VectorFit variant (vectorfit = the full method with AVF) or a baseline "
        "(peft LoRA/AdaLoRA/VeRA/IA3/BEFT, BitFit, full fine-tuning)", choices=METHODS))
    seed: int = field(default=0, metadata=_help(
        "seed for head initialisation, dropout and data order; a run is deterministic given the seed"))
    epochs: int = field(default=2, metadata=_help("passes over the (capped) training set"))
    max_steps: Optional[int] = field(default=None, metadata=_help(
        "stop after this many optimizer steps (the AVF schedule is derived from the shortened run)"))
    max_train_examples: Optional[int] = field(default=2000, metadata=_help(
        "cap on training examples (a fixed, seed-independent subsample); none = all"))
    max_eval_examples: Optional[int] = field(default=None, metadata=_help(
        "cap on validation and test examples (fixed subsample); none = the whole split"))
    max_len: int = field(default=64, metadata=_help("maximum sequence length in tokens (longer texts are truncated)"))
    batch_size: int = field(default=32, metadata=_help("training batch size"))
    eval_batch_size: int = field(default=128, metadata=_help("evaluation batch size"))
    lr: Optional[float] = field(default=None, metadata=_help(
        "AdamW learning rate; none = the method's rate from configs/methods.json (see its 'source' there)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (paper: 0)"))
    avf_k: int = field(default=5, metadata=_help("AVF: vectors frozen at each AVF step (paper: 5)"))
    avf_beta: float = field(default=0.99, metadata=_help("AVF: EMA factor of the training strength (paper: 0.99)"))
    avf_start: Optional[int] = field(default=None, metadata=_help(
        "AVF: first AVF step t_i; none = derived from the run length"))
    avf_interval: Optional[int] = field(default=None, metadata=_help(
        "AVF: steps between AVF steps t_f; none = derived (about one epoch)"))
    avf_num_freezes: Optional[int] = field(default=None, metadata=_help(
        "AVF: number of AVF steps n_f; none = derived"))
    eval_before: bool = field(default=True, metadata=_help("measure the test metric before fine-tuning"))
    select_on_validation: bool = field(default=True, metadata=_help(
        "evaluate on validation after each epoch and test the best epoch's weights (else the last)"))
    output: Optional[str] = field(default=None, metadata=_help("write the result as JSON to this file"))
    save_adapter: Optional[str] = field(default=None, metadata=_help(
        "save the trained adapter to this folder"))
    threads: Optional[int] = field(default=None, metadata=_help(
        "torch CPU threads; none = all cores"))
    device: str = field(default="cpu", metadata=_help("torch device (cpu, cuda, ...)"))
    low_memory: bool = field(default=False, metadata=_help(
        "VectorFit layers keep no weight-sized buffer between forward and backward (less memory, "
        "a few percent slower; same numbers): see vectorfit.low_memory"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    pooling: str = field(default="mean", metadata=_help(
        "how the new classification head reads the encoder: mean = attention-masked mean of the last "
        "hidden states (how the sentence-transformers checkpoints were trained; no extra parameters); "
        "pooler = transformers' default tanh(dense(CLS)), whose dense layer only full fine-tuning trains",
        choices=models_mod.POOLINGS))
    eval_steps: Optional[str] = field(default=None, metadata=_help(
        "comma-separated optimizer steps (e.g. 64,128,256) at which validation and test are measured: "
        "the learning curve in the result's 'curve'; none = no curve"))

    def curve_steps(self) -> list[int]:
        """``eval_steps`` as a sorted list of distinct step numbers (empty if none)."""
        if not self.eval_steps:
            return []
        try:
            steps = sorted({int(x) for x in str(self.eval_steps).split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"--eval-steps must be comma-separated integers, got {self.eval_steps!r}") from None
        if steps and steps[0] < 1:
            raise ValueError(f"--eval-steps must be >= 1, got {steps[0]}")
        return steps

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not available; choose one of {', '.join(METHODS)}")
        data_mod.get_dataset_info(self.task)
        models_mod.get_model_info(self.model)
        self.curve_steps()
        for name in ("epochs", "max_len", "batch_size", "eval_batch_size", "avf_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples", "max_eval_examples", "threads",
                     "avf_start", "avf_interval", "avf_num_freezes"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 or none, got {v}")
