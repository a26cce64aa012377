"""Optimizer parameter groups for a VectorFit model: separate rates for singular values, biases and
the task head.

Why: VectorFit's trained entries span orders of magnitude. Singular values of a pre-trained matrix
run from about 1e-2 to 10, biases sit near 0, and a new head starts from a random init; Adam moves
every entry by about the learning rate per step whatever its size. One rate cannot suit all three,
so the library hands out the groups and lets a recipe set each rate (``lr`` stays the default).

    groups = vectorfit.param_groups(model, lr=1e-3, bias_lr=1e-4)
    optimizer = torch.optim.AdamW(groups)

AVF is unaffected: it removes frozen vectors' gradients, whichever group they are in.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import nn

__all__ = ["param_groups", "GROUPS"]

#: Group names, in the order they are returned.
GROUPS = ("sigma", "bias", "head", "other")


def _check_lr(name: str, value: Optional[float]) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"param_groups: {name}={value!r} must be a finite number >= 0 "
                         f"(or None for the default lr)")


def param_groups(
    model: nn.Module,
    lr: float,
    *,
    sigma_lr: Optional[float] = None,
    bias_lr: Optional[float] = None,
    head_lr: Optional[float] = None,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Split a ``VectorFitModel``'s trainable parameters into optimizer groups.

    Args:
        model: a VectorFit ``PeftModel`` (``get_vectorfit_model`` / ``peft.get_peft_model``, or
            ``PeftModel.from_pretrained(..., is_trainable=True)``).
        lr: the rate of every group whose own rate is ``None``.
        sigma_lr: rate of the singular-value vectors (``vectorfit_sigma``; ``z`` with the relative
            parameterisation).
        bias_lr: rate of the trained bias vectors of the VectorFit layers.
        head_lr: rate of the ``modules_to_save`` copies (the new task head).
        weight_decay: AdamW weight decay for every group (the paper uses 0).

    Returns:
        A list of ``{"name", "params", "lr", "weight_decay"}`` dicts, one per non-empty group in the
        order of :data:`GROUPS`; every trainable parameter is in exactly one group ("other" holds
        anything trainable that is none of the above, e.g. parameters a user unfroze by hand).
    """
    for name, value in (("lr", lr), ("sigma_lr", sigma_lr), ("bias_lr", bias_lr), ("head_lr", head_lr),
                        ("weight_decay", weight_decay)):
        _check_lr(name, value)
    if lr is None:
        raise ValueError("param_groups: lr is required (it is the rate of every group left at None)")
    if not hasattr(model, "vector_list"):
        raise TypeError(f"param_groups expects a VectorFit model, got {type(model).__name__}; "
                        "wrap the model with vectorfit.get_vectorfit_model (or peft.get_peft_model) first")
    kinds: dict[int, str] = {}
    for adapter in model.active_adapters:
        for _, layer, kind in model.vector_list(adapter):
            p = (layer.vectorfit_sigma if kind == "sigma" else layer.vectorfit_bias)[adapter]
            if p.requires_grad:
                kinds[id(p)] = kind
    for m in model.modules():
        if type(m).__name__ == "ModulesToSaveWrapper":  # peft's trained copies of the task heads
            for p in m.modules_to_save.parameters():
                if p.requires_grad:
                    kinds.setdefault(id(p), "head")
    rates = {"sigma": sigma_lr, "bias": bias_lr, "head": head_lr, "other": None}
    buckets: dict[str, list[nn.Parameter]] = {g: [] for g in GROUPS}
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            buckets[kinds.get(id(p), "other")].append(p)
    return [{"name": g, "params": buckets[g], "lr": lr if rates[g] is None else rates[g],
             "weight_decay": weight_decay} for g in GROUPS if buckets[g]]
