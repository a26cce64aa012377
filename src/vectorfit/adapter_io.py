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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch
from safetensors.torch import load_file, save_file

from .cache import atomic_path, atomic_write_bytes

if TYPE_CHECKING:  # the annotation only; config_of imports it when called, as the file's I/O needs no config
    from .config import VectorFitConfig

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
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
        digest = _sha256_file(tmp)
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, "vectorfit_version": __version__, **meta, "weights_sha256": digest}
        # Serialise the config before touching the existing adapter: if that fails, the old pair stays valid.
        # Insertion order, not sorted: targets stay in model order, so errors name the first one.
        config_bytes = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write_bytes(directory / CONFIG_NAME, config_bytes)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_structure(meta: dict, cfg_path: Path) -> None:
    """Refuse a config whose fields have the wrong type or are missing, naming the field: a
    hand-edited or damaged file must fail here with an AdapterError, not later with a bare
    KeyError / TypeError deep inside loading."""

    def corrupt(what: str) -> AdapterError:
        return AdapterError(f"adapter config {cfg_path} is corrupt: {what}; save the adapter again with VectorFitModel.save_pretrained")

    version = meta.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise corrupt(f"format_version is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{cfg_path} has format version {version}; this vectorfit reads up to {FORMAT_VERSION}: upgrade vectorfit")
    for key in ("config", "targets", "weights_sha256"):
        if key not in meta:
            raise corrupt(f"field {key!r} is missing")
    if not isinstance(meta["config"], dict):
        raise corrupt(f"field 'config' is a {type(meta['config']).__name__}, expected an object of VectorFitConfig fields")
    if not isinstance(meta["weights_sha256"], str):
        raise corrupt("field 'weights_sha256' is not a string")
    targets = meta["targets"]
    if not isinstance(targets, dict) or not targets:
        raise corrupt("field 'targets' is not a non-empty object of target modules")
    for name, info in targets.items():
        if not isinstance(info, dict):
            raise corrupt(f"targets[{name!r}] is a {type(info).__name__}, expected an object")
        for key in ("shape", "fingerprint"):
            if key not in info:
                raise corrupt(f"targets[{name!r}] has no {key!r}")
        shape = info["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise corrupt(f"targets[{name!r}].shape is {shape!r}, expected [d_out, d_in]")
        if not isinstance(info["fingerprint"], str):
            raise corrupt(f"targets[{name!r}].fingerprint is not a string")
    mts = meta.get("modules_to_save", [])
    if not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        raise corrupt(f"field 'modules_to_save' is {mts!r}, expected a list of module names")
    base = meta.get("base_tensors", {})
    if not (isinstance(base, dict) and all(isinstance(v, dict) and isinstance(v.get("fingerprint"), str) for v in base.values())):
        raise corrupt("field 'base_tensors' is not an object of {fingerprint, dtype} entries")


def config_of(meta: dict[str, Any], directory: Union[str, Path], **overrides: Any) -> "VectorFitConfig":
    """The adapter's :class:`VectorFitConfig` (with machine-local ``overrides`` such as
    ``cache_dir``); an invalid stored config is an :class:`AdapterError` naming the file."""
    from .config import ConfigError, VectorFitConfig

    try:
        return VectorFitConfig.from_dict({**meta["config"], **overrides})
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"adapter config {Path(directory) / CONFIG_NAME} holds an invalid VectorFit config: {e}") from None


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
    _check_structure(meta, cfg_path)
    if _sha256_file(w_path) != meta["weights_sha256"]:
        raise AdapterError(f"adapter weights {w_path} are corrupt or do not belong to {cfg_path} (checksum mismatch)")
    try:
        tensors = load_file(str(w_path))
    except Exception as e:
        raise AdapterError(f"adapter weights {w_path} cannot be read: {e}") from None
    return meta, tensors
