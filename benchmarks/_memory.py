"""Process memory readings shared by the benchmarks (Linux): resident set and its high-water mark
from ``/proc/self/status``, after handing freed heap back to the system."""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path


def trim() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc ``malloc_trim``), so the
    resident set reads what is live rather than what the allocator kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``: resident now; ``VmHWM``: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
