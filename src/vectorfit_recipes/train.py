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
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from . import data as data_mod
from . import methods as methods_mod
from . import models as models_mod
from .methods import METHODS, VECTORFIT_METHODS

__all__ = ["TrainConfig", "VECTORFIT_METHODS", "METHODS", "run", "evaluate", "RESULT_SCHEMA_VERSION"]

RESULT_SCHEMA_VERSION = 1


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

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r} is not available; choose one of {', '.join(METHODS)}")
        data_mod.get_dataset_info(self.task)
        models_mod.get_model_info(self.model)
        for name in ("epochs", "max_len", "batch_size", "eval_batch_size", "avf_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples", "max_eval_examples", "threads",
                     "avf_start", "avf_interval", "avf_num_freezes"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 or none, got {v}")


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


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vectorfit", "peft", "accelerate"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    return out


def _peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


#: Methods whose weight update's spectrum is recorded (paper fig. 9: VectorFit vs full fine-tuning).
SPECTRA_METHODS = ("vectorfit", "no_avf", "full")


def _spectra_layers(base: Any) -> list[str]:
    """First and last block's first attention matrix and first MLP matrix (4 layers)."""
    from vectorfit import target_module_names

    roles = target_module_names(base, with_roles=True)
    names = list(roles)
    picks = []
    layer_ids = sorted({int(p) for n in names for p in n.split(".") if p.isdigit()})
    for lid in (layer_ids[0], layer_ids[-1]) if layer_ids else ():
        for role in ("attn", "mlp"):
            cand = [n for n in names if roles[n] == role and f".{lid}." in f".{n}."]
            if cand:
                picks.append(cand[0])
    return picks


def _delta_spectra(model: Any, layers: list[str], w_init: dict) -> dict:
    """Singular values of W_final - W_init (float32) for ``layers``, largest first."""
    import torch

    out = {}
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name in layers:
            mod = root.get_submodule(name)
            if name in w_init:
                delta = mod.weight.detach().float() - w_init[name].float()
            else:
                delta = mod.delta_weight()
            out[name] = [float(x) for x in torch.linalg.svdvals(delta.float())]
    return out


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
    """Train, evaluate, and return (and optionally write) the result dictionary."""
    cfg.validate()
    models_mod.set_offline()
    with _process_settings(cfg):
        return _run(cfg, log)


def _run(cfg: TrainConfig, log: Any) -> dict:
    t_start = time.perf_counter()

    import torch
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)

    ds = data_mod.load_dataset(cfg.task)
    info = ds.info
    train_ex = _cap(ds.train, cfg.max_train_examples)
    val_ex = _cap(ds.validation, cfg.max_eval_examples)
    test_ex = _cap(ds.test, cfg.max_eval_examples)
    log(f"[vectorfit] task {cfg.task}: {ds.summary()}")
    log(f"[vectorfit] using train {len(train_ex)}, validation {len(val_ex)}, test {len(test_ex)}; "
        f"model {cfg.model}, method {cfg.method}, seed {cfg.seed}, {torch.get_num_threads()} threads")

    tokenizer = models_mod.load_tokenizer(cfg.model)
    regression = info.is_regression
    enc_train = _Encoded(tokenizer, train_ex, cfg.max_len, regression)
    enc_val = _Encoded(tokenizer, val_ex, cfg.max_len, regression)
    enc_test = _Encoded(tokenizer, test_ex, cfg.max_len, regression)

    steps_per_epoch = math.ceil(len(enc_train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)

    seed_everything(cfg.seed)
    base = models_mod.load_model(cfg.model, info.num_labels)
    t_wrap = time.perf_counter()
    spectra_layers = _spectra_layers(base) if cfg.method in SPECTRA_METHODS else []
    w_init = {n: base.get_submodule(n).weight.detach().clone() for n in spectra_layers} if cfg.method == "full" else {}
    avf_options = dict(k=cfg.avf_k, beta=cfg.avf_beta, start_step=cfg.avf_start, interval=cfg.avf_interval,
                       num_freezes=cfg.avf_num_freezes)
    built = methods_mod.build(cfg.method, base, total_steps, steps_per_epoch, avf_options=avf_options)
    model, method_config, avf = built.model, built.config, built.avf
    wrap_s = time.perf_counter() - t_wrap
    model.to(device)
    trainable, total = built.parameter_counts()
    log(f"[vectorfit] trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
        f"method set-up {wrap_s:.1f}s")

    before = None
    if cfg.eval_before:
        before = evaluate(model, enc_test, info.metric, cfg.eval_batch_size, device, cfg.progress, "test (before)")
        log(f"[vectorfit] test {info.metric} before fine-tuning: {before:.4f}")

    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if cfg.lr is not None else methods_mod.default_lr(cfg.method)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)

    model.train()
    global_step = 0
    losses: list[float] = []
    val_history: list[dict] = []
    best_val, best_state, best_epoch = None, None, None
    val_s = 0.0
    t_train = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"train {cfg.method}", disable=not cfg.progress, dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(enc_train), generator=gen).tolist()
        for s in range(0, len(perm), cfg.batch_size):
            if global_step >= total_steps:
                break
            batch = enc_train.batch(perm[s: s + cfg.batch_size], device)
            loss = model(**batch).loss
            loss.backward()
            global_step += 1
            if built.before_optimizer_step is not None:  # AVF: freeze between backward and step
                built.before_optimizer_step(global_step)
            optimizer.step()
            if built.after_optimizer_step is not None:
                built.after_optimizer_step(global_step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            if global_step % 5 == 0 or global_step == total_steps:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}", epoch=epoch)
        if cfg.select_on_validation:
            t_val = time.perf_counter()
            v = evaluate(model, enc_val, info.metric, cfg.eval_batch_size, device, cfg.progress, "validation")
            val_s += time.perf_counter() - t_val
            val_history.append({"epoch": epoch, "step": global_step, info.metric: v})
            if best_val is None or v > best_val:
                best_val, best_epoch = v, epoch
                if epoch < epochs:  # the last epoch's weights are in the model already
                    best_state = {id(p): p.detach().clone() for p in params}
                else:
                    best_state = None
    bar.close()
    train_s = time.perf_counter() - t_train - val_s  # optimisation only, without the validation passes
    if best_state is not None:  # an earlier epoch was better on validation
        with torch.no_grad():
            for p in params:
                p.copy_(best_state[id(p)])

    after = evaluate(model, enc_test, info.metric, cfg.eval_batch_size, device, cfg.progress, "test")
    if best_val is None:
        best_val = evaluate(model, enc_val, info.metric, cfg.eval_batch_size, device, cfg.progress, "validation")
        best_epoch = epochs

    # adapter size (and optionally keep it)
    adapter_bytes = None
    if cfg.save_adapter:
        built.save(cfg.save_adapter)
        adapter_bytes = _dir_bytes(Path(cfg.save_adapter))
    else:
        with tempfile.TemporaryDirectory(prefix="vectorfit-adapter-") as d:
            built.save(d)
            adapter_bytes = _dir_bytes(Path(d))

    avf_info = None
    if avf is not None:
        avf_info = {
            "schedule": _jsonable(avf.schedule()) if hasattr(avf, "schedule") else None,
            "history": _jsonable(getattr(avf, "history", None)),
            "frozen_at_end": _jsonable(getattr(avf, "frozen", None)),
        }
    delta_spectra = _delta_spectra(model, spectra_layers, w_init) if spectra_layers else None
    strengths = None
    if hasattr(model, "training_strengths"):
        strengths = _jsonable(model.training_strengths())

    wall_s = time.perf_counter() - t_start
    result = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "task": cfg.task,
        "model": cfg.model,
        "method": cfg.method,
        "method_config": method_config,
        "seed": cfg.seed,
        "metric": info.metric,
        "test_before": before,
        "test": after,
        "validation": best_val,
        "best_epoch": best_epoch,
        "validation_history": val_history,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": adapter_bytes,
        "steps": global_step,
        "epochs": epochs,
        "n_train": len(enc_train),
        "n_validation": len(enc_val),
        "n_test": len(enc_test),
        "final_train_loss": (sum(losses[-20:]) / len(losses[-20:])) if losses else None,
        "train_seconds": train_s,
        "wall_seconds": wall_s,
        "peak_rss_mb": _peak_rss_mb(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "avf": avf_info,
        "training_strengths": strengths,
        "delta_spectra": delta_spectra,
        "lr": lr,
        "dataset_stats": ds.stats,
        "config": _jsonable(cfg),
        "versions": _versions(),
    }
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, out)

    m = info.metric
    if before is not None:
        log(f"test {m} before fine-tuning: {before:.4f}")
    log(f"test {m} after fine-tuning:  {after:.4f}   (validation {best_val:.4f}, epoch {best_epoch})")
    log(f"trainable parameters: {trainable:,} of {total:,}")
    log(f"time: {wall_s:.1f}s total, {train_s:.1f}s training ({global_step} steps)")
    if cfg.output:
        log(f"result written to {cfg.output}")
    return result
