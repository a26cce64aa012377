"""peft's task types VectorFit supports and the head modules each one trains.

Plain data, importing nothing: ``config.py`` checks ``task_type`` against :data:`TASK_TYPES` and
``tasks.py`` finds the heads of :data:`TASK_HEADS` in a model, and ``tasks.py`` reads a
``VectorFitConfig``. With the table here, both import it and ``config.py`` never needs ``tasks.py``.
"""

from __future__ import annotations

__all__ = ["TASK_HEADS", "TASK_TYPES"]

#: peft's task types and the head modules each adds to ``modules_to_save``.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}
#: peft's task types VectorFit supports (as in ``peft.TaskType``).
TASK_TYPES: tuple[str, ...] = tuple(TASK_HEADS)
