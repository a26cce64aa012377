"""Typed configuration for VectorFit and Adaptive Vector Freezing (AVF).

Every validation error names the field, the value it got and what to do instead, because a
configuration mistake found at step 0 is cheap and one found after an hour of training is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import _peft  # noqa: F401  (adds PeftType.VECTORFIT before the config below uses it)
from peft.config import PeftConfig
from peft.utils.peft_types import PeftType

from .errors import AdapterError, ConfigError
from .task_types import TASK_TYPES

#: Parameterisations of the trained singular values (see VectorFitConfig.sigma_param).
SIGMA_PARAMS = ("absolute", "relative")

#: What each variant trains (paper section 6.3, SPEC table). ``sigma`` says on which roles the
#: singular values are trained, ``bias`` on which roles the biases are trained.
#: Roles: "attn" = q, k, v, o (and fused qkv, cross-attention); "mlp" = f1, f2 (gate/up/down).
VARIANTS: dict[str, dict[str, Any]] = {
    "sigma_attn": {"sigma": ("attn",), "bias": (), "avf": False},
    "sigma": {"sigma": ("attn", "mlp"), "bias": (), "avf": False},
    "sigma_attn_bias": {"sigma": ("attn",), "bias": ("attn", "mlp"), "avf": False},
    "no_avf": {"sigma": ("attn", "mlp"), "bias": ("attn", "mlp"), "avf": False},
    "vectorfit": {"sigma": ("attn", "mlp"), "bias": ("attn", "mlp"), "avf": True},
}


def _bad(field_name: str, value: Any, fix: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is invalid: {fix}")


@dataclass
class AVFConfig:
    """Adaptive Vector Freezing schedule (paper section 3.2, appendix C).

    AVF steps happen at ``start_step, start_step + interval, ...`` (``num_freezes`` of them). At each,
    the exponential moving average of every vector's training strength is updated and the ``k``
    vectors with the largest average are frozen; all others become trainable again.

    Args:
        k: number of vectors frozen at each AVF step (paper: 5).
        beta: EMA factor for the training strength (paper: 0.99).
        start_step: first AVF step t_i (optimizer steps, counted from 1). ``None``: derived from the
            run length, see :meth:`resolve`.
        interval: steps between AVF steps t_f. ``None``: derived (about one epoch).
        num_freezes: number of AVF steps n_f. ``None``: derived.
    """

    k: int = 5
    beta: float = 0.99
    start_step: Optional[int] = None
    interval: Optional[int] = None
    num_freezes: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise _bad("AVFConfig.k", self.k, "use a positive integer (the paper uses 5)")
        # bool is an int to Python but never a meaningful beta; NaN fails the range test.
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= float(self.beta) < 1.0:
            raise _bad("AVFConfig.beta", self.beta, "use a float in [0, 1) (the paper uses 0.99); 1 or more would never update the average")
        for name in ("start_step", "interval", "num_freezes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise _bad(f"AVFConfig.{name}", v, "use a positive integer, or None to derive it from the run length")

    @classmethod
    def from_dict(cls, d: Any) -> "AVFConfig":
        """An ``AVFConfig`` from a dict of its fields; unknown fields are a :class:`ConfigError`."""
        if not isinstance(d, dict):
            raise _bad("VectorFitConfig.avf", d, "pass an AVFConfig, a dict of its fields, or None")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown AVFConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**d)

    @property
    def is_resolved(self) -> bool:
        return None not in (self.start_step, self.interval, self.num_freezes)

    def resolve(self, total_steps: int, steps_per_epoch: Optional[int] = None) -> "AVFConfig":
        """Fill the fields left ``None`` from the run length (appendix C heuristics).

        The paper's schedules (tables 7, 9, 11, 13) start freezing after roughly 1/3 to 1/2 of
        training, repeat about once an epoch and freeze 4 to 27 times. We start at 40% of the run,
        repeat once an epoch but at least 4 times in what remains (short runs have few epochs), and
        keep every AVF step inside the run.

        Args:
            total_steps: total number of optimizer steps of the run.
            steps_per_epoch: optimizer steps per epoch, if known.

        Returns:
            A new, fully resolved ``AVFConfig``; explicit fields are kept as they are.
        """
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise _bad("total_steps", total_steps, "pass the run's number of optimizer steps (a positive integer)")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise _bad("steps_per_epoch", steps_per_epoch, "pass a positive integer or None")
        # Never start at step 1 unless the run is one step long: before any update every strength
        # is 0 and the "top-k" would just be the first k vectors.
        start = self.start_step if self.start_step is not None else min(total_steps, max(2, int(round(0.4 * total_steps))))
        remaining = max(total_steps - start, 0)
        interval = self.interval
        if interval is None:
            interval = steps_per_epoch if steps_per_epoch is not None else max(1, remaining // 8)
            interval = max(1, min(interval, remaining // 4 if remaining >= 4 else 1))
        n = self.num_freezes
        if n is None:
            n = max(1, min(27, remaining // interval + 1))
        return dataclasses.replace(self, start_step=start, interval=interval, num_freezes=n)

    @classmethod
    def for_training(cls, total_steps: int, steps_per_epoch: Optional[int] = None, **kwargs: Any) -> "AVFConfig":
        """An ``AVFConfig`` resolved for a run of ``total_steps`` optimizer steps.

        Example: ``AVFConfig.for_training(total_steps=600, steps_per_epoch=200)``.
        """
        return cls(**kwargs).resolve(total_steps, steps_per_epoch)

    def schedule(self) -> list[int]:
        """The AVF steps, in order. Requires a resolved config."""
        if not self.is_resolved:
            raise ConfigError(
                "the AVF schedule is not resolved: set AVFConfig.start_step/interval/num_freezes, use "
                "AVFConfig.for_training(total_steps, steps_per_epoch), or call model.avf.set_total_steps(...)"
            )
        return [self.start_step + i * self.interval for i in range(self.num_freezes)]  # type: ignore[operator]


TargetSpec = Union[None, str, list]

#: Fields of :class:`VectorFitConfig` that describe this machine or process, not the adapter: never
#: written to ``adapter_config.json``.
LOCAL_FIELDS = ("svd_cache", "cache_dir", "progress", "check_base")
#: Fields VectorFit fills itself (when the model is wrapped, and when it is saved); they record what
#: the adapter depends on, so loading can refuse a base model it was not trained on.
RECORD_FIELDS = ("targets", "base_tensors", "base_model_class", "weights_sha256")
_CONFIG_NAME, _WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class VectorFitConfig(PeftConfig):
    """What to adapt and how: a ``peft.PeftConfig`` whose ``peft_type`` is ``VECTORFIT``.

    ``peft.get_peft_model(model, VectorFitConfig(...))`` (or :func:`vectorfit.get_vectorfit_model`)
    wraps a model; ``save_pretrained`` writes it as ``adapter_config.json``.

    Args:
        variant: one of ``vectorfit`` (default, the full method), ``no_avf``, ``sigma``,
            ``sigma_attn``, ``sigma_attn_bias`` (SPEC table / paper section 6.3).
        target_modules: ``None`` for the architecture's default (q, k, v, o, f1, f2); a list of module
            names or dotted suffixes; a regex string (full match against the module name); or
            ``"all-linear"`` (every Linear/Conv1D except the output head).
        exclude_modules: names / dotted suffixes (list) or a regex (string) removed from the targets.
        modules_to_save: new task heads trained in full and saved with the adapter (e.g.
            ``["classifier"]``). ``task_type="SEQ_CLS"`` adds ``classifier``/``score`` (peft's rule).
        avf: AVF schedule (:class:`AVFConfig` or a dict of its fields); only for variants with AVF.
            ``None`` there means the default ``AVFConfig()`` whose steps are derived from the run length.
        sigma_param: ``"absolute"`` (the paper's form, the default): ``s`` itself is the parameter.
            ``"relative"``: ``s = s0 * (1 + z)`` with ``z`` trained from 0 (Transformer²'s SVF form), so
            Adam changes each singular value by a *relative* amount whatever its size.
        svd_cache: cache decompositions on disk (keyed by the weight's content). Not saved.
        cache_dir: where; ``None`` means ``$VECTORFIT_CACHE/svd`` or ``~/.cache/vectorfit/svd``. Not saved.
        progress: a progress bar over the matrices while they are fingerprinted and decomposed
            (shown only if that takes over a second). ``None``: on unless ``$VECTORFIT_PROGRESS=0``. Not saved.
        check_base: when an adapter is loaded: ``"error"`` (default) refuses a base whose tensors
            outside the adapted matrices (embeddings, norms, an unsaved head) differ from the
            training model's; ``"warn"`` loads it with a warning. Target matrices must always match.
            ``PeftModel.from_pretrained(base, path, check_base="warn")`` sets it. Not saved.
        targets: the adapter's record of its targets (shapes, roles, fingerprints, decomposition
            sketches). Filled by VectorFit when saving; leave it ``None``.
        base_tensors: fingerprints of every other base tensor the adapted model computes with.
            Filled by VectorFit; leave it ``None``.
        base_model_class: the base model's class name. Filled by VectorFit; leave it ``None``.
        weights_sha256: the checksum of the adapter's weights file. Filled by VectorFit; leave it ``None``.
    """

    variant: str = field(default="vectorfit", metadata={"help": f"one of {sorted(VARIANTS)}"})
    target_modules: Optional[Union[list, str]] = field(default=None, metadata={"help": "modules to adapt; None: q,k,v,o,f1,f2"})
    exclude_modules: Optional[Union[list, str]] = field(default=None, metadata={"help": "modules to leave out"})
    modules_to_save: Optional[list] = field(default=None, metadata={"help": "new task heads, trained and saved"})
    avf: Optional[Union[AVFConfig, dict]] = field(default=None, metadata={"help": "Adaptive Vector Freezing schedule"})
    sigma_param: str = field(default="absolute", metadata={"help": "'absolute' or 'relative' singular values"})
    svd_cache: bool = field(default=True, metadata={"help": "cache SVDs on disk"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "SVD cache folder"})
    progress: Optional[bool] = field(default=None, metadata={"help": "progress bar of the first SVD"})
    check_base: str = field(default="error", metadata={"help": "'error' or 'warn' on a differing base at load"})
    targets: Optional[dict] = field(default=None, metadata={"help": "filled by VectorFit"})
    base_tensors: Optional[dict] = field(default=None, metadata={"help": "filled by VectorFit"})
    base_model_class: Optional[str] = field(default=None, metadata={"help": "filled by VectorFit"})
    weights_sha256: Optional[str] = field(default=None, metadata={"help": "filled by VectorFit"})

    def __post_init__(self) -> None:
        self.peft_type = PeftType.VECTORFIT
        if self.task_type is not None:
            name = getattr(self.task_type, "value", self.task_type)  # peft.TaskType is a str Enum
            if not isinstance(name, str) or name.upper() not in TASK_TYPES:
                raise _bad("VectorFitConfig.task_type", self.task_type, f"use one of {', '.join(TASK_TYPES)}, or None")
            self.task_type = name.upper()
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise _bad("VectorFitConfig.variant", self.variant, f"choose one of {sorted(VARIANTS)}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise _bad("VectorFitConfig.progress", self.progress, "use True, False, or None (on unless VECTORFIT_PROGRESS=0)")
        if self.sigma_param not in SIGMA_PARAMS:
            raise _bad("VectorFitConfig.sigma_param", self.sigma_param, f"use one of {', '.join(SIGMA_PARAMS)}")
        if self.check_base not in ("error", "warn"):
            raise _bad("VectorFitConfig.check_base", self.check_base, "use 'error' (refuse a differing base) or 'warn'")
        if isinstance(self.avf, dict):
            self.avf = AVFConfig.from_dict(self.avf)
        if VARIANTS[self.variant]["avf"]:
            if self.avf is None:
                self.avf = AVFConfig()
            elif not isinstance(self.avf, AVFConfig):
                raise _bad("VectorFitConfig.avf", self.avf, "pass an AVFConfig, a dict of its fields, or None")
        elif self.avf is not None:
            raise _bad("VectorFitConfig.avf", self.avf,
                       f"variant {self.variant!r} has no Adaptive Vector Freezing; drop avf= or use variant='vectorfit'")
        for name in ("target_modules", "exclude_modules"):
            v = getattr(self, name)
            if isinstance(v, (tuple, set, frozenset)):
                v = sorted(v) if isinstance(v, (set, frozenset)) else list(v)
                setattr(self, name, v)
            if v is None:
                continue
            if isinstance(v, str):
                if v != "all-linear" or name == "exclude_modules":
                    try:
                        re.compile(v)
                    except re.error as e:
                        raise _bad(f"VectorFitConfig.{name}", v, f"not a valid regex ({e}); pass a list of names instead") from None
            elif isinstance(v, list):
                if not v or not all(isinstance(x, str) and x for x in v):
                    raise _bad(f"VectorFitConfig.{name}", v, "use a non-empty list of module names, a regex string or None")
            else:
                raise _bad(f"VectorFitConfig.{name}", v, "use None, a list of module names, a regex string or 'all-linear'")
        if not isinstance(self.svd_cache, bool):
            raise _bad("VectorFitConfig.svd_cache", self.svd_cache, "use True or False")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise _bad("VectorFitConfig.cache_dir", self.cache_dir, "use a folder path (str or os.PathLike) or None")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, (str, tuple, set)):
                self.modules_to_save = [self.modules_to_save] if isinstance(self.modules_to_save, str) else list(self.modules_to_save)
            if not all(isinstance(x, str) and x for x in self.modules_to_save):
                raise _bad("VectorFitConfig.modules_to_save", self.modules_to_save, "use a list of module names, e.g. ['classifier']")
            unique = list(dict.fromkeys(self.modules_to_save))
            if len(unique) != len(self.modules_to_save):
                self.modules_to_save = unique  # peft's task classes append their head names again on every load
        _check_record(self)

    @property
    def sigma_roles(self) -> tuple:
        return VARIANTS[self.variant]["sigma"]

    @property
    def bias_roles(self) -> tuple:
        return VARIANTS[self.variant]["bias"]

    @property
    def uses_avf(self) -> bool:
        return VARIANTS[self.variant]["avf"]

    def to_dict(self) -> dict:
        """The fields ``adapter_config.json`` holds: everything but the machine-local ones."""
        d = super().to_dict()
        for k in LOCAL_FIELDS:
            d.pop(k, None)
        # The record of the base model, made by the tuner when the adapter is saved (model.py).
        d.update(self.__dict__.get("_vectorfit_record") or {})
        return d

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``adapter_config.json`` atomically (a reader sees the old file or the new one). peft
        writes the weights first: their SHA-256 goes into the config, so a torn or damaged pair is
        refused at load instead of computing with wrong numbers."""
        from .cache import atomic_write_bytes, plain_open_mode

        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise AdapterError(f"cannot save the adapter to {folder}: it exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        out = self.to_dict()
        out = {k: sorted(v) if isinstance(v, set) else v for k, v in out.items()}
        if kwargs.get("auto_mapping_dict") is not None:
            out["auto_mapping"] = kwargs["auto_mapping_dict"]
        weights = folder / _WEIGHTS_NAME
        out["weights_sha256"] = _sha256(weights) if weights.is_file() else None
        if weights.is_file():
            # safetensors creates the file 0o600 whatever the umask; give it what open(path, "w") would:
            # the existing config's mode on a re-save, the umask's in a new folder.
            os.chmod(weights, plain_open_mode(folder / _CONFIG_NAME))
        data = (json.dumps(out, indent=2, sort_keys=True) + "\n").encode()  # fails before touching the file
        atomic_write_bytes(folder / _CONFIG_NAME, data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs: Any) -> "VectorFitConfig":
        """peft's loader, plus: a local adapter's weights must match the checksum its config recorded."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        cfg_path = folder / _CONFIG_NAME
        if cfg_path.is_file():
            try:
                json.loads(cfg_path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise AdapterError(f"adapter config {cfg_path} is corrupt (not valid JSON: {e})") from None
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (TypeError, ConfigError) as e:
            raise AdapterError(f"adapter config {cfg_path} holds an invalid VectorFit config: {e}") from None
        if cfg_path.is_file() and config.weights_sha256 is not None:
            weights = folder / _WEIGHTS_NAME
            if not weights.is_file():
                raise AdapterError(f"adapter file {weights} is missing (its config {cfg_path} is there)")
            if _sha256(weights) != config.weights_sha256:
                raise AdapterError(f"adapter weights {weights} are corrupt or do not belong to {cfg_path} (checksum mismatch)")
        return config

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_record(config: VectorFitConfig) -> None:
    """Refuse a record (``targets`` / ``base_tensors``) of the wrong shape, naming the field: a
    hand-edited or damaged ``adapter_config.json`` must fail here, not deep inside loading."""

    def corrupt(what: str) -> ConfigError:
        return ConfigError(f"VectorFitConfig.{what}; this adapter_config.json is damaged or was not written by vectorfit: "
                           "save the adapter again with save_pretrained")

    targets = config.targets
    if targets is not None:
        if not isinstance(targets, dict) or not targets:
            raise corrupt("targets is not a non-empty object of target modules")
        for name, info in targets.items():
            if not isinstance(info, dict):
                raise corrupt(f"targets[{name!r}] is a {type(info).__name__}, expected an object")
            shape = info.get("shape")
            if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise corrupt(f"targets[{name!r}].shape is {shape!r}, expected [d_out, d_in]")
            if not isinstance(info.get("fingerprint"), str):
                raise corrupt(f"targets[{name!r}].fingerprint is not a string")
            for key in ("sigma", "bias"):
                if not isinstance(info.get(key), bool):
                    raise corrupt(f"targets[{name!r}].{key} is {info.get(key)!r}, expected true or false")
    base = config.base_tensors
    if base is not None and not (isinstance(base, dict) and all(isinstance(v, dict) and isinstance(v.get("fingerprint"), str) for v in base.values())):
        raise corrupt("base_tensors is not an object of {fingerprint, dtype} entries")
