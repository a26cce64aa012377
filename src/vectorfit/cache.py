"""Content fingerprints of weights and an on-disk cache of their SVDs.

The SVD is the only expensive part of setting VectorFit up. It depends only on the weight's bytes,
so we key it by a SHA-256 of them: a second run on the same base model reads the factors back
instead of recomputing them. The same fingerprint guards adapters against the wrong base model.

What the cache guarantees:

* **Damage is detected.** Every entry carries a CRC-32 of its own payload; a file that fails to
  open or to verify is recomputed and rewritten, never used. (CRC-32, not a cryptographic digest:
  it reads at ~4 GB/s against SHA-256's ~1.8 GB/s, and it only has to catch accidents.)
* **Wrong or planted entries are detected.** Whoever can write the folder can write a file with a
  valid name and CRC, so every entry read is also checked against the weight it is read for, at a
  small fraction of the SVD's cost (:func:`check_factors`): ``W x ~= U (S * (Vh x))`` for 4 random
  ``x`` drawn from OS entropy at each load (a planted file cannot be tuned to them), ``U`` and ``Vh``
  orthonormal (VectorFit trains ``S``: with other factors its vectors would mean something else) and
  ``S`` sorted and non-negative. An entry that fails is reported (a :class:`VectorFitWarning`, once
  per cache object; later ones are logged), recomputed and overwritten. An accepted entry is, with
  overwhelming probability, an SVD of the weight to a relative error of about ``CHECK_TOL`` (1e-3).
* **The folder has a size cap** (default :data:`DEFAULT_MAX_BYTES`, 2 GiB; environment variable
  ``VECTORFIT_CACHE_MAX_BYTES``, e.g. ``5GB``; ``0`` = no limit). After each write the least
  recently used entries are deleted until the folder fits, never the entry just written. "Used" is
  read or written: a read sets the entry's mtime (atime is unreliable under ``noatime``/``relatime``).
  Each process counts its own writes and rescans the folder when that count passes the cap, so with
  several writers at once the folder can briefly exceed the cap by what the others wrote meanwhile.
  ``vectorfit cache info|prune|clear`` shows and trims the folder by hand.
* **Folders can be shared by processes.** Files are written to a temporary name and renamed, so a
  reader sees the old entry, the new one or none; an entry that another process evicts while this
  one looks at it is a miss, not an error. Only files named like entries (64 hex digits +
  ``.safetensors``) or like their temporaries are ever deleted.
* **Nothing stays mapped.** Factors read back are owned copies: the entry's memory map is closed
  before :meth:`SVDCache.get_or_compute` returns (a view would keep the file's pages resident as
  long as the layer lives, doubling the model's memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import ConfigError
from .functional import svd_fp32
from .targets import TargetError
from .notices import warn

logger = logging.getLogger(__name__)

_FORMAT = "vectorfit-svd-2"  # 1: SHA-256 payload digest; 2: CRC-32

MAX_BYTES_ENV = "VECTORFIT_CACHE_MAX_BYTES"
#: Default cap. The factors of one 135M-parameter model's targets (SmolLM2-135M, all q/k/v/o/MLP
#: matrices in float32) take ~630 MB, all-MiniLM-L6's ~65 MB: 2 GiB keeps about three such
#: models warm, under 1% of a 256 GB laptop disk. Bigger models want a bigger cap (``5GB``, or ``0``).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Relative tolerance of :func:`check_factors`. A float32 SVD reconstructs its matrix to ~sqrt(n)
#: float32 epsilons: measured 2e-6 (576 x 1536) to 8e-6 (2048 x 2048, spiky spectrum), so real entries
#: pass with a margin of 100x or more, up to far larger matrices. What an entry can still change while
#: passing (~1e-3 of the weight) is the order of the weight's own fp16 rounding (5e-4), below bf16's (4e-3).
CHECK_TOL = 1e-3
CHECK_VECTORS = 4
#: A temporary file older than this is a crashed writer's leftover (a live write takes seconds).
STALE_TMP_S = 3600.0

_ENTRY_RE = re.compile(r"^[0-9a-f]{64}\.safetensors$")
_TMP_RE = re.compile(r"^\.[0-9a-f]{64}\.safetensors\.[A-Za-z0-9_]+\.tmp$")  # atomic_path's mkstemp names
_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


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


# ------------------------------------------------------------------------------------------ sizes
def parse_size(text: str, what: str = MAX_BYTES_ENV) -> int:
    """Bytes in ``text``: a plain number (``2147483648``), or one with a unit, decimal (``500MB``,
    ``5G`` = 5e9) or binary (``2GiB`` = 2 * 2**30); ``0`` means no limit.

    Raises:
        ConfigError: not a size; the message names ``what``, the value and the accepted forms.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?)b?\s*", str(text), flags=re.IGNORECASE)
    if m is None or (m.group(3) and not m.group(2)):
        raise ConfigError(
            f"{what}={text!r} is not a size: use a number of bytes (2147483648), a number with a unit "
            "(500MB, 5GB, 2GiB, 1.5G; KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024) or 0 for no limit")
    unit = m.group(2).lower()
    scale = 1024 ** ("kmgt".index(unit) + 1) if m.group(3) else _UNITS[unit]
    return int(round(float(m.group(1)) * scale))


def format_size(n: int) -> str:
    """``n`` bytes for people: ``1.50 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def max_bytes_from_env() -> tuple[int, str]:
    """The cap (0 = none) and where it came from: ``$VECTORFIT_CACHE_MAX_BYTES`` or the default."""
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES, "default"
    return parse_size(text), f"{MAX_BYTES_ENV}={text}"


# ------------------------------------------------------------------------------------------ checking
def _blocks(A: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``A``'s rows in blocks of ~4M elements as float64 on the CPU, whatever ``A``'s dtype and device.
    float64, because float32 matmuls may run in TF32 / bf16 (``torch.set_float32_matmul_precision``)
    with errors near CHECK_TOL; in blocks, so that the float64 copy stays small."""
    rows = max(1, (1 << 22) // max(1, A.shape[1]))
    for i in range(0, A.shape[0], rows):
        yield i, A[i:i + rows].detach().to(device="cpu", dtype=torch.float64)


def check_factors(matrix: Tensor, U: Tensor, S: Tensor, Vh: Tensor, tol: float = CHECK_TOL) -> Optional[str]:
    """``None`` if ``U diag(S) Vh`` is an SVD of ``matrix`` (to ``tol``, relative), else what is wrong.

    Checks ``W X = U (S * (Vh X))``, ``U^T U Z = Z`` and ``Vh Vh^T Z = Z`` for ``CHECK_VECTORS`` random
    columns ``X``, ``Z``: one pass over ``W`` and ``U``, two over ``Vh``, i.e. ``O(k m n)`` against the
    SVD's ``O(m n min(m, n))``. The vectors come from a generator seeded from OS entropy: the user's
    torch RNG is not touched, and a planted entry cannot anticipate them.
    """
    m, n = matrix.shape
    r, k = S.shape[0], CHECK_VECTORS
    if r == 0:
        return None
    S64 = S.detach().to(torch.float64)
    if not bool(torch.isfinite(S64).all()) or bool((S64 < 0).any()) or bool((S64[1:] > S64[:-1]).any()):
        return "its singular values are not finite, non-negative and sorted"
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    X = torch.randn(n, k, generator=g, dtype=torch.float64)
    Z = torch.randn(r, k, generator=g, dtype=torch.float64)
    WX = torch.cat([b @ X for _, b in _blocks(matrix)])
    VtZ = sum(b.t() @ Z[i:i + b.shape[0]] for i, b in _blocks(Vh))
    P = torch.cat([b @ torch.cat([X, VtZ], 1) for _, b in _blocks(Vh)])  # [Vh X | Vh Vh^T Z]
    Q = torch.cat([S64[:, None] * P[:, :k], Z], 1)
    UQ, UtUZ = torch.empty(m, k, dtype=torch.float64), torch.zeros(r, k, dtype=torch.float64)
    for i, b in _blocks(U):
        y = b @ Q  # [U S Vh X | U Z]
        UQ[i:i + b.shape[0]] = y[:, :k]
        UtUZ += b.t() @ y[:, k:]
    # "not <=": a NaN anywhere fails too. A zero weight with zero S passes (0 <= 0).
    res, scale = float((WX - UQ).norm()), float(WX.norm())
    if not res <= tol * scale:
        return f"U diag(S) Vh is not this weight (relative residual {res / max(scale, 1e-300):.1e} > {tol:g})"
    for label, err in (("U", UtUZ - Z), ("Vh", P[:, k:] - Z)):
        if not float(err.norm()) <= tol * float(Z.norm()):
            return f"its {label} is not orthonormal (relative error {float(err.norm()) / float(Z.norm()):.1e} > {tol:g})"
    return None


# ------------------------------------------------------------------------------------------ folder
@dataclass
class Entry:
    """One file of the cache folder: an entry, or (``temporary``) a write's temporary file."""

    path: Path
    size: int
    mtime: float  # last use
    temporary: bool = False


def scan(root: Union[str, Path]) -> list[Entry]:
    """The cache's own files under ``root`` (by name; nothing else is listed), oldest use first.
    Files that vanish while being listed (another process evicted them) are left out."""
    out = []
    try:
        it = os.scandir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    with it:
        for d in it:
            entry, tmp = bool(_ENTRY_RE.match(d.name)), bool(_TMP_RE.match(d.name))
            if not (entry or tmp):
                continue
            try:
                st = d.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(Entry(Path(d.path), st.st_size, st.st_mtime, temporary=tmp))
    return sorted(out, key=lambda e: (e.mtime, e.path.name))


def _remove(path: Path) -> Optional[bool]:
    """``True``: removed; ``False``: already gone (another process); ``None``: could not (logged)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as e:  # e.g. open elsewhere on Windows, or a shared folder not writable here
        logger.info("could not remove SVD cache file %s (%s)", path, e)
        return None


@dataclass
class Pruned:
    """What :meth:`SVDCache.prune` / :meth:`SVDCache.clear` did."""

    removed: int = 0
    freed: int = 0
    kept: int = 0
    kept_bytes: int = 0
    temporaries: int = 0  # stale temporary files removed


class SVDCache:
    """SVD factors on disk, one safetensors file per distinct weight.

    Args:
        root: folder of the entries; ``None`` uses ``default_cache_root() / "svd"``.
        enabled: ``False`` computes every SVD and touches no file.
        max_bytes: size cap of the folder (0 = none); ``None`` reads ``$VECTORFIT_CACHE_MAX_BYTES``,
            else :data:`DEFAULT_MAX_BYTES`.

    Raises:
        ConfigError: a malformed ``$VECTORFIT_CACHE_MAX_BYTES`` (only when the cache is enabled).
    """

    def __init__(self, root: Optional[Union[str, Path]] = None, enabled: bool = True,
                 max_bytes: Optional[int] = None) -> None:
        self.enabled = enabled and os.environ.get("VECTORFIT_SVD_CACHE", "1") != "0"
        self.root = Path(root).expanduser() if root is not None else default_cache_root() / "svd"
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ConfigError(f"SVDCache(max_bytes={max_bytes!r}) is invalid: use a number of bytes >= 0 (0 = no limit)")
        self.max_bytes, self.cap_source = (max_bytes, "argument") if max_bytes is not None else (
            max_bytes_from_env() if self.enabled else (0, "off"))
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # entries with a valid CRC that did not decompose their weight
        self._write_failed = False
        self._usage: Optional[int] = None  # bytes in the folder as of this object's last scan + its writes since

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def _read(self, key: str, matrix: Tensor, name: str) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        path = self.path_for(key)
        shape = tuple(matrix.shape)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                # .clone(): get_tensor returns a view of the file's memory map, which would stay
                # mapped (and resident) for as long as the layer keeps U and Vh.
                U, S, Vh = (f.get_tensor(k).clone() for k in ("U", "S", "Vh"))
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
        except FileNotFoundError:  # none yet, or another process just evicted it
            return None
        except Exception as e:  # unreadable file: treat like a damaged one
            logger.warning("SVD cache entry %s is unreadable (%s); recomputing it", path, e)
            return None
        if not ok:
            logger.warning("SVD cache entry %s failed verification; recomputing it", path)
            return None
        problem = check_factors(matrix, U, S, Vh)
        if problem is not None:
            self.rejected += 1
            text = (f"SVD cache entry {path} does not decompose the weight of module {name or '(unnamed)'!r}: {problem}. "
                    "Its checksum is valid, so it was written wrong or planted by someone who can write "
                    f"{self.root}; it is recomputed and overwritten. If the folder is shared, check who writes "
                    "there, or point VECTORFIT_CACHE at a private folder")
            if self.rejected == 1:
                warn(text + " (further such entries in this run are logged, not warned)")
            else:
                logger.warning(text)
            return None
        self._touch(path)
        return U, S, Vh

    @staticmethod
    def _touch(path: Path) -> None:
        """Mark an entry used now (its mtime: what eviction sorts by)."""
        try:
            os.utime(path)
        except OSError:  # evicted meanwhile, or a shared entry another user owns: LRU just sees it older
            pass

    def _write(self, key: str, U: Tensor, S: Tensor, Vh: Tensor) -> None:
        if self._write_failed:
            return  # a full or read-only disk stays so for the rest of this set-up: do not retry per matrix
        tensors = {"U": U.contiguous(), "S": S.contiguous(), "Vh": Vh.contiguous()}
        meta = {"format": _FORMAT, "crc32": _payload_digest(U, S, Vh), "torch": torch.__version__}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path_for(key)) as tmp:
                save_file(tensors, str(tmp), metadata=meta)
                size = os.path.getsize(tmp)
        # The cache is an optimisation: a full disk (safetensors reports it as SafetensorError, not
        # OSError) or a read-only folder must not stop training. atomic_path removed the partial file.
        except (OSError, SafetensorError) as e:
            self._write_failed = True
            warn(
                f"could not write SVD cache entries under {self.root} ({type(e).__name__}: {e}); continuing "
                "without caching (the decompositions are recomputed next time). Free space there, point "
                "VECTORFIT_CACHE elsewhere, or turn the cache off with VECTORFIT_SVD_CACHE=0",
            )
            return
        self._enforce_cap(key, size)

    def _enforce_cap(self, key: str, size: int) -> None:
        # Scanning the folder after every write would cost O(entries) stats per matrix; instead
        # scan once, count this object's writes, and rescan (other processes write too) only when
        # the count says the folder is over the cap.
        if not self.max_bytes:
            return
        if self._usage is not None and self._usage + size <= self.max_bytes:
            self._usage += size
            return
        self._usage = self.prune(keep=(key,)).kept_bytes

    # ------------------------------------------------------------------ maintenance
    def entries(self) -> list[Entry]:
        """The cache's entries and temporary files, least recently used first."""
        return scan(self.root)

    def prune(self, max_bytes: Optional[int] = None, keep: tuple = (), dry_run: bool = False) -> Pruned:
        """Delete least recently used entries until the folder holds at most ``max_bytes``
        (default: the cap; 0 = no limit, only stale temporaries go), never those in ``keep``
        (keys). Temporary files older than ``STALE_TMP_S`` (crashed writes) are deleted too."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        out, now = Pruned(), time.time()
        files = self.entries()
        entries = [e for e in files if not e.temporary]
        for e in files:
            if e.temporary and now - e.mtime > STALE_TMP_S and (dry_run or _remove(e.path) is not None):
                out.temporaries += 1
        total = sum(e.size for e in entries)
        keep_names = {f"{k}.safetensors" for k in keep}
        for e in entries:
            if cap and total > cap and e.path.name not in keep_names:
                gone = True if dry_run else _remove(e.path)
                if gone is not None:  # gone=False: another process removed it; it is gone either way
                    total -= e.size
                    if gone:
                        out.removed, out.freed = out.removed + 1, out.freed + e.size
                    continue
            out.kept, out.kept_bytes = out.kept + 1, out.kept_bytes + e.size
        if out.removed:
            logger.info("SVD cache %s: evicted %d least recently used entries (%s) to stay under %s",
                        self.root, out.removed, format_size(out.freed), format_size(cap))
        return out

    def clear(self, dry_run: bool = False) -> Pruned:
        """Delete every entry (files named like the cache's own, nothing else) and stale temporaries;
        temporaries of writes in progress elsewhere are left to finish."""
        out, now = Pruned(), time.time()
        for e in self.entries():
            if e.temporary and now - e.mtime <= STALE_TMP_S:
                continue
            gone = True if dry_run else _remove(e.path)
            if gone and e.temporary:
                out.temporaries += 1
            elif gone:
                out.removed, out.freed = out.removed + 1, out.freed + e.size
            elif gone is None:
                out.kept, out.kept_bytes = out.kept + 1, out.kept_bytes + e.size
        self._usage = None
        return out

    def get_or_compute(self, matrix: Tensor, key: Optional[str] = None, name: str = "") -> tuple[Tensor, Tensor, Tensor]:
        """The float32 thin SVD of ``matrix``, from disk when a verified entry exists.

        Args:
            matrix: ``d_out x d_in`` weight.
            key: its :func:`fingerprint`, if already known.
            name: the module's name, for messages.

        Returns:
            ``(U, S, Vh)`` on the CPU in float32, owned tensors (no view of a file).

        Raises:
            TargetError: the matrix holds NaN or Inf values (named by ``name``).
        """
        if self.enabled:
            key = key or fingerprint(matrix)
            hit = self._read(key, matrix, name)
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
