"""Configuration validation and target selection (lists, suffixes, regexes, "all-linear", excludes)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import ARCHS, make_tiny_bert, make_tiny_gpt2, make_tiny_llama, make_tiny_t5, make_tiny_vit
from vectorfit import AVFConfig, ConfigError, TargetError, VectorFitConfig, VectorFitLayer, get_vectorfit_model
from vectorfit.targets import find_targets


# ------------------------------------------------------------------------------------------ validation
def _raises(exc, fn, field: str, value):
    with pytest.raises(exc) as e:
        fn()
    msg = str(e.value)
    assert field in msg, f"the error does not name the field {field!r}: {msg}"
    assert repr(value) in msg, f"the error does not show the bad value {value!r}: {msg}"
    return msg


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"variant": "lora"}, "variant", "lora"),
        ({"variant": "Sigma"}, "variant", "Sigma"),
        ({"avf": "fast"}, "avf", "fast"),
        ({"target_modules": 123}, "target_modules", 123),
        ({"target_modules": []}, "target_modules", []),
        ({"target_modules": ["query", ""]}, "target_modules", ["query", ""]),
        ({"target_modules": ["query", 3]}, "target_modules", ["query", 3]),
        ({"target_modules": "(query"}, "target_modules", "(query"),
        ({"exclude_modules": 5}, "exclude_modules", 5),
        ({"exclude_modules": "[a-"}, "exclude_modules", "[a-"),
        ({"exclude_modules": "all-linear" + "("}, "exclude_modules", "all-linear("),
        ({"modules_to_save": [1]}, "modules_to_save", [1]),
        ({"modules_to_save": [""]}, "modules_to_save", [""]),
        ({"svd_cache": "false"}, "svd_cache", "false"),
        ({"cache_dir": 5}, "cache_dir", 5),
    ],
)
def test_vectorfit_config_errors_name_field_and_value(kwargs, field, value):
    _raises(ConfigError, lambda: VectorFitConfig(**kwargs), field, value)


@pytest.mark.parametrize(
    "kwargs, field, value",
    [
        ({"k": 0}, "k", 0),
        ({"k": -2}, "k", -2),
        ({"k": 2.5}, "k", 2.5),
        ({"k": True}, "k", True),
        ({"beta": 1.0}, "beta", 1.0),
        ({"beta": -0.1}, "beta", -0.1),
        ({"beta": "0.9"}, "beta", "0.9"),
        ({"start_step": 0}, "start_step", 0),
        ({"interval": -3}, "interval", -3),
        ({"num_freezes": 1.5}, "num_freezes", 1.5),
        ({"num_freezes": False}, "num_freezes", False),
    ],
)
def test_avf_config_errors_name_field_and_value(kwargs, field, value):
    msg = _raises(ConfigError, lambda: AVFConfig(**kwargs), field, value)
    assert f"AVFConfig.{field}" in msg
    # The same through a dict inside VectorFitConfig.
    _raises(ConfigError, lambda: VectorFitConfig(avf=kwargs), field, value)


def test_resolve_errors_name_argument_and_value():
    _raises(ConfigError, lambda: AVFConfig().resolve(0), "total_steps", 0)
    _raises(ConfigError, lambda: AVFConfig.for_training(-5), "total_steps", -5)
    _raises(ConfigError, lambda: AVFConfig().resolve(100, steps_per_epoch=0), "steps_per_epoch", 0)


def test_unknown_fields(tmp_path):
    # VectorFitConfig is a dataclass: an unknown keyword is refused, naming it.
    with pytest.raises(TypeError, match="'rank'"):
        VectorFitConfig(variant="sigma", rank=8)
    # An AVF schedule given as a dict is checked by vectorfit.
    with pytest.raises(ConfigError, match="rank"):
        VectorFitConfig(avf={"k": 3, "rank": 8})
    # adapter_config.json: peft's rule (a field of a newer release is ignored, with a warning naming it).
    VectorFitConfig(variant="sigma").save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    d = json.loads(path.read_text())
    d["rank"] = 8
    path.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="rank"):
        loaded = VectorFitConfig.from_pretrained(str(tmp_path))
    assert loaded.variant == "sigma" and not hasattr(loaded, "rank")


def test_config_dict_round_trip(tmp_path):
    cfg = VectorFitConfig(variant="vectorfit", target_modules=["query", "value"], exclude_modules=r".*layer\.0\..*",
                          modules_to_save=["classifier"], avf=AVFConfig(k=3, start_step=10, interval=5, num_freezes=4))
    d = json.loads(cfg.to_json())
    assert d["peft_type"] == "VECTORFIT" and d["avf"] == {"k": 3, "beta": 0.99, "start_step": 10, "interval": 5, "num_freezes": 4}
    again = VectorFitConfig(**d)
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    assert again.avf == cfg.avf and isinstance(again.avf, AVFConfig)
    # Through adapter_config.json (peft's save_pretrained / from_pretrained).
    cfg.save_pretrained(str(tmp_path))
    loaded = VectorFitConfig.from_pretrained(str(tmp_path))
    assert loaded == cfg and isinstance(loaded.avf, AVFConfig)
    # The machine-local fields are not written: they come back as their defaults.
    local = VectorFitConfig(variant="sigma", svd_cache=False, cache_dir=str(tmp_path / "svd"), progress=False, check_base="warn")
    local.save_pretrained(str(tmp_path / "local"))
    saved = json.loads((tmp_path / "local" / "adapter_config.json").read_text())
    assert not {"svd_cache", "cache_dir", "progress", "check_base"} & set(saved)
    back = VectorFitConfig.from_pretrained(str(tmp_path / "local"))
    assert (back.variant, back.svd_cache, back.cache_dir, back.progress, back.check_base) == ("sigma", True, None, None, "error")


def test_k_larger_than_number_of_vectors():
    msg = _raises(ConfigError, lambda: get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(avf=AVFConfig(k=100))), "k", 100)
    assert "24" in msg  # 12 targets x (sigma, bias)


def test_modules_to_save_matching_nothing():
    _raises(ConfigError, lambda: get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", modules_to_save=["scorer"])),
            "modules_to_save", "scorer")


def test_variant_that_trains_nothing_on_the_targets():
    with pytest.raises(ConfigError, match="sigma_attn"):
        get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="sigma_attn", target_modules=["intermediate.dense"]))


def test_wrapping_twice_is_refused():
    vf = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="sigma_attn"))
    with pytest.raises(ConfigError):
        get_vectorfit_model(vf, VectorFitConfig(variant="sigma_attn"))


# ------------------------------------------------------------------------------------------ target selection
def _names(model, targets=None, exclude=None, skip=None):
    return [n for n, _, _ in find_targets(model, targets, exclude, skip=skip)]


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


B = "bert.encoder.layer"


def test_targets_by_list_of_names():
    m = make_tiny_bert(0)
    assert _names(m, ["query", "value"]) == [f"{B}.{i}.attention.self.{x}" for i in range(2) for x in ("query", "value")]


@pytest.mark.parametrize(
    "suffix, expected",
    [
        (["attention.output.dense"], [f"{B}.{i}.attention.output.dense" for i in range(2)]),
        (["self.query"], [f"{B}.{i}.attention.self.query" for i in range(2)]),
        # "output.dense" is the suffix of both the attention output and the second MLP matrix.
        (["output.dense"], [f"{B}.{i}.{x}" for i in range(2) for x in ("attention.output.dense", "output.dense")]),
        (["layer.1.intermediate.dense"], [f"{B}.1.intermediate.dense"]),
        ([f"{B}.0.attention.self.key"], [f"{B}.0.attention.self.key"]),
        # A container name is not an error: only the linear leaves are adapted.
        (["attention", "key"], [f"{B}.{i}.attention.self.key" for i in range(2)]),
    ],
)
def test_targets_by_dotted_suffix(suffix, expected):
    assert _names(make_tiny_bert(0), suffix) == expected


def test_suffix_matches_whole_name_components_only():
    m = make_tiny_bert(0)
    with pytest.raises(TargetError):
        _names(m, ["uery"])  # not a suffix at a dot boundary
    with pytest.raises(TargetError):
        _names(m, ["self.query.weight"])  # a parameter, not a module


def test_targets_by_regex_full_match():
    m = make_tiny_bert(0)
    assert _names(m, r".*\.layer\.0\..*\.(query|key)") == [f"{B}.0.attention.self.query", f"{B}.0.attention.self.key"]
    with pytest.raises(TargetError):
        _names(m, "query")  # full match: no module is named just "query"


def test_roles_of_explicit_targets():
    m = make_tiny_bert(0)
    roles = {n: r for n, _, r in find_targets(m, "all-linear")}
    for i in range(2):
        assert roles[f"{B}.{i}.attention.self.query"] == "attn"
        assert roles[f"{B}.{i}.attention.output.dense"] == "attn"
        assert roles[f"{B}.{i}.intermediate.dense"] == "mlp"
        assert roles[f"{B}.{i}.output.dense"] == "mlp"


@pytest.mark.parametrize("factory, head", [(make_tiny_bert, "classifier"), (make_tiny_gpt2, "lm_head"), (make_tiny_llama, "lm_head"),
                                           (make_tiny_t5, "lm_head"), (make_tiny_vit, "classifier")])
def test_all_linear_excludes_only_the_output_head(factory, head):
    m = factory(0)
    got = _names(m, "all-linear")
    assert head not in got
    assert got == [n for n in _linear_names(m) if n != head]
    default = [n for n, _ in ARCHS[m.config.model_type].expected_targets(m)]
    assert set(default) <= set(got)


@pytest.mark.parametrize("cls_name, head", [("BartForSequenceClassification", "classification_head"),
                                            ("DistilBertForSequenceClassification", "pre_classifier"),
                                            ("RobertaForSequenceClassification", "classifier")])
def test_all_linear_excludes_new_classification_heads(cls_name, head):
    arch = {"Bart": "bart", "Dist": "distilbert", "Robe": "roberta"}[cls_name[:4]]
    base = ARCHS[arch].build(0)
    model = getattr(T, cls_name)(base.config)
    got = _names(model, "all-linear")
    assert not any(n == head or n.startswith(head + ".") for n in got), got
    assert set(n for n, _ in ARCHS[arch].expected_targets(model)) <= set(got)


def test_all_linear_on_a_model_applies():
    """sigma variant on all linear layers of GPT-2: every Conv1D but the (tied) lm_head is decomposed."""
    m = make_tiny_gpt2(0)
    vf = get_vectorfit_model(m, VectorFitConfig(variant="sigma", target_modules="all-linear"))
    assert [n for n, _ in vf.vectorfit_layers()] == [n for n in _linear_names(make_tiny_gpt2(0)) if n != "lm_head"]
    assert type(vf.get_base_model().lm_head) is nn.Linear


def test_exclude_modules_list_and_regex():
    m = make_tiny_bert(0)
    default = _names(m)
    assert _names(m, exclude=["value"]) == [n for n in default if not n.endswith(".value")]
    assert _names(m, exclude=r".*\.layer\.1\..*") == [n for n in default if ".layer.0." in n]
    assert _names(m, "all-linear", exclude=["pooler.dense"]) == [n for n in _linear_names(m) if n not in ("classifier", "bert.pooler.dense")]
    with pytest.raises(TargetError):
        _names(m, ["query"], exclude=["query"])


def test_modules_to_save_are_never_targets():
    m = make_tiny_bert(0)
    assert "bert.pooler.dense" not in _names(m, "all-linear", skip=["bert.pooler"])
    vf = get_vectorfit_model(m, VectorFitConfig(variant="sigma", target_modules="all-linear", modules_to_save=["pooler"]))
    assert not any(n.startswith("bert.pooler") for n, _ in vf.vectorfit_layers())


def test_non_linear_target_is_an_error_listing_candidates():
    with pytest.raises(TargetError) as e:
        _names(make_tiny_bert(0), ["LayerNorm"])
    msg = str(e.value)
    assert "LayerNorm" in msg and "attention.self.query" in msg


def test_targets_matching_nothing_list_candidates():
    m = make_tiny_bert(0)
    for targets in (["nonexistent"], r"zzz.*"):
        with pytest.raises(TargetError) as e:
            _names(m, targets)
        msg = str(e.value)
        assert repr(targets) in msg
        for cand in ("bert.encoder.layer.*.attention.self.query", "bert.encoder.layer.*.intermediate.dense", "classifier"):
            assert cand in msg, f"{cand!r} not listed in: {msg}"


class Toy(nn.Module):
    """A model vectorfit has never heard of."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"mix": nn.Linear(8, 8), "ff": nn.Linear(8, 16), "out": nn.Linear(16, 8)}) for _ in range(2))
        self.readout = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + b["out"](torch.relu(b["ff"](b["mix"](h))))
        return self.readout(h)


def test_unknown_architecture_without_targets_lists_candidates():
    with pytest.raises(TargetError) as e:
        get_vectorfit_model(Toy(), VectorFitConfig(variant="sigma"))
    msg = str(e.value)
    for cand in ("blocks.*.mix", "blocks.*.ff", "blocks.*.out", "readout"):
        assert cand in msg
    assert "target_modules" in msg


def test_unknown_transformers_architecture_lists_candidates():
    cfg = T.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                      max_position_embeddings=64, word_embed_proj_dim=32)
    torch.manual_seed(0)
    m = T.OPTForCausalLM(cfg).eval()
    with pytest.raises(TargetError) as e:
        get_vectorfit_model(m, VectorFitConfig())
    msg = str(e.value)
    assert "'opt'" in msg and "model.decoder.layers.*.self_attn.q_proj" in msg and "model.decoder.layers.*.fc1" in msg
    # With explicit targets it works; roles come from generic name patterns.
    roles = {n: r for n, _, r in find_targets(m, ["q_proj", "out_proj", "fc1", "fc2"])}
    assert roles["model.decoder.layers.0.self_attn.q_proj"] == "attn"
    assert roles["model.decoder.layers.0.self_attn.out_proj"] == "attn"
    assert roles["model.decoder.layers.1.fc1"] == "mlp" and roles["model.decoder.layers.1.fc2"] == "mlp"
    vf = get_vectorfit_model(m, VectorFitConfig(variant="sigma_attn", target_modules=["q_proj", "out_proj", "fc1", "fc2"]))
    assert sorted(n.rsplit(".", 1)[-1] for n, _ in vf.vectorfit_layers()) == ["out_proj", "out_proj", "q_proj", "q_proj"]
    assert all(isinstance(layer, VectorFitLayer) and layer.decomposed for _, layer in vf.vectorfit_layers())


def test_toy_model_with_explicit_targets_trains():
    toy = Toy()
    vf = get_vectorfit_model(toy, VectorFitConfig(variant="no_avf", target_modules=r"blocks\.\d+\.(mix|ff|out)"))
    assert len(list(vf.vectorfit_layers())) == 6
    x = torch.randint(0, 10, (3, 4))
    out = vf(x)
    assert out.shape == (3, 4, 2)
    out.square().mean().backward()
    assert all(p.grad is not None for p in vf.trainable_vectors().values())
