"""Progress display while VectorFit fingerprints and decomposes a model's matrices.

The first ``get_vectorfit_model`` on a large model runs one SVD per target matrix, which takes
minutes on a CPU; a silent minute looks like a hang. The bar is shown only if the work takes over
a second (tqdm's ``delay``), so a warm start from the SVD cache prints nothing.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["progress_enabled", "svd_progress", "svd_bar", "ENV_VAR", "DELAY_S"]

T = TypeVar("T")

#: Environment switch: ``VECTORFIT_PROGRESS=0`` turns the bar off when the config leaves it ``None``.
ENV_VAR = "VECTORFIT_PROGRESS"
#: Seconds of work before the bar appears.
DELAY_S = 1.0

_OFF = ("0", "false", "no", "off")


def progress_enabled(setting: Optional[bool] = None) -> bool:
    """Whether to show progress.

    Args:
        setting: ``VectorFitConfig.progress``; ``None`` defers to ``$VECTORFIT_PROGRESS`` (on by default).

    Returns:
        ``setting`` if it is a bool, else ``False`` iff the variable is ``0``/``false``/``no``/``off``.
    """
    if setting is not None:
        return bool(setting)
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def svd_progress(items: Iterable[T], total: int, enabled: bool) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar over the target matrices.

    Args:
        items: the targets, in the order they are processed.
        total: their number (for the bar's percentage and estimate).
        enabled: ``False`` iterates silently.

    Returns:
        An iterator over ``items``.
    """
    if not enabled:
        return iter(items)
    from tqdm.auto import tqdm

    return iter(tqdm(items, total=total, desc="VectorFit: fingerprint + SVD", unit="matrix",
                     delay=DELAY_S, leave=True, dynamic_ncols=True))


def svd_bar(total: int, enabled: bool):
    """A progress bar over ``total`` target matrices, advanced with ``.update(1)`` and ended with
    ``.close()``; ``None`` when disabled."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="VectorFit: fingerprint + SVD", unit="matrix", delay=DELAY_S, leave=True, dynamic_ncols=True)
