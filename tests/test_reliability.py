"""The reliability checks: eight ways to get a wrong model or a crash, each reproduced on a tiny real model, and
the decomposition check that makes loading safe across machines.

Every test here failed (or passed silently with a wrong result) before the fix it names.
"""

from __future__ import annotations

import json
import math
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from safetensors import SafetensorError
from torch import nn

import vectorfit.cache as vf_cache
from conftest import (
    _llama_like,
    assert_close_rel,
    example_inputs,
    logits_of,
    make_tiny_bert,
    make_tiny_llama,
    make_tiny_mistral,
    make_tiny_qwen2,
    make_tiny_t5,
    max_rel_diff,
    spread_singular_values,
    train_steps,
)
from vectorfit import (
    AdapterError,
    AVFConfig,
    AVFError,
    ConfigError,
    VectorFitLayer,
    TargetError,
    VectorFitConfig,
    VectorFitModel,
    VectorFitWarning,
    get_vectorfit_model,
)
from vectorfit.functional import force_path
from peft.utils.other import ModulesToSaveWrapper

RTOL = 1e-5
Q0 = "bert.encoder.layer.0.attention.self.query"
V0 = "bert.encoder.layer.0.attention.self.value"  # acts linearly on the output (a query barely does in a tiny random BERT)


def _trained(base, steps=2, **cfg):
    cfg.setdefault("variant", "no_avf")
    vf = get_vectorfit_model(base, VectorFitConfig(**cfg))
    inputs = example_inputs(base, labels=True)
    if base.config.model_type == "gemma":  # a causal LM conftest does not list
        inputs["labels"] = inputs["input_ids"].clone()
    train_steps(vf, inputs, steps=steps)
    return vf, inputs


def _vf_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, VectorFitWarning)]


# ------------------------------------------------------------------- 1. merged model loses its biases
def _tiny_gemma(seed=0):
    return _llama_like(T.GemmaForCausalLM, T.GemmaConfig, seed, None, {"head_dim": 8})


@pytest.mark.parametrize("build", [make_tiny_llama], ids=["llama"])
def test_merged_bias_model_reloads_exactly_with_transformers(build, tmp_path):
    """Llama: trained biases on bias-free layers -> the merged config says so -> a plain
    transformers save/load round trip gives bit-identical logits."""
    base = build(0)
    vf, inputs = _trained(base)
    adapted = logits_of(vf, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)  # everything is expressible: no warning
        merged = vf.merge_and_unload()
    assert merged.config.attention_bias is True and merged.config.mlp_bias is True
    merged_out = logits_of(merged, inputs)
    assert_close_rel(merged_out, adapted, RTOL, "merged vs adapted")
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged").eval()
    assert torch.equal(logits_of(reloaded, inputs), merged_out), "the reload lost or changed trained biases"
    q = reloaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.bias is not None and float(q.bias.detach().abs().max()) > 0


def test_merge_adds_zero_biases_the_config_flag_implies(tmp_path):
    """Only q_proj trained a bias, but attention_bias gives q, k, v and o one: k, v, o get exact
    zero biases so that the merged model has the structure transformers rebuilds."""
    base = make_tiny_llama(0)
    vf, inputs = _trained(base, target_modules=["q_proj"])
    adapted = logits_of(vf, inputs)
    merged = vf.merge_and_unload()
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False
    k = merged.get_submodule("model.layers.0.self_attn.k_proj")
    assert k.bias is not None and torch.count_nonzero(k.bias) == 0
    assert merged.get_submodule("model.layers.0.mlp.up_proj").bias is None
    assert torch.equal(logits_of(merged, inputs), logits_of(merged, inputs))
    assert_close_rel(logits_of(merged, inputs), adapted, RTOL)
    merged.save_pretrained(tmp_path / "m")
    assert torch.equal(logits_of(type(merged).from_pretrained(tmp_path / "m").eval(), inputs), logits_of(merged, inputs))


def test_untrained_zero_bias_is_dropped_at_merge():
    base = make_tiny_llama(0)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    merged = vf.merge_and_unload()
    assert merged.get_submodule("model.layers.0.self_attn.q_proj").bias is None
    assert merged.config.attention_bias is False  # nothing to describe


@pytest.mark.parametrize(
    "build, unexpressible",
    [
        (make_tiny_mistral, "model.layers.0.self_attn.q_proj"),  # no bias flag at all
        (make_tiny_qwen2, "model.layers.0.self_attn.o_proj"),  # q, k, v have biases; o and the MLP cannot
        (_tiny_gemma, "model.layers.0.mlp.gate_proj"),  # attention_bias exists, no mlp flag
        (make_tiny_t5, "encoder.block.0.layer.0.SelfAttention.q"),
    ],
    ids=["mistral", "qwen2", "gemma", "t5"],
)
def test_merge_warns_when_the_config_cannot_describe_a_bias(build, unexpressible):
    base = build(0)
    vf, _ = _trained(base)
    with pytest.warns(VectorFitWarning, match="cannot describe") as rec:
        vf.merge_and_unload()
    assert unexpressible in " ".join(_vf_warnings(rec))


def test_gemma_attention_biases_are_expressed_even_when_mlp_ones_are_not(tmp_path):
    base = _tiny_gemma(0)
    vf, inputs = _trained(base, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        merged = vf.merge_and_unload()
    assert merged.config.attention_bias is True
    merged.save_pretrained(tmp_path / "g")
    assert torch.equal(logits_of(type(merged).from_pretrained(tmp_path / "g").eval(), inputs), logits_of(merged, inputs))


# ------------------------------------------------------------------- 2. a full disk aborts set-up
def _full_disk(monkeypatch, calls):
    real = vf_cache.save_file

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        Path(filename).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(vf_cache, "save_file", save_file)
    return real


def test_full_disk_while_caching_warns_once_and_setup_continues(tmp_path, monkeypatch):
    calls: list = []
    _full_disk(monkeypatch, calls)
    base = make_tiny_bert(0)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    with pytest.warns(VectorFitWarning, match="could not write SVD cache") as rec:
        vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", cache_dir=str(tmp_path / "svd")))
    assert len(_vf_warnings(rec)) == 1, "the failed cache write must warn once, not once per matrix"
    assert len(calls) == 1, "after the first failure the cache stops trying"
    assert_close_rel(logits_of(vf, inputs), ref, RTOL, "set-up after a failed cache write")
    left = [p.name for p in (tmp_path / "svd").rglob("*")]
    assert left == [], f"half-written cache files left behind: {left}"


def test_full_disk_while_loading_an_adapter(tmp_path, monkeypatch):
    vf, inputs = _trained(make_tiny_bert(0), modules_to_save=["classifier"], svd_cache=False)
    vf.save_pretrained(tmp_path / "a")
    calls: list = []
    _full_disk(monkeypatch, calls)
    with pytest.warns(VectorFitWarning, match="could not write SVD cache"):
        loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "a", cache_dir=str(tmp_path / "svd"))
    assert_close_rel(logits_of(loaded, inputs), logits_of(vf, inputs), RTOL)
    assert list((tmp_path / "svd").rglob("*")) == []


# ------------------------------------------------------------------- 3. base differs outside the targets
@pytest.fixture
def adapter_without_head(tmp_path):
    """modules_to_save=None: the classifier is a fresh random head that is neither trained nor saved."""
    base = make_tiny_bert(0)
    vf, inputs = _trained(base)
    vf.save_pretrained(tmp_path / "a")
    return tmp_path / "a", logits_of(vf, inputs), inputs


def _reinit(module: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)


def test_other_head_is_refused_naming_it(adapter_without_head):
    folder, _, _ = adapter_without_head
    other = make_tiny_bert(0)
    _reinit(other.classifier, 7)  # what a fresh AutoModelForSequenceClassification would do
    with pytest.raises(AdapterError, match="classifier") as e:
        VectorFitModel.from_pretrained(other, folder)
    assert "modules_to_save" in str(e.value)


def test_other_head_loads_with_a_warning_when_asked(adapter_without_head):
    folder, out, inputs = adapter_without_head
    other = make_tiny_bert(0)
    _reinit(other.classifier, 7)
    with pytest.warns(VectorFitWarning, match="classifier"):
        loaded = VectorFitModel.from_pretrained(other, folder, check_base="warn")
    assert float((logits_of(loaded, inputs) - out).abs().max()) > 1e-3  # it is a different model indeed


def test_same_base_still_loads_exactly(adapter_without_head):
    folder, out, inputs = adapter_without_head
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), folder)
    assert_close_rel(logits_of(loaded, inputs), out, RTOL)


def test_other_layernorm_is_refused_naming_it(adapter_without_head):
    folder, _, _ = adapter_without_head
    other = make_tiny_bert(0)
    with torch.no_grad():
        other.bert.encoder.layer[1].output.LayerNorm.weight.mul_(1.01)
    with pytest.raises(AdapterError, match=r"bert\.encoder\.layer\.1\.output\.LayerNorm"):
        VectorFitModel.from_pretrained(other, folder)


def test_saved_head_may_differ_on_the_fresh_base(tmp_path):
    vf, inputs = _trained(make_tiny_bert(0), modules_to_save=["classifier"])
    vf.save_pretrained(tmp_path / "a")
    other = make_tiny_bert(0)
    _reinit(other.classifier, 7)  # replaced by the saved head anyway
    loaded = VectorFitModel.from_pretrained(other, tmp_path / "a")
    assert_close_rel(logits_of(loaded, inputs), logits_of(vf, inputs), RTOL)


def test_untrained_target_bias_is_part_of_the_base(tmp_path):
    """variant 'sigma' trains no bias: the base bias of a target is computed with, so it is checked."""
    vf, _ = _trained(make_tiny_bert(0), variant="sigma", modules_to_save=["classifier"])
    vf.save_pretrained(tmp_path / "a")
    other = make_tiny_bert(0)
    with torch.no_grad():
        other.get_submodule(Q0).bias.add_(0.1)
    with pytest.raises(AdapterError, match="attention.self.query"):
        VectorFitModel.from_pretrained(other, tmp_path / "a")


def test_adapter_from_before_the_check_still_loads(adapter_without_head):
    folder, out, inputs = adapter_without_head
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["base_tensors"]
    for t in cfg["targets"].values():
        t.pop("signature", None)
        t.pop("dtype", None)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), folder)
    assert_close_rel(logits_of(loaded, inputs), out, RTOL)


# ------------------------------------------------------------------- 4. file permissions ignore the umask
@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    vf, _ = _trained(make_tiny_bert(0), steps=1, cache_dir=str(tmp_path / "svd"))
    vf.save_pretrained(tmp_path / "a")
    files = list((tmp_path / "a").iterdir()) + list((tmp_path / "svd").iterdir())
    # peft's three files (weights, config, model card README.md) and the 12 SVD cache entries
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert len(files) == 3 + 12
    assert {p.name: _mode(p) for p in files} == {p.name: expected for p in files}


def test_resave_keeps_an_existing_files_mode(tmp_path, umask):
    vf, _ = _trained(make_tiny_bert(0), steps=1)
    vf.save_pretrained(tmp_path / "a")
    for p in (tmp_path / "a").iterdir():
        p.chmod(0o640)
    vf.save_pretrained(tmp_path / "a")
    assert {_mode(p) for p in (tmp_path / "a").iterdir()} == {0o640}


# ------------------------------------------------------------------- 5. stale weights after .data edits
def _sigmas(vf):
    """The trained singular values (adapter "default", absolute form: s itself) of every layer."""
    return [layer.vectorfit_sigma["default"] for _, layer in vf.vectorfit_layers()]


def _scale_data(vf, f):
    for s in _sigmas(vf):
        s.data.mul_(f)


def _scale_copy(vf, f):
    with torch.no_grad():
        for s in _sigmas(vf):
            s.copy_(s * f)


def _scale_no_grad(vf, f):
    with torch.no_grad():
        for s in _sigmas(vf):
            s.mul_(f)


def _scale_state_dict(vf, f):
    sd = {k: (v * f if k.endswith(".vectorfit_sigma.default") else v) for k, v in vf.state_dict().items()}
    assert sum(k.endswith(".vectorfit_sigma.default") for k in sd) == len(_sigmas(vf)) == 12
    vf.load_state_dict(sd)


def _scale_optimizer(vf, f):
    sigmas = _sigmas(vf)
    opt = torch.optim.SGD(sigmas, lr=1.0)
    for s in sigmas:
        s.grad = s.detach() * (1 - f)  # one SGD step: s - (1 - f) s = f s
    opt.step()


@pytest.mark.parametrize("edit", [_scale_data, _scale_copy, _scale_no_grad, _scale_state_dict, _scale_optimizer],
                         ids=["data", "copy_", "no_grad", "load_state_dict", "optimizer"])
def test_inference_cache_sees_every_kind_of_sigma_edit(edit):
    base = make_tiny_bert(0)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", modules_to_save=["classifier"])).eval()
    inputs = example_inputs(base, batch=4, seq=16)  # enough tokens for the dense (cached) path
    for _ in range(3):
        before = logits_of(vf, inputs)  # the second call builds the cached W, the third uses it
    assert any(getattr(layer, "_vf_dense_cache", None) is not None for _, layer in vf.vectorfit_layers())
    edit(vf, 1.5)
    after = logits_of(vf, inputs)
    with force_path("reference"):
        ref = logits_of(vf, inputs)
    assert max_rel_diff(ref, before) > 1e-2, "the edit should change the outputs"
    assert_close_rel(after, ref, RTOL, f"cached inference after a {edit.__name__} edit")


# ------------------------------------------------------------------- 6. dtype mismatch
def test_fp32_adapter_onto_bf16_base_says_dtype_and_how(tmp_path):
    vf, inputs = _trained(make_tiny_bert(0), modules_to_save=["classifier"])
    vf.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        VectorFitModel.from_pretrained(make_tiny_bert(0, dtype=torch.bfloat16), tmp_path / "a")
    msg = str(e.value)
    assert "bfloat16" in msg and "float32" in msg and "fingerprint mismatch" not in msg
    # ... and the way it names works: load in float32, merge, cast.
    merged = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "a").merge_and_unload().to(torch.bfloat16)
    assert_close_rel(logits_of(merged, inputs), logits_of(vf, inputs), 3e-2, "bf16 cast of the merged model")


def test_bf16_adapter_onto_fp32_upcast_loads(tmp_path):
    """The values round to exactly what the adapter was trained on: nothing to refuse."""
    vf, inputs = _trained(make_tiny_bert(0, dtype=torch.bfloat16), modules_to_save=["classifier"])
    vf.save_pretrained(tmp_path / "a")
    upcast = make_tiny_bert(0, dtype=torch.bfloat16).float()
    loaded = VectorFitModel.from_pretrained(upcast, tmp_path / "a")
    assert_close_rel(logits_of(loaded, inputs), logits_of(vf, inputs), 3e-2, "fp32 upcast vs bf16 training model")


# ------------------------------------------------------------------- 7. raw exceptions
def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    fn(cfg)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _first_target(cfg):
    return next(iter(cfg["targets"].values()))


MALFORMED = {
    "no fingerprint": (lambda c: _first_target(c).pop("fingerprint"), "fingerprint"),
    "no shape": (lambda c: _first_target(c).pop("shape"), "shape"),
    "shape of 3": (lambda c: _first_target(c).__setitem__("shape", [1, 2, 3]), "shape"),
    "avf is a list": (lambda c: c.__setitem__("avf", [1, 2]), "avf"),
    "unknown variant": (lambda c: c.__setitem__("variant", "lora"), "variant"),
    "targets is a list": (lambda c: c.__setitem__("targets", ["x"]), "targets"),
    "unknown AVF field": (lambda c: c.__setitem__("avf", {"k": 5, "gamma": 1}), "gamma"),
    "modules_to_save is a string": (lambda c: c.__setitem__("modules_to_save", "classifier"), "modules_to_save"),
    "base_tensors damaged": (lambda c: c.__setitem__("base_tensors", {"x": 1}), "base_tensors"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_adapter_config_is_an_adapter_error(tmp_path, case):
    vf, _ = _trained(make_tiny_bert(0), steps=1, variant="vectorfit", avf=AVFConfig(start_step=1, interval=1, num_freezes=1))
    vf.save_pretrained(tmp_path / "a")
    edit, fragment = MALFORMED[case]
    _edit_config(tmp_path / "a", edit)
    with pytest.raises(AdapterError, match=fragment):
        VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "a")


def test_unknown_top_level_config_field_is_ignored_with_peft_warning(tmp_path):
    """peft's rule for adapter_config.json (a newer peft may add fields): an unknown field is named and ignored."""
    vf, inputs = _trained(make_tiny_bert(0), steps=1, modules_to_save=["classifier"])
    vf.save_pretrained(tmp_path / "a")
    _edit_config(tmp_path / "a", lambda c: c.__setitem__("rank", 8))
    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['rank'\].*ignored"):
        loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / "a")
    assert_close_rel(logits_of(loaded, inputs), logits_of(vf, inputs), RTOL)


@pytest.mark.parametrize("targets", [None, "all-linear"])
def test_peft_wrapped_target_is_named_as_such(targets):
    peft = pytest.importorskip("peft")
    base = make_tiny_bert(0)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"])).get_base_model()
    with pytest.raises(TargetError, match="peft adapter layer") as e:
        get_vectorfit_model(wrapped, VectorFitConfig(target_modules=targets))
    assert "merge_and_unload" in str(e.value) and "is not a Linear" not in str(e.value)


@pytest.mark.parametrize("cache", [True, False])
def test_nan_in_a_base_weight_names_the_module(tmp_path, cache):
    base = make_tiny_bert(0)
    name = "bert.encoder.layer.1.attention.self.key"
    with torch.no_grad():
        base.get_submodule(name).weight[3, 5] = float("nan")
    with pytest.raises(TargetError, match=rf"{name}.*1 NaN/Inf"):
        get_vectorfit_model(base, VectorFitConfig(svd_cache=cache, cache_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"beta": 1.5}, "beta"), ({"beta": float("nan")}, "beta"), ({"beta": True}, "beta"), ({"beta": -0.1}, "beta"),
     ({"k": 0}, "k"), ({"k": 2.0}, "k"), ({"k": True}, "k")],
)
def test_avf_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"AVFConfig\.{field}=.* is invalid"):
        AVFConfig(**kwargs)


def test_avf_k_larger_than_the_vectors_is_refused_at_set_up():
    with pytest.raises(ConfigError, match=r"AVFConfig\.k=100000 .* use k < 24"):
        get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(avf=AVFConfig(k=100000)))


def test_unknown_avf_field_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown AVFConfig fields"):
        VectorFitConfig(avf={"k": 5, "gamma": 0.5})


# ------------------------------------------------------------------- 8. silent degenerate states
def _avf_model(k=2, **avf):
    base = make_tiny_bert(0)
    avf = {"start_step": 2, "interval": 1, "num_freezes": 2, **avf}
    vf = get_vectorfit_model(base, VectorFitConfig(avf=AVFConfig(k=k, **avf)))
    return vf, example_inputs(base, labels=True)


def _run(vf, inputs, steps, start=1):
    opt = torch.optim.AdamW([p for p in vf.parameters() if p.requires_grad], lr=1e-2)
    for step in range(start, start + steps):
        vf(**inputs).loss.backward()
        vf.avf.step(step)
        opt.step()
        opt.zero_grad()


def test_k_equal_to_the_number_of_vectors_is_refused():
    with pytest.raises(ConfigError, match=r"k=24 .* use k < 24"):
        _avf_model(k=24)


@pytest.mark.parametrize("step", [0, -3, 2.0, True, "1"])
def test_avf_step_must_count_from_one(step):
    vf, _ = _avf_model()
    with pytest.raises(AVFError, match="global_step"):
        vf.avf.step(step)


def test_restarting_after_the_schedule_ended_is_refused_until_reset():
    vf, inputs = _avf_model()
    _run(vf, inputs, 4)
    assert int(vf.avf.num_done) == 2
    with pytest.raises(AVFError, match="went backwards.*reset"):
        vf.avf.step(1)
    vf.avf.reset()
    assert vf.avf.frozen == [] and vf.avf.history == [] and float(vf.avf.ema.abs().sum()) == 0.0
    _run(vf, inputs, 4)  # a second run with its own AVF steps
    assert [h["step"] for h in vf.avf.history] == [2, 3]


def test_same_step_twice_and_resume_are_still_fine():
    vf, inputs = _avf_model()
    _run(vf, inputs, 2)
    vf.avf.step(2)  # the same step again (e.g. once per micro-batch): harmless
    _run(vf, inputs, 2, start=3)
    assert [h["step"] for h in vf.avf.history] == [2, 3]


def test_nan_in_a_trained_vector_stops_avf_naming_it():
    vf, inputs = _avf_model()
    _run(vf, inputs, 1)
    layer = vf.base_model.model.get_submodule(Q0)
    with torch.no_grad():
        layer.vectorfit_sigma["default"][0] = float("nan")
    vf(**inputs).loss.backward()
    with pytest.raises(AVFError, match=rf"{Q0}\.sigma.*diverged"):
        vf.avf.step(2)
    assert not torch.isnan(vf.avf.ema).any(), "the average must not take the NaN in"


def test_duplicate_modules_to_save_wraps_once():
    # duplicates are dropped silently: peft's task classes append their head names again on every load
    cfg = VectorFitConfig(modules_to_save=["classifier", "classifier"], variant="no_avf")
    assert cfg.modules_to_save == ["classifier"]
    vf = get_vectorfit_model(make_tiny_bert(0), cfg)
    head = vf.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper) and not isinstance(head.modules_to_save["default"], ModulesToSaveWrapper)
    assert not isinstance(head.original_module, ModulesToSaveWrapper)
    assert [n for n, m in vf.named_modules() if isinstance(m, ModulesToSaveWrapper)] == ["base_model.model.classifier"]


Q1 = "bert.encoder.layer.1.attention.self.query"


def _one_layer_under_two_names():
    base = make_tiny_bert(0)
    inputs = example_inputs(base, labels=True)
    shared = base.bert.encoder.layer[0].attention.self.query
    base.bert.encoder.layer[1].attention.self.query = shared  # one layer object, two names
    with pytest.warns(VectorFitWarning, match=rf"{Q0}.*also registered as.*{Q1}"):
        vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    a, b = vf.base_model.model.get_submodule(Q0), vf.base_model.model.get_submodule(Q1)
    assert isinstance(a, VectorFitLayer) and a is b
    train_steps(vf, inputs, steps=2)
    return vf, inputs, logits_of(vf, inputs)


def test_a_layer_registered_under_two_names_is_adapted_under_both():
    vf, inputs, adapted = _one_layer_under_two_names()
    layer = vf.base_model.model.get_submodule(Q1)
    assert not torch.equal(layer.vectorfit_sigma["default"].detach(), layer.sigma0)  # trained (once, for both names)
    vf.merge()
    assert layer.merged
    assert_close_rel(logits_of(vf, inputs), adapted, RTOL)


def test_a_layer_registered_under_two_names_is_unloaded_under_both():
    vf, inputs, adapted = _one_layer_under_two_names()
    merged = vf.merge_and_unload()
    assert merged.get_submodule(Q0) is merged.get_submodule(Q1) and isinstance(merged.get_submodule(Q1), nn.Linear)
    assert not any(isinstance(m, VectorFitLayer) for m in merged.modules())
    assert_close_rel(logits_of(merged, inputs), adapted, RTOL)


# ------------------------------------------------------------------- cross-machine: decomposition signature
def _degenerate_bert():
    """A BERT whose q matrix of layer 0 has an exactly repeated top singular value: any rotation of
    that pair's singular vectors is an equally valid SVD, as a near-repeated pair is under round-off."""
    base = make_tiny_bert(0)
    spread_singular_values(base, [V0])
    with torch.no_grad():
        m = base.get_submodule(V0)
        U, S, Vh = torch.linalg.svd(m.weight.double(), full_matrices=False)
        S[1] = S[0]
        m.weight.copy_(((U * S) @ Vh).float())
    return base


def _rotate_top_pair(theta):
    real = vf_cache.svd_fp32

    def svd(matrix):
        U, S, Vh = real(matrix)
        if matrix.shape == (32, 32) and abs(float(S[0] - S[1])) <= 1e-5 * float(S[0]):
            c, s = math.cos(theta), math.sin(theta)
            R = torch.tensor([[c, -s], [s, c]])
            U, Vh = U.clone(), Vh.clone()
            U[:, :2] = U[:, :2] @ R
            Vh[:2] = R.t() @ Vh[:2]  # U R R^T Vh: the same matrix, another basis
        return U, S, Vh

    return svd


@pytest.fixture
def degenerate_adapter(tmp_path):
    base = _degenerate_bert()
    vf, inputs = _trained(base, steps=4, modules_to_save=["classifier"], svd_cache=False)
    layer = vf.base_model.model.get_submodule(V0)
    with torch.no_grad():
        s = layer.vectorfit_sigma["default"]
        s[1] += 0.3 * s[0]  # the pair trained apart: the basis now matters
    vf.save_pretrained(tmp_path / "a")
    return tmp_path / "a", logits_of(vf, inputs), inputs


def test_same_decomposition_loads_silently(degenerate_adapter):
    folder, out, inputs = degenerate_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        loaded = VectorFitModel.from_pretrained(_degenerate_bert(), folder, svd_cache=False)
    assert_close_rel(logits_of(loaded, inputs), out, 1e-6)


def test_sign_flips_are_harmless_and_not_reported(degenerate_adapter, monkeypatch):
    real = vf_cache.svd_fp32

    def flipped(matrix):
        U, S, Vh = real(matrix)
        return -U, S, -Vh

    monkeypatch.setattr(vf_cache, "svd_fp32", flipped)
    folder, out, inputs = degenerate_adapter
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        loaded = VectorFitModel.from_pretrained(_degenerate_bert(), folder, svd_cache=False)
    assert_close_rel(logits_of(loaded, inputs), out, RTOL)


def test_another_basis_of_a_repeated_pair_is_reported_with_its_deviation(degenerate_adapter, monkeypatch):
    monkeypatch.setattr(vf_cache, "svd_fp32", _rotate_top_pair(0.7))
    folder, out, inputs = degenerate_adapter
    with pytest.warns(VectorFitWarning, match=rf"1 of 12 decomposed layers .* up to [0-9.e+-]+, worst {V0}") as rec:
        loaded = VectorFitModel.from_pretrained(_degenerate_bert(), folder, svd_cache=False)
    dev = float(_vf_warnings(rec)[0].split("up to ")[1].split(",")[0])
    # The sketch estimates the layer's relative weight change; compare with the true one.
    layer = loaded.base_model.model.get_submodule(V0)
    w_loaded = layer.dense_weight(layer.sigma).double()  # the trained weight as the loaded model computes it
    U, S, Vh = torch.linalg.svd(_degenerate_bert().get_submodule(V0).weight.float(), full_matrices=False)
    w_saved = (U.double() * layer.sigma.detach().double()) @ Vh.double()
    true_dev = float(((w_loaded - w_saved).norm() / w_saved.norm()).detach())
    assert true_dev > 1e-2 and 0.3 * true_dev < dev < 3 * true_dev, (dev, true_dev)
    assert max_rel_diff(logits_of(loaded, inputs), out) > 1e-5  # the outputs moved (a same-basis load: < 1e-6)


def test_signature_is_small(degenerate_adapter):
    folder, _, _ = degenerate_adapter
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sig = cfg["targets"][V0]["signature"]
    assert len(sig) == 4 and all(len(row) == 4 for row in sig)
