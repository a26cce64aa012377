"""Input and output files of ``vectorfit report``, checked before they are used.

A results folder is written by ``vectorfit train``, but also edited by hand, copied between
machines and written by older versions. One unusable file must not stop the report of all the
others, nor bring a NaN into a mean: it is skipped with a one-line warning naming it. The report's
own ``--out`` is checked before any result is read, so a typo fails in a second with one line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

__all__ = ["result_problem", "read_result", "check_out"]


def _is_number(x: object, finite: bool = True) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (not finite or math.isfinite(x))


def result_problem(r: object, partial: bool = False) -> Optional[str]:
    """What makes ``r`` (a parsed result file, or a ``.partial`` with ``partial``) unusable for the
    report, or ``None`` if nothing does.

    A result file is written by ``vectorfit train``, but a results folder is also edited by hand,
    copied between machines and written by older versions; one bad file must not stop the report of
    all the others, nor bring a NaN into a mean. Checked: the fields the tables read, by type."""
    if not isinstance(r, dict):
        return f"holds a JSON {type(r).__name__}, not an object"
    for key in ("task", "model", "method", "metric"):
        if not isinstance(r.get(key), str) or not r[key]:
            return f"{key!r} is {'missing' if key not in r else repr(r[key])[:40]}; a string is needed"
    if not isinstance(r.get("seed"), int) or isinstance(r.get("seed"), bool):
        return f"'seed' is {repr(r.get('seed'))[:40]}; an integer is needed"
    numbers = ["lr"] if partial else ["lr", "test", "validation"]
    for key in numbers:
        if not _is_number(r.get(key)):
            return f"{key!r} is {'missing' if key not in r else repr(r[key])[:40]}; a finite number is needed"
    for key in ("test_before", "train_seconds", "peak_rss_mb", "adapter_bytes"):
        if r.get(key) is not None and not _is_number(r[key]):
            return f"{key!r} is {repr(r[key])[:40]}; a finite number or null is needed"
    for key in ("trainable_params", "total_params"):
        if key not in r and not partial:
            return f"{key!r} is missing"
        if r.get(key) is not None and not _is_number(r[key]):
            return f"{key!r} is {repr(r[key])[:40]}; an integer or null is needed"
    if not isinstance(r.get("config", {}), dict) or (not partial and "config" not in r):
        return "'config' is missing or not an object"
    curve = r.get("curve") or []
    if not isinstance(curve, list):
        return "'curve' is not a list"
    for p in curve:
        if not isinstance(p, dict) or not isinstance(p.get("step"), int) or isinstance(p.get("step"), bool):
            return f"a 'curve' point has no integer 'step': {repr(p)[:60]}"
        bad = next((k for k in ("test", "validation") if p.get(k) is not None and not _is_number(p[k])), None)
        if bad:
            return f"the 'curve' point at step {p['step']} has {bad} {p[bad]!r}; a finite number or null is needed"
    return None


def read_result(path: Path, partial: bool = False, warn: Any = None) -> Optional[dict]:
    """The result (or ``.partial``) file at ``path``, or ``None`` after a one-line warning (on stderr,
    or to ``warn``) naming it and what is wrong, if it cannot be read or :func:`result_problem` finds
    a problem."""
    try:
        r = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError
        problem: Optional[str] = f"cannot be read as JSON ({' '.join(str(e).split())})"
    else:
        problem = result_problem(r, partial)
    if problem is None:
        return r
    message = f"vectorfit report: skipping {path}: {problem}"
    (warn or (lambda m: print(m, file=sys.stderr)))(message)
    return None


def check_out(out: Path) -> None:
    """``--out`` is a file name whose folder (and the ``plots/`` beside it) can be written; checked
    before any result is read.

    Raises:
        ValueError: naming ``--out``, the value and what to do instead.
    """
    from .train_config import _check_writable

    if out.expanduser().is_dir():
        raise ValueError(f"--out {out}: it is a folder; give the report's file name, e.g. {out / 'RESULTS.md'}")
    _check_writable(str(out), "--out", folder=False)
    plots = out.expanduser().parent / "plots"
    if plots.exists() and not plots.is_dir():
        raise ValueError(f"--out {out}: {plots} is a file, and the plots go in a folder of that name; move it or "
                         "choose another --out")
