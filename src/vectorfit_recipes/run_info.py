"""What a result records besides its metric: versions, memory, training time, the adapter's size,
and the spectra of the weight update (paper fig. 9). Used by ``train``."""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

__all__ = ["versions", "peak_rss_mb", "TrainClock", "jsonable", "dir_bytes", "SPECTRA_METHODS",
           "spectra_layers", "delta_spectra"]


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "vectorfit", "peft", "accelerate"):
        try:
            from importlib.metadata import version

            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    return out


class TrainClock:
    """A run's optimisation time, on the wall clock and in CPU seconds of this process.

    Time inside :meth:`paused` (evaluation, checkpoint writes) is not counted. The wall clock says
    how long training took on this machine as it was; CPU time says what it cost: on a machine
    shared with other work a one-thread run waits for its core, and only its wall time grows, so CPU
    time per step is close to a quiet core's pace (``bench --status`` estimates from it).

    Args:
        wall: seconds counted by earlier invocations of the same run (resumed from a checkpoint).
        cpu: the same in CPU seconds; ``None`` when an earlier invocation did not record them
            (a checkpoint older than the field), and then the run's CPU time stays unknown.
    """

    def __init__(self, wall: float = 0.0, cpu: Optional[float] = 0.0) -> None:
        self._wall, self._cpu = wall, cpu
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def seconds(self) -> tuple[float, Optional[float]]:
        """(wall, cpu) seconds counted so far."""
        wall = self._wall + time.perf_counter() - self._t0
        return wall, None if self._cpu is None else self._cpu + time.process_time() - self._c0

    @contextlib.contextmanager
    def paused(self) -> Iterator[tuple[float, Optional[float]]]:
        """Stop counting inside the block; yields the (wall, cpu) seconds counted when it began."""
        self._wall, self._cpu = counted = self.seconds()
        try:
            yield counted
        finally:
            self._t0, self._c0 = time.perf_counter(), time.process_time()


def peak_rss_mb() -> Optional[float]:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 / 1024 if sys.platform == "darwin" else r / 1024


def jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if hasattr(x, "tolist"):
        return x.tolist()
    return repr(x)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


#: Methods whose weight update's spectrum is recorded (paper fig. 9: VectorFit vs full fine-tuning).
SPECTRA_METHODS = ("vectorfit", "no_avf", "full")


def spectra_layers(base: Any) -> list[str]:
    """First and last block's first attention matrix and first MLP matrix (4 layers); a model that
    names its own (``SPECTRA_LAYERS``, e.g. the image tasks' MobileNetV2) gets those."""
    from vectorfit import target_module_names

    if hasattr(base, "SPECTRA_LAYERS"):
        return list(base.SPECTRA_LAYERS)

    roles = target_module_names(base, with_roles=True)
    names = list(roles)
    picks = []
    layer_ids = sorted({int(p) for n in names for p in n.split(".") if p.isdigit()})
    for lid in (layer_ids[0], layer_ids[-1]) if layer_ids else ():
        for role in ("attn", "mlp"):
            cand = [n for n in names if roles[n] == role and f".{lid}." in f".{n}."]
            if cand:
                picks.append(cand[0])
    return picks


def delta_spectra(model: Any, layers: list[str], w_init: dict) -> dict:
    """Singular values of W_final - W_init (float32) for ``layers``, largest first."""
    import torch

    out = {}
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        for name in layers:
            mod = root.get_submodule(name)
            if name in w_init:
                delta = mod.weight.detach().float() - w_init[name].float()
            else:
                delta = mod.delta_weight()
            # a convolution's kernel as its matrix, out x (in/groups * kh * kw), as VectorFit decomposes it
            out[name] = [float(x) for x in torch.linalg.svdvals(delta.float().reshape(delta.shape[0], -1))]
    return out
