"""``VectorFitModel``: injects VectorFit layers into a model, and saves, loads, merges and disables them.

The wrapper follows peft's ``PeftModel`` closely so that code written for peft reads the same:
``get_vectorfit_model(base, config)``, ``print_trainable_parameters()``, ``save_pretrained``,
``from_pretrained``, ``merge_and_unload``, ``disable_adapter``. Attribute access falls through to
the base model (``model.config`` is the base model's config).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from . import adapter_io
from .avf import AdaptiveVectorFreezing, training_strength
from .cache import SVDCache, fingerprint
from .config import ConfigError, VectorFitConfig
from .layer import SVDLinear
from .targets import find_targets, is_conv1d

logger = logging.getLogger(__name__)


def _matrix_of(module: nn.Module) -> torch.Tensor:
    """The ``d_out x d_in`` matrix of a Linear or (transposed) Conv1D."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class ModulesToSaveWrapper(nn.Module):
    """Keeps a new task head's original weights next to the trained copy (peft's
    "modules_to_save"): the copy trains and is saved, the original serves ``disable_adapter``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.original_module if self.disabled else self.trained_module)(*args, **kwargs)


class VectorFitModel(nn.Module):
    """A base model with VectorFit layers in place of its target matrices.

    Build it with :func:`get_vectorfit_model` or :meth:`from_pretrained`.

    Args:
        model: the base model; modified in place (its target layers are replaced).
        config: what to adapt.
        fingerprints: known fingerprints of target weights (skips hashing them again).
    """

    def __init__(self, model: nn.Module, config: VectorFitConfig, fingerprints: Optional[dict] = None) -> None:
        super().__init__()
        if isinstance(model, VectorFitModel):
            raise ConfigError("the model already has VectorFit layers; pass its base model (model.get_base_model())")
        self.base_model = model
        self.vectorfit_config = config
        self._targets: dict[str, dict[str, Any]] = {}
        self._base_param_count = sum(p.numel() for p in model.parameters())
        self.svd_cache = SVDCache(config.cache_dir, enabled=config.svd_cache)
        for p in model.parameters():
            p.requires_grad_(False)
        self._inject(fingerprints or {})
        self._wrap_modules_to_save()
        vectors = [(f"{n}.{a}", layer, a) for n, layer in self.vectorfit_layers() for a in ("sigma", "bias") if self._trains(layer, a)]
        self.avf = AdaptiveVectorFreezing(vectors, config.avf) if config.uses_avf else None

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _trains(layer: SVDLinear, attr: str) -> bool:
        return layer.train_sigma if attr == "sigma" else layer.train_bias

    def _inject(self, fingerprints: dict) -> None:
        cfg = self.vectorfit_config
        targets = list(find_targets(self.base_model, cfg.target_modules, cfg.exclude_modules, skip=cfg.modules_to_save))
        for name, module, role in targets:
            train_sigma = role in cfg.sigma_roles
            train_bias = role in cfg.bias_roles
            if not (train_sigma or train_bias):
                continue  # e.g. f1/f2 in sigma_attn: left exactly as they are
            matrix = _matrix_of(module)
            fp = fingerprints.get(name) or fingerprint(matrix)
            svd = self.svd_cache.get_or_compute(matrix, key=fp) if train_sigma else None
            layer = SVDLinear(matrix, module.bias, train_sigma, train_bias, svd=svd)
            _set_submodule(self.base_model, name, layer)
            self._targets[name] = {
                "role": role,
                "shape": list(matrix.shape),
                "fingerprint": fp,
                "conv1d": is_conv1d(module),
                "module_class": type(module),
                "sigma": train_sigma,
                "bias": train_bias,
                "had_bias": module.bias is not None,
            }
        if not self._targets:
            raise ConfigError(
                f"variant {cfg.variant!r} trains nothing on the selected targets {[n for n, _, _ in targets][:6]}...: "
                "its roles (attention/MLP) do not occur among them; widen target_modules or pick another variant"
            )

    def _wrap_modules_to_save(self) -> None:
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
                _set_submodule(self.base_model, name, ModulesToSaveWrapper(self.base_model.get_submodule(name)))
                self._modules_to_save.append(name)

    # ------------------------------------------------------------------ basics
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def vectorfit_layers(self) -> Iterator[tuple[str, SVDLinear]]:
        """``(name, layer)`` for every VectorFit layer, in model order."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, SVDLinear):
                yield name, module

    def trainable_vectors(self) -> dict[str, nn.Parameter]:
        """The trained vectors by name (``<module>.sigma`` / ``<module>.bias``)."""
        return {f"{n}.{a}": getattr(layer, a) for n, layer in self.vectorfit_layers() for a in ("sigma", "bias") if self._trains(layer, a)}

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
        weights and the trained heads: same outputs, no VectorFit module left, no overhead."""
        for name, layer in list(self.vectorfit_layers()):
            info = self._targets[name]
            with torch.no_grad():
                w = layer.dense_weight()
                has_bias = layer.bias is not None
                b = layer.bias.detach().to(w.dtype) if has_bias else None
                if info["conv1d"]:
                    new = info["module_class"](layer.out_features, layer.in_features)
                    new.weight = nn.Parameter(w.t().contiguous())
                    new.bias = nn.Parameter(b.clone()) if has_bias else None
                else:
                    new = nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device=w.device, dtype=w.dtype)
                    new.weight.copy_(w)
                    if has_bias:
                        new.bias.copy_(b)
            new.requires_grad_(False)
            _set_submodule(self.base_model, name, new)
        for name in self._modules_to_save:
            _set_submodule(self.base_model, name, self.base_model.get_submodule(name).trained_module)
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
    def save_pretrained(self, save_directory: Union[str, Path], **_: Any) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (trained vectors, heads,
        base-weight fingerprints) atomically into ``save_directory``."""
        tensors: dict[str, torch.Tensor] = {}
        for name, p in self.trainable_vectors().items():
            tensors[name] = p.detach()
        for name in self._modules_to_save:
            for pname, t in self.base_model.get_submodule(name).trained_module.state_dict().items():
                tensors[f"{name}.{pname}"] = t.detach()
        targets = {
            n: {k: v for k, v in info.items() if k != "module_class"} for n, info in self._targets.items()
        }
        adapter_io.save_adapter(
            save_directory,
            tensors,
            config=self.vectorfit_config.to_dict(),
            targets=targets,
            modules_to_save=self._modules_to_save,
            base_model_class=type(self.base_model).__name__,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_path: Union[str, Path],
        is_trainable: bool = False,
        cache_dir: Optional[str] = None,
        svd_cache: bool = True,
    ) -> "VectorFitModel":
        """Load an adapter onto a fresh base model.

        Args:
            model: the base model the adapter was trained on (checked by fingerprints).
            adapter_path: folder written by :meth:`save_pretrained`.
            is_trainable: keep the vectors trainable (to continue training); otherwise they are frozen.
            cache_dir, svd_cache: as in :class:`VectorFitConfig`.

        Raises:
            adapter_io.AdapterError: missing/corrupt files, or a base model that differs from the
                one the adapter was trained on (the message names the first mismatching module).
        """
        meta, tensors = adapter_io.load_adapter(adapter_path)
        config = VectorFitConfig.from_dict({**meta["config"], "cache_dir": cache_dir, "svd_cache": svd_cache})
        saved = meta["targets"]
        # Check the base before any SVD: a wrong base fails in milliseconds, not after a minute.
        found = {n: m for n, m, _ in find_targets(model, config.target_modules, config.exclude_modules, skip=config.modules_to_save)}
        absent = [n for n in saved if n not in found]
        if absent:
            raise adapter_io.AdapterError(
                f"the base model has no target module {absent[0]!r} that the adapter at {adapter_path} was trained on "
                f"(adapter base class: {meta.get('base_model_class')}, this model: {type(model).__name__})"
            )
        fingerprints = {}
        for name, module in found.items():  # model order, so the error names the first mismatch
            info = saved.get(name)
            if info is None:
                continue
            matrix = _matrix_of(module)
            if list(matrix.shape) != info["shape"]:
                raise adapter_io.AdapterError(
                    f"base model mismatch at module {name!r}: weight shape {list(matrix.shape)}, the adapter was trained on {info['shape']}"
                )
            fp = fingerprint(matrix)
            if fp != info["fingerprint"]:
                raise adapter_io.AdapterError(
                    f"base model mismatch at module {name!r}: its weights differ from those the adapter at {adapter_path} "
                    "was trained on (fingerprint mismatch); load the adapter onto the same pretrained model"
                )
            fingerprints[name] = fp
        vf = cls._build(model, config, fingerprints)
        extra = set(vf._targets) - set(saved)
        if extra:
            raise adapter_io.AdapterError(f"the adapter does not cover target modules {sorted(extra)[:5]} of this model")
        params = dict(vf.trainable_vectors())
        for name in vf._modules_to_save:
            for pname, p in vf.base_model.get_submodule(name).trained_module.named_parameters():
                params[f"{name}.{pname}"] = p
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise adapter_io.AdapterError(
                f"adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, p in params.items():
                t = tensors[name]
                if t.shape != p.shape:
                    raise adapter_io.AdapterError(f"adapter tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))
        if not is_trainable:
            for p in vf.parameters():
                p.requires_grad_(False)
        return vf

    @staticmethod
    def _build(model: nn.Module, config: VectorFitConfig, fingerprints: Optional[dict] = None) -> "VectorFitModel":
        return _class_for(type(model))(model, config, fingerprints)


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
            return self.base_model(*args, **kwargs)

        try:
            forward.__signature__ = inspect.signature(base_forward)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        forward.__doc__ = getattr(base_forward, "__doc__", None)
        _CLASSES[base_cls] = type(f"VectorFitModelFor{base_cls.__name__}", (VectorFitModel,), {"forward": forward, "__module__": __name__})
    return _CLASSES[base_cls]


def get_vectorfit_model(model: nn.Module, config: Optional[VectorFitConfig] = None) -> VectorFitModel:
    """Replace the target layers of ``model`` by VectorFit layers and freeze everything else.

    Args:
        model: a pre-trained model (modified in place).
        config: what to adapt; ``VectorFitConfig()`` (the full method on default targets) if ``None``.

    Returns:
        A :class:`VectorFitModel` whose forward is the base model's forward.
    """
    return VectorFitModel._build(model, config if config is not None else VectorFitConfig())


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
    config = config if config is not None else VectorFitConfig()
    found = {n: role for n, _, role in find_targets(model, config.target_modules, config.exclude_modules, skip=config.modules_to_save)}
    return found if with_roles else list(found)
