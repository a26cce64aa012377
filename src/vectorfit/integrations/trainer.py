"""VectorFit inside Hugging Face's ``Trainer``: Adaptive Vector Freezing and adapter-aware saving.

``AVFCallback`` is a thin adapter over the plain-loop API: it calls ``model.avf.step(step)`` between
the backward pass and the optimizer step, exactly where a plain loop calls it. AVF's state lives in
buffers of the model, so it travels with the model's weights.

``VectorFitTrainer`` is a ``Trainer`` that saves like peft: ``save_model()`` and every
``checkpoint-*`` folder hold the adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
loadable with ``VectorFitModel.from_pretrained``) plus, for AVF variants, the AVF state
(``vectorfit_avf_state.safetensors``), instead of a full ``model.safetensors`` of the base model.
``resume_from_checkpoint`` and ``load_best_model_at_end`` read those files back. A plain
``Trainer`` cannot do this: it calls ``save_pretrained`` only on ``PreTrainedModel`` / peft models and
writes the whole state dict of anything else; with ``AVFCallback`` it still gets the adapter files
in each checkpoint (written after the Trainer's own files), but ``save_model()`` stays a full dump.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .. import adapter_io
from ..avf import AdaptiveVectorFreezing
from ..cache import atomic_write_bytes

__all__ = ["AVFCallback", "VectorFitTrainer", "save_training_state", "load_training_state", "AVF_STATE_NAME"]

#: File holding the AVF controller's buffers (EMA, frozen set, schedule, history) next to an adapter.
AVF_STATE_NAME = "vectorfit_avf_state.safetensors"
_AVF_FORMAT = "vectorfit-avf-state"
_TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


def _find_vectorfit(model: Optional[nn.Module]) -> Any:
    """The ``VectorFitModel`` inside ``model`` (itself, or under DDP / accelerate wrappers), or None."""
    from ..model import VectorFitModel

    while model is not None:
        if isinstance(model, VectorFitModel):
            return model
        model = getattr(model, "module", None)
    return None


def _find_avf(model: Optional[nn.Module]) -> Optional[AdaptiveVectorFreezing]:
    while model is not None:
        avf = getattr(model, "avf", None)
        if isinstance(avf, AdaptiveVectorFreezing):
            return avf
        model = getattr(model, "module", None)  # DDP / accelerate wrappers
    return None


# ------------------------------------------------------------------------------ checkpoint files
def save_training_state(model: nn.Module, directory: Union[str, Path]) -> None:
    """Write what a VectorFit training run needs to continue: the adapter (trained vectors and heads,
    loadable with ``VectorFitModel.from_pretrained``) and, if the variant uses AVF, its state.

    Every file is written to a temporary name and renamed into place.

    Args:
        model: a ``VectorFitModel`` (or a DDP / accelerate wrapper around one).
        directory: created if missing.
    """
    vf = _find_vectorfit(model)
    if vf is None:
        raise TypeError(f"save_training_state needs a VectorFitModel, got {type(model).__name__}")
    vf.save_pretrained(directory)
    if vf.avf is not None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in vf.avf.state_dict().items()}
        meta = {"format": _AVF_FORMAT, "names": json.dumps(vf.avf.names)}
        atomic_write_bytes(Path(directory) / AVF_STATE_NAME, safetensors_bytes(tensors, metadata=meta))


def load_training_state(model: nn.Module, directory: Union[str, Path]) -> None:
    """Load a folder written by :func:`save_training_state` into an already built ``VectorFitModel``
    (the same base model and config), in place: trained vectors, saved heads and AVF state.

    Raises:
        adapter_io.AdapterError: files missing or corrupt, or written for another base model or
            another set of targets / vectors.
    """
    vf = _find_vectorfit(model)
    if vf is None:
        raise TypeError(f"load_training_state needs a VectorFitModel, got {type(model).__name__}")
    directory = Path(directory)
    meta, tensors = adapter_io.load_adapter(directory)
    saved = meta["targets"]
    for name, info in vf._targets.items():  # cheap: compares recorded fingerprints, hashes nothing
        if name not in saved or saved[name]["fingerprint"] != info["fingerprint"]:
            raise adapter_io.AdapterError(
                f"{directory} was not written for this model: target {name!r} is "
                f"{'missing from it' if name not in saved else 'of another base weight (fingerprint mismatch)'}"
            )
    params: dict[str, torch.Tensor] = dict(vf.trainable_vectors())
    for head in vf._modules_to_save:
        for pname, t in vf.base_model.get_submodule(head).trained_module.state_dict(keep_vars=True).items():
            params[f"{head}.{pname}"] = t
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise adapter_io.AdapterError(
            f"{directory} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tensors[name].shape != p.shape:
                raise adapter_io.AdapterError(f"{directory}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                              f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    if vf.avf is None:
        return
    path = directory / AVF_STATE_NAME
    if not path.is_file():
        raise adapter_io.AdapterError(
            f"{path} is missing: the model uses AVF and resuming without its state would freeze other vectors "
            "than the interrupted run; resume from a checkpoint written by VectorFitTrainer or with AVFCallback"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            info = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise adapter_io.AdapterError(f"AVF state {path} cannot be read: {e}") from None
    if info.get("format") != _AVF_FORMAT or json.loads(info.get("names", "[]")) != vf.avf.names:
        raise adapter_io.AdapterError(f"AVF state {path} does not belong to this model (other vectors or format)")
    vf.avf.load_state_dict({k: v.to(vf.avf.ema.device) for k, v in state.items()})


def _has_adapter(directory: Optional[str]) -> bool:
    return bool(directory) and (Path(directory) / adapter_io.CONFIG_NAME).is_file()


# ------------------------------------------------------------------------------------- callback
class AVFCallback(TrainerCallback):
    """Runs Adaptive Vector Freezing in ``transformers.Trainer``.

    Usage: ``Trainer(model=vectorfit_model, ..., callbacks=[AVFCallback()])`` (``VectorFitTrainer``
    adds it by itself). AVF fields left ``None`` in the config are derived from the Trainer's
    ``max_steps`` and epoch length. After each checkpoint it also writes the adapter and AVF state
    into the checkpoint folder, unless they are there already, so that every ``checkpoint-*`` can be
    loaded with ``VectorFitModel.from_pretrained`` even with a plain ``Trainer``.
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

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kw: Any) -> None:
        if not args.should_save:
            return  # only the process that writes checkpoints
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and not _has_adapter(folder) and _find_vectorfit(model) is not None:
            save_training_state(model, folder)


# -------------------------------------------------------------------------------------- trainer
class VectorFitTrainer(Trainer):
    """``transformers.Trainer`` that saves and loads VectorFit adapters like peft's.

    Same arguments as ``Trainer``. Differences, only when the model is a ``VectorFitModel``:

    * ``save_model(dir)`` and every checkpoint write the adapter (``adapter_config.json``,
      ``adapter_model.safetensors``; a few hundred KB) and the AVF state, not ``model.safetensors``;
      the tokenizer / processor and ``training_args.bin`` are saved as usual;
    * ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` load those files back
      into the model (checkpoints of a plain ``Trainer`` still resume as before);
    * an ``AVFCallback`` is added when the variant uses AVF and none was passed.

    Under DDP only the main process writes (``args.should_save``); DDP keeps a full copy of the vectors
    on every process, so its adapter is complete (tested with two processes launched as torchrun does,
    tests/test_distributed_trainer.py; no DDP argument needs setting, see vectorfit.distributed). With
    DeepSpeed ZeRO-3 or sharded FSDP the parameters are partitioned across processes and the adapter
    written here would hold one shard: use a plain ``Trainer`` there.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        vf = _find_vectorfit(self.model)
        if vf is not None and vf.avf is not None and not any(isinstance(c, AVFCallback) for c in self.callback_handler.callbacks):
            self.add_callback(AVFCallback())

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        vf = _find_vectorfit(self.model)
        if vf is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_training_state(vf, output_dir)
        # As Trainer._save does after the weights: the processor, then the arguments.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, _TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        target = model if model is not None else self.model
        if _find_vectorfit(target) is not None and _has_adapter(resume_from_checkpoint):
            load_training_state(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if _find_vectorfit(self.model) is not None and _has_adapter(best):
            load_training_state(self.model, best)
            return
        super()._load_best_model()
