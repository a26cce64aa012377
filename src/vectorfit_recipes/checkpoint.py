"""Resumable runs: the training loop's state, written atomically next to the result file.

A run with ``--output X`` keeps ``X.ckpt`` while it trains (at every learning-curve step and every
epoch end) and removes it when the result is written. Running the same command again continues from
it: same weights, optimizer moments, AVF state, data order and random streams, so the resumed run
gives the numbers the uninterrupted run would have (tested). A checkpoint made with other settings
(another rate, seed, budget, ...) is not used: the run starts afresh and says so.

The file holds the trainable parameters and every buffer of the model (AVF's state is a set of
buffers), not the frozen weights, which come from the pretrained model again.

The file sits beside a result, where anyone who can write the results folder can plant one, and
unpickling runs whatever a pickle names. So it holds only tensors and plain Python data (numbers,
strings, lists, tuples, dicts) and is read with ``torch.load(weights_only=True)``, which refuses
anything else (:class:`UnsafeCheckpoint`) without running it. Checkpoints written before this rule
kept numpy's random state as an array; numpy arrays (and nothing else) are allowed in addition, so
they still resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["LoopState", "checkpoint_path", "partial_path", "resume_path", "identity", "save", "load",
           "read", "RESUME_UNSUPPORTED", "OutputBusy", "UnsafeCheckpoint", "output_lock", "output_busy"]

FORMAT = 1

#: Methods whose per-step state lives outside the model and the optimizer (peft's AdaLoRA keeps its
#: importance scores in Python dicts): they are not checkpointed and restart from scratch.
RESUME_UNSUPPORTED = ("adalora",)

# Settings that change how a run is executed or reported, not the numbers it produces.
_NOT_IDENTITY = {"output", "save_adapter", "threads", "progress", "stop_at_step", "low_memory", "device"}


@dataclasses.dataclass
class LoopState:
    """Everything the training loop needs to continue where it stopped."""

    step: int = 0
    epoch: int = 1
    pos: int = 0                      # index into ``perm`` of the next batch
    perm: Optional[list] = None       # this epoch's data order (None: not drawn yet)
    losses: list = dataclasses.field(default_factory=list)
    val_history: list = dataclasses.field(default_factory=list)
    curve: list = dataclasses.field(default_factory=list)
    best_val: Optional[float] = None
    best_epoch: Optional[int] = None
    best_state: Optional[list] = None  # trainable tensors of the best epoch, in parameter order
    train_seconds: float = 0.0         # optimisation time of earlier invocations
    train_cpu_seconds: Optional[float] = 0.0  # the same in CPU seconds (None: not recorded)
    resumed_from: list = dataclasses.field(default_factory=list)


def checkpoint_path(output: str) -> Path:
    return Path(f"{output}.ckpt")


def resume_path(output: Optional[str], method: str) -> Optional[Path]:
    """The checkpoint a run of ``method`` with ``--output output`` keeps and resumes from, or None
    when it keeps none (no output, or a method in :data:`RESUME_UNSUPPORTED`).

    The one place that rule lives: the trainer asks it which file to load and save, and
    ``bench --status`` asks it whether a stopped run resumes or trains again from step 0.
    """
    if not output or method in RESUME_UNSUPPORTED:
        return None
    return checkpoint_path(output)


def partial_path(output: str) -> Path:
    """Where a run with ``--output X`` keeps its learning curve while it trains (``X.partial``)."""
    return Path(f"{output}.partial")


class OutputBusy(RuntimeError):
    """Another process is writing the same result file (and its checkpoint)."""


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint holds Python objects other than tensors and plain data: loading it could run code."""


def lock_path(output: str) -> Path:
    """The lock file of a run with ``--output X`` (``X.lock``; see :func:`output_lock`)."""
    return Path(f"{output}.lock")


@contextlib.contextmanager
def output_lock(output: Optional[str]) -> Iterator[None]:
    """Hold an exclusive lock on ``X.lock`` while a run with ``--output X`` trains.

    Two processes on one output (two benches over the same results folder, or a bench and a
    hand-typed ``vectorfit train``) would both resume from ``X.ckpt`` and overwrite each other's
    checkpoint and curve. The second one instead stops at once with :class:`OutputBusy`. The lock is
    the operating system's (``flock``), so a killed process releases it; the empty lock file stays
    until the run has written its result.
    Where ``fcntl`` does not exist (Windows) runs are not locked.

    Raises:
        OutputBusy: another process holds the lock.
    """
    if not output:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = lock_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if not _take(f):
            raise OutputBusy(f"another process is writing {output} (it holds {path}); wait for it to finish, "
                             f"stop it, or choose another --output")
        os.utime(path)  # the lock's time is when its holder started: `bench --status` counts down from it
        try:
            yield
            if Path(output).exists():  # finished: the result marks the run done, the lock file can go
                path.unlink(missing_ok=True)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _take(f: Any) -> bool:
    """Take the exclusive lock on the open file ``f`` without waiting; ``False``: another process holds it."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def output_busy(output: str) -> bool:
    """Whether some process holds :func:`output_lock` on ``output`` now (without keeping it)."""
    path = lock_path(output)
    if not path.exists():  # never locked (and no lock file made just to look)
        return False
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: runs are not locked
        return False
    with open(path, "a") as f:  # a look changes nothing: not the lock's time, not the file
        if not _take(f):
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def identity(cfg: Any) -> dict:
    """The settings that determine a run's numbers (a checkpoint is used only if they match)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}


def _model_state(model: Any) -> dict:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = {n for n, _ in model.named_parameters()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k not in params}


def _numpy_state_to_plain(state: tuple) -> dict:
    """``np.random.get_state()`` without numpy objects (a ``weights_only`` load refuses arrays)."""
    import torch

    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.tensor(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _numpy_state_from_plain(state: Any) -> tuple:
    import numpy as np

    if isinstance(state, tuple):  # a checkpoint from before the plain form: numpy's own tuple
        return state
    keys = np.asarray(state["keys"].numpy() if hasattr(state["keys"], "numpy") else state["keys"], dtype=np.uint32)
    return (state["kind"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def save(path: Path, cfg: Any, state: LoopState, model: Any, optimizer: Any, generator: Any) -> None:
    """Write the checkpoint atomically (a temporary file renamed over the old one).

    Only tensors and plain Python data go in, so that :func:`load` can read it with
    ``weights_only=True`` (see the module's docstring)."""
    import numpy as np
    import torch

    blob = {
        "format": FORMAT, "identity": identity(cfg), "loop": dataclasses.asdict(state),
        "model": _model_state(model), "optimizer": optimizer.state_dict(),
        "rng": {"generator": generator.get_state(), "torch": torch.get_rng_state(),
                "python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _numpy_array_globals() -> list:
    """What unpickling a numpy array needs, and nothing more: how the checkpoints written before the
    plain form kept numpy's random state (torch's documentation allows the same list)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    rebuild = core.multiarray._reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), rebuild,
            (rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct")]


def read(path: Path) -> Any:
    """The checkpoint's contents, read with ``torch.load(weights_only=True)``: tensors and plain data.

    Raises:
        UnsafeCheckpoint: the file names other Python objects (a pickle planted to run code, or a
            file that is no checkpoint of this program); nothing in it was run.
        OSError, EOFError, RuntimeError, ...: the file is damaged (truncated, not a torch file).
    """
    import pickle

    import torch

    # torch < 2.5 has no allow-list: there only checkpoints written in the plain form load
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with allow(_numpy_array_globals()) if allow is not None else contextlib.nullcontext():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the first forbidden object ("GLOBAL posix.system"); its advice to
        # allow-list that object is not repeated
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f" (it names {found.group(1)})" if found else ""
        raise UnsafeCheckpoint(
            f"refusing to load checkpoint {path}: it holds Python objects other than tensors and plain data"
            f"{why}, and unpickling them could run code. vectorfit writes only tensors and "
            f"plain data there; if you did not put the file there, someone else may have. Delete it to start the "
            f"run afresh") from None


def load(path: Path, cfg: Any, model: Any, optimizer: Any, generator: Any, log: Any = print) -> Optional[LoopState]:
    """Restore a checkpoint made by the same settings; ``None`` (start afresh) if there is none,
    it is unreadable, or it belongs to other settings.

    Raises:
        UnsafeCheckpoint: the file holds objects that a ``weights_only`` load refuses (see :func:`read`);
            the run stops rather than overwrite a file somebody planted.
    """
    import numpy as np
    import torch

    if not path.exists():
        return None
    try:
        blob = read(path)
    except UnsafeCheckpoint:
        raise
    except Exception as e:  # a damaged file must not stop the run: it is rebuilt as training goes
        log(f"[vectorfit] ignoring unreadable checkpoint {path} ({type(e).__name__}: {e}); starting afresh")
        return None
    if not isinstance(blob, dict):
        log(f"[vectorfit] ignoring checkpoint {path}: not a checkpoint of this program; starting afresh")
        return None
    if blob.get("format") != FORMAT or blob.get("identity") != identity(cfg):
        changed = sorted(k for k, v in identity(cfg).items() if (blob.get("identity") or {}).get(k) != v)
        log(f"[vectorfit] checkpoint {path} is from other settings ({', '.join(changed) or 'format'}); starting afresh")
        return None
    missing, unexpected = model.load_state_dict(blob["model"], strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {path} holds tensors this model lacks: {unexpected[:5]}; delete it to start afresh")
    optimizer.load_state_dict(blob["optimizer"])
    rng = blob["rng"]
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(_numpy_state_from_plain(rng["numpy"]))
    state = LoopState(**{"train_cpu_seconds": None, **blob["loop"]})  # None: saved before the field
    state.resumed_from = [*state.resumed_from, state.step]
    log(f"[vectorfit] resuming from {path} at step {state.step}")
    return state
