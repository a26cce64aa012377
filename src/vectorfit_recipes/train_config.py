"""``TrainConfig``: the settings of one ``vectorfit train`` run; every field is a command-line flag."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import data as data_mod
from . import models as models_mod
from . import vision_data
from .methods import METHODS, VECTORFIT_METHODS

__all__ = ["TrainConfig"]


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """Settings of one training run. Every field is a command-line flag (``--max-len`` etc.)."""

    task: str = field(default="movie", metadata=_help(
        "dataset to train and evaluate on (mnist, fashion-mnist: image tasks)",
        choices=tuple(data_mod.DATASETS) + tuple(vision_data.IMAGE_DATASETS)))
    model: str = field(default="minilm", metadata=_help(
        "pretrained model (mobilenetv2: image tasks)", choices=tuple(models_mod.MODELS) + tuple(vision_data.IMAGE_MODELS)))
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
    max_len: int = field(default=64, metadata=_help(
        "maximum sequence length in tokens (longer texts are truncated); for a generation task the source's "
        "token budget inside the prompt (the nlg suite uses 128)"))
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
        "torch CPU threads; none = all cores. On a machine shared with other jobs use 1 (benchmarks/THREADS.md)"))
    device: str = field(default="cpu", metadata=_help("torch device (cpu, cuda, ...)"))
    low_memory: bool = field(default=False, metadata=_help(
        "VectorFit layers keep no weight-sized buffer between forward and backward (less memory, "
        "~10%% more multiply-adds on decoder models; same numbers): see vectorfit.low_memory"))
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    pooling: str = field(default="mean", metadata=_help(
        "how the new classification head reads the encoder: mean = attention-masked mean of the last "
        "hidden states (how the sentence-transformers checkpoints were trained; no extra parameters); "
        "pooler = transformers' default tanh(dense(CLS)), whose dense layer only full fine-tuning trains",
        choices=models_mod.POOLINGS))
    bias_lr_scale: float = field(default=1.0, metadata=_help(
        "VectorFit methods: the bias vectors' rate is lr x this (see vectorfit.param_groups; the paper uses "
        "one rate, 1.0)"))
    sigma_param: str = field(default="absolute", metadata=_help(
        "VectorFit methods: absolute = train s itself (the paper); relative = s = s0 * (1 + z), z trained "
        "from 0, so each singular value moves by a relative amount (see VectorFitConfig.sigma_param)",
        choices=("absolute", "relative")))
    head_lr: Optional[float] = field(default=None, metadata=_help(
        "VectorFit methods: the new head's own rate; none = lr"))
    stop_at_step: Optional[int] = field(default=None, metadata=_help(
        "stop after this optimizer step, keeping the checkpoint (needs --output); the same command "
        "without this flag resumes (to spread a long run over several sittings)"))
    eval_steps: Optional[str] = field(default=None, metadata=_help(
        "comma-separated optimizer steps (e.g. 64,128,256) at which validation and test are measured: "
        "the learning curve in the result's 'curve'; none = no curve"))
    image_size: int = field(default=32, metadata=_help(
        "image tasks: the side in pixels the 28x28 images are resized to (bilinear) before the network"))

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
        image, image_model = vision_data.is_image_task(self.task), self.model in vision_data.IMAGE_MODELS
        if image != image_model:
            raise ValueError(f"--task {self.task} is {'an image' if image else 'a text'} task and --model {self.model} "
                             f"{'an image' if image_model else 'a text'} model; use --model "
                             + (" or ".join(vision_data.IMAGE_MODELS) if image else "minilm (or another text model)"))
        generation = not image and data_mod.get_dataset_info(self.task).is_generation
        causal = not image_model and models_mod.get_model_info(self.model).kind == "causal"
        if generation != causal:
            fit = [m.name for m in models_mod.MODELS.values() if (m.kind == "causal") == generation]
            raise ValueError(f"--task {self.task} is a {'generation' if generation else 'classification'} task and "
                             f"--model {self.model} a {'causal language model' if causal else 'sentence encoder'}; "
                             f"use --model {' or '.join(fit)}")
        self.curve_steps()
        if self.stop_at_step is not None and (self.stop_at_step < 1 or self.output is None):
            raise ValueError(f"--stop-at-step {self.stop_at_step}: needs --output (the checkpoint is kept beside it) "
                             "and a step >= 1")
        if not (math.isfinite(self.bias_lr_scale) and self.bias_lr_scale >= 0):
            raise ValueError(f"--bias-lr-scale must be a finite number >= 0, got {self.bias_lr_scale}")
        if self.head_lr is not None and not (math.isfinite(self.head_lr) and self.head_lr > 0):
            raise ValueError(f"--head-lr must be a finite number > 0 or none, got {self.head_lr}")
        if self.method not in VECTORFIT_METHODS and (self.bias_lr_scale != 1.0 or self.head_lr is not None
                                                      or self.sigma_param != "absolute"):
            raise ValueError(f"--bias-lr-scale, --head-lr and --sigma-param apply to the VectorFit methods "
                             f"({', '.join(VECTORFIT_METHODS)}), not to --method {self.method}")
        for name in ("epochs", "max_len", "batch_size", "eval_batch_size", "avf_k", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_train_examples", "max_eval_examples", "threads",
                     "avf_start", "avf_interval", "avf_num_freezes"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 or none, got {v}")
        # nan compares False with everything, so each check is written as "must be", not "must not be".
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr {self.lr}: the learning rate must be a finite number > 0, e.g. --lr 1e-3 "
                             "(or none: the method's rate from configs/methods.json)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"--weight-decay {self.weight_decay}: must be a finite number >= 0 (the paper uses 0)")
        if not (math.isfinite(self.avf_beta) and 0.0 <= self.avf_beta < 1.0):
            raise ValueError(f"--avf-beta {self.avf_beta}: the EMA factor must be in [0, 1) (the paper uses 0.99)")
        if self.save_adapter is not None and self.output is not None and \
                Path(self.save_adapter).expanduser().resolve() == Path(self.output).expanduser().resolve():
            raise ValueError(f"--output and --save-adapter are the same path {self.output!r}: --output is a JSON "
                             "file, --save-adapter a folder")

    def check_environment(self) -> None:
        """Checks that need this machine but load no data and no model weights; ``vectorfit train``
        runs them right after :meth:`validate`, so a bad flag fails in seconds, not after training.

        * ``--device`` exists in this torch build and machine;
        * ``--output`` and ``--save-adapter`` can be written (probed with a temporary file that is
          removed at once);
        * ``--avf-k`` is below the number of vectors the method trains on the model, counted on the
          model's architecture (built without weights) when the model is already in the cache;
          otherwise the count is checked as soon as the model is built, still before training.

        Raises:
            ValueError: naming the flag, the value and what to do instead.
        """
        _check_device(self.device)
        if self.output is not None:
            _check_writable(self.output, "--output", folder=False)
        if self.save_adapter is not None:
            _check_writable(self.save_adapter, "--save-adapter", folder=True)
        if self.method in VECTORFIT_METHODS:
            n = trained_vector_count(self.model, self.method)
            if n is not None and self.method == "vectorfit" and self.avf_k >= n:
                raise ValueError(f"--avf-k {self.avf_k}: must be less than the {n} vectors that --method {self.method} "
                                 f"trains on --model {self.model} (freezing all would stop training); "
                                 f"use 1..{n - 1} (the paper uses 5)")


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r}: not a torch device ({e}); use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {device}: this torch ({torch.__version__}) is a CPU-only build; use --device cpu, "
                             "or install a CUDA build of torch")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise ValueError(f"--device {device}: {count} CUDA device(s) visible here; use --device cpu"
                             + (f" or cuda:0..cuda:{count - 1}" if count else ""))
        return
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"--device {device}: {dev.type} is not available in this torch build or machine; use --device cpu")


def _check_writable(path: str, flag: str, folder: bool) -> None:
    """The nearest existing folder on the way to ``path`` accepts a new file, and ``path`` itself is
    of the right kind (a folder for ``--save-adapter``, a file for ``--output``)."""
    import tempfile

    p = Path(path).expanduser()
    if p.exists() and p.is_dir() != folder:
        kind = "a folder" if p.is_dir() else "a file"
        want = "a folder" if folder else "a file name, e.g. result.json"
        raise ValueError(f"{flag} {path}: it is {kind}; give {want}")
    probe = p if (folder and p.is_dir()) else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, so nothing can be written below it")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".vectorfit-write-test-", dir=probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); choose another path") from None
    os.close(fd)
    os.unlink(tmp)


def trained_vector_count(model: str, method: str) -> Optional[int]:
    """How many vectors a VectorFit ``method`` trains on ``model``, from the model's architecture
    (built on the ``meta`` device: no weights read), or ``None`` if the model is not cached yet."""
    from . import assets

    if model in vision_data.IMAGE_MODELS:  # not a transformers folder; AVF checks k when it is built
        return None
    info = models_mod.get_model_info(model)
    if not assets.is_fetched(info.asset):
        return None
    import torch
    import transformers

    from vectorfit import VARIANTS, VectorFitConfig, target_module_names

    cfg = transformers.AutoConfig.from_pretrained(str(assets.asset_dir(info.asset) / info.subdir))
    auto = transformers.AutoModelForCausalLM if info.kind == "causal" else transformers.AutoModelForSequenceClassification
    with torch.device("meta"):
        skeleton = auto.from_config(cfg)
    roles = target_module_names(skeleton, VectorFitConfig(variant=method), with_roles=True)
    v = VARIANTS[method]
    return sum((role in v["sigma"]) + (role in v["bias"]) for role in roles.values())
