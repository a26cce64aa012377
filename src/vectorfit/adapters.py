"""Many adapters on one base model: one SVD, many sets of vectors.

Every adapter of a base model lives in the same basis: ``U`` and ``Vh`` (and ``sigma0``) are computed
once and shared; an adapter is only its singular values, biases and saved heads. peft's own calls
manage them (``load_adapter``, ``set_adapter``, ``delete_adapter``, ``add_adapter``); this mixin of
the tuner adds what VectorFit does better than a low-rank method:

* ``add_weighted_adapter(names, weights, new)`` is exact: with a shared basis
  ``U diag(sum_j w_j ds_j) Vh = sum_j w_j dW_j`` (negative weights subtract a task);
* ``hotswap_adapter(path, name)`` writes a saved adapter's vectors into a loaded one in place (the
  same parameter objects: an optimizer or a compiled graph keeps working; a merged model is merged
  again with the new vectors);
* ``model(**batch, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` run each
  row with its own adapter in one pass (``"__base__"``: the base model), as peft's keyword does for LoRA.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import AdapterError, ConfigError
from .layer import BASE, VectorFitLayer

__all__ = ["AdaptersMixin", "BASE", "check_adapter_name"]

_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: Any) -> None:
    """Refuse an adapter name that cannot be a folder name of ``save_pretrained`` (which writes every
    adapter but ``default`` into ``<dir>/<name>/``) or that peft reserves.

    Raises:
        ValueError: naming the bad name and what is allowed.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == BASE:
        raise ValueError(f"adapter_name={name!r} is invalid: use letters, digits, '_' or '-' (it becomes a folder name "
                         f"when saved; {BASE!r} names the base model in mixed batches)")

# The model inputs whose first dimension is the batch (to check one adapter name per row).
_BATCH_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values", "attention_mask")


def _inject_names(module: nn.Module, args: tuple, kwargs: dict, adapter_names: list) -> tuple:
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, AuxiliaryTrainingWrapper):  # an adapter without this head computes with the original one
        adapter_names = [n if n in module._adapters else BASE for n in adapter_names]
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _head_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [(n, m) for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]


class AdaptersMixin:
    """Adapter operations of :class:`~vectorfit.model.VectorFitModel` (the peft tuner)."""

    # ------------------------------------------------------------------ mixed batches
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft calls this around every forward / generate: ``adapter_names`` (one adapter name or
        ``"__base__"`` per row) makes every VectorFit layer and saved head compute row ``i`` with adapter
        ``adapter_names[i]``."""
        if self.training:
            self._watch_avf()  # type: ignore[attr-defined]  # the tuner's (model.py)
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ValueError("adapter_names must be a list with one adapter name (or '__base__') per row of the batch")
        if self.training:
            # As peft does: a mixed batch in training would leave gradients on adapters no optimizer
            # steps (and zero_grad never clears), to be applied later when that adapter is trained.
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode: call model.eval() first")
        adapter_names = list(adapter_names)
        inputs = [*args, *[kwargs.get(k) for k in _BATCH_INPUTS]]
        first = next((t for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), None)
        if first is not None and first.shape[0] != len(adapter_names):
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {first.shape[0]} rows: give one per row")
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}; loaded: "
                             f"{list(self.peft_config)} (and {BASE!r} for the base model)")
        if list(dict.fromkeys(adapter_names)) == self.active_adapters:
            # Every row uses the active adapter: the ordinary forward computes exactly that (merged or
            # not), with each layer's cached dense weight at inference instead of the per-row pass.
            yield
            return
        layers = [m for m in self.model.modules() if isinstance(m, VectorFitLayer)]
        if any(layer.merged for layer in layers):
            raise ValueError("mixed-adapter batches need the unmerged model: call model.unmerge_adapter() first")
        hook = partial(_inject_names, adapter_names=adapter_names)
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
        handles += [m.register_forward_pre_hook(hook, with_kwargs=True) for _, m in _head_wrappers(self.model)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` (one per prompt) generates each prompt with
        its adapter in the same batch (beams and ``num_return_sequences`` follow their prompt).
        (``PeftModelForCausalLM.generate`` does the same through peft.)"""
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        with self._enable_peft_forward_hooks(*args, adapter_names=adapter_names, **kwargs):
            return gen(*args, **kwargs)

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
            adapters: names of loaded adapters (on the same targets and vectors).
            weights: one float per adapter.
            adapter_name: the new adapter's name.
            combination_type: ``"linear"`` only (peft's other types approximate a sum of LoRA products;
                here the linear sum is already the exact sum of the weight updates).
        """
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists already; pick another name")
        if combination_type != "linear":
            raise ValueError(f"combination_type={combination_type!r} is not supported: use 'linear', which for VectorFit "
                             "is exactly the weighted sum of the adapters' weight updates")
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"add_weighted_adapter needs one weight per adapter, got {len(adapters)} adapters and {len(weights)} weights")
        bad = [(a, w) for a, w in zip(adapters, weights) if not math.isfinite(w)]
        if bad:  # a NaN weight makes every vector NaN: an adapter that computes nothing
            raise ValueError(f"add_weighted_adapter: weight {bad[0][1]} for adapter {bad[0][0]!r} is not a finite number; "
                             "give each adapter a finite weight")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"no adapter named {missing[0]!r}; loaded adapters: {list(self.peft_config)}")
        layers = list(self.vectorfit_layers())
        shapes = {a: [(n, a in layer.vectorfit_sigma, a in layer.vectorfit_bias) for n, layer in layers] for a in adapters}
        if any(shapes[a] != shapes[adapters[0]] for a in adapters):
            raise ConfigError(f"add_weighted_adapter: {adapters} train different vectors (targets or variants differ); "
                              "only adapters with the same vectors can be combined")
        configs = [self.peft_config[a] for a in adapters]
        relative = all(c.sigma_param == "relative" for c in configs)  # z is linear in ds too: keep that form
        config = copy.deepcopy(configs[0])
        config.sigma_param = "relative" if relative else "absolute"
        config.inference_mode = True
        if config.uses_avf:
            config.avf = copy.deepcopy(config.avf)
        self.peft_config[adapter_name] = config
        st = self._state()
        st["records"][adapter_name] = copy.deepcopy(st["records"][adapters[0]])
        grads = [(p, p.requires_grad) for p in self.parameters()]  # update_layer re-applies peft's rule; keep as is
        for _, layer in layers:
            s_on, b_on = adapters[0] in layer.vectorfit_sigma, adapters[0] in layer.vectorfit_bias
            layer.update_layer(adapter_name, s_on, b_on, config.sigma_param, inference_mode=True)
            if s_on:
                new = layer.vectorfit_sigma[adapter_name]
                if relative:
                    new.copy_(sum(w * layer.vectorfit_sigma[a] for a, w in zip(adapters, weights)))
                else:
                    new.copy_(layer.sigma0 + sum(w * (layer.sigma_of(a) - layer.sigma0) for a, w in zip(adapters, weights)))
            if b_on:
                layer.vectorfit_bias[adapter_name].copy_(
                    layer.bias0 + sum(w * (layer.vectorfit_bias[a] - layer.bias0) for a, w in zip(adapters, weights)))
        for hname, head in _head_wrappers(self.model):
            if not all(a in head.modules_to_save for a in adapters):
                continue
            head.update(adapter_name)
            original = head.original_module.state_dict()
            target = head.modules_to_save[adapter_name].state_dict(keep_vars=True)
            for key, t in target.items():
                parts = [head.modules_to_save[a].state_dict()[key] for a in adapters]
                if any(p.shape != t.shape for p in parts):
                    self.delete_adapter(adapter_name)
                    raise ValueError(f"add_weighted_adapter: head tensor {hname}.{key} has different shapes across {adapters}")
                if t.is_floating_point():
                    t.copy_(original[key] + sum(w * (p - original[key]) for w, p in zip(weights, parts)))
                else:
                    t.copy_(parts[0])  # counters and the like: not a weight to combine
            for p in head.modules_to_save[adapter_name].parameters():
                p.requires_grad_(False)
        if config.uses_avf:
            self._add_avf(adapter_name, config)
        for p, flag in grads:
            p.requires_grad_(flag)
        for _, layer in layers:  # the new adapter is frozen
            for d in (layer.vectorfit_sigma, layer.vectorfit_bias):
                if adapter_name in d:
                    d[adapter_name].requires_grad_(False)

    # ------------------------------------------------------------------ hot-swap
    @torch.no_grad()
    def hotswap_adapter(self, adapter_path: Union[str, Path], adapter_name: str) -> None:
        """Write the vectors and heads saved at ``adapter_path`` into the loaded adapter
        ``adapter_name`` in place: the same parameter objects, so an optimizer or a ``torch.compile``d
        model keeps working. The new adapter must have been trained on this base model, with the same
        targets and vectors; nothing is written unless all of it fits. A merged model is merged again,
        with the new vectors.

        Raises:
            AdapterError: another base, other targets/vectors/heads, damaged files.
        """
        from peft.utils import load_peft_weights

        from .config import VectorFitConfig

        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter named {adapter_name!r} to hot-swap into; loaded: {list(self.peft_config)}")
        path = Path(adapter_path)
        try:
            new_config = VectorFitConfig.from_pretrained(str(path))
        except (ValueError, TypeError, OSError) as e:
            raise AdapterError(f"cannot read the adapter config at {path}: {e}") from None
        rec, mine = new_config.targets or {}, self._state()["records"][adapter_name]
        for name, info in mine.items():
            other = rec.get(name)
            if other is None or other["fingerprint"] != info["fingerprint"] or other["sigma"] != info["sigma"] or other["bias"] != info["bias"]:
                raise AdapterError(f"hotswap: the adapter at {path} does not fit adapter {adapter_name!r} at target {name!r} "
                                   "(another base weight, or other vectors); load it with load_adapter under a new name")
        if set(rec) != set(mine) or sorted(new_config.modules_to_save or []) != sorted(self.peft_config[adapter_name].modules_to_save or []):
            raise AdapterError(f"hotswap: the adapter at {path} covers other modules than adapter {adapter_name!r}")
        if new_config.sigma_param != self.peft_config[adapter_name].sigma_param:
            raise AdapterError(f"hotswap: {path} uses sigma_param={new_config.sigma_param!r}, adapter {adapter_name!r} "
                               "the other form; load it with load_adapter under a new name")
        weights = load_peft_weights(str(path), device="cpu")
        peft_model = _Shim(self)
        self._state()["loading"].add(adapter_name)  # type: ignore[attr-defined]  # check the new file's signatures
        remapped = type(self)._remap_adapter_state_dict_for_load(peft_model, new_config, adapter_name, weights)
        own = {k: v for k, v in peft_model.state_dict(keep_vars=True).items()}
        heads = [f"base_model.model.{n}." for n, _ in _head_wrappers(self.model)]
        for key in list(remapped):  # a head's tensors are saved without peft's wrapper path
            head = next((h for h in heads if key.startswith(h)), None)
            if head is not None and key not in own:
                remapped[f"{head}modules_to_save.{adapter_name}.{key[len(head):]}"] = remapped.pop(key)
        pairs = []
        for key, t in remapped.items():
            if key.startswith("base_model.vectorfit_avf."):
                continue  # AVF state: loaded below into the controller the new config asks for
            if key not in own:
                raise AdapterError(f"hotswap: {path} holds {key!r}, which adapter {adapter_name!r} does not have")
            if own[key].shape != t.shape:
                raise AdapterError(f"hotswap: tensor {key!r} has shape {tuple(t.shape)}, the model expects {tuple(own[key].shape)}")
            pairs.append((own[key], t))
        for dst, src in pairs:  # all checked: now write
            if dst.shape == src.shape:
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))
        # The slot becomes the new adapter, AVF included: its variant decides whether there is a
        # controller, and a saved AVF state (history, frozen set) comes along with its vectors.
        avfs = self._modules["vectorfit_avf"]
        if adapter_name in avfs:
            del avfs[adapter_name]
        if new_config.uses_avf:
            self._add_avf(adapter_name, new_config)
            prefix = f"base_model.vectorfit_avf.{adapter_name}."
            avf_state = {k[len(prefix):]: v for k, v in remapped.items() if k.startswith(prefix)}
            if avf_state:  # history length depends on the schedule: load through the module
                avfs[adapter_name].load_state_dict(avf_state)
        new_config.inference_mode = self.peft_config[adapter_name].inference_mode
        self.peft_config[adapter_name] = new_config
        # A merged layer sees that its vectors changed (their in-place versions) and merges again at its
        # next forward: VectorFitLayer._refresh_merge, the same path any other in-place change takes.


class _Shim(nn.Module):
    """Stands in for the ``PeftModel`` (``base_model.model.*`` names) when the tuner is used alone."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.base_model = tuner
