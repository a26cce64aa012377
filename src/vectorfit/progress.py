"""Progress display while VectorFit fingerprints and decomposes a model's matrices.

The first ``get_vectorfit_model`` on a large model runs one SVD per target matrix, which takes
minutes on a CPU; a silent minute looks like a hang. The bar is shown only if the work takes over
a second (tqdm's ``delay``), so a warm start from the SVD cache prints nothing.

When stderr is not a terminal (a log file, a pipe, a job scheduler) a bar cannot redraw itself in
place: every refresh becomes a line of its own, hundreds per model. There the display is two lines
instead, one when the work has taken a second and one with the count and the time at the end.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional, TypeVar

__all__ = ["progress_enabled", "svd_progress", "svd_bar", "ENV_VAR", "DELAY_S", "DESCRIPTION"]

T = TypeVar("T")

#: Environment switch: ``VECTORFIT_PROGRESS=0`` turns the bar off when the config leaves it ``None``.
ENV_VAR = "VECTORFIT_PROGRESS"
#: Seconds of work before the bar appears.
DELAY_S = 1.0

_OFF = ("0", "false", "no", "off")

#: What the display says it counts.
DESCRIPTION = "VectorFit: fingerprint + SVD"


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


def _on_terminal() -> bool:
    """Whether stderr (where progress goes) is a terminal that a bar can redraw in place."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class _LogLines:
    """A stand-in for the bar when stderr is not a terminal: a start line once the work has taken
    :data:`DELAY_S` seconds, and an end line with the count and the time (nothing at all for faster
    work, like the bar)."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0
        self.start = time.monotonic()
        self.announced = self.closed = False

    def _say(self, text: str) -> None:
        print(f"{DESCRIPTION}: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.announced and time.monotonic() - self.start >= DELAY_S:
            self.announced = True
            self._say(f"{self.total} matrices to decompose ({self.n}/{self.total} done)")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.monotonic() - self.start
        if self.announced or seconds >= DELAY_S:
            self._say(f"{self.n}/{self.total} matrices in {seconds:.1f}s")


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
    bar = svd_bar(total, enabled)

    def each() -> Iterator[T]:
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            bar.close()

    return each()


def svd_bar(total: int, enabled: bool) -> Any:
    """A progress bar over ``total`` target matrices, advanced with ``.update(1)`` and ended with
    ``.close()``; ``None`` when disabled. Two lines instead of a bar when stderr is not a terminal."""
    if not enabled:
        return None
    if not _on_terminal():
        return _LogLines(total)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=DESCRIPTION, unit="matrix", delay=DELAY_S, leave=True, dynamic_ncols=True)
