"""Making a merged model survive its own ``save_pretrained`` / ``from_pretrained``.

Training biases on layers that had none (Llama, Mistral, Gemma, T5, ...) gives the merged model
``Linear`` layers with a bias. transformers rebuilds a model from its config, and the config still
says "no bias" (``attention_bias=False``, or nothing at all), so a reload silently drops the trained
biases -- it only logs "UNEXPECTED ... can be ignored" -- and the outputs move.

:func:`reconcile_biases` runs at the end of ``merge_and_unload``:

1. an added bias that is exactly zero is removed (no bias computes exactly the same);
2. for the others, the config's boolean ``*bias*`` flags (``attention_bias``, ``mlp_bias``, ...) are
   tried one at a time on a model built from the config on the ``meta`` device (no memory, no
   weights), and each flag that gives one of those layers a bias is switched on;
3. layers that the switched-on flags give a bias but that have none get an exact zero bias, so the
   merged model has exactly the structure ``type(model)(config)`` builds and reloads bit for bit;
4. layers no flag can give a bias are named in a :class:`~vectorfit.VectorFitWarning`: the merged
   model computes correctly but does not survive ``save_pretrained`` -> ``from_pretrained``.

Models that are not transformers ``PreTrainedModel`` s (no config to rebuild from) are left alone.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from .notices import warn
from .targets import is_linear_like

logger = logging.getLogger(__name__)

#: Flags some architectures read with ``getattr(config, name, False)`` although their config class
#: does not declare them; tried as well, and removed again when they change nothing.
_UNDECLARED_FLAGS = ("attention_bias", "mlp_bias")


def _bias_layout(cls: type, config: Any) -> Optional[tuple[dict[str, bool], dict[str, tuple]]]:
    """For ``cls(config)`` built on the meta device: ``{module name: has a bias}`` for every
    Linear/Conv1D, and ``{key: shape}`` of every other ``state_dict`` entry; ``None`` if the class
    cannot be built from the config this way."""
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # an unusual model class; nothing to reconcile against
        logger.debug("cannot rebuild %s from its config on the meta device (%s)", cls.__name__, e)
        return None
    layout = {n: m.bias is not None for n, m in model.named_modules() if is_linear_like(m)}
    biases = {f"{n}.bias" for n in layout}
    rest = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in biases}
    return layout, rest


def _candidate_flags(config: Any) -> list[str]:
    declared = [
        k for k, v in config.to_dict().items() if isinstance(v, bool) and not v and (k == "bias" or k.endswith("_bias"))
    ]
    return declared + [f for f in _UNDECLARED_FLAGS if f not in declared and not hasattr(config, f)]


def reconcile_biases(model: nn.Module, added: list[str]) -> None:
    """See the module docstring.

    Args:
        model: the merged model (its VectorFit layers already replaced by plain layers).
        added: names of the layers whose bias did not exist in the base model.
    """
    with torch.no_grad():
        for name in added:
            layer = model.get_submodule(name)
            if layer.bias is not None and not bool(layer.bias.any()):
                layer.bias = None
    needed = [n for n in added if model.get_submodule(n).bias is not None]
    if not needed:
        return
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(type(model), "config_class"):
        # Not a transformers model (a diffusers UNet, a plain nn.Module): its class builds those
        # layers without a bias, so a fresh copy loading the merged weights drops them (diffusers'
        # from_pretrained, with a log line) or refuses them (a strict load_state_dict).
        warn(
            f"the merged {type(model).__name__} has trained biases on {len(needed)} layer(s) its class builds without "
            f"one ({needed[:3]}{' ...' if len(needed) > 3 else ''}): it computes correctly, but loading its weights into "
            f"a freshly built {type(model).__name__} (e.g. from_pretrained of a saved merged model) drops or refuses "
            "them. Keep the adapter instead, save the merged module itself (torch.save), or train with a variant that "
            "trains no bias there (e.g. variant='sigma')",
        )
        return
    built = _bias_layout(type(model), config)
    if built is None:
        return
    base, rest = built
    flags: list[str] = []
    trial = copy.deepcopy(config)
    for flag in _candidate_flags(config):
        attempt = copy.deepcopy(trial)
        setattr(attempt, flag, True)
        got = _bias_layout(type(model), attempt)
        # Accept a flag only if all it changes is which linear layers have a bias.
        if got is not None and got[1] == rest and any(got[0].get(n) and not base.get(n) for n in needed):
            trial, base, flags = attempt, got[0], flags + [flag]
    uncovered = [n for n in needed if not base.get(n)]
    if flags:
        for flag in flags:
            setattr(config, flag, True)
        with torch.no_grad():
            for name, has_bias in base.items():
                layer = model.get_submodule(name)
                if has_bias and layer.bias is None:
                    w = layer.weight
                    out = w.shape[1] if type(layer).__name__ == "Conv1D" else w.shape[0]
                    layer.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=False)
        logger.info("merged model: set %s in its config so that the trained biases are saved and reloaded", flags)
    if uncovered:
        warn(
            f"the merged {type(model).__name__} has trained biases on {len(uncovered)} layer(s) that its config cannot "
            f"describe ({uncovered[:3]}{' ...' if len(uncovered) > 3 else ''}): it computes correctly, but "
            f"save_pretrained -> {type(model).__name__}.from_pretrained would silently drop those biases. Keep the "
            "adapter (VectorFitModel.save_pretrained) instead, save the merged model with torch.save, or train with a "
            "variant that trains no bias there (e.g. variant='sigma')",
        )
