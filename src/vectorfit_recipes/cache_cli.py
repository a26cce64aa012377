"""``vectorfit cache info|prune|clear``: look at and trim the on-disk SVD cache.

The library keeps the folder under its cap by itself (see :mod:`vectorfit.cache`); these commands
are for seeing what it holds, trimming it further by hand (before copying a home folder, on a full
disk) and emptying it. They delete only files named like the cache's own entries and temporaries,
so pointing ``--dir`` at the wrong folder (``$HOME``, say) removes nothing else.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

DIR_HELP = ("the cache folder (default: the one training uses: $VECTORFIT_CACHE/svd, else "
            "$XDG_CACHE_HOME/vectorfit/svd, else ~/.cache/vectorfit/svd; give the cache_dir of your "
            "VectorFitConfig if you set one)")


def _size_arg(text: str) -> int:
    from vectorfit import ConfigError
    from vectorfit.cache import parse_size

    try:
        return parse_size(text, "--max-size")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``cache`` and its actions on the ``vectorfit`` subparsers ``sub``."""
    p = sub.add_parser(
        "cache", help="show, trim or empty the on-disk cache of SVDs",
        description="VectorFit keeps the SVD of every pretrained weight it decomposed on disk, keyed by the "
                    "weight's SHA-256, so that the next run on the same base model starts in seconds. The folder "
                    "has a size cap (default 2 GiB; set VECTORFIT_CACHE_MAX_BYTES, e.g. 5GB, or 0 for no limit): "
                    "after each write the least recently used entries are deleted. VECTORFIT_SVD_CACHE=0 turns "
                    "the cache off. Every entry is checked against its weight when read, so a damaged or foreign "
                    "entry is recomputed, never used.",
    )
    actions = p.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    p_info = actions.add_parser("info", help="folder, number of entries, total size, cap, oldest and newest use")
    p_prune = actions.add_parser(
        "prune", help="delete least recently used entries until the folder fits the cap (or --max-size)",
        description="Delete least recently used entries (by their last read or write) until the folder holds at most "
                    "the cap, or --max-size, and say what was freed; also removes temporary files that crashed "
                    "writes left behind (older than an hour).")
    p_prune.add_argument("--max-size", type=_size_arg, default=None, metavar="SIZE",
                         help="size to trim to: bytes or a number with a unit (500MB, 1GiB); default: the cap. "
                              "0 means no limit (then only stale temporary files go); use `clear` to empty the folder")
    p_clear = actions.add_parser(
        "clear", help="delete every entry (only the cache's own files)",
        description="Delete every cache entry: files named <64 hex digits>.safetensors and stale temporaries of "
                    "the cache's writes. Other files in the folder, and the folder itself, are left alone; "
                    "temporary files of writes in progress in another process are left to finish.")
    for q in (p_info, p_prune, p_clear):
        q.add_argument("--dir", default=None, metavar="DIR", help=DIR_HELP)
    for q in (p_prune, p_clear):
        q.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    return p


def _when(t: float) -> str:
    ago = max(0.0, time.time() - t)
    for unit, s in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if ago >= s:
            return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} ({ago / s:.0f} {unit} ago)"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(t))} (just now)"


def cache_command(ns: argparse.Namespace) -> int:
    """Run ``vectorfit cache ACTION``; returns the exit status."""
    import os

    from vectorfit import ConfigError
    from vectorfit.cache import MAX_BYTES_ENV, SVDCache, format_size, max_bytes_from_env

    try:
        cap, source = max_bytes_from_env()  # also under VECTORFIT_SVD_CACHE=0: the folder may still hold entries
    except ConfigError as e:
        print(f"vectorfit: error: {e}", file=sys.stderr)
        return 2
    cache = SVDCache(ns.dir, max_bytes=cap)
    root = cache.root
    cap_text = (f"{format_size(cap)} ({cap} bytes)" if cap else "none") + f", from {source}"
    if source == "default":
        cap_text += f" (set {MAX_BYTES_ENV}, e.g. 5GB, to change it; 0 = no limit)"
    if root.exists() and not root.is_dir():
        print(f"vectorfit: error: {root} is not a folder; give the cache folder with --dir", file=sys.stderr)
        return 2

    if ns.cache_command == "info":
        files = cache.entries()
        entries = [e for e in files if not e.temporary]
        print(f"folder:  {root}{'' if root.exists() else ' (does not exist yet)'}")
        print(f"entries: {len(entries)}, {format_size(sum(e.size for e in entries))}")
        print(f"cap:     {cap_text}")
        if entries:
            print(f"used:    oldest {_when(entries[0].mtime)}, newest {_when(entries[-1].mtime)}")
        tmp = [e for e in files if e.temporary]
        if tmp:
            print(f"temporary files: {len(tmp)}, {format_size(sum(e.size for e in tmp))} (writes in progress, or "
                  "left by a crash: `vectorfit cache prune` removes those older than an hour)")
        if os.environ.get("VECTORFIT_SVD_CACHE", "1") == "0":
            print("note:    VECTORFIT_SVD_CACHE=0 is set: training neither reads nor writes this cache")
        return 0

    verb = "would free" if ns.dry_run else "freed"
    if ns.cache_command == "prune":
        limit = cap if ns.max_size is None else ns.max_size
        done = cache.prune(max_bytes=limit, dry_run=ns.dry_run)
        target = f"{format_size(limit)}" if limit else "no limit"
        print(f"{root}: {verb} {format_size(done.freed)} ({done.removed} least recently used entries) to fit {target}; "
              f"{done.kept} entries, {format_size(done.kept_bytes)} kept")
    else:
        done = cache.clear(dry_run=ns.dry_run)
        print(f"{root}: {verb} {format_size(done.freed)} ({done.removed} entries)"
              + (f"; {done.kept} entries could not be deleted (see the log)" if done.kept else ""))
    if done.temporaries:
        print(f"{'would remove' if ns.dry_run else 'removed'} {done.temporaries} stale temporary file(s)")
    return 0
