"""Adaptive Vector Freezing in Hugging Face's ``Trainer`` (and every trainer built on it: TRL's
``SFTTrainer``, ``DPOTrainer``, ...).

A VectorFit model is a ``peft.PeftModel``, so a plain ``Trainer`` already saves the adapter in
``save_model()`` and in every ``checkpoint-*`` (``adapter_config.json`` +
``adapter_model.safetensors``, AVF state included), and ``resume_from_checkpoint`` loads it back.
What the Trainer cannot know is when to freeze: :class:`AVFCallback` calls ``model.avf.step(step)``
between the backward pass and the optimizer step, exactly where a plain loop calls it, and derives
the AVF schedule from the Trainer's ``max_steps`` and epoch length.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..avf import AdaptiveVectorFreezing, AVFError
from ..notices import warn

__all__ = ["AVFCallback", "VectorFitTrainer"]


def _find_avf(model: Optional[nn.Module]) -> Optional[AdaptiveVectorFreezing]:
    """The active adapter's AVF controller of ``model`` (itself, or under DDP / accelerate wrappers)."""
    while model is not None:
        avf = getattr(model, "avf", None)
        if isinstance(avf, AdaptiveVectorFreezing):
            return avf
        model = getattr(model, "module", None)
    return None


class AVFCallback(TrainerCallback):
    """Runs Adaptive Vector Freezing in ``transformers.Trainer``.

    Usage: ``Trainer(model=peft_model, ..., callbacks=[AVFCallback()])`` (also ``SFTTrainer``). AVF
    fields left ``None`` in the config are derived from the Trainer's ``max_steps`` and epoch length.
    A resumed run (``resume_from_checkpoint``) continues the checkpoint's AVF state, which the adapter
    file carries; a *new* run on an adapter that already went through AVF steps starts AVF afresh.
    """

    def __init__(self) -> None:
        self._avf: Optional[AdaptiveVectorFreezing] = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any) -> None:
        self._avf = _find_avf(model)
        if self._avf is None:
            raise ValueError(
                "AVFCallback needs a VectorFit model whose variant uses AVF ('vectorfit'); "
                "this model has none: drop the callback or use variant='vectorfit'"
            )
        if state.global_step == 0 and int(self._avf.num_done) > 0:
            warn(f"the model's AVF state holds {int(self._avf.num_done)} AVF step(s) of an earlier run, but this run starts "
                 "at step 0: AVF starts afresh (model.avf.reset()); pass resume_from_checkpoint to continue a run instead")
            self._avf.reset()
        epochs = max(1, math.ceil(state.num_train_epochs or 1))
        self._avf.set_total_steps(state.max_steps, steps_per_epoch=max(1, state.max_steps // epochs))
        if state.global_step > 0:  # a resumed run: the checkpoint must have brought the AVF state along
            due = sum(1 for t in self._avf.schedule() if t <= state.global_step)
            if int(self._avf.num_done) < due:
                raise AVFError(
                    f"resuming at step {state.global_step}, where {due} AVF step(s) should have run, but the model's AVF "
                    f"state records {int(self._avf.num_done)}: the checkpoint lacks the AVF state (an adapter file saved "
                    "without it?); resume from a checkpoint the Trainer wrote with this model")

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # state.global_step counts finished optimizer steps; the step about to run is the next one.
        self._avf.step(state.global_step + 1)


class VectorFitTrainer(Trainer):
    """Deprecated: a plain ``transformers.Trainer`` does everything this class did, now that a VectorFit
    model is a ``peft.PeftModel``. This alias adds an :class:`AVFCallback` when the model uses AVF and
    none was passed; write ``Trainer(..., callbacks=[AVFCallback()])`` instead."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        warnings.warn("VectorFitTrainer is deprecated: use transformers.Trainer(..., callbacks=[vectorfit.integrations.AVFCallback()])",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
        if _find_avf(self.model) is not None and not any(isinstance(c, AVFCallback) for c in self.callback_handler.callbacks):
            self.add_callback(AVFCallback())
