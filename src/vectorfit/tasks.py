"""peft-style task types, and a warning for new task heads that would stay frozen.

peft users write ``LoraConfig(task_type="SEQ_CLS")`` and rely on peft adding the classification
head to ``modules_to_save``; with VectorFit peft itself does that (its task classes, e.g.
``PeftModelForSequenceClassification``), with the head names of ``task_types.TASK_HEADS``
(re-exported here): ``classifier`` / ``score`` for SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS, nothing for the language-model and feature-extraction tasks
(their output heads are pretrained, often tied to the embeddings, and stay frozen).

Unlike peft, a task whose head names match no module of the model is an error rather than a silent
no-op: with SEQ_CLS and no head found, the classifier would not train and nothing would say so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from torch import nn

from .notices import warn
from .task_types import TASK_HEADS, TASK_TYPES

if TYPE_CHECKING:  # pragma: no cover
    from .config import VectorFitConfig

__all__ = ["TASK_TYPES", "TASK_HEADS", "check_task_heads", "newly_initialised_parameters", "warn_frozen_new_parameters"]

#: Head names peft's task classes add to modules_to_save themselves, whether the model has them or not
#: (peft 0.22 adds "pre_classifier" for SEQ_CLS): never an error of the user's.
_PEFT_ADDS = frozenset({"classifier", "score", "pre_classifier", "qa_outputs"})


def _matches(module_name: str, entry: str) -> bool:
    return module_name == entry or module_name.endswith("." + entry)


def check_task_heads(model: nn.Module, config: "VectorFitConfig") -> None:
    """Refuse a classification ``task_type`` whose head the model does not have.

    peft adds the head names of the task to ``modules_to_save`` and silently skips the ones that do
    not exist; with none found the classifier would stay random and frozen, and nothing would say so.

    Raises:
        ConfigError: the task type expects a head but the model has none of its names, and
            ``modules_to_save`` names none that exists either.
    """
    from .errors import ConfigError

    heads = TASK_HEADS.get(config.task_type or "", ())
    names = [n for n, _ in model.named_modules() if n]
    for entry in config.modules_to_save or []:
        if entry not in heads and entry not in _PEFT_ADDS and not any(_matches(n, entry) for n in names):
            raise ConfigError(
                f"VectorFitConfig.modules_to_save entry {entry!r} matches no module of this {type(model).__name__}; "
                f"top-level modules are {[n for n, _ in model.named_children()]}"
            )
    if not heads:
        return
    wanted = [*heads, *[m for m in (config.modules_to_save or []) if m not in heads]]
    if not any(_matches(n, h) for n in names for h in wanted):
        raise ConfigError(
            f"VectorFitConfig.task_type={config.task_type!r} expects a task head named {' or '.join(map(repr, heads))}, "
            f"but this {type(model).__name__} has none; name your head in modules_to_save=[...] instead "
            f"(top-level modules: {[n for n, _ in model.named_children()]})"
        )


def newly_initialised_parameters(model: nn.Module) -> list[str]:
    """Parameters that ``transformers``' ``from_pretrained`` initialised because the checkpoint
    lacked them (typically a new task head), by name.

    ``from_pretrained`` (transformers 5) marks every parameter it loaded with
    ``_is_hf_initialized = True``; the ones it had to create are not marked. A model that has no
    marked parameter at all (built from a config, or by another library) gives no information,
    and the result is empty.
    """
    params = list(model.named_parameters())
    if not any(getattr(p, "_is_hf_initialized", False) for _, p in params):
        return []
    return [n for n, p in params if not getattr(p, "_is_hf_initialized", False)]


def _task_of(model_class: str, head: str) -> Optional[str]:
    """The task type a head belongs to, using the model class to tell SEQ_CLS from TOKEN_CLS."""
    by_class = {"ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                "ForSequenceClassification": "SEQ_CLS"}
    for suffix, task in by_class.items():
        if model_class.endswith(suffix) and head in TASK_HEADS[task]:
            return task
    return next((t for t, heads in TASK_HEADS.items() if head in heads), None)


def warn_frozen_new_parameters(new_params: Iterable[str], trained_prefixes: Iterable[str], model_class: str = "") -> None:
    """Warn (a :class:`~vectorfit.VectorFitWarning`) if newly initialised parameters will not be trained.

    Args:
        new_params: names from :func:`newly_initialised_parameters` (taken before wrapping).
        trained_prefixes: module names whose parameters VectorFit trains or rebuilds (saved heads,
            decomposed targets).
        model_class: the base model's class name, to suggest the right task type.
    """
    prefixes = [p + "." for p in trained_prefixes]
    frozen = [n for n in new_params if not any(n.startswith(p) for p in prefixes)]
    if not frozen:
        return
    modules = sorted({n.rpartition(".")[0] or n for n in frozen})
    # Name a known head (RoBERTa's classifier.dense + classifier.out_proj -> "classifier") so the
    # suggestion is what a user would write; other modules by their full name (a suffix could match
    # more modules than meant).
    known = [h for heads in TASK_HEADS.values() for h in heads]
    suggest: list[str] = []
    task: Optional[str] = None
    for m in modules:
        head = next((h for h in known if h in m.split(".")), None)
        entry = head if head is not None else m
        if entry not in suggest:
            suggest.append(entry)
        if head is not None and task is None:
            task = _task_of(model_class, head)
    hint = f"VectorFitConfig(modules_to_save={suggest})"
    if task is not None:
        hint = f"VectorFitConfig(task_type={task!r}) or {hint}"
    warn(
        f"{', '.join(modules[:4])}{' ...' if len(modules) > 4 else ''}: newly initialised by from_pretrained "
        f"(not in the checkpoint), but VectorFit leaves it frozen, so it would stay random; pass {hint} "
        "to train it and save it with the adapter"
    )
