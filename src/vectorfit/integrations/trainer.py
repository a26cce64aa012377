"""Adaptive Vector Freezing inside Hugging Face's ``Trainer``.

A thin adapter over the plain-loop API: the callback calls ``model.avf.step(step)`` between the
backward pass and the optimizer step, exactly where a plain loop calls it. AVF's state lives in
buffers of the model, so it is written into every Trainer checkpoint with the model's weights and
restored by ``resume_from_checkpoint``; the callback itself holds no state.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..avf import AdaptiveVectorFreezing


def _find_avf(model: Optional[nn.Module]) -> Optional[AdaptiveVectorFreezing]:
    while model is not None:
        avf = getattr(model, "avf", None)
        if isinstance(avf, AdaptiveVectorFreezing):
            return avf
        model = getattr(model, "module", None)  # DDP / accelerate wrappers
    return None


class AVFCallback(TrainerCallback):
    """Runs Adaptive Vector Freezing in ``transformers.Trainer``.

    Usage: ``Trainer(model=vectorfit_model, ..., callbacks=[AVFCallback()])``. AVF fields left
    ``None`` in the config are derived from the Trainer's ``max_steps`` and epoch length.
    """

    def __init__(self) -> None:
        self._avf: Optional[AdaptiveVectorFreezing] = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any) -> None:
        self._avf = _find_avf(model)
        if self._avf is None:
            raise ValueError(
                "AVFCallback needs a VectorFitModel whose variant uses AVF ('vectorfit'); "
                "this model has none — drop the callback or use variant='vectorfit'"
            )
        epochs = max(1, math.ceil(state.num_train_epochs or 1))
        self._avf.set_total_steps(state.max_steps, steps_per_epoch=max(1, state.max_steps // epochs))

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any) -> None:
        # state.global_step counts finished optimizer steps; the step about to run is the next one.
        self._avf.step(state.global_step + 1)
