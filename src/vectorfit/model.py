"""``VectorFitModel``: injects VectorFit layers into a model, and saves, loads, merges and disables them.

The wrapper follows peft's ``PeftModel`` closely so that code written for peft reads the same:
``get_vectorfit_model(base, config)``, ``print_trainable_parameters()``, ``save_pretrained``,
``from_pretrained``, ``merge_and_unload``, ``disable_adapter``. Attribute access falls through to
the base model (``model.config`` is the base model's config).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from . import adapter_io, base_check, distributed, merge_compat, tasks
from .avf import AdaptiveVectorFreezing, training_strength
from .cache import SVDCache, fingerprint
from .config import ConfigError, VectorFitConfig
from .layer import SVDLinear
from .notices import warn
from .progress import progress_enabled, svd_progress
from .targets import find_targets, is_conv1d
from .adapters import AdaptersMixin, ModulesToSaveWrapper
from .unsupported import UnsupportedMethodsMixin

logger = logging.getLogger(__name__)


def _matrix_of(module: nn.Module) -> torch.Tensor:
    """The ``d_out x d_in`` matrix of a Linear or (transposed) Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> list[str]:
    """Put ``new`` at ``name`` and at every other name the same module object is registered under
    (a layer shared by two parents stays shared; replacing it under one name only would leave the
    other path computing with the old layer). Returns all those names."""
    old = root.get_submodule(name)
    names = [n for n, m in root.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for n in names:
        parent_name, _, child = n.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return names


def _plain_layer(info: dict, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """A frozen ``nn.Linear`` (or the target's ``Conv1D`` class) holding ``weight`` (``d_out x d_in``)
    and ``bias``, in the weight's dtype and device."""
    d_out, d_in = weight.shape
    if info["conv1d"]:
        new = info["module_class"](d_out, d_in)  # Conv1D(nf=d_out, nx=d_in) stores d_in x d_out
        new.weight = nn.Parameter(weight.t().contiguous().clone())
        new.bias = nn.Parameter(bias.detach().to(weight.dtype).clone()) if bias is not None else None
    else:
        new = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias.detach().to(weight.dtype))
    return new.requires_grad_(False)


class VectorFitModel(AdaptersMixin, UnsupportedMethodsMixin, nn.Module):
    """A base model with VectorFit layers in place of its target matrices.

    Build it with :func:`get_vectorfit_model` or :meth:`from_pretrained`.

    Args:
        model: the base model; modified in place (its target layers are replaced).
        config: what to adapt.
        fingerprints: known fingerprints of target weights (skips hashing them again).
        adapter_name: the name of this first adapter (more: :meth:`add_adapter`, :meth:`load_adapter`).
    """

    def __init__(self, model: nn.Module, config: VectorFitConfig, fingerprints: Optional[dict] = None,
                 adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(model, VectorFitModel):
            raise ConfigError("the model already has VectorFit layers; pass its base model (model.get_base_model())")
        config = tasks.apply_task_type(model, config)  # peft's task_type: add the task head to modules_to_save
        new_params = tasks.newly_initialised_parameters(model)  # before wrapping changes the parameters
        self.base_model = model
        self.vectorfit_config = config
        self._targets: dict[str, dict[str, Any]] = {}
        self._base_param_count = sum(p.numel() for p in model.parameters())
        self.svd_cache = SVDCache(config.cache_dir, enabled=config.svd_cache)
        for p in model.parameters():
            p.requires_grad_(False)
        self._factors_shared = distributed.begin_decomposition()  # rank 0's factors on every rank?
        self._inject(fingerprints or {}, adapter_name)
        self._wrap_modules_to_save(adapter_name)
        tasks.warn_frozen_new_parameters(new_params, [*self._targets, *self._modules_to_save], type(model).__name__)
        vectors = [(f"{n}.{a}", layer, a) for n, layer in self.vectorfit_layers() for a in ("sigma", "bias") if self._trains(layer, a)]
        self.avf = AdaptiveVectorFreezing(vectors, config.avf) if config.uses_avf else None
        self._init_adapters(adapter_name)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _trains(layer: SVDLinear, attr: str) -> bool:
        return layer.train_sigma if attr == "sigma" else layer.train_bias

    def _inject(self, fingerprints: dict, adapter_name: str) -> None:
        cfg = self.vectorfit_config
        targets = list(find_targets(self.base_model, cfg.target_modules, cfg.exclude_modules, skip=cfg.modules_to_save))
        for name, module, role in svd_progress(targets, len(targets), progress_enabled(cfg.progress) and distributed.is_main_process()):
            train_sigma = role in cfg.sigma_roles
            train_bias = role in cfg.bias_roles
            if not (train_sigma or train_bias):
                continue  # e.g. f1/f2 in sigma_attn: left exactly as they are
            matrix = _matrix_of(module)
            fp = fingerprints.get(name) or fingerprint(matrix)
            # Under torch.distributed, rank 0 decomposes and broadcasts (distributed.py says why).
            svd = distributed.decompose(self.svd_cache, matrix, fp, name) if train_sigma else None
            layer = SVDLinear(matrix, module.bias, train_sigma, train_bias, svd=svd, sigma_param=cfg.sigma_param, adapter_name=adapter_name)
            aliases = _set_submodule(self.base_model, name, layer)
            if len(aliases) > 1:
                warn(f"module {name!r} is also registered as {[a for a in aliases if a != name]} (the same layer object): "
                     "it is adapted once and the adapted layer serves every name")
            self._targets[name] = {
                "role": role,
                "shape": list(matrix.shape),
                "fingerprint": fp,
                "conv1d": is_conv1d(module),
                "module_class": type(module),
                "sigma": train_sigma,
                "bias": train_bias,
                "had_bias": module.bias is not None,
                "dtype": base_check.dtype_name(matrix.dtype),
            }
        if not self._targets:
            raise ConfigError(
                f"variant {cfg.variant!r} trains nothing on the selected targets {[n for n, _, _ in targets][:6]}...: "
                "its roles (attention/MLP) do not occur among them; widen target_modules or pick another variant"
            )

    def _wrap_modules_to_save(self, adapter_name: str) -> None:
        self._modules_to_save: list[str] = []
        for entry in self.vectorfit_config.modules_to_save or []:
            names = [n for n, _ in self.base_model.named_modules() if n and (n == entry or n.endswith("." + entry))]
            names = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
            if not names:
                raise ConfigError(
                    f"VectorFitConfig.modules_to_save entry {entry!r} matches no module of this "
                    f"{type(self.base_model).__name__}; top-level modules are "
                    f"{[n for n, _ in self.base_model.named_children()]}"
                )
            for name in names:
                _set_submodule(self.base_model, name, ModulesToSaveWrapper(self.base_model.get_submodule(name), adapter_name))
                self._modules_to_save.append(name)

    # ------------------------------------------------------------------ basics
    def forward(self, *args: Any, adapter_names: Optional[list] = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one adapter name or ``"__base__"`` per batch
        row) runs each row with its own adapter in the same pass."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with self._mixed(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel at construction: it then does not re-broadcast the frozen
        # U/Vh/sigma0 buffers before every forward pass (see distributed.py), whatever broadcast_buffers.
        # Only when the factors came from rank 0: otherwise DDP's initial sync must equalise them.
        frozen = distributed.ddp_ignored_buffer_names(self) if self.__dict__.get("_factors_shared") else []
        return frozen + list(self.__dict__.get("_ddp_extra_ignored", []))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: list[str]) -> None:
        # DDP._set_params_and_buffers_to_ignore_for_model(model, names) assigns the attribute.
        self.__dict__["_ddp_extra_ignored"] = list(names)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def vectorfit_layers(self) -> Iterator[tuple[str, SVDLinear]]:
        """``(name, layer)`` for every VectorFit layer, in model order."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, SVDLinear):
                yield name, module

    def trainable_vectors(self) -> dict[str, nn.Parameter]:
        """The trained parameters by name: ``<module>.sigma`` (``<module>.sigma_delta`` with
        ``sigma_param="relative"``) and ``<module>.bias``."""
        return {f"{n}.{layer.trained_attr(a)}": getattr(layer, layer.trained_attr(a))
                for n, layer in self.vectorfit_layers() for a in ("sigma", "bias") if self._trains(layer, a)}

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)``: trainable counts the vectors and the saved heads; total is the base
        model's parameter count plus the parameters VectorFit added (singular values, new biases)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        added = sum(
            (layer.sigma.numel() if layer.sigma is not None else 0) + (layer.out_features if layer.train_bias and not layer.had_bias else 0)
            for _, layer in self.vectorfit_layers()
        )
        return trainable, self._base_param_count + added

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        vectors = sum(p.numel() for p in self.trainable_vectors().values())
        print(
            f"trainable params: {trainable:,} (vectors: {vectors:,}, heads: {trainable - vectors:,}) || "
            f"all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
        )

    # ------------------------------------------------------------------ merge / disable
    def merge(self) -> None:
        """Fold the trained vectors into dense weights in place (idempotent); see :meth:`unmerge`."""
        for _, layer in self.vectorfit_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.vectorfit_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Return the base model with plain ``nn.Linear`` / ``Conv1D`` layers holding the merged
        weights and the trained heads: same outputs, no VectorFit module left, no overhead.

        A bias trained on a layer that had none is kept; the config's bias flags are set so that
        ``save_pretrained`` -> ``from_pretrained`` reloads it (a warning names layers no flag can
        describe, e.g. Mistral's or T5's); see :mod:`vectorfit.merge_compat`."""
        added = []
        for name, layer in list(self.vectorfit_layers()):
            with torch.no_grad():
                new = _plain_layer(self._targets[name], layer.dense_weight(), layer.bias)
            _set_submodule(self.base_model, name, new)
            if layer.bias is not None and not self._targets[name]["had_bias"]:
                added.append(name)
        for name in self._modules_to_save:
            _set_submodule(self.base_model, name, self.base_model.get_submodule(name).trained_module)
        self._targets, self._modules_to_save = {}, []
        merge_compat.reconcile_biases(self.base_model, added)
        return self.base_model

    def unload(self) -> nn.Module:
        """Return the base model without the adapter (peft's ``unload``): every VectorFit layer becomes
        a plain ``nn.Linear`` / ``Conv1D`` with the *original* weight and bias, and the saved heads go
        back to their original modules. Nothing trained is kept.

        Exact for biases, heads and bias-only layers; a decomposed weight is rebuilt as
        ``U diag(s0) Vh`` in float32, equal to the original to float32 round-off (about 1e-7
        relative, as with :meth:`disable_adapter`), not bit for bit. Parameters stay frozen.

        Returns:
            The base model (modified in place); this ``VectorFitModel`` is empty afterwards.
        """
        for name, layer in list(self.vectorfit_layers()):
            with torch.no_grad():
                bias = layer.current_bias(original=True) if layer.had_bias else None
                new = _plain_layer(self._targets[name], layer.dense_weight(original=True), bias)
            _set_submodule(self.base_model, name, new)
        for name in self._modules_to_save:
            _set_submodule(self.base_model, name, self.base_model.get_submodule(name).original_module)
        self._targets, self._modules_to_save = {}, []
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the ``with`` block the model computes with the base weights and original heads
        (equal to the base model's outputs to float32 round-off for decomposed layers; exactly for
        bias-only layers and heads)."""
        layers = [layer for _, layer in self.vectorfit_layers()]
        heads = [self.base_model.get_submodule(n) for n in self._modules_to_save]
        for m in layers + heads:
            m.disabled = True
        try:
            yield
        finally:
            for m in layers + heads:
                m.disabled = False

    # ------------------------------------------------------------------ diagnostics
    @torch.no_grad()
    def training_strengths(self) -> dict[str, float]:
        """``mean(|v_0 - v_t|)`` per trained vector (the quantity AVF ranks), by vector name."""
        return {
            f"{name}.{attr}": float(training_strength(layer, attr))
            for name, layer in self.vectorfit_layers()
            for attr in ("sigma", "bias")
            if self._trains(layer, attr)
        }

    # ------------------------------------------------------------------ adapters
    def _save_active(self, save_directory: Union[str, Path]) -> None:
        """Write the active adapter's ``adapter_config.json`` and ``adapter_model.safetensors``
        (trained vectors, heads, base-weight fingerprints) atomically into ``save_directory``."""
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.trainable_vectors().items():
            tensors[name] = p.detach()
        for name in self._modules_to_save:
            for pname, t in self.base_model.get_submodule(name).trained_module.state_dict().items():
                tensors[f"{name}.{pname}"] = t.detach()
        targets = {
            n: {k: v for k, v in info.items() if k != "module_class"} for n, info in self._targets.items()
        }
        layers = dict(self.vectorfit_layers())
        for name, info in targets.items():
            if info["sigma"]:  # what the trained weight looks like here; checked at load (base_check)
                info["signature"] = base_check.encode(base_check.signature(layers[name].U, layers[name].sigma, layers[name].Vh))
        adapter_io.save_adapter(
            save_directory,
            tensors,
            config=self.vectorfit_config.to_dict(),
            targets=targets,
            modules_to_save=self._modules_to_save,
            base_model_class=type(self.base_model).__name__,
            base_tensors=base_check.record_other_tensors(self._other_base_tensors(self.base_model, self._targets, self._modules_to_save)),
        )

    @staticmethod
    def _other_base_tensors(model: nn.Module, targets: dict, heads: list) -> dict:
        """The base tensors an adapter depends on besides its target matrices: everything outside
        the targets and saved heads, plus the target biases it does not train."""
        extra = {f"{n}.bias": model.get_submodule(n).bias for n, i in targets.items() if i.get("had_bias") and not i.get("bias", True)}
        return base_check.other_tensors(model, [*targets, *heads], extra)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: Union[str, Path],
        is_trainable: bool = False,
        cache_dir: Optional[str] = None,
        svd_cache: bool = True,
        check_base: str = "error",
        adapter_name: str = "default",
    ) -> "VectorFitModel":
        """Load an adapter onto a fresh base model (more adapters of the same base: :meth:`load_adapter`).

        Args:
            model: the base model the adapter was trained on (checked by fingerprints).
            adapter_path: folder written by :meth:`save_pretrained`.
            is_trainable: keep the vectors trainable (to continue training); otherwise they are frozen.
            cache_dir, svd_cache: as in :class:`VectorFitConfig`.
            check_base: ``"error"`` (default) refuses a base whose tensors outside the adapted
                matrices (embeddings, norms, an unsaved head) differ from the training model's;
                ``"warn"`` loads it with a warning. Target matrices must always match.
            adapter_name: the name the adapter gets here.

        Raises:
            adapter_io.AdapterError: missing/corrupt files, or a base model that differs from the
                one the adapter was trained on (the message names the first mismatching module).

        Warns:
            VectorFitWarning: a decomposed layer computes a trained weight that deviates from the
                one saved beyond tolerance (another SVD driver or device; see :mod:`vectorfit.base_check`).
        """
        if check_base not in ("error", "warn"):
            raise ConfigError(f"check_base={check_base!r} is invalid: use 'error' (refuse a differing base) or 'warn'")
        meta, tensors = adapter_io.load_adapter(adapter_path)
        config = adapter_io.config_of(meta, adapter_path, cache_dir=cache_dir, svd_cache=svd_cache)
        saved = meta["targets"]
        # Check the base before any SVD: a wrong base fails in milliseconds, not after a minute.
        found = {n: m for n, m, _ in find_targets(model, config.target_modules, config.exclude_modules, skip=config.modules_to_save)}
        absent = [n for n in saved if n not in found]
        if absent:
            raise adapter_io.AdapterError(
                f"the base model has no target module {absent[0]!r} that the adapter at {adapter_path} was trained on "
                f"(adapter base class: {meta.get('base_model_class')}, this model: {type(model).__name__})"
            )
        # model order, so the error names the first mismatch
        fingerprints = base_check.check_targets({n: _matrix_of(m) for n, m in found.items()}, saved, adapter_path)
        if "base_tensors" in meta:  # adapters saved before this check have no record
            other = cls._other_base_tensors(model, {n: i for n, i in saved.items() if n in found}, meta.get("modules_to_save", []))
            base_check.enforce_other_tensors(other, meta["base_tensors"], adapter_path, check_base)
        vf = cls._build(model, config, fingerprints, adapter_name)
        extra = set(vf._targets) - set(saved)
        if extra:
            raise adapter_io.AdapterError(f"the adapter does not cover target modules {sorted(extra)[:5]} of this model")
        vf._fill(adapter_name, tensors, adapter_path)
        base_check.check_signatures(dict(vf.vectorfit_layers()), saved)
        if not is_trainable:
            for p in vf.parameters():
                p.requires_grad_(False)
        return vf

    @staticmethod
    def _build(model: nn.Module, config: VectorFitConfig, fingerprints: Optional[dict] = None,
               adapter_name: str = "default") -> "VectorFitModel":
        from .adapters import _check_name

        return _class_for(type(model))(model, config, fingerprints, _check_name(adapter_name))


_CLASSES: dict[type, type] = {}


def _class_for(base_cls: type) -> type:
    """A ``VectorFitModel`` subclass whose ``forward`` shows the base class's signature.

    ``transformers.Trainer`` reads the model class's ``forward`` signature to decide which dataset
    columns to keep and which inputs are labels; a bare ``forward(*args, **kwargs)`` would make it
    drop every column. The subclass only relabels the signature; behaviour is identical.
    """
    if base_cls not in _CLASSES:
        base_forward = getattr(base_cls, "forward", None)

        def forward(self: VectorFitModel, *args: Any, **kwargs: Any) -> Any:
            return VectorFitModel.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_forward)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        forward.__doc__ = getattr(base_forward, "__doc__", None)
        _CLASSES[base_cls] = type(f"VectorFitModelFor{base_cls.__name__}", (VectorFitModel,), {"forward": forward, "__module__": __name__})
    return _CLASSES[base_cls]


def get_vectorfit_model(model: nn.Module, config: Optional[VectorFitConfig] = None, adapter_name: str = "default") -> VectorFitModel:
    """Replace the target layers of ``model`` by VectorFit layers and freeze everything else.

    Args:
        model: a pre-trained model (modified in place).
        config: what to adapt; ``VectorFitConfig()`` (the full method on default targets) if ``None``.
        adapter_name: the name of this first adapter.

    Returns:
        A :class:`VectorFitModel` whose forward is the base model's forward.
    """
    return VectorFitModel._build(model, config if config is not None else VectorFitConfig(), adapter_name=adapter_name)


def target_module_names(
    model: nn.Module, config: Optional[VectorFitConfig] = None, with_roles: bool = False
) -> Union[list[str], dict[str, str]]:
    """Names of the modules ``get_vectorfit_model(model, config)`` would adapt, in model order.

    Useful to give a baseline (e.g. a peft LoRA) exactly the same targets. Modules of a role the
    variant leaves alone (f1/f2 in ``sigma_attn``) are included: they are the variant's targets.

    Args:
        model: the base model (before wrapping).
        config: the targets' settings; ``VectorFitConfig()`` if ``None``.
        with_roles: return ``{name: "attn" | "mlp"}`` instead of a list.
    """
    config = tasks.apply_task_type(model, config if config is not None else VectorFitConfig())
    found = {n: role for n, _, role in find_targets(model, config.target_modules, config.exclude_modules, skip=config.modules_to_save)}
    return found if with_roles else list(found)
