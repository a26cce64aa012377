"""Content fingerprints of weights and an on-disk cache of their SVDs.

The SVD is the only expensive part of setting VectorFit up. It depends only on the weight's bytes,
so we key it by a SHA-256 of them: a second run on the same base model reads the factors back
instead of recomputing them. The same fingerprint guards adapters against the wrong base model.

Every cache file carries a CRC-32 of its own payload; a file that fails to open or to verify is
recomputed and rewritten, never used. (The payload check guards against damage, not against an
adversary -- whoever can write the cache folder can write any file there -- so it uses the checksum
that reads fastest: CRC-32 runs at ~4 GB/s here against SHA-256's ~1.8 GB/s, and verifying every
entry is most of a warm start. The cache *key* stays a SHA-256 of the weight.) Files are written to a temporary name and renamed, so a
crash leaves either the old entry or none.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import tempfile
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .functional import svd_fp32
from .targets import TargetError
from .notices import warn

logger = logging.getLogger(__name__)

_FORMAT = "vectorfit-svd-2"  # 1: SHA-256 payload digest; 2: CRC-32


def default_cache_root() -> Path:
    """``$VECTORFIT_CACHE`` if set, else ``$XDG_CACHE_HOME/vectorfit``, else ``~/.cache/vectorfit``."""
    if os.environ.get("VECTORFIT_CACHE"):
        return Path(os.environ["VECTORFIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "vectorfit"


def _tensor_bytes(t: Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def fingerprint(weight: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (hex)."""
    h = hashlib.sha256()
    h.update(f"{weight.dtype}|{tuple(weight.shape)}|".encode())
    h.update(_tensor_bytes(weight))
    return h.hexdigest()


def _payload_digest(U: Tensor, S: Tensor, Vh: Tensor) -> str:
    crc = 0
    for t in (U, S, Vh):
        crc = zlib.crc32(f"{tuple(t.shape)}|".encode(), crc)
        crc = zlib.crc32(_tensor_bytes(t), crc)
    return f"{crc:08x}"


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``);
    elsewhere by the set-and-restore idiom."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_open_mode(path: Union[str, Path]) -> int:
    """The permission bits ``open(path, "w")`` would leave: an existing file keeps its own, a new
    one gets ``0o666`` less the umask. (``mkstemp`` creates ``0o600`` files whatever the umask; an
    adapter or a shared cache entry written that way is unreadable for everyone else.)"""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary file name in ``path``'s folder; when the block succeeds, give the file the
    permissions a plain ``open(path, "w")`` would and rename it over ``path``. Whatever fails, the
    temporary file is removed: a reader sees the old file or the complete new one, never a part."""
    path = Path(path)
    mode = plain_open_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


class SVDCache:
    """SVD factors on disk, one safetensors file per distinct weight.

    Args:
        root: folder of the entries; ``None`` uses ``default_cache_root() / "svd"``.
        enabled: ``False`` computes every SVD and touches no file.
    """

    def __init__(self, root: Optional[Union[str, Path]] = None, enabled: bool = True) -> None:
        self.enabled = enabled and os.environ.get("VECTORFIT_SVD_CACHE", "1") != "0"
        self.root = Path(root).expanduser() if root is not None else default_cache_root() / "svd"
        self.hits = 0
        self.misses = 0
        self._write_failed = False

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _read(self, key: str, shape: tuple) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        path = self.path_for(key)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                U, S, Vh = f.get_tensor("U"), f.get_tensor("S"), f.get_tensor("Vh")
            if meta.get("format") != _FORMAT:
                logger.info("SVD cache entry %s has format %r, not %r; recomputing it", path, meta.get("format"), _FORMAT)
                return None
            r = min(shape)
            ok = (
                tuple(U.shape) == (shape[0], r)
                and tuple(S.shape) == (r,)
                and tuple(Vh.shape) == (r, shape[1])
                and meta.get("crc32") == _payload_digest(U, S, Vh)
            )
        except Exception as e:  # unreadable file: treat like a damaged one
            logger.warning("SVD cache entry %s is unreadable (%s); recomputing it", path, e)
            return None
        if not ok:
            logger.warning("SVD cache entry %s failed verification; recomputing it", path)
            return None
        return U, S, Vh

    def _write(self, key: str, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        if self._write_failed:
            return  # a full or read-only disk stays so for the rest of this set-up: do not retry per matrix
        tensors = {"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}
        meta = {"format": _FORMAT, "crc32": _payload_digest(U, S, Vh), "torch": torch.__version__}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path_for(key)) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
        # The cache is an optimisation: a full disk (safetensors reports it as SafetensorError, not
        # OSError) or a read-only folder must not stop training. atomic_path removed the partial file.
        except (OSError, SafetensorError) as e:
            self._write_failed = True
            warn(
                f"could not write SVD cache entries under {self.root} ({type(e).__name__}: {e}); continuing "
                "without caching (the decompositions are recomputed next time). Free space there, point "
                "VECTORFIT_CACHE elsewhere, or turn the cache off with VECTORFIT_SVD_CACHE=0",
            )

    def get_or_compute(self, matrix: Tensor, key: Optional[str] = None, name: str = "") -> tuple[Tensor, Tensor, Tensor]:
        """The float32 thin SVD of ``matrix``, from disk when a verified entry exists.

        Args:
            matrix: ``d_out x d_in`` weight.
            key: its :func:`fingerprint`, if already known.
            name: the module's name, for error messages.

        Returns:
            ``(U, S, Vh)`` on the CPU in float32.

        Raises:
            TargetError: the matrix holds NaN or Inf values (named by ``name``).
        """
        if self.enabled:
            key = key or fingerprint(matrix)
            hit = self._read(key, tuple(matrix.shape))
            if hit is not None:
                self.hits += 1
                return hit
        # Only on a miss: a cache entry was made from a finite matrix with the same bytes. LAPACK
        # either fails on NaN with an error that names no module, or returns NaN factors silently.
        bad = int((~torch.isfinite(matrix)).sum())
        if bad:
            raise TargetError(
                f"module {name or '(unnamed)'!r}: its weight holds {bad} NaN/Inf value(s) of {matrix.numel()}, so it has no "
                "SVD; the base model is damaged (reload it from its checkpoint) or diverged in earlier training"
            )
        U, S, Vh = svd_fp32(matrix.to("cpu") if matrix.device.type == "cpu" else matrix)
        U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
        self.misses += 1
        if self.enabled:
            self._write(key, U, S, Vh)  # type: ignore[arg-type]
        return U, S, Vh
