"""The library's warning category.

Everything VectorFit warns about (a cache it could not write, a merged model its config cannot
describe, a loaded adapter whose decomposition deviates, ...) is a :class:`VectorFitWarning`, so a
user can silence, log or escalate them as one group::

    warnings.simplefilter("error", vectorfit.VectorFitWarning)   # e.g. in CI
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional


class VectorFitWarning(UserWarning):
    """A result that is usable but not what the user may assume; the message says what and why."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the innermost frame outside this package, so that a warning points at
    the user's line whatever depth inside the library it was raised at."""
    frame, level = sys._getframe(2), 2  # 1 would be warn() itself
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def warn(message: str, stacklevel: Optional[int] = None) -> None:
    """Emit ``message`` as a :class:`VectorFitWarning` attributed to the user's code (the first
    caller outside the vectorfit package) unless ``stacklevel`` says otherwise."""
    warnings.warn(message, VectorFitWarning, stacklevel=stacklevel or _user_stacklevel())
