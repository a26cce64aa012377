"""One training loop for every task, model and method (``vectorfit train``).

A plain PyTorch loop over the public ``vectorfit`` API: AdamW (betas 0.9/0.999, no warm-up, weight
decay 0 by default, the learning rate of configs/methods.json), and per optimizer step

    loss.backward(); model.avf.step(global_step)  # if AVF; global_step counts from 1
    optimizer.step(); optimizer.zero_grad()

(methods with other per-step hooks, e.g. AdaLoRA's rank allocation, get them through ``BuiltMethod``).

Training data are capped (``--max-train-examples``) by a seed-independent, hash-ordered subsample,
so every method and seed sees the same examples; each epoch shuffles them with the run's seed. The
checkpoint kept for the test is the one with the best validation metric (evaluated at the end of each
epoch); the test metric is also measured before fine-tuning.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from . import data as data_mod
from . import methods as methods_mod
from . import checkpoint as ckpt_mod
from . import distributed as dist_mod
from . import run_info
from . import models as models_mod
from . import nlg
from . import vision_task
from .methods import METHODS, VECTORFIT_METHODS
from .train_config import TrainConfig

__all__ = ["TrainConfig", "VECTORFIT_METHODS", "METHODS", "run", "evaluate", "RESULT_SCHEMA_VERSION",
           "prepare_data", "build_method", "train_loop", "record", "RunData", "Setup", "Outcome"]

RESULT_SCHEMA_VERSION = 1


# ---------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _hash_order(examples: Sequence[data_mod.Example]) -> list[data_mod.Example]:
    """A fixed pseudo-random order that depends only on the texts (not on any seed)."""
    return sorted(examples, key=lambda ex: hashlib.sha256(
        ("order:" + data_mod.normalize_text(ex.text)).encode("utf-8")).digest())


def _cap(examples: Sequence[data_mod.Example], n: Optional[int]) -> list[data_mod.Example]:
    if n is None or n >= len(examples):
        return list(examples)
    return _hash_order(examples)[:n]


class _Encoded:
    """Texts tokenised once (no padding); batches are padded to their longest member."""

    def __init__(self, tokenizer: Any, examples: Sequence[data_mod.Example], max_len: int,
                 regression: bool) -> None:
        import torch

        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_len,
                        padding=False, return_attention_mask=False, return_token_type_ids=False)
        self.ids: list[list[int]] = enc["input_ids"]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        dtype = torch.float32 if regression else torch.long
        self.labels = torch.tensor([ex.label for ex in examples], dtype=dtype)

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: Sequence[int], device: Any) -> dict:
        import torch

        width = max(len(self.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = self.ids[i]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "labels": self.labels[list(idx)].to(device)}


def evaluate(model: Any, enc: _Encoded, metric: str, batch_size: int, device: Any,
             progress: bool = False, desc: str = "eval") -> float:
    if getattr(enc, "generation", False):  # a generation task: greedy decoding, ROUGE-L (nlg.py)
        return nlg.evaluate(model, enc, batch_size, device, progress, desc)
    if getattr(enc, "images_task", False):  # an image task: accuracy (vision_task.py)
        return vision_task.evaluate(model, enc, batch_size, device, progress, desc)
    import torch
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(enc)), key=lambda i: len(enc.ids[i]))  # less padding; metric is order-free
    preds: list[float] = [0.0] * len(enc)
    with torch.inference_mode():
        for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False,
                      dynamic_ncols=True):
            idx = order[s: s + batch_size]
            b = enc.batch(idx, device)
            b.pop("labels")
            logits = model(**b).logits.float()
            p = logits.squeeze(-1) if metric == "pearson" else logits.argmax(-1)
            for i, v in zip(idx, p.tolist()):
                preds[i] = v
    model.train(was_training)
    return data_mod.compute_metric(metric, preds, enc.labels.tolist())


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- the run
@contextlib.contextmanager
def _process_settings(cfg: TrainConfig) -> Iterator[None]:
    """Thread count, deterministic kernels and quiet transformers for the run; restored afterwards
    (``run`` may be called in-process, e.g. from tests or notebooks)."""
    import torch

    threads = torch.get_num_threads()
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    verbosity = None
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # the weight-loading bar
    except Exception:  # pragma: no cover
        transformers = None  # type: ignore[assignment]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    from vectorfit import low_memory

    try:
        with low_memory(cfg.low_memory):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        if transformers is not None and verbosity is not None:
            transformers.logging.set_verbosity(verbosity)
            if bars:
                transformers.utils.logging.enable_progress_bar()


def run(cfg: TrainConfig, log: Any = print) -> dict:
    """Train, evaluate, and return (and optionally write) the result dictionary.

    The stages are separate functions (data -> build -> loop -> evaluate -> record) so that other
    entry points (generation tasks, launchers) can reuse or replace one of them.
    """
    cfg.validate()
    models_mod.set_offline()
    # Under torchrun: the process group, and this rank's cfg/log (only rank 0 writes); see distributed.py.
    with _process_settings(cfg), dist_mod.session(cfg, log) as (cfg, log), ckpt_mod.output_lock(cfg.output):
        t_start = time.perf_counter()
        data = prepare_data(cfg, log)
        setup = build_method(cfg, data, log)
        dist_mod.decorrelate_dropout(cfg.seed)
        outcome = train_loop(cfg, data, setup, log)
        if not dist_mod.is_main():
            return {"rank": dist_mod.rank(), "steps": outcome.steps}
        if outcome.stopped:
            return {"stopped_at": outcome.steps, "total_steps": data.total_steps, "curve": outcome.curve}
        result = record(cfg, data, setup, outcome, t_start, log)
    return result


@dataclass
class RunData:
    """Stage 1: the tokenised splits and the run length in optimizer steps."""

    info: Any
    stats: dict
    train: _Encoded
    validation: _Encoded
    test: _Encoded
    steps_per_epoch: int
    total_steps: int
    epochs: int


@dataclass
class Setup:
    """Stage 2: the wrapped model and what was measured while building it."""

    built: methods_mod.Built
    device: Any
    trainable: int
    total: int
    setup_seconds: float
    test_before: Optional[float]
    spectra_layers: list = field(default_factory=list)
    w_init: dict = field(default_factory=dict)


@dataclass
class Outcome:
    """Stage 3: what the training loop produced."""

    lr: float
    steps: int
    losses: list
    val_history: list
    curve: list
    best_val: Optional[float]
    best_epoch: Optional[int]
    train_seconds: float
    train_cpu_seconds: Optional[float] = None  # None: an earlier invocation did not record it
    stopped: bool = False        # --stop-at-step: the run is to be continued (no result yet)
    resumed_from: list = field(default_factory=list)  # steps at which earlier invocations stopped


def prepare_data(cfg: TrainConfig, log: Any = print) -> RunData:
    """Load the task, cap and tokenise its splits (image tasks: tensors, vision_task.py), and work out the run length."""
    if vision_task.vision_data.is_image_task(cfg.task):
        return _run_data(cfg, *vision_task.load_splits(cfg, log))
    import torch

    ds = data_mod.load_dataset(cfg.task)
    train_ex = _cap(ds.train, cfg.max_train_examples)
    val_ex = _cap(ds.validation, cfg.max_eval_examples)
    test_ex = _cap(ds.test, cfg.max_eval_examples)
    log(f"[vectorfit] task {cfg.task}: {ds.summary()}")
    log(f"[vectorfit] using train {len(train_ex)}, validation {len(val_ex)}, test {len(test_ex)}; "
        f"model {cfg.model}, method {cfg.method}, seed {cfg.seed}, {torch.get_num_threads()} threads")
    tokenizer = models_mod.load_tokenizer(cfg.model)
    if ds.info.is_generation:  # prompt = instruction + the source cut to --max-len tokens; see nlg.py
        enc: list = [nlg.Encoded(tokenizer, ex, cfg.max_len) for ex in (train_ex, val_ex, test_ex)]
        log(f"[vectorfit] generation: source cut to {cfg.max_len} tokens, training sequences up to "
            f"{max(map(len, enc[0].ids))} tokens, greedy decoding of at most {nlg.MAX_NEW_TOKENS} new tokens")
    else:
        enc = [_Encoded(tokenizer, ex, cfg.max_len, ds.info.is_regression) for ex in (train_ex, val_ex, test_ex)]
    return _run_data(cfg, ds.info, ds.stats, enc)


def _run_data(cfg: TrainConfig, info: Any, stats: dict, enc: list) -> RunData:
    steps_per_epoch = math.ceil(len(enc[0]) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    return RunData(info, stats, *enc, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                   epochs=math.ceil(total_steps / steps_per_epoch))


def build_method(cfg: TrainConfig, data: RunData, log: Any = print) -> Setup:
    """Load the pretrained model with a new head (seeded), wrap it for the method, and measure the
    test metric before fine-tuning."""
    import torch

    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    generation, image, targets = data.info.is_generation, data.info.kind == "image", {}
    if generation:  # a pretrained language model as it is: no new head
        base = models_mod.load_causal_lm(cfg.model)
    elif image:  # MobileNetV2, and the layers each method adapts on it (vision_task.py)
        base, note, targets = vision_task.base_model(cfg, data.info.num_labels)
    else:
        base = models_mod.load_model(cfg.model, data.info.num_labels, pooling=cfg.pooling)
    note = note if image else methods_mod.bias_note(base, cfg.method)
    if note:
        log(f"[vectorfit] {cfg.model}: {note}")
    t_wrap = time.perf_counter()
    spectra_layers = run_info.spectra_layers(base) if cfg.method in run_info.SPECTRA_METHODS else []
    w_init = ({n: base.get_submodule(n).weight.detach().clone() for n in spectra_layers}
              if cfg.method == "full" else {})
    avf_options = dict(k=cfg.avf_k, beta=cfg.avf_beta, start_step=cfg.avf_start, interval=cfg.avf_interval,
                       num_freezes=cfg.avf_num_freezes)
    vf_options = {"sigma_param": cfg.sigma_param} if cfg.method in VECTORFIT_METHODS else None
    built = methods_mod.build(cfg.method, base, data.total_steps, data.steps_per_epoch, avf_options=avf_options,
                              vectorfit_options=vf_options, head=[] if generation else None, **targets)
    wrap_s = time.perf_counter() - t_wrap
    built.model.to(device)
    trainable, total = built.parameter_counts()
    log(f"[vectorfit] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
        f"method set-up {wrap_s:.1f}s")
    before = None
    if cfg.eval_before:
        before = evaluate(built.model, data.test, data.info.metric, cfg.eval_batch_size, device, cfg.progress,
                          "test (before)")
        log(f"[vectorfit] test {data.info.metric} before fine-tuning: {before:.4f}")
    return Setup(built, device, trainable, total, wrap_s, before, spectra_layers, w_init)


def train_loop(cfg: TrainConfig, data: RunData, setup: Setup, log: Any = print) -> Outcome:
    """AdamW over the trainable parameters for ``data.total_steps`` optimizer steps.

    Validation after each epoch (``select_on_validation``: the best epoch's weights are restored at
    the end); validation and test at each step of ``cfg.eval_steps`` (the learning curve: the
    weights of that very step, no selection). Evaluation time is not counted as training time.
    With ``cfg.output`` the loop keeps a checkpoint (``checkpoint.py``) and resumes from it.
    """
    import torch
    from tqdm.auto import tqdm

    model, built, device, metric = setup.built.model, setup.built, setup.device, data.info.metric
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else methods_mod.default_lr(cfg.method, data.info.kind)
    if cfg.method in VECTORFIT_METHODS and (cfg.bias_lr_scale != 1.0 or cfg.head_lr is not None):
        from vectorfit import param_groups

        groups: Any = param_groups(model, lr, bias_lr=lr * cfg.bias_lr_scale, head_lr=cfg.head_lr,
                                   weight_decay=cfg.weight_decay)
    else:
        groups = params
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt = ckpt_mod.resume_path(cfg.output, cfg.method) if not dist_mod.launched() else None
    st = (ckpt_mod.load(ckpt, cfg, model, optimizer, gen, log) if ckpt is not None else None) or ckpt_mod.LoopState()
    curve_at = [s for s in cfg.curve_steps() if st.step < s <= data.total_steps]

    def ev(split: _Encoded, desc: str) -> float:
        if not dist_mod.is_main():
            return float("nan")  # only rank 0 evaluates (its numbers are the run's)
        return evaluate(model, split, metric, cfg.eval_batch_size, device, cfg.progress, desc)

    def write_partial(**extra: Any) -> None:
        """The curve so far beside the result (``X.partial``): a long run stopped early keeps it."""
        if cfg.output:
            _write_json(ckpt_mod.partial_path(cfg.output), {
                "partial": True, "task": cfg.task, "model": cfg.model, "method": cfg.method,
                "seed": cfg.seed, "lr": lr, "metric": metric, "curve": st.curve,
                "total_steps": data.total_steps, "trainable_params": setup.trainable, "total_params": setup.total,
                "config": run_info.jsonable(cfg), **extra})

    def keep() -> None:
        """Write the checkpoint with the optimisation time so far (writing is not training)."""
        if ckpt is not None:
            with clock.paused() as counted:
                st.train_seconds, st.train_cpu_seconds = counted
                ckpt_mod.save(ckpt, cfg, st, model, optimizer, gen)

    def at_stop() -> bool:
        """--stop-at-step reached (and the run not finished): this invocation trains no further."""
        return cfg.stop_at_step is not None and cfg.stop_at_step <= st.step < data.total_steps

    model.train()
    clock = run_info.TrainClock(st.train_seconds, st.train_cpu_seconds)  # evaluation is not training
    stopped = at_stop()  # resumed at or past the stop step: nothing to train
    bar = tqdm(total=data.total_steps, initial=st.step, desc=f"train {cfg.method}", disable=not cfg.progress,
               dynamic_ncols=True)
    while st.epoch <= data.epochs and not stopped:
        if st.perm is None:
            st.perm, st.pos = torch.randperm(len(data.train), generator=gen).tolist(), 0
        while st.pos < len(st.perm) and st.step < data.total_steps:
            idx = st.perm[st.pos: st.pos + cfg.batch_size]
            # this rank's share of the batch under a launcher, gradients combined (distributed.py)
            loss = dist_mod.forward_backward(model, lambda i: data.train.batch(i, device), idx, params)
            st.step += 1
            st.pos += cfg.batch_size
            if built.before_optimizer_step is not None:  # AVF: freeze between backward and step
                built.before_optimizer_step(st.step)
            optimizer.step()
            if built.after_optimizer_step is not None:
                built.after_optimizer_step(st.step)
            optimizer.zero_grad(set_to_none=True)
            st.losses.append(float(loss.detach()))
            bar.update(1)
            if st.step % 5 == 0 or st.step == data.total_steps:
                bar.set_postfix(loss=f"{sum(st.losses[-20:]) / len(st.losses[-20:]):.4f}", epoch=st.epoch)
            if curve_at and st.step == curve_at[0]:
                curve_at.pop(0)
                with clock.paused() as (wall, cpu):
                    # optimisation seconds so far (resumed invocations included), wall and CPU: bench
                    # --status's pace; to the millisecond, as a tiny run's first step can take < 0.05 s
                    point = {"step": st.step, "epoch": round(st.step / data.steps_per_epoch, 3),
                             "train_loss": sum(st.losses[-20:]) / len(st.losses[-20:]),
                             "validation": ev(data.validation, f"validation @{st.step}"),
                             "test": ev(data.test, f"test @{st.step}"), "train_seconds": round(wall, 3),
                             "train_cpu_seconds": None if cpu is None else round(cpu, 3)}
                    if hasattr(model, "training_strengths"):
                        # the balance AVF is for, at this step: a table read at a shorter budget than
                        # the run's (converged reads curves at 1,024) has it without a run of its own
                        point["training_strengths"] = run_info.jsonable(model.training_strengths())
                    if setup.spectra_layers and at_stop():
                        # the ΔW a finished run records at its end, here where this run stops: a
                        # table read at this step (converged) has its spectra though the run goes on
                        # (a stop at the run's last step is its end, which records them itself)
                        point["delta_spectra"] = run_info.delta_spectra(model, setup.spectra_layers, setup.w_init)
                    st.curve.append(point)
                    tqdm.write(f"[curve] step {st.step}: validation {point['validation']:.4f}, "
                               f"test {point['test']:.4f}")
                    write_partial()
                keep()
            if at_stop():
                stopped = True
                write_partial(stopped_at=st.step)
                keep()
                break
        if stopped:
            break
        if cfg.select_on_validation:
            with clock.paused():
                v = ev(data.validation, "validation")
            st.val_history.append({"epoch": st.epoch, "step": st.step, metric: v})
            if st.best_val is None or v > st.best_val:
                st.best_val, st.best_epoch = v, st.epoch
                # the last epoch's weights are in the model already
                st.best_state = [p.detach().clone() for p in params] if st.epoch < data.epochs else None
        st.epoch, st.perm, st.pos = st.epoch + 1, None, 0
        if st.epoch <= data.epochs:
            keep()
    bar.close()
    train_s, train_cpu_s = clock.seconds()  # optimisation only
    if stopped:
        log(f"[vectorfit] stopped at step {st.step} of {data.total_steps} (--stop-at-step); the checkpoint is "
            f"{ckpt}: run the same command without --stop-at-step to go on")
    elif st.best_state is not None:  # an earlier epoch was better on validation
        with torch.no_grad():
            for p, v in zip(params, st.best_state):
                p.copy_(v)
    return Outcome(lr, st.step, st.losses, st.val_history, st.curve, st.best_val, st.best_epoch, train_s,
                   train_cpu_s, stopped=stopped, resumed_from=st.resumed_from)


def record(cfg: TrainConfig, data: RunData, setup: Setup, out: Outcome, t_start: float,
           log: Any = print) -> dict:
    """Test the kept weights, measure the adapter, and build (and optionally write) the result."""
    import torch

    built, model, metric = setup.built, setup.built.model, data.info.metric
    best_val, best_epoch = out.best_val, out.best_epoch
    if best_val is None and out.curve and out.curve[-1]["step"] == out.steps:
        # no selection and the curve measured these very weights at the last step: reuse, do not repeat
        after, best_val, best_epoch = out.curve[-1]["test"], out.curve[-1]["validation"], data.epochs
    else:
        after = evaluate(model, data.test, metric, cfg.eval_batch_size, setup.device, cfg.progress, "test")
    if best_val is None:
        best_val = evaluate(model, data.validation, metric, cfg.eval_batch_size, setup.device, cfg.progress,
                            "validation")
        best_epoch = data.epochs

    if cfg.save_adapter:
        built.save(cfg.save_adapter)
        adapter_bytes = run_info.dir_bytes(Path(cfg.save_adapter))
    else:  # measure the adapter's size all the same
        with tempfile.TemporaryDirectory(prefix="vectorfit-adapter-") as d:
            built.save(d)
            adapter_bytes = run_info.dir_bytes(Path(d))

    avf = built.avf
    avf_info = None if avf is None else {
        "schedule": run_info.jsonable(avf.schedule()) if hasattr(avf, "schedule") else None,
        "history": run_info.jsonable(getattr(avf, "history", None)),
        "frozen_at_end": run_info.jsonable(getattr(avf, "frozen", None)),
    }
    wall_s = time.perf_counter() - t_start
    result = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "task": cfg.task, "model": cfg.model, "method": cfg.method, "method_config": built.config,
        "seed": cfg.seed, "metric": metric,
        "test_before": setup.test_before, "test": after, "validation": best_val, "best_epoch": best_epoch,
        "validation_history": out.val_history, "curve": out.curve,
        "trainable_params": setup.trainable, "total_params": setup.total, "adapter_bytes": adapter_bytes,
        "steps": out.steps, "epochs": data.epochs, "resumed_from": out.resumed_from,
        "n_train": len(data.train), "n_validation": len(data.validation), "n_test": len(data.test),
        "final_train_loss": (sum(out.losses[-20:]) / len(out.losses[-20:])) if out.losses else None,
        "train_seconds": out.train_seconds, "train_cpu_seconds": out.train_cpu_seconds, "wall_seconds": wall_s, "peak_rss_mb": run_info.peak_rss_mb(),
        "threads": torch.get_num_threads(), "device": str(setup.device), **dist_mod.annotate({}),
        "avf": avf_info,
        "training_strengths": run_info.jsonable(model.training_strengths()) if hasattr(model, "training_strengths") else None,
        "delta_spectra": run_info.delta_spectra(model, setup.spectra_layers, setup.w_init) if setup.spectra_layers else None,
        "lr": out.lr, "dataset_stats": data.stats, "config": run_info.jsonable(cfg), "versions": run_info.versions(),
    }
    if data.info.is_generation:  # ROUGE-1/2/L and sample outputs (nlg.py)
        result.update(nlg.result_fields(data, best_val, cfg.max_len))
        r = result["rouge"]["test"]
        if r:
            log("test ROUGE-1/2/L F1 x100 after fine-tuning: " + " / ".join(f"{r[k]:.2f}" for k in nlg.ROUGE_KEYS))
    if cfg.output:
        _write_json(Path(cfg.output), result)
        ckpt_mod.partial_path(cfg.output).unlink(missing_ok=True)
        ckpt_mod.checkpoint_path(cfg.output).unlink(missing_ok=True)

    if setup.test_before is not None:
        log(f"test {metric} before fine-tuning: {setup.test_before:.4f}")
    log(f"test {metric} after fine-tuning:  {after:.4f}   (validation {best_val:.4f}, epoch {best_epoch})")
    log(f"trainable parameters: {setup.trainable:,} of {setup.total:,}")
    cpu = "" if out.train_cpu_seconds is None else f", {out.train_cpu_seconds:.1f}s of CPU"
    log(f"time: {wall_s:.1f}s total, {out.train_seconds:.1f}s training{cpu} ({out.steps} steps)")
    if cfg.output:
        log(f"result written to {cfg.output}")
    return result
