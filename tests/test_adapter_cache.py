"""Adapter files (clear errors, atomic writes) and the on-disk SVD cache; fp16 / bf16 base models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import (
    ARCHS,
    assert_close_rel,
    example_inputs,
    logits_of,
    make_tiny_bert,
    make_tiny_llama,
    matrix_of,
    max_rel_diff,
    train_steps,
)
from vectorfit import AdapterError, VectorFitConfig, VectorFitModel, get_vectorfit_model

RTOL = 1e-5
SAME = 1e-6
N_BERT_TARGETS = 12  # 2 layers x (q, k, v, o, f1, f2), all with distinct weights
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _files(folder: Path) -> list[str]:
    # peft also writes a model card (README.md) beside the adapter
    return sorted(p.name for p in Path(folder).iterdir() if p.name != "README.md")


def _trained_bert(seed: int = 0, steps: int = 2):
    base = make_tiny_bert(seed)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    inputs = example_inputs(base, labels=True)
    train_steps(vf, inputs, steps=steps)
    return vf, inputs


@pytest.fixture
def saved(tmp_path):
    """A trained BERT adapter saved to ``tmp_path/'adapter'``: (folder, its outputs, inputs)."""
    vf, inputs = _trained_bert()
    folder = tmp_path / "adapter"
    vf.save_pretrained(folder)
    return folder, logits_of(vf, inputs), inputs


def _load_fails(folder, *fragments):
    base = make_tiny_bert(0)
    with pytest.raises(AdapterError) as e:
        VectorFitModel.from_pretrained(base, folder)
    msg = str(e.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in the error message: {msg}"
    return msg


# ------------------------------------------------------------------------------------------ adapter errors
def test_missing_adapter_folder(tmp_path):
    _load_fails(tmp_path / "nowhere", "nowhere")


@pytest.mark.parametrize("missing", ADAPTER_FILES)
def test_missing_adapter_file(saved, missing):
    folder, _, _ = saved
    (folder / missing).unlink()
    _load_fails(folder, missing, "missing")


def test_corrupt_json(saved):
    folder, _, _ = saved
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    _load_fails(folder, "adapter_config.json", "JSON")


def test_json_of_another_format(saved):
    folder, _, _ = saved
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    _load_fails(folder, "adapter_config.json")


@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_flipped_bytes_in_weights(saved, where):
    folder, _, _ = saved
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    i = {"header": 20, "middle": len(data) // 2, "end": len(data) - 3}[where]
    data[i] ^= 0x01  # one bit: a silently wrong value if it were not detected
    path.write_bytes(bytes(data))
    _load_fails(folder, "adapter_model.safetensors", "corrupt")


def test_truncated_weights(saved):
    folder, _, _ = saved
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    _load_fails(folder, "adapter_model.safetensors")


def test_refused_load_leaves_base_untouched(saved):
    folder, _, inputs = saved
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    base = make_tiny_bert(0)
    ref = logits_of(base, inputs)
    with pytest.raises(AdapterError):
        VectorFitModel.from_pretrained(base, folder)
    assert not any(type(m).__module__.startswith("vectorfit") for m in base.modules())
    assert_close_rel(logits_of(base, inputs), ref, SAME)


def test_adapter_onto_another_architecture(saved):
    folder, _, _ = saved
    with pytest.raises(AdapterError, match=r"has no module 'bert\.encoder\.layer\.\d\."):
        VectorFitModel.from_pretrained(ARCHS["distilbert"].build(0), folder)


def test_adapter_onto_other_shapes_names_first_module(saved):
    folder, _, _ = saved
    other = make_tiny_bert(0, intermediate_size=40)
    same = make_tiny_bert(0).state_dict()
    with torch.no_grad():  # identical weights wherever the shapes agree
        for k, v in other.state_dict().items():
            if same[k].shape == v.shape:
                v.copy_(same[k])
    with pytest.raises(AdapterError) as e:
        VectorFitModel.from_pretrained(other, folder)
    msg = str(e.value)
    assert "'bert.encoder.layer.0.intermediate.dense'" in msg and "shape" in msg
    assert "attention" not in msg  # q, k, v, o of layer 0 come first and match


# ------------------------------------------------------------------------------------------ atomic saves
def test_save_leaves_only_the_two_files_and_overwrites(saved):
    folder, first_out, inputs = saved
    assert _files(folder) == ADAPTER_FILES
    vf2, _ = _trained_bert(steps=4)  # same base, other vectors
    second_out = logits_of(vf2, inputs)
    assert max_rel_diff(second_out, first_out) > 1e-4
    vf2.save_pretrained(folder)
    assert _files(folder) == ADAPTER_FILES, "temporary files left behind"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), folder)
    assert_close_rel(logits_of(loaded, inputs), second_out, RTOL)


def test_save_into_a_file_path_is_an_adapter_error(tmp_path):
    vf, _ = _trained_bert(steps=1)
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="a_file"):  # peft's own check, before anything is written
        vf.save_pretrained(target)


def test_a_torn_save_is_refused_at_load_never_silently_mixed(saved):
    """A config value JSON cannot encode makes the save fail after peft wrote the new weights: the
    folder then holds new weights beside the old config. The config's checksum of its weights
    refuses that pair with a clear error (peft writes the weights file in place, so the old adapter
    is not kept; but nothing computes with a mix of two adapters)."""
    folder, old_out, inputs = saved
    vf2, _ = _trained_bert(steps=4)
    vf2.peft_config["default"].exclude_modules = {"no-such-module": object()}  # not JSON
    with pytest.raises(TypeError, match="JSON serializable"):
        vf2.save_pretrained(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left behind"
    _load_fails(folder, "adapter_model.safetensors", "checksum mismatch")


# ------------------------------------------------------------------------------------------ SVD cache
def _entries(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


def _apply(seed=0, **cfg):
    base = make_tiny_bert(seed)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", **cfg))
    return vf, ref, inputs


def test_session_cache_is_not_the_user_cache():
    from vectorfit.cache import SVDCache

    root = SVDCache().root.resolve()
    assert Path(os.environ["VECTORFIT_CACHE"]).resolve() in root.parents
    assert Path.home().resolve() / ".cache" not in root.parents


def test_cache_on_by_default_under_vectorfit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VECTORFIT_CACHE", str(tmp_path / "vc"))
    vf1, ref, inputs = _apply()
    assert (vf1.svd_cache.misses, vf1.svd_cache.hits) == (N_BERT_TARGETS, 0)
    files = _entries(tmp_path / "vc")
    assert len(files) == N_BERT_TARGETS
    assert all(p.parent.name == "svd" and p.suffix == ".safetensors" for p in (tmp_path / "vc").rglob("*") if p.is_file())
    out1 = logits_of(vf1, inputs)

    vf2, _, _ = _apply()  # the same base weights again
    assert (vf2.svd_cache.misses, vf2.svd_cache.hits) == (0, N_BERT_TARGETS)
    assert _entries(tmp_path / "vc") == files, "a cache hit must not rewrite entries"
    assert_close_rel(logits_of(vf2, inputs), out1, SAME)
    assert_close_rel(logits_of(vf2, inputs), ref, RTOL)
    for (n1, p1), (n2, p2) in zip(vf1.trainable_vectors().items(), vf2.trainable_vectors().items()):
        assert n1 == n2 and torch.equal(p1, p2)

    vf3, _, _ = _apply(seed=1)  # other weights: keyed by content, so no hit
    assert (vf3.svd_cache.misses, vf3.svd_cache.hits) == (N_BERT_TARGETS, 0)
    assert len(_entries(tmp_path / "vc")) == 2 * N_BERT_TARGETS


def test_bias_only_layers_need_no_svd(tmp_path):
    base = make_tiny_bert(0)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="sigma_attn_bias", cache_dir=str(tmp_path)))
    assert vf.svd_cache.misses == 8  # q, k, v, o of 2 layers; f1/f2 train only their bias
    assert len(_entries(tmp_path)) == 8


def test_cache_dir_option(tmp_path, monkeypatch):
    monkeypatch.setenv("VECTORFIT_CACHE", str(tmp_path / "env"))
    vf, _, _ = _apply(cache_dir=str(tmp_path / "explicit"))
    assert len(_entries(tmp_path / "explicit")) == N_BERT_TARGETS
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "rewritten"])
def test_damaged_cache_entry_is_recomputed_never_used(tmp_path, damage):
    root = tmp_path / "cache"
    _apply(cache_dir=str(root))
    good = _entries(root)
    victim = sorted(root.rglob("*.safetensors"))[len(good) // 2]
    data = victim.read_bytes()
    if damage == "flip":  # 64 bytes of tensor data with every bit flipped: huge/NaN values if used
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]
        victim.write_bytes(data)
    elif damage == "truncate":
        data = data[: len(data) // 3]
        victim.write_bytes(data)
    else:  # a well-formed file with the right shapes and metadata but other numbers
        with safe_open(str(victim), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v * 2 for k, v in tensors.items()}
        save_file(tensors, str(victim), metadata=meta)
        data = victim.read_bytes()

    vf, ref, inputs = _apply(cache_dir=str(root))
    assert (vf.svd_cache.misses, vf.svd_cache.hits) == (1, N_BERT_TARGETS - 1)
    assert_close_rel(logits_of(vf, inputs), ref, RTOL, "outputs with a damaged cache entry")
    assert victim.read_bytes() != data, "the damaged entry was not rewritten"
    again, _, _ = _apply(cache_dir=str(root))
    assert (again.svd_cache.misses, again.svd_cache.hits) == (0, N_BERT_TARGETS), "the rewritten entry is not valid"
    assert sorted(_entries(root)) == sorted(good)


def test_cache_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("VECTORFIT_CACHE", str(tmp_path / "env"))
    vf, ref, inputs = _apply(svd_cache=False)
    _apply(svd_cache=False, cache_dir=str(tmp_path / "explicit"))
    assert_close_rel(logits_of(vf, inputs), ref, RTOL)
    vf.save_pretrained(tmp_path / "adapter")
    VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "adapter", svd_cache=False)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "adapter" not in p.parts]
    assert written == [], f"svd_cache=False wrote {written}"


def test_from_pretrained_reads_the_cache(tmp_path):
    vf, _, inputs = _apply(cache_dir=str(tmp_path / "c"))
    vf.save_pretrained(tmp_path / "adapter")
    loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "adapter", cache_dir=str(tmp_path / "c"))
    assert (loaded.svd_cache.misses, loaded.svd_cache.hits) == (0, N_BERT_TARGETS)


# ------------------------------------------------------------------------------------------ fp16 / bf16
# Tolerances: a half-precision model differs from its own fp32 version by ~1e-3 (fp16) / ~1e-2
# (bf16) relative; the factorised layers add error of the same order, not more.
HALF_TOL = {torch.float16: 5e-3, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_half_precision_models(name, dtype, tmp_path):
    arch = ARCHS[name]
    base = arch.build(0, dtype=dtype)
    inputs = example_inputs(base, labels=True)
    ref = logits_of(base, inputs)
    weights = {n: matrix_of(base.get_submodule(n), arch.conv1d).clone() for n, _ in arch.expected_targets(base)}
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(tmp_path)))
    assert_close_rel(logits_of(vf, inputs), ref, HALF_TOL[dtype], f"{name} {dtype} init outputs")

    # The SVD ran in float32 on the half-precision weight: sigma is float32 and matches a float64
    # SVD of the same weight to fp32 accuracy (a half-precision SVD would be off by ~1e-3 .. 1e-2).
    vectors = vf.trainable_vectors()
    for n, W in weights.items():
        s = vectors[f"{n}.sigma"]
        assert s.dtype == torch.float32
        s64 = torch.linalg.svdvals(W.double())
        assert max_rel_diff(s.detach(), s64) < 1e-5, n
    for f in tmp_path.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            assert all(fh.get_slice(k).get_dtype() == "F32" for k in fh.keys())

    train_steps(vf, inputs, steps=2, lr=1e-2)
    adapted = logits_of(vf, inputs)
    assert torch.isfinite(adapted).all()
    merged = vf.merge_and_unload()
    for n in weights:
        assert merged.get_submodule(n).weight.dtype == dtype
    assert_close_rel(logits_of(merged, inputs), adapted, HALF_TOL[dtype], f"{name} {dtype} merged")


def test_llama_bias_in_bf16_merges_to_a_linear_with_bias(tmp_path):
    base = make_tiny_llama(0, dtype=torch.bfloat16)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(tmp_path)))
    train_steps(vf, example_inputs(base, labels=True), steps=1)  # a zero bias would be dropped at merge
    merged = vf.merge_and_unload()
    q = merged.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.bias is not None and q.bias.dtype == torch.bfloat16
    assert merged.config.attention_bias and merged.config.mlp_bias  # so that a reload keeps the biases


def test_cache_entry_of_another_format_is_recomputed(tmp_path):
    """An entry written by an older cache format (here: the right numbers under format 1's label)
    is never trusted: it is recomputed and rewritten in the current format."""
    root = tmp_path / "cache"
    _apply(cache_dir=str(root))
    victim = sorted(root.rglob("*.safetensors"))[0]
    with safe_open(str(victim), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    current = meta["format"]
    meta["format"] = "vectorfit-svd-1"
    save_file(tensors, str(victim), metadata=meta)
    vf, _, _ = _apply(cache_dir=str(root))
    assert (vf.svd_cache.misses, vf.svd_cache.hits) == (1, N_BERT_TARGETS - 1)
    with safe_open(str(victim), framework="pt") as f:
        assert f.metadata()["format"] == current
