"""Several adapters on one base model: one SVD, many sets of vectors (issue 11).

Every adapter of a base model lives in the same basis: ``U`` and ``Vh`` (and ``sigma0``) are computed
once and shared; an adapter is only its singular values, biases and saved heads. So, peft-shaped:

* ``load_adapter(path, name)`` adds a saved adapter without a new SVD: the adapter's recorded
  fingerprints must equal those of the loaded base, which proves the factors fit;
* ``add_adapter(name, config)`` starts a new trainable adapter on the same decomposition;
* ``set_adapter`` / ``active_adapter`` / ``adapters`` / ``delete_adapter`` manage them; the active
  adapter's vectors are the model's parameters (optimizer, AVF, ``save_pretrained``, ``merge``), the
  others are kept aside and untouched by training;
* ``add_weighted_adapter(names, weights, new)`` is exact: with a shared basis
  ``U diag(sum_j w_j ds_j) Vh = sum_j w_j dW_j``;
* ``model(**batch, adapter_names=[...])`` (and ``generate``) runs each row with its own adapter in one
  pass (``"__base__"``: the base model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import adapter_io, base_check, tasks
from .avf import AdaptiveVectorFreezing
from .config import ConfigError, VectorFitConfig
from .layer import BASE

__all__ = ["AdaptersMixin", "ModulesToSaveWrapper", "BASE"]

# The model inputs whose first dimension is the batch (to check one adapter name per row).
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values", "attention_mask")
# Fields every adapter of one model must share: they decide which vectors and heads exist.
_SHARED_FIELDS = ("target_modules", "exclude_modules", "modules_to_save")


class ModulesToSaveWrapper(nn.Module):
    """Keeps a new task head's original weights next to the trained copy (peft's
    "modules_to_save"): the copy trains and is saved, the original serves ``disable_adapter``.

    With several adapters each has its own copy; the active one is registered as
    ``trained_module``, the others wait in ``_heads``.
    """

    def __init__(self, module: nn.Module, adapter_name: str = "default") -> None:
        super().__init__()
        self.original_module = module
        self.trained_module = copy.deepcopy(module)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.trained_module.parameters():
            p.requires_grad_(True)
        self.disabled = False
        self.__dict__["_heads"] = {adapter_name: self.trained_module}
        self.__dict__["_active"] = adapter_name
        self.__dict__["_rows"] = None

    def add_head(self, name: str) -> nn.Module:
        """A new trainable copy of the original head for adapter ``name`` (not activated)."""
        head = copy.deepcopy(self.original_module).train(self.training)
        for p in head.parameters():
            p.requires_grad_(True)
        self._heads[name] = head
        return head

    def set_active(self, name: str) -> None:
        self.trained_module = self._heads[name].train(self.training)
        self.__dict__["_active"] = name

    def drop_head(self, name: str) -> None:
        if name == self._active:
            raise ValueError(f"cannot drop the active adapter {name!r}'s head; activate another one first")
        self._heads.pop(name, None)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        out = super()._apply(fn, recurse)
        self._heads[self._active] = self.trained_module
        for name, head in self._heads.items():
            if name != self._active:
                head._apply(fn)
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._rows is None or self.disabled:
            return (self.original_module if self.disabled else self.trained_module)(*args, **kwargs)
        # Mixed batch: each adapter's head on its own rows (heads are small; one call per adapter).
        names, index = self._rows
        x = args[0]
        index = index.to(x.device).repeat_interleave(x.shape[0] // index.numel())
        out = None
        for a, name in enumerate(names):
            sel = torch.nonzero(index == a).flatten()
            head = self.original_module if name == BASE else self._heads[name]
            y = head(x[sel], *args[1:], **kwargs)
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"mixed-adapter batches need heads that return a tensor; {type(head).__name__} returned {type(y).__name__}")
            out = y.new_empty((x.shape[0],) + tuple(y.shape[1:])) if out is None else out
            out[sel] = y
        return out


def _check_name(name: Any, what: str = "adapter_name") -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name in (BASE, ".", ".."):
        raise ValueError(
            f"{what}={name!r} is invalid: use a non-empty string of letters, digits, '_', '-', '.' "
            f"(it names a folder in save_pretrained(selected_adapters=...)); {BASE!r} is reserved for the base model"
        )
    return name


class AdaptersMixin:
    """The adapter registry of :class:`~vectorfit.model.VectorFitModel` (state set up by
    :meth:`_init_adapters`): per adapter its config and AVF controller; its vectors live in the
    layers, its heads in the :class:`ModulesToSaveWrapper` modules."""

    def _init_adapters(self, adapter_name: str) -> None:
        self.__dict__["_adapter_configs"] = {adapter_name: self.vectorfit_config}
        self.__dict__["_avfs"] = {adapter_name: self.avf}
        self.__dict__["_active_name"] = adapter_name

    # ------------------------------------------------------------------ registry
    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters, in the order they were added."""
        return list(self._adapter_configs)

    @property
    def active_adapter(self) -> str:
        """The adapter the model computes with (and trains, saves, merges)."""
        return self._active_name

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (peft's plural form)."""
        return [self._active_name]

    @property
    def peft_config(self) -> dict[str, VectorFitConfig]:
        """``{adapter name: its VectorFitConfig}``, as peft's ``PeftModel.peft_config``."""
        return dict(self._adapter_configs)

    def _head_wrappers(self) -> list[ModulesToSaveWrapper]:
        return [self.base_model.get_submodule(n) for n in self._modules_to_save]

    def _device(self) -> torch.device:
        """Where the layers' frozen factors live (a bias-only layer keeps its dense weight)."""
        layer = next(layer for _, layer in self.vectorfit_layers())
        return (layer.U if layer.train_sigma else layer.weight).device

    def _require(self, name: Any) -> str:
        if name not in self._adapter_configs:
            raise ValueError(f"no adapter named {name!r}; loaded adapters: {self.adapters}")
        return name

    def set_adapter(self, adapter_name: str) -> None:
        """Make an adapter the active one: the model then computes with, trains (its vectors become
        the model's trainable parameters; build the optimizer after this call), saves and merges it.
        A merged model stays merged, with the new adapter.

        Args:
            adapter_name: a loaded adapter (see :attr:`adapters`).

        Raises:
            ValueError: no adapter has that name.
        """
        self._require(adapter_name)
        for _, layer in self.vectorfit_layers():
            layer.set_active(adapter_name)
        for head in self._head_wrappers():
            head.set_active(adapter_name)
        self.vectorfit_config = self._adapter_configs[adapter_name]
        avf = self._avfs[adapter_name]
        if avf is not None:
            avf.to(self._device())  # a waiting controller missed the model's .to()
        self.avf = avf
        self._active_name = adapter_name

    @contextlib.contextmanager
    def _using(self, adapter_name: str) -> Iterator[None]:
        before = self.active_adapter
        self.set_adapter(adapter_name)
        try:
            yield
        finally:
            self.set_adapter(before)

    def add_adapter(self, adapter_name: str, config: Optional[VectorFitConfig] = None) -> None:
        """Add a new trainable adapter on the same decomposition (no SVD); it is not activated.

        Args:
            adapter_name: the new adapter's name.
            config: its config; ``None``: the active adapter's. Targets, variant roles and
                ``modules_to_save`` must equal the model's (they decide which vectors exist);
                ``avf`` and ``sigma_param`` may differ.

        Raises:
            ValueError: the name is taken or invalid. ConfigError: the config asks for other vectors.
        """
        _check_name(adapter_name)
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; delete_adapter() it or pick another name")
        config = tasks.apply_task_type(self.base_model, config) if config is not None else copy.deepcopy(self.vectorfit_config)
        self._check_compatible(config, "add_adapter")
        self._new_slot(adapter_name, config, trainable=True)

    def _check_compatible(self, config: VectorFitConfig, where: str) -> None:
        ref = self.vectorfit_config
        diff = [f for f in _SHARED_FIELDS if getattr(config, f) != getattr(ref, f)]
        if config.sigma_roles != ref.sigma_roles or config.bias_roles != ref.bias_roles:
            diff.append(f"variant ({config.variant!r} trains other vectors than {ref.variant!r})")
        if diff:
            raise ConfigError(
                f"{where}: the adapter's config differs from this model's in {diff}; every adapter on one base shares "
                "the decomposed targets and heads. Use the same targets, modules_to_save and a variant training the "
                "same vectors, or wrap another copy of the base model"
            )

    def _new_slot(self, name: str, config: VectorFitConfig, trainable: bool) -> None:
        # AVF reads the active adapter's vectors through (layer, attr), so one controller per adapter
        # (built first: an invalid AVF config then leaves nothing half-added).
        vectors = [(f"{n}.{a}", layer, a) for n, layer in self.vectorfit_layers() for a in ("sigma", "bias") if self._trains(layer, a)]
        avf = AdaptiveVectorFreezing(vectors, config.avf) if config.uses_avf else None
        for _, layer in self.vectorfit_layers():
            for p in layer.add_vectors(name, config.sigma_param).values():
                p.requires_grad_(trainable)
        for head in self._head_wrappers():
            head.add_head(name).requires_grad_(trainable)
        self._adapter_configs[name] = config
        self._avfs[name] = avf

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. Deleting the active one activates the first remaining one.

        Args:
            adapter_name: a loaded adapter.

        Raises:
            ValueError: no such adapter, or it is the last one (``unload()`` returns the plain base model).
        """
        self._require(adapter_name)
        if len(self._adapter_configs) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; use unload() or merge_and_unload() for the base model")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(n for n in self._adapter_configs if n != adapter_name))
        for _, layer in self.vectorfit_layers():
            layer.drop_vectors(adapter_name)
        for head in self._head_wrappers():
            head.drop_head(adapter_name)
        del self._adapter_configs[adapter_name], self._avfs[adapter_name]

    # ------------------------------------------------------------------ load / save
    def load_adapter(
        self,
        adapter_path: Union[str, Path],
        adapter_name: str,
        is_trainable: bool = False,
        check_base: str = "error",
        hotswap: bool = False,
    ) -> None:
        """Load a saved adapter of the same base model next to the others (not activated; no SVD).

        Args:
            adapter_path: a folder written by ``save_pretrained``.
            adapter_name: its name here.
            is_trainable: keep its vectors trainable.
            check_base: as in ``from_pretrained`` (tensors outside the adapted matrices).
            hotswap: write the vectors into the existing adapter ``adapter_name``'s tensors in place
                (same parameter objects, so an optimizer or a compiled graph keeps working).

        Raises:
            adapter_io.AdapterError: the adapter was trained on another base (fingerprints of the target
                matrices differ), on other targets or heads, or its files are damaged.
        """
        _check_name(adapter_name)
        if hotswap:
            self._require(adapter_name)
        elif adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} is loaded already; pick another name, "
                             "delete_adapter() it first, or pass hotswap=True to replace its vectors in place")
        if check_base not in ("error", "warn"):
            raise ConfigError(f"check_base={check_base!r} is invalid: use 'error' (refuse a differing base) or 'warn'")
        meta, tensors = adapter_io.load_adapter(adapter_path)
        ref = self.vectorfit_config
        config = adapter_io.config_of(meta, adapter_path, cache_dir=ref.cache_dir, svd_cache=ref.svd_cache)
        saved = meta["targets"]
        # The recorded fingerprints of the loaded base prove the factors fit: nothing is hashed or decomposed.
        for name, info in self._targets.items():
            rec = saved.get(name)
            if rec is None or rec["fingerprint"] != info["fingerprint"] or rec["sigma"] != info["sigma"] or rec["bias"] != info["bias"]:
                why = "it has no record of it" if rec is None else "it was trained on other weights or vectors there"
                raise adapter_io.AdapterError(f"the adapter at {adapter_path} does not fit this model at target {name!r}: {why}")
        extra = sorted(set(saved) - set(self._targets))
        if extra or list(meta.get("modules_to_save", [])) != list(self._modules_to_save):
            raise adapter_io.AdapterError(
                f"the adapter at {adapter_path} covers other modules than this model's adapters "
                f"(extra targets {extra[:5]}, heads {meta.get('modules_to_save')} vs {self._modules_to_save})"
            )
        if "base_tensors" in meta:
            other = self._other_base_tensors(self.base_model, self._targets, self._modules_to_save)
            base_check.enforce_other_tensors(other, meta["base_tensors"], adapter_path, check_base)
        self._check_compatible(config, f"load_adapter({str(adapter_path)!r})")
        if hotswap:
            want = "sigma_delta" if config.sigma_param == "relative" else "sigma"
            if any(layer.train_sigma and want not in layer._adapters[adapter_name] for _, layer in self.vectorfit_layers()):
                raise adapter_io.AdapterError(f"hotswap: {adapter_path} uses sigma_param={config.sigma_param!r}, adapter "
                                              f"{adapter_name!r} the other form; load it without hotswap under a new name")
        else:
            self._new_slot(adapter_name, config, trainable=is_trainable)
        try:
            self._fill(adapter_name, tensors, adapter_path)
        except Exception:
            if not hotswap:
                self._drop_slot(adapter_name)
            raise
        base_check.check_signatures(self._views(adapter_name), saved)
        if hotswap:
            self._adapter_configs[adapter_name] = config
            if adapter_name == self.active_adapter:
                self.vectorfit_config = config

    def _drop_slot(self, name: str) -> None:
        for _, layer in self.vectorfit_layers():
            layer._adapters.pop(name, None)
        for head in self._head_wrappers():
            head._heads.pop(name, None)
        self._adapter_configs.pop(name, None)
        self._avfs.pop(name, None)

    def _slot_params(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors by their file name (``<module>.sigma``, ``<head>.<param>``)."""
        params: dict[str, torch.Tensor] = {}
        for lname, layer in self.vectorfit_layers():
            params.update({f"{lname}.{k}": p for k, p in layer._adapters[name].items()})
        for hname, head in zip(self._modules_to_save, self._head_wrappers()):
            params.update({f"{hname}.{k}": t for k, t in head._heads[name].state_dict(keep_vars=True).items()})
        return params

    def _fill(self, name: str, tensors: dict[str, torch.Tensor], adapter_path: Any) -> None:
        params = self._slot_params(name)
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise adapter_io.AdapterError(f"adapter tensors do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        bad = next((k for k, p in params.items() if tensors[k].shape != p.shape), None)
        if bad is not None:  # checked before any copy: a hot swap never leaves an adapter half-written
            raise adapter_io.AdapterError(f"adapter tensor {bad!r} has shape {tuple(tensors[bad].shape)}, "
                                          f"the model expects {tuple(params[bad].shape)}")
        with torch.no_grad():
            for key, p in params.items():
                p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))

    def _views(self, name: str) -> dict[str, Any]:
        """Per layer what ``base_check.check_signatures`` reads, with adapter ``name``'s singular values."""
        out = {}
        for lname, layer in self.vectorfit_layers():
            s, _ = layer.effective_vectors(name)
            if s is not None:
                out[lname] = SimpleNamespace(U=layer.U, Vh=layer.Vh, sigma=s.detach())
        return out

    def save_pretrained(self, save_directory: Union[str, Path], selected_adapters: Optional[Sequence[str]] = None,
                        is_main_process: bool = True, **_: Any) -> None:
        """Write the active adapter into ``save_directory`` (``adapter_config.json`` +
        ``adapter_model.safetensors``, atomically).

        Args:
            save_directory: the folder.
            selected_adapters: save these adapters instead, peft's layout: ``"default"`` into
                ``save_directory`` itself, every other one into ``save_directory/<name>``.
            is_main_process: as in peft: ``False`` writes nothing (call it on every rank with
                ``is_main_process=rank == 0``; under FSDP2 inside ``vectorfit.distributed.full_parameters``).
        """
        if not is_main_process:
            return
        if selected_adapters is None:
            self._save_active(save_directory)
            return
        if isinstance(selected_adapters, str):
            raise ValueError(f"selected_adapters={selected_adapters!r} must be a list of adapter names, e.g. [{selected_adapters!r}]")
        for name in selected_adapters:
            self._require(name)
        for name in selected_adapters:
            with self._using(name):
                self._save_active(Path(save_directory) if name == "default" else Path(save_directory) / name)

    # ------------------------------------------------------------------ arithmetic
    @torch.no_grad()
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                             combination_type: str = "linear") -> None:
        """A new adapter whose update is the weighted sum of the given adapters' updates, exactly:
        ``s = s0 + sum_j w_j (s_j - s0)`` and ``b = b0 + sum_j w_j (b_j - b0)``; since every adapter shares
        ``U`` and ``Vh``, its weight update is ``sum_j w_j dW_j``. Heads are combined the same way,
        parameter by parameter, from the original head (weights summing to 1 average them). Negative
        weights subtract a task. The new adapter is frozen and not activated.

        Args:
            adapters: names of loaded adapters.
            weights: one float per adapter.
            adapter_name: the new adapter's name.
            combination_type: ``"linear"`` only (peft's other types approximate a sum of LoRA products;
                here the linear sum is already the exact sum of the weight updates).
        """
        _check_name(adapter_name)
        if adapter_name in self._adapter_configs:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        if combination_type != "linear":
            raise ValueError(f"combination_type={combination_type!r} is not supported: use 'linear', which for VectorFit "
                             "is exactly the weighted sum of the adapters' weight updates")
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        for a in adapters:
            self._require(a)
        configs = [self._adapter_configs[a] for a in adapters]
        relative = all(c.sigma_param == "relative" for c in configs)  # z is linear in ds too: keep that form
        config = dataclasses.replace(configs[0], sigma_param="relative" if relative else "absolute")
        self._new_slot(adapter_name, config, trainable=False)
        for _, layer in self.vectorfit_layers():
            new = layer._adapters[adapter_name]
            for a, w in zip(adapters, weights):
                s, b = layer.effective_vectors(a)
                if "sigma_delta" in new:
                    new["sigma_delta"].add_(w * layer._adapters[a]["sigma_delta"])
                elif "sigma" in new:
                    new["sigma"].add_(w * (s - layer.sigma0))
                if "bias" in new:
                    new["bias"].add_(w * (b - layer.bias0))
        for head in self._head_wrappers():
            original = head.original_module.state_dict()
            target = head._heads[adapter_name].state_dict(keep_vars=True)
            for key, t in target.items():
                parts = [head._heads[a].state_dict()[key] for a in adapters]
                if any(p.shape != t.shape for p in parts):
                    self._drop_slot(adapter_name)
                    raise ValueError(f"add_weighted_adapter: head tensor {key!r} has different shapes across {adapters}")
                if t.is_floating_point():
                    t.copy_(original[key] + sum(w * (p - original[key]) for w, p in zip(weights, parts)))
                else:
                    t.copy_(parts[0])  # counters and the like: not a weight to combine

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def _mixed(self, adapter_names: Sequence[str], args: tuple = (), kwargs: Optional[dict] = None) -> Iterator[None]:
        """Inside, every layer and head computes row ``i`` with adapter ``adapter_names[i]``."""
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names must be a list with one adapter name (or '__base__') per row of the batch")
        inputs = [*args, *[(kwargs or {}).get(k) for k in _BATCH_INPUTS]]
        first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None and first.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {first.shape[0]} rows: give one per row")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self._adapter_configs})
        if unknown:
            raise ValueError(f"adapter_names holds unknown adapters {unknown}; loaded: {self.adapters} (and {BASE!r} for the base)")
        names = list(dict.fromkeys(adapter_names))
        if names == [self._active_name]:
            # Every row uses the active adapter: the ordinary forward computes exactly that (merged
            # or not), with each layer's cached dense weight at inference instead of the per-row
            # factorised pass.
            yield
            return
        layers = [layer for _, layer in self.vectorfit_layers()]
        if any(layer.merged for layer in layers):
            raise ValueError("mixed-adapter batches need the unmerged model: call model.unmerge() first")
        rows = (names, torch.tensor([names.index(n) for n in adapter_names], device=self._device()))
        modules = [*layers, *self._head_wrappers()]
        for m in modules:
            m.__dict__["_rows"] = rows
        try:
            yield
        finally:
            for m in modules:
                m.__dict__["_rows"] = None

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``.

        Args:
            adapter_names: one adapter name (or ``"__base__"``) per prompt: each prompt is generated with
                its adapter, all in the same batch (beams and ``num_return_sequences`` follow their prompt).
            args, kwargs: passed to the base model's ``generate``.

        Returns:
            What the base model's ``generate`` returns.
        """
        gen = getattr(self.base_model, "generate", None)
        if gen is None:
            raise AttributeError(f"{type(self.base_model).__name__} has no generate()")
        if adapter_names is None:
            return gen(*args, **kwargs)
        with self._mixed(adapter_names, args, kwargs):
            return gen(*args, **kwargs)
