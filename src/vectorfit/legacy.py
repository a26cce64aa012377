"""Adapters written by vectorfit 0.1 (``"format": "vectorfit-adapter"``, ``format_version`` 1).

vectorfit 0.1 was a library beside peft with a file layout of its own: ``adapter_config.json`` held
``{"format", "format_version", "config", "targets", "modules_to_save", "base_tensors",
"weights_sha256", ...}`` and ``adapter_model.safetensors`` held ``<module>.sigma`` (or
``.sigma_delta``), ``<module>.bias`` and ``<head>.<param>``. peft cannot read that folder (it has no
``peft_type``). :func:`convert_legacy_adapter` (also ``vectorfit convert OLD NEW``) writes the same
adapter in peft's layout; :meth:`vectorfit.VectorFitModel.from_pretrained` converts on the fly
with a one-line note. The numbers are copied unchanged, so the converted adapter computes exactly
what the old one did.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .cache import atomic_path
from .errors import AdapterError

LEGACY_FORMAT = "vectorfit-adapter"
_LEGACY_AVF = "vectorfit_avf_state.safetensors"  # 0.1's VectorFitTrainer checkpoints


def is_legacy_adapter(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder holding a vectorfit 0.1 adapter."""
    cfg = Path(path) / "adapter_config.json"
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == LEGACY_FORMAT


def convert_legacy_adapter(src: Union[str, Path], dst: Union[str, Path]) -> Path:
    """Write the vectorfit 0.1 adapter at ``src`` in peft's layout into ``dst`` (created; ``dst``'s
    adapter files are replaced atomically, weights first, config last).

    Returns:
        ``dst`` as a ``Path``.

    Raises:
        AdapterError: ``src`` is not a 0.1 adapter, or its files are damaged.
    """
    from .config import VectorFitConfig, _sha256

    src, dst = Path(src), Path(dst)
    cfg_path, w_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not is_legacy_adapter(src):
        raise AdapterError(f"{src} holds no vectorfit 0.1 adapter (no adapter_config.json with \"format\": \"{LEGACY_FORMAT}\")")
    meta = json.loads(cfg_path.read_text())
    if meta.get("format_version", 1) != 1:
        raise AdapterError(f"{cfg_path} has format version {meta.get('format_version')!r}; only version 1 converts")
    if not w_path.is_file():
        raise AdapterError(f"adapter file {w_path} is missing")
    if "weights_sha256" in meta and _sha256(w_path) != meta["weights_sha256"]:
        raise AdapterError(f"adapter weights {w_path} are corrupt or do not belong to {cfg_path} (checksum mismatch)")
    try:
        old = load_file(str(w_path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise AdapterError(f"adapter weights {w_path} cannot be read: {e}") from None
    targets = meta.get("targets")
    if not isinstance(targets, dict) or not isinstance(meta.get("config"), dict):
        raise AdapterError(f"adapter config {cfg_path} is corrupt: 'config' or 'targets' is missing")
    heads = list(meta.get("modules_to_save") or [])
    new: dict[str, torch.Tensor] = {}
    for key, t in old.items():
        module, _, attr = key.rpartition(".")
        if module in targets and attr in ("sigma", "sigma_delta"):
            new[f"base_model.model.{module}.vectorfit_sigma"] = t
        elif module in targets and attr == "bias":
            new[f"base_model.model.{module}.vectorfit_bias"] = t
        elif any(key.startswith(h + ".") for h in heads):
            new[f"base_model.model.{key}"] = t
        else:
            raise AdapterError(f"adapter weights {w_path} hold {key!r}, which belongs to no target or head of its config")
    fields = dict(meta["config"])
    avf_path = src / _LEGACY_AVF
    if avf_path.is_file():
        with safe_open(str(avf_path), framework="pt") as f:
            for k in f.keys():
                new[f"base_model.vectorfit_avf.{k}"] = f.get_tensor(k)
    elif fields.get("variant", "vectorfit") == "vectorfit":
        # 0.1 adapters carried no AVF state outside checkpoints: record a fresh one (no AVF step taken).
        n = sum(bool(i.get("sigma")) + bool(i.get("bias")) for i in targets.values())
        avf = fields.get("avf") or {}
        k = int(avf.get("k", 5))
        spec = [avf.get("start_step"), avf.get("interval"), avf.get("num_freezes")]
        spec = spec if None not in spec else [-1, -1, -1]
        fresh = {"ema": torch.zeros(n), "frozen_mask": torch.zeros(n, dtype=torch.bool), "num_done": torch.zeros((), dtype=torch.long),
                 "schedule_spec": torch.tensor(spec, dtype=torch.long),
                 "frozen_history": torch.full((max(spec[2], 0), k), -1, dtype=torch.long)}
        new.update({f"base_model.vectorfit_avf.{key}": t for key, t in fresh.items()})
    # 0.1 recorded the heads it wrapped; peft records the config's entries (the same names, or suffixes).
    fields["modules_to_save"] = fields.get("modules_to_save") or heads or None
    config = VectorFitConfig(**fields, targets=targets, base_tensors=meta.get("base_tensors"),
                             base_model_class=meta.get("base_model_class"), inference_mode=True)
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "adapter_model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in new.items()}, str(tmp), metadata={"format": "pt"})
    with tempfile.TemporaryDirectory(dir=dst) as tmpdir:
        config.save_pretrained(tmpdir)
        with atomic_path(dst / "adapter_config.json") as tmp:
            tmp.write_bytes((Path(tmpdir) / "adapter_config.json").read_bytes())
    return dst
