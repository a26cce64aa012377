"""``VectorFitModel``: VectorFit's peft tuner (what ``LoraModel`` is to LoRA).

``peft.get_peft_model(model, VectorFitConfig(...))`` builds a ``peft.PeftModel`` whose
``base_model`` is this tuner; :func:`get_vectorfit_model` is the same call. Everything peft does
for its own methods -- ``save_pretrained`` / ``PeftModel.from_pretrained`` / ``AutoPeftModel*``,
``load_adapter``, ``set_adapter``, ``delete_adapter``, ``disable_adapter``, ``merge_and_unload``,
``unload``, mixed batches (``adapter_names=``) -- works through peft's own code paths, and the
tuner adds what is VectorFit's:

* the targets and their roles (attention / MLP, which the variants need) are resolved by
  :mod:`vectorfit.targets` before injection; an adapter being loaded is matched by the exact
  module names it recorded, never by re-running a stored pattern;
* one SVD per matrix, from the on-disk cache, made on rank 0 under ``torch.distributed``;
* the record of the base model an adapter depends on (fingerprints of the target matrices and of
  every other base tensor, a sketch of each trained weight), written into ``adapter_config.json``
  at save and checked at load *before* any SVD, so a wrong base fails in milliseconds;
* Adaptive Vector Freezing: one controller per adapter (``model.avf``), whose state is saved in
  ``adapter_model.safetensors`` beside the vectors.

Further operations (weighted adapters, hot-swap, mixed-batch generation, the old ``from_pretrained``
name) are in :mod:`vectorfit.adapters`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from . import base_check, distributed, merge_compat, tasks
from .adapters import AdaptersMixin, check_adapter_name
from .avf import AdaptiveVectorFreezing, training_strength
from .cache import SVDCache, fingerprint
from .config import VectorFitConfig
from .errors import AdapterError, ConfigError
from .layer import VectorFitLayer, is_conv1d, matrix_of
from .notices import warn
from .progress import progress_enabled, svd_bar
from .targets import check_target_weight, find_targets, is_linear_like

logger = logging.getLogger(__name__)

_AVF = "vectorfit_avf"  # the tuner's ModuleDict of AVF controllers, by adapter name


def _aliases(root: nn.Module, module: nn.Module) -> list[str]:
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module and n]


def _set_at(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


class VectorFitModel(AdaptersMixin, BaseTuner):
    """peft tuner for VectorFit. Build it through ``peft.get_peft_model`` / :func:`get_vectorfit_model`
    or ``PeftModel.from_pretrained``; its methods are reachable on the ``PeftModel`` too
    (``peft_model.avf``, ``peft_model.vectorfit_layers()``, ...)."""

    prefix: str = "vectorfit_"
    tuner_layer_cls = VectorFitLayer
    target_module_mapping: dict = {}  # the defaults are vectorfit.targets.ARCHITECTURES (with roles)

    # ------------------------------------------------------------------ injection
    def _state(self) -> dict:
        # BaseTuner.__init__ injects the first adapter before a subclass __init__ could set anything.
        st = self.__dict__.get("_vf")
        if st is None:
            st = self.__dict__["_vf"] = {"records": {}, "pending": {}, "bar": None, "new_params": None, "cache": None,
                                         "shared": False, "avf_probe": {}, "avf_settled": set(), "loading": set()}
            self.add_module(_AVF, nn.ModuleDict())
        return st

    def _prepare_adapter_config(self, peft_config: VectorFitConfig, model_config: dict) -> VectorFitConfig:
        return peft_config  # targets are resolved in _before_injection, with their roles

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # peft calls inject_adapter for the first adapter (from BaseTuner.__init__) and for every later
        # one (PeftModel.add_adapter / load_adapter), but its pre/post-injection hooks only for the first.
        config = self.peft_config[adapter_name]
        self._before_injection(model, config, adapter_name)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            self._close_bar()
        self._after_injection(model, config, adapter_name)

    def _before_injection(self, model: nn.Module, config: VectorFitConfig, adapter_name: str) -> None:
        st = self._state()
        if not isinstance(config, VectorFitConfig):
            raise ConfigError(f"a VectorFit model takes VectorFitConfig adapters, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        existing = any(isinstance(m, VectorFitLayer) for m in model.modules())
        if config.targets is not None:  # an adapter being loaded: check the base before any SVD
            roles, fps = self._check_record(model, config)
            # The adapter names its targets exactly. Its stored patterns are never run against module
            # names (peft would, e.g. for tied modules): a file from elsewhere may hold a regex that
            # backtracks for minutes. The exact names select the same modules.
            config.target_modules, config.exclude_modules = set(config.targets), None
        else:
            tasks.check_task_heads(model, config)
            roles = {n: role for n, _, role in find_targets(model, config.target_modules, config.exclude_modules,
                                                            skip=config.modules_to_save)}
            fps = {}
        trained = [n for n, r in roles.items() if r in config.sigma_roles or r in config.bias_roles]
        distributed.check_same_targets(adapter_name, trained)  # all ranks, before any collective SVD
        if not trained:
            raise ConfigError(
                f"variant {config.variant!r} trains nothing on the selected targets {list(roles)[:6]}...: "
                "its roles (attention/MLP) do not occur among them; widen target_modules or pick another variant")
        if not existing:
            st["new_params"] = tasks.newly_initialised_parameters(model)  # before wrapping changes the parameters
            st["shared"] = distributed.begin_decomposition()  # rank 0's factors on every rank?
        st["pending"], st["fps"] = roles, fps
        st["cache"] = SVDCache(config.cache_dir, enabled=config.svd_cache)
        st["records"][adapter_name] = {}
        st["bar"] = svd_bar(len(trained), progress_enabled(config.progress) and distributed.is_main_process())

    def _check_record(self, model: nn.Module, config: VectorFitConfig) -> tuple[dict, dict]:
        """Verify a loaded adapter's record against ``model``; returns ``(roles, fingerprints)``."""
        # adapter_config.json is written with sorted keys: check (and name the first mismatch) in model order.
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        saved = dict(sorted(config.targets.items(), key=lambda kv: order.get(kv[0], len(order))))
        found, fps = {}, {}
        for name, info in saved.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                module = None
            if isinstance(module, VectorFitLayer):
                if module.fingerprint != info["fingerprint"] or [module.out_features, module.in_features] != info["shape"]:
                    raise AdapterError(f"the adapter does not fit this model at target {name!r}: it was trained on other "
                                       "weights there (fingerprint mismatch); load it onto the same pretrained model")
                fps[name] = module.fingerprint
            elif module is None or not is_linear_like(module):
                raise AdapterError(
                    f"the base model has no {'module' if module is None else 'Linear/Conv1D module'} {name!r} that the adapter "
                    f"was trained on (adapter base class: {config.base_model_class}, this model: {type(model).__name__})")
            else:
                check_target_weight(name, module)  # a quantised / meta base: refused before any fingerprint
                found[name] = matrix_of(module)
        fps.update(base_check.check_targets(found, saved, "the adapter being loaded"))
        if config.base_tensors is not None:
            other = base_check.other_tensors_of(model, saved, config.modules_to_save or [])
            base_check.enforce_other_tensors(other, config.base_tensors, "the adapter being loaded", base_check.mode(config.check_base))
        return {n: info.get("role", "attn") for n, info in saved.items()}, fps

    def _check_target_module_exists(self, peft_config: VectorFitConfig, key: str) -> bool:  # type: ignore[override]
        return key in self._state()["pending"]

    def _create_and_replace(self, peft_config: VectorFitConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **_: Any) -> None:
        st = self._state()
        role = st["pending"][current_key]
        train_sigma, train_bias = role in peft_config.sigma_roles, role in peft_config.bias_roles
        if peft_config.targets is not None:  # loading: the record says which vectors exist
            rec = peft_config.targets[current_key]
            train_sigma, train_bias = rec["sigma"], rec["bias"]
        if not (train_sigma or train_bias):
            return  # e.g. f1/f2 in sigma_attn: left exactly as they are
        layer = target if isinstance(target, VectorFitLayer) else None
        matrix = matrix_of(target.base_layer if layer is not None else target)
        fp = layer.fingerprint if layer is not None else (st["fps"].get(current_key) or fingerprint(matrix))
        cache = st["cache"]

        def decompose() -> tuple:
            # Under torch.distributed, rank 0 decomposes and broadcasts (distributed.py says why).
            return distributed.decompose(cache, matrix, fp, current_key)

        if layer is not None:
            layer.update_layer(adapter_name, train_sigma, train_bias, peft_config.sigma_param, decompose,
                               inference_mode=peft_config.inference_mode)
        else:
            names = _aliases(self.model, target)
            layer = VectorFitLayer(target, adapter_name, train_sigma, train_bias, peft_config.sigma_param, decompose)
            layer.fingerprint, layer.role = fp, role  # what later adapters and users read of the target
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)  # an additional adapter is not trainable until activated
            self._replace_module(parent, target_name, layer, target)
            if len(names) > 1:
                for n in names:
                    _set_at(self.model, n, layer)
                warn(f"module {current_key!r} is also registered as {[n for n in names if n != current_key]} (the same layer "
                     "object): it is adapted once and the adapted layer serves every name")
        layer.vectorfit_shared_factors = st["shared"]
        st["records"][adapter_name][current_key] = {
            "role": role, "shape": [layer.out_features, layer.in_features], "fingerprint": fp, "conv1d": layer.conv1d,
            "sigma": train_sigma, "bias": train_bias, "had_bias": layer.had_bias,
            "dtype": base_check.dtype_name(matrix.dtype),
        }
        if layer.conv2d:
            st["records"][adapter_name][current_key]["kernel"] = list(layer.kernel_shape)
        if st["bar"] is not None:
            st["bar"].update(1)

    def _close_bar(self) -> None:
        st = self._state()
        if st["bar"] is not None:
            st["bar"].close()
            st["bar"] = None
        st["pending"] = {}

    def _after_injection(self, model: nn.Module, config: VectorFitConfig, adapter_name: str) -> None:
        st = self._state()
        if st["new_params"]:
            saved = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
            tasks.warn_frozen_new_parameters(st["new_params"], [*st["records"][adapter_name], *saved], type(model).__name__)
            st["new_params"] = None
        if config.uses_avf:
            self._add_avf(adapter_name, config)
        if config.targets is not None:  # its weights come next, from the file this record describes
            st["loading"].add(adapter_name)

    def _add_avf(self, adapter_name: str, config: VectorFitConfig) -> None:
        """Adapter ``adapter_name``'s AVF controller over the vectors it trains, beside the factors."""
        vectors = self.vector_list(adapter_name)
        self._modules[_AVF][adapter_name] = AdaptiveVectorFreezing(vectors, config.avf, adapter_name).to(self._device())

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_path: Any, is_trainable: bool = False, check_base: str = "error",
                        adapter_name: str = "default", **kwargs: Any) -> Any:
        """``peft.PeftModel.from_pretrained(model, adapter_path, ...)`` (kept from vectorfit 0.1, whose
        wrapper had this name). An adapter folder written by vectorfit 0.1 is converted on the fly
        (``vectorfit convert`` does it once, on disk).

        Args:
            model: the base model the adapter was trained on (checked by fingerprints before any SVD).
            adapter_path: folder written by ``save_pretrained``.
            is_trainable: keep the vectors trainable (to continue training); otherwise they are frozen.
            check_base: ``"error"`` refuses a base whose tensors outside the adapted matrices differ
                from the training model's; ``"warn"`` loads it with a warning.
            adapter_name: the name the adapter gets here.
            kwargs: ``cache_dir``, ``svd_cache``, ``progress`` (as in :class:`VectorFitConfig`); the rest
                goes to ``PeftModel.from_pretrained``.
        """
        from .loading import load_adapter_folder

        return load_adapter_folder(model, adapter_path, is_trainable=is_trainable, check_base=check_base,
                                   adapter_name=adapter_name, **kwargs)

    # ------------------------------------------------------------------ AVF that never runs
    def _watch_avf(self) -> None:
        """Warn once when an adapter with AVF trains but ``avf.step`` is never called (a plain
        ``Trainer`` without :class:`~vectorfit.integrations.AVFCallback`, TRL, a forgotten line): it
        would silently train as ``no_avf``. An optimizer step shows as a new in-place version of a
        trained vector (``Tensor._version``), seen at the next training forward pass (peft enters
        ``_enable_peft_forward_hooks`` around every forward). Once settled (warned, or AVF seen
        running) this costs one set lookup; it never reads a device tensor in the hot path."""
        st, avf = self._state(), self.avf
        a = self.active_adapters[0] if self.active_adapters else None
        if avf is None or avf.steps_called or a in st["avf_settled"]:
            return
        probe = st["avf_probe"]
        if a not in probe:  # the first training forward: remember one trained vector's version
            if int(avf.num_done):  # AVF state from an earlier run: it has been running
                st["avf_settled"].add(a)
                return
            p = next((v for v in self.trainable_vectors(a).values() if v.requires_grad), None)
            probe[a] = (p, None if p is None else p._version)
        p, version = probe[a]
        if p is not None and p._version != version:
            self._warn_avf_off(a, "an optimizer step was taken")

    def _warn_avf_off(self, adapter_name: str, when: str) -> None:
        self._state()["avf_settled"].add(adapter_name)
        warn(f"adapter {adapter_name!r} uses AVF (variant={self.peft_config[adapter_name].variant!r}) but {when} without any "
             "call of model.avf.step(): it trains as variant 'no_avf'. Run AVF with transformers.Trainer(..., "
             "callbacks=[vectorfit.integrations.AVFCallback()]) (also for TRL trainers), or in a plain loop call "
             "model.avf.step(global_step) after loss.backward(); to train without AVF, use variant='no_avf'")

    # ------------------------------------------------------------------ views
    def vectorfit_layers(self) -> Iterator[tuple[str, VectorFitLayer]]:
        """``(name, layer)`` for every VectorFit layer, in model order (names relative to the base model)."""
        for name, module in self.model.named_modules():
            if isinstance(module, VectorFitLayer):
                yield name, module

    def vector_list(self, adapter_name: Optional[str] = None) -> list[tuple[str, VectorFitLayer, str]]:
        """``(name, layer, kind)`` of every vector adapter ``adapter_name`` trains (default: the
        active one), in model order; ``name`` is ``<module>.sigma`` or ``<module>.bias``."""
        a = adapter_name or self.active_adapters[0]
        return [(f"{n}.{k}", layer, k) for n, layer in self.vectorfit_layers() for k, d in
                (("sigma", layer.vectorfit_sigma), ("bias", layer.vectorfit_bias)) if a in d]

    def trainable_vectors(self, adapter_name: Optional[str] = None) -> dict[str, nn.Parameter]:
        """The trained vectors by name (``<module>.sigma``, ``<module>.bias``) of an adapter (default:
        the active one). With ``sigma_param="relative"`` the ``sigma`` entry is the parameter ``z``."""
        a = adapter_name or self.active_adapters[0]
        return {name: (layer.vectorfit_sigma if k == "sigma" else layer.vectorfit_bias)[a] for name, layer, k in self.vector_list(a)}

    @torch.no_grad()
    def training_strengths(self, adapter_name: Optional[str] = None) -> dict[str, float]:
        """``mean(|v_0 - v_t|)`` per trained vector (the quantity AVF ranks), by vector name."""
        a = adapter_name or self.active_adapters[0]
        return {name: float(training_strength(layer, k, a)) for name, layer, k in self.vector_list(a)}

    @property
    def avf(self) -> Optional[AdaptiveVectorFreezing]:
        """The active adapter's AVF controller (``None`` for variants without AVF). In a plain loop:
        ``loss.backward(); model.avf.step(global_step); optimizer.step()``."""
        avfs = self._modules.get(_AVF)
        return avfs[self.active_adapters[0]] if avfs is not None and self.active_adapters and self.active_adapters[0] in avfs else None

    @property
    def svd_cache(self) -> Optional[SVDCache]:
        """The SVD cache the last injection used (its ``hits`` / ``misses`` count what it did)."""
        return self._state()["cache"]

    @property
    def vectorfit_config(self) -> VectorFitConfig:
        """The active adapter's config."""
        return self.peft_config[self.active_adapters[0]]

    def _device(self) -> torch.device:
        layer = next((m for _, m in self.vectorfit_layers()), None)
        return layer.bias0.device if layer is not None else torch.device("cpu")

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # Read by DistributedDataParallel at construction (through the PeftModel): when rank 0's factors
        # were broadcast at set-up, DDP's own initial sync of U/Vh/sigma0 (model-sized) is redundant.
        names = distributed.ddp_ignored_names(self.model)
        out = [f"base_model.model.{n}" for n in names] + [f"model.{n}" for n in names]
        return out + list(self.__dict__.get("_ddp_extra_ignored", []))

    @_ddp_params_and_buffers_to_ignore.setter
    def _ddp_params_and_buffers_to_ignore(self, names: list[str]) -> None:
        self.__dict__["_ddp_extra_ignored"] = list(names)

    # ------------------------------------------------------------------ merge / unload / delete
    def merge(self) -> None:
        """Fold the active adapter into dense weights in place (peft's ``merge_adapter``)."""
        self.merge_adapter()

    def unmerge(self) -> None:
        """Undo :meth:`merge` (peft's ``unmerge_adapter``)."""
        self.unmerge_adapter()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None) -> nn.Module:
        added = []
        if merge:
            names = adapter_names if adapter_names is not None else self.active_adapters
            added = [n for n, layer in self.vectorfit_layers() if not layer.had_bias and any(a in layer.vectorfit_bias for a in names)]
        # peft walks the de-duplicated module tree: a layer registered under two names is unloaded under
        # the first only; put the unloaded layer under the others too.
        aliases = [ns for ns in (_aliases(self.model, layer) for _, layer in self.vectorfit_layers()) if len(ns) > 1]
        model = super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)
        for ns in aliases:
            for n in ns[1:]:
                _set_at(model, n, model.get_submodule(ns[0]))
        if merge:
            merge_compat.reconcile_biases(model, added)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        merged = [layer for _, layer in self.vectorfit_layers() if adapter_name in layer.merged_adapters]
        if merged:  # its vectors are about to go: the dense weight must not keep computing with them
            warn(f"adapter {adapter_name!r} is merged: unmerging it before deleting it")
            for layer in merged:
                rest = [a for a in layer.merged_adapters if a != adapter_name]
                layer.unmerge()
                if rest:
                    layer.merge(adapter_names=rest)
        super().delete_adapter(adapter_name)
        avfs = self._modules.get(_AVF)
        if avfs is not None and adapter_name in avfs:
            del avfs[adapter_name]
        self._state()["records"].pop(adapter_name, None)

    # ------------------------------------------------------------------ saving and loading
    def adapter_record(self, adapter_name: str) -> dict:
        """What ``adapter_config.json`` records of the base model for ``adapter_name``."""
        st = self._state()
        targets = {n: dict(i) for n, i in st["records"][adapter_name].items()}
        layers = dict(self.vectorfit_layers())
        for name, info in targets.items():
            s = layers[name].sigma_of(adapter_name)
            if s is not None:  # what the trained weight looks like here; checked at load (base_check)
                info["signature"] = base_check.encode(base_check.signature(layers[name].U, s, layers[name].Vh))
        heads = self.peft_config[adapter_name].modules_to_save or []
        other = base_check.other_tensors_of(self.model, targets, heads)
        return {"targets": targets, "base_tensors": base_check.record_other_tensors(other),
                "base_model_class": type(self.model).__name__}

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: VectorFitConfig, adapter_name: str,
                                state_dict: dict, unwanted_adapter_names: list) -> dict:
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        avf_prefix = f"base_model.{_AVF}.{adapter_name}."
        out.update({k: v for k, v in state_dict.items() if k.startswith(avf_prefix)})
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, cls):
            tuner._check_avf_ran(adapter_name)
        if isinstance(tuner, cls) and adapter_name in tuner._state()["records"]:
            # Written into the saved copy of the config (VectorFitConfig.to_dict); the live config
            # stays as the user made it, so it can wrap another base model later.
            config.__dict__["_vectorfit_record"] = tuner.adapter_record(adapter_name)
        return out

    def _check_avf_ran(self, adapter_name: str) -> None:
        """At save: an AVF adapter whose vectors trained while ``avf.step`` never ran warns (once)."""
        avfs = self._modules[_AVF]
        avf = avfs[adapter_name] if adapter_name in avfs else None
        if avf is None or avf.steps_called or adapter_name in self._state()["avf_settled"] or int(avf.num_done):
            return
        if any(v > 0 for v in self.training_strengths(adapter_name).values()):
            self._warn_avf_off(adapter_name, "its vectors trained")

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: VectorFitConfig, adapter_name: str,
                                           state_dict: dict) -> dict:
        avf_prefix = f"base_model.{_AVF}."
        state_dict = {(avf_prefix + adapter_name + "." + k[len(avf_prefix):] if k.startswith(avf_prefix) else k): v
                      for k, v in state_dict.items()}
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, cls):
            tuner._check_loaded_tensors(adapter_name, out, config)
        return out

    def _check_loaded_tensors(self, adapter_name: str, tensors: dict, config: VectorFitConfig) -> None:
        """Before peft copies anything: every vector present with its shape; the decomposition here
        computes the trained weights the adapter was saved with (signatures; warns otherwise)."""
        expected = {}
        for name, layer in self.vectorfit_layers():
            for attr, d in (("vectorfit_sigma", layer.vectorfit_sigma), ("vectorfit_bias", layer.vectorfit_bias)):
                if adapter_name in d:
                    expected[f"base_model.model.{name}.{attr}.{adapter_name}"] = (name, layer, attr, d[adapter_name])
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise AdapterError(f"the adapter's weights lack {len(missing)} vector(s) of this model, first "
                               f"{[expected[k][0] + '.' + expected[k][2] for k in missing[:3]]}: the weights file is damaged or "
                               "belongs to another adapter")
        for key, (name, layer, attr, p) in expected.items():
            if tuple(tensors[key].shape) != tuple(p.shape):
                raise AdapterError(f"adapter tensor {name}.{attr} has shape {tuple(tensors[key].shape)}, the model expects {tuple(p.shape)}")
        views = {}
        for key, (name, layer, attr, p) in expected.items():
            if attr == "vectorfit_sigma":
                t = tensors[key].to(device=layer.sigma0.device, dtype=torch.float32)
                s = layer.sigma0 * (1.0 + t) if layer.vectorfit_sigma_param[adapter_name] == "relative" else t
                views[name] = (layer, s)
        # The signatures describe the file this adapter was created from. peft's load_adapter into an
        # existing adapter (a Trainer's resume) passes that adapter's config, not the new file's: its
        # record would not describe these tensors, so only the shapes above are checked then.
        st = self._state()
        if config.targets is not None and adapter_name in st["loading"]:
            st["loading"].discard(adapter_name)
            base_check.check_signatures(views, config.targets)


def get_vectorfit_model(model: nn.Module, config: Optional[VectorFitConfig] = None, adapter_name: str = "default") -> Any:
    """``peft.get_peft_model(model, config)`` with a VectorFit config (``VectorFitConfig()``, the full
    method on the architecture's default targets, if ``None``).

    Args:
        model: a pre-trained model (modified in place: its targets become VectorFit layers).
        config: what to adapt.
        adapter_name: the name of this first adapter.

    Returns:
        A ``peft.PeftModel`` (a task subclass such as ``PeftModelForCausalLM`` when ``task_type`` is set).
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise ConfigError("the model already is a PeftModel; pass its base model (model.get_base_model()), "
                          "or add an adapter with model.add_adapter(name, config)")
    return get_peft_model(model, config if config is not None else VectorFitConfig(), adapter_name=adapter_name)


def target_module_names(model: nn.Module, config: Optional[VectorFitConfig] = None,
                        with_roles: bool = False) -> Any:
    """Names of the modules ``get_vectorfit_model(model, config)`` would adapt, in model order.

    Useful to give a baseline (e.g. a peft LoRA) exactly the same targets. Modules of a role the
    variant leaves alone (f1/f2 in ``sigma_attn``) are included: they are the variant's targets.

    Args:
        model: the base model (before wrapping).
        config: the targets' settings; ``VectorFitConfig()`` if ``None``.
        with_roles: return ``{name: "attn" | "mlp"}`` instead of a list.
    """
    config = config if config is not None else VectorFitConfig()
    heads = list(config.modules_to_save or []) + list(tasks.TASK_HEADS.get(config.task_type or "", ()))
    found = {n: role for n, _, role in find_targets(model, config.target_modules, config.exclude_modules, skip=heads,
                                                      check_weights=False)}  # names only: reads no weight
    return found if with_roles else list(found)


__all__ = ["VectorFitModel", "get_vectorfit_model", "target_module_names", "is_conv1d"]
