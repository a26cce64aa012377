"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``.

The weights file holds only the trained vectors and the saved heads (a few hundred KB). The config
records the VectorFit config, every target's shape and base-weight fingerprint, and the SHA-256 of
the weights file, so a torn or corrupted pair is detected on load. Both files are written to
temporary names first and renamed into place, weights first, config last: a reader never sees a
config that points to weights that are not fully written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import load_file, save_file

from .cache import atomic_write_bytes

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "vectorfit-adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter could not be saved or loaded; the message says which file or module and why."""


def _sha256_file(path: Union[str, Path]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(directory: Union[str, Path], tensors: dict[str, torch.Tensor], **meta: Any) -> None:
    """Atomically write an adapter folder.

    Args:
        directory: created if missing; existing adapter files in it are replaced.
        tensors: name -> tensor (copied to CPU, contiguous).
        **meta: JSON-serialisable fields stored in the config.
    """
    from . import __version__

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"cannot save the adapter to {directory}: it exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{WEIGHTS_NAME}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp, metadata={"format": FORMAT})
        digest = _sha256_file(tmp)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "vectorfit_version": __version__, **meta, "weights_sha256": digest}
        # Serialise the config before touching the existing adapter: if that fails, the old pair stays valid.
        # Insertion order, not sorted: targets stay in model order, so errors name the first one.
        config_bytes = (json.dumps(config, indent=2) + "\n").encode()
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_bytes(directory / CONFIG_NAME, config_bytes)


def load_adapter(directory: Union[str, Path]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an adapter folder.

    Returns:
        ``(config, tensors)``.

    Raises:
        AdapterError: the folder or a file is missing, unreadable, of another format, or the
            weights do not match the checksum recorded in the config.
    """
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise AdapterError(f"no adapter folder at {directory}")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise AdapterError(f"adapter file {p} is missing; save adapters with VectorFitModel.save_pretrained")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter config {cfg_path} is corrupt (not valid JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterError(f"{cfg_path} is not a VectorFit adapter config (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{cfg_path} has format version {meta['format_version']}; this vectorfit reads up to {FORMAT_VERSION}: upgrade vectorfit")
    for key in ("config", "targets", "weights_sha256"):
        if key not in meta:
            raise AdapterError(f"adapter config {cfg_path} is corrupt: field {key!r} is missing")
    if _sha256_file(w_path) != meta["weights_sha256"]:
        raise AdapterError(f"adapter weights {w_path} are corrupt or do not belong to {cfg_path} (checksum mismatch)")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:
        raise AdapterError(f"adapter weights {w_path} cannot be read: {e}") from None
    return meta, tensors
