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

import hashlib
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .layer import svd_fp32

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


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        tensors = {"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}
        meta = {"format": _FORMAT, "crc32": _payload_digest(U, S, Vh), "torch": torch.__version__}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            try:
                save_file(tensors, tmp, metadata=meta)
                os.replace(tmp, self.path_for(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as e:  # a read-only or full disk must not stop training
            logger.warning("could not write SVD cache entry under %s (%s); continuing without it", self.root, e)

    def get_or_compute(self, matrix: Tensor, key: Optional[str] = None) -> tuple[Tensor, Tensor, Tensor]:
        """The float32 thin SVD of ``matrix``, from disk when a verified entry exists.

        Args:
            matrix: ``d_out x d_in`` weight.
            key: its :func:`fingerprint`, if already known.

        Returns:
            ``(U, S, Vh)`` on the CPU in float32.
        """
        if self.enabled:
            key = key or fingerprint(matrix)
            hit = self._read(key, tuple(matrix.shape))
            if hit is not None:
                self.hits += 1
                return hit
        U, S, Vh = svd_fp32(matrix.to("cpu") if matrix.device.type == "cpu" else matrix)
        U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
        self.misses += 1
        if self.enabled:
            self._write(key, U, S, Vh)  # type: ignore[arg-type]
        return U, S, Vh
