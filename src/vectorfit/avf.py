"""Adaptive Vector Freezing (paper section 3.2).

Every trained singular-value vector and bias vector is one *vector* v. Its training strength at
step t is ``S_v(t) = mean(|v_0 - v_t|)``. At each AVF step an exponential moving average
``S'_v = beta * S'_v + (1 - beta) * S_v`` is updated and the k vectors with the largest ``S'`` are
frozen until the next AVF step; all others train.

How a vector is frozen: ``step()`` runs after ``backward()`` and before ``optimizer.step()`` and
sets the frozen vectors' ``.grad`` to ``None``. PyTorch optimizers skip parameters without a
gradient entirely, so a frozen vector gets no update, no momentum/variance update, no weight
decay, and its optimizer state waits unchanged for its release. ``requires_grad`` is never
toggled, so ``DistributedDataParallel`` (which fixes the set of reduced parameters at wrap time)
keeps working; every rank takes the same decisions from the same all-reduced values.

All AVF state (the EMA, the frozen set, the schedule, the history) lives in buffers of this
module, which is a submodule of the VectorFit tuner (``peft_model.base_model.vectorfit_avf``): it
is saved with the adapter (``adapter_model.safetensors``, so in every ``checkpoint-*`` a Trainer
writes) and with the model's ``state_dict``, and restored from either, so a resumed run freezes
exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .config import AVFConfig
from .errors import ConfigError


def training_strength(layer: nn.Module, kind: str, adapter_name: str) -> Tensor:
    """``mean(|v_0 - v_t|)`` of adapter ``adapter_name``'s vector ``kind`` (``"sigma"`` / ``"bias"``)
    on a VectorFit layer (paper eq. for S_v), float32.

    Under FSDP2 (``fully_shard``) the trained parameter is a sharded ``DTensor``: every rank then
    all-gathers the whole vector (a collective; vectors are tiny) and computes the strength from it
    as one process would, so all ranks get the same value and take the same freezing decision."""
    p = (layer.vectorfit_sigma if kind == "sigma" else layer.vectorfit_bias)[adapter_name]
    v0 = layer.sigma0 if kind == "sigma" else layer.bias0
    full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()  # DTensor (torch.distributed.tensor)
    if full.shape != v0.shape:
        raise AVFError(
            f"AVF cannot read the trained {kind} vector of a {type(layer).__name__}: it has shape {tuple(full.shape)}, "
            f"not {tuple(v0.shape)}. FSDP1 (FullyShardedDataParallel) leaves each rank only its slice of a flat "
            "parameter (DeepSpeed ZeRO-3 an empty placeholder); use FSDP2 (torch.distributed.fsdp.fully_shard), DDP, "
            "or one process"
        )
    if kind == "sigma" and layer.vectorfit_sigma_param[adapter_name] == "relative":
        full = v0 * (1.0 + full)  # relative form: sigma = sigma0 * (1 + z)
    return (full.float() - v0.float()).abs().mean()


class AVFError(RuntimeError):
    """AVF was driven in a way that would silently break its schedule."""


class AdaptiveVectorFreezing(nn.Module):
    """AVF controller over a fixed, ordered list of vectors.

    Args:
        vectors: ``(name, layer, kind)`` triples, ``kind`` ``"sigma"`` or ``"bias"``: the vector is
            adapter ``adapter_name``'s ``layer.vectorfit_<kind>[adapter_name]``.
        config: the schedule; fields left ``None`` are filled by :meth:`set_total_steps`.
        adapter_name: the adapter whose vectors these are.
    """

    def __init__(self, vectors: list[tuple[str, nn.Module, str]], config: AVFConfig, adapter_name: str = "default") -> None:
        super().__init__()
        # k = n would freeze every vector at the first AVF step and train nothing afterwards.
        if config.k >= len(vectors):
            raise ConfigError(
                f"AVFConfig.k={config.k} is invalid: only {len(vectors)} vectors are trained and freezing k of them "
                f"must leave some to train; use k < {len(vectors)} (the paper uses 5), or variant='no_avf'"
            )
        self.names = [n for n, _, _ in vectors]
        # Plain list, not registered: the layers belong to the model, not to this module.
        self._vectors = [(layer, kind) for _, layer, kind in vectors]
        self.adapter_name = adapter_name
        self.config = config
        self._user_config = config  # what reset() returns to
        self.steps_called = 0  # step() calls in this process (not saved): lets the tuner notice AVF never runs
        n = len(vectors)
        self.register_buffer("ema", torch.zeros(n, dtype=torch.float32))
        self.register_buffer("frozen_mask", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("num_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("schedule_spec", torch.full((3,), -1, dtype=torch.long))
        self.register_buffer("frozen_history", torch.full((0, config.k), -1, dtype=torch.long))
        if config.is_resolved:
            self._set_schedule(config)

    # ------------------------------------------------------------------ schedule
    def _set_schedule(self, cfg: AVFConfig) -> None:
        self.config = cfg
        self.schedule_spec.copy_(torch.tensor([cfg.start_step, cfg.interval, cfg.num_freezes]))
        if self.frozen_history.shape[0] != cfg.num_freezes:
            self.frozen_history = torch.full((cfg.num_freezes, cfg.k), -1, dtype=torch.long, device=self.ema.device)

    def set_total_steps(self, total_steps: int, steps_per_epoch: Optional[int] = None) -> None:
        """Derive the schedule fields left ``None`` from the run length. A schedule that is already
        fixed (explicit config, or restored from a checkpoint) is kept."""
        if self.is_scheduled:
            return
        self._set_schedule(self.config.resolve(total_steps, steps_per_epoch))

    @property
    def is_scheduled(self) -> bool:
        return int(self.schedule_spec[0]) > 0

    def schedule(self) -> list[int]:
        """The optimizer steps at which AVF acts."""
        if not self.is_scheduled:
            raise AVFError(
                "the AVF schedule is unknown: pass AVFConfig.for_training(total_steps, steps_per_epoch) in the "
                "VectorFitConfig, call model.avf.set_total_steps(total_steps), or use AVFCallback with the Trainer"
            )
        start, interval, n = (int(x) for x in self.schedule_spec)
        return [start + i * interval for i in range(n)]

    # ------------------------------------------------------------------ the algorithm
    def _param(self, i: int) -> nn.Parameter:
        """The parameter that trains vector i (``z`` for relative singular values)."""
        layer, kind = self._vectors[i]
        return (layer.vectorfit_sigma if kind == "sigma" else layer.vectorfit_bias)[self.adapter_name]

    @torch.no_grad()
    def strengths(self) -> Tensor:
        """Current training strengths ``mean(|v_0 - v_t|)`` of all vectors, in order (float32)."""
        out = torch.empty(len(self._vectors), dtype=torch.float32, device=self.ema.device)
        for i, (layer, kind) in enumerate(self._vectors):
            out[i] = training_strength(layer, kind, self.adapter_name).to(out.device)
        return out

    def step(self, global_step: int) -> None:
        """Call once per optimizer step, after ``backward()`` and before ``optimizer.step()``.

        Args:
            global_step: the optimizer step about to be taken, counted from 1.
        """
        global_step = self._check_step(global_step)
        self.steps_called += 1
        schedule = self.schedule()
        done = int(self.num_done)
        if done and global_step < schedule[done - 1]:
            raise AVFError(
                f"step({global_step}) comes before AVF step {schedule[done - 1]}, which already ran "
                f"({done} of {len(schedule)} AVF steps done): the step count went backwards. A new training run on "
                "this model must start from fresh AVF state (model.avf.reset()); a resumed run must load the "
                "checkpoint's AVF state and continue its step count"
            )
        if global_step in schedule:
            idx = schedule.index(global_step)
            if idx > done:
                raise AVFError(
                    f"AVF step {global_step} reached but only {done} of the earlier AVF steps {schedule[:idx]} ran: "
                    "step() was not called at every optimizer step, or a run was resumed without the AVF state "
                    "(load the model's full state_dict, or model.avf.load_state_dict(...))"
                )
            if idx == done:  # not yet applied (calling step twice for one step is harmless)
                self._freeze(idx)
        self._drop_frozen_grads()

    @staticmethod
    def _check_step(global_step: Any) -> int:
        try:
            if isinstance(global_step, bool):
                raise TypeError
            step = operator.index(global_step)  # int, numpy / 0-d integer tensors; not 3.0 or True
        except TypeError:
            raise AVFError(f"step({global_step!r}): global_step must be an integer (optimizer steps counted from 1)") from None
        if step < 1:
            raise AVFError(f"step({step}): global_step counts optimizer steps from 1 (the step about to be taken), got {step}")
        return step

    def reset(self) -> None:
        """Forget all AVF state (averages, frozen set, history) to train the model again from step 1.
        The schedule is kept if it was given explicitly, and derived again (``set_total_steps``,
        ``AVFCallback``) if it had been derived from the earlier run's length."""
        with torch.no_grad():
            self.ema.zero_()
            self.frozen_mask.zero_()
            self.num_done.zero_()
            self.schedule_spec.fill_(-1)
        self.frozen_history = torch.full((0, self._user_config.k), -1, dtype=torch.long, device=self.ema.device)
        self.config = self._user_config
        if self._user_config.is_resolved:
            self._set_schedule(self._user_config)

    @torch.no_grad()
    def _freeze(self, idx: int) -> None:
        strengths = self.strengths()
        bad = torch.nonzero(~torch.isfinite(strengths)).flatten().tolist()
        if bad:
            # A NaN would enter the average and stay there for ever, and the top-k of NaNs is arbitrary.
            names = [self.names[i] for i in bad]
            raise AVFError(
                f"AVF step {self.schedule()[idx]}: {len(bad)} trained vector(s) hold NaN/Inf values, first {names[:3]}: "
                "training diverged (lower the learning rate, clip gradients, or check the loss for NaN) "
                "before AVF can rank the vectors"
            )
        beta = float(self.config.beta)
        self.ema.mul_(beta).add_((1.0 - beta) * strengths)
        # Stable sort: ties go to the earlier vector, so every process decides alike.
        top = torch.argsort(self.ema, descending=True, stable=True)[: self.config.k]
        self.frozen_mask.zero_()
        self.frozen_mask[top] = True
        self.frozen_history[idx] = torch.sort(top).values
        self.num_done += 1

    def _drop_frozen_grads(self) -> None:
        for i in torch.nonzero(self.frozen_mask).flatten().tolist():
            self._param(i).grad = None

    # ------------------------------------------------------------------ views
    @property
    def frozen(self) -> list[str]:
        """Names of the vectors frozen right now."""
        return [self.names[i] for i in torch.nonzero(self.frozen_mask).flatten().tolist()]

    @property
    def history(self) -> list[dict[str, Any]]:
        """``[{"step": t, "frozen": [names]}, ...]`` for the AVF steps taken so far."""
        if not self.is_scheduled:
            return []
        steps = self.schedule()
        return [
            {"step": steps[i], "frozen": [self.names[j] for j in self.frozen_history[i].tolist() if j >= 0]}
            for i in range(int(self.num_done))
        ]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The history's length depends on the schedule, which a fresh model may not know yet.
        key = prefix + "frozen_history"
        if key in state_dict and state_dict[key].shape != self.frozen_history.shape:
            self.frozen_history = torch.empty_like(state_dict[key], device=self.ema.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        spec = state_dict.get(prefix + "schedule_spec")
        if spec is not None and int(spec[0]) > 0:
            start, interval, n = (int(x) for x in spec)
            self.config = AVFConfig(k=self.config.k, beta=self.config.beta, start_step=start, interval=interval, num_freezes=n)

    def extra_repr(self) -> str:
        sched = self.schedule() if self.is_scheduled else "unscheduled"
        return f"vectors={len(self.names)}, k={self.config.k}, beta={self.config.beta}, schedule={sched}"
