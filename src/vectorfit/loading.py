"""Loading a saved VectorFit adapter folder: checks that give a clear error before peft reads
anything, the vectorfit 0.1 format converted on the fly, and VectorFit's local settings passed on.

``VectorFitModel.from_pretrained`` (and so ``vectorfit.VectorFitModel.from_pretrained``) is this;
``peft.PeftModel.from_pretrained`` works too, without the 0.1 conversion and the early checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from .config import VectorFitConfig
from .errors import AdapterError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["load_adapter_folder"]


def load_adapter_folder(model: nn.Module, adapter_path: Any, is_trainable: bool = False, check_base: str = "error",
                        adapter_name: str = "default", **kwargs: Any) -> Any:
    """See :meth:`vectorfit.model.VectorFitModel.from_pretrained`."""
    from .legacy import LEGACY_FORMAT, convert_legacy_adapter

    if check_base not in ("error", "warn"):
        raise ConfigError(f"check_base={check_base!r} is invalid: use 'error' (refuse a differing base) or 'warn'")
    folder = Path(adapter_path)
    if not folder.is_dir():
        raise AdapterError(f"no adapter folder at {folder}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter file {folder / name} is missing; save adapters with save_pretrained")
    try:
        meta = json.loads((folder / "adapter_config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter config {folder / 'adapter_config.json'} is corrupt (not valid JSON: {e})") from None
    legacy = isinstance(meta, dict) and meta.get("format") == LEGACY_FORMAT
    if not isinstance(meta, dict) or (meta.get("peft_type") != "VECTORFIT" and not legacy):
        kind = meta.get("peft_type") if isinstance(meta, dict) else None
        raise AdapterError(f"{folder / 'adapter_config.json'} is not a VectorFit adapter config (peft_type={kind!r}); "
                           "a peft adapter of another method loads with peft.PeftModel.from_pretrained")
    if legacy:
        import tempfile

        logger.warning("%s is a vectorfit 0.1 adapter: converting it to peft's layout in memory "
                       "(`vectorfit convert %s NEW` does it once, on disk)", adapter_path, adapter_path)
        with tempfile.TemporaryDirectory() as tmp:
            converted = convert_legacy_adapter(adapter_path, tmp)
            return _load(model, converted, adapter_name, is_trainable, check_base, kwargs)
    return _load(model, folder, adapter_name, is_trainable, check_base, kwargs)


def _load(model: nn.Module, folder: Path, adapter_name: str, is_trainable: bool, check_base: str, kwargs: dict) -> Any:
    from peft import PeftModel

    # The config is read here so that VectorFit's local fields (cache_dir, which peft would take as
    # the Hub's cache folder, svd_cache, progress) reach the tuner.
    config = VectorFitConfig.from_pretrained(str(folder))
    config.check_base = check_base
    for key in ("cache_dir", "svd_cache", "progress"):
        if key in kwargs:
            setattr(config, key, kwargs.pop(key))
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)

