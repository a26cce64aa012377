"""Text helpers shared by the ``vectorfit`` command and its subcommand modules.

``cli.py`` builds the parser and dispatches to ``generate_cli.py`` and the others; they all word
their errors with these, imported from here, so that no subcommand module imports ``cli.py``.
"""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(e: BaseException) -> str:
    """An exception's text on one line (a KeyError's str() would add quotes)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())
