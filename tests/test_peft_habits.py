"""What a peft user reaches for first: ``task_type``, the warning for a
new head that would stay frozen, ``unload()``, peft's own adapter switches and state dict, and the
progress bar of the first SVD."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from conftest import (
    HEADS,
    HIDDEN,
    INTER,
    LAYERS,
    VOCAB,
    assert_close_rel,
    example_inputs,
    logits_of,
    make_tiny_bart,
    make_tiny_bert,
    make_tiny_gpt2,
    make_tiny_llama,
    train_steps,
)
from torch import nn

from vectorfit import ConfigError, VectorFitConfig, VectorFitLayer, VectorFitModel, VectorFitWarning, get_vectorfit_model
from vectorfit import progress as progress_mod


def _bert_config(**kw) -> T.BertConfig:
    return T.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTER, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **kw)


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(config).eval()


# ------------------------------------------------------------------------------------ task_type
@pytest.mark.parametrize("task, builder, expected", [
    ("SEQ_CLS", lambda: make_tiny_bert(0), ["classifier"]),
    ("SEQ_CLS", lambda: _seeded(T.LlamaForSequenceClassification, T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, num_labels=3, pad_token_id=0)), ["score"]),
    ("TOKEN_CLS", lambda: _seeded(T.BertForTokenClassification, _bert_config(num_labels=5)), ["classifier"]),
    ("QUESTION_ANS", lambda: _seeded(T.BertForQuestionAnswering, _bert_config()), ["qa_outputs"]),
    ("CAUSAL_LM", lambda: make_tiny_gpt2(0), None),
    ("SEQ_2_SEQ_LM", lambda: make_tiny_bart(0), None),
    ("FEATURE_EXTRACTION", lambda: _seeded(T.BertModel, _bert_config()), None),
])
def test_task_type_adds_the_task_head_as_peft_does(task, builder, expected):
    from peft.utils.other import ModulesToSaveWrapper

    model = builder()
    vf = get_vectorfit_model(model, VectorFitConfig(task_type=task, variant="no_avf"))
    config = vf.peft_config["default"]
    assert config.task_type == task
    wrapped = [n for n, m in vf.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrapped == (expected or [])  # the head the model has, wrapped once
    heads = [n for n, p in vf.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    if expected:
        # peft's rule: the task's head names (classifier / score for SEQ_CLS) go into modules_to_save
        assert set(expected) <= set(config.modules_to_save)
        assert heads and all(n.startswith(f"base_model.model.{expected[0]}.modules_to_save.default.") for n in heads)
        head = vf.base_model.model.get_submodule(expected[0])
        assert {n for n, p in head.modules_to_save["default"].named_parameters()} == {n for n, _ in head.original_module.named_parameters()}
    else:
        assert config.modules_to_save is None and heads == []


def test_task_type_accepts_peft_enum_and_lower_case_and_names_bad_values():
    peft = pytest.importorskip("peft")
    assert VectorFitConfig(task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"
    assert VectorFitConfig(task_type="token_cls").task_type == "TOKEN_CLS"
    with pytest.raises(ConfigError, match=r"VectorFitConfig.task_type='CLS' is invalid: use one of SEQ_CLS"):
        VectorFitConfig(task_type="CLS")


def test_task_type_without_its_head_is_an_error_and_explicit_heads_are_kept():
    with pytest.raises(ConfigError, match=r"task_type='SEQ_CLS' expects a task head named 'classifier' or 'score'.*GPT2LMHeadModel"):
        get_vectorfit_model(make_tiny_gpt2(0), VectorFitConfig(task_type="SEQ_CLS"))
    from peft.utils.other import ModulesToSaveWrapper

    user = VectorFitConfig(task_type="SEQ_CLS", modules_to_save=["classifier"])
    vf = get_vectorfit_model(make_tiny_bert(0), user)
    assert "classifier" in vf.peft_config["default"].modules_to_save
    # the head is wrapped once, though peft appends the task's head names to the list again
    assert [n for n, m in vf.base_model.model.named_modules() if isinstance(m, ModulesToSaveWrapper)] == ["classifier"]


def test_task_type_round_trips_through_an_adapter(tmp_path):
    vf = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(task_type="SEQ_CLS"))
    x = example_inputs(vf, labels=True)
    vf.train()
    train_steps(vf, x, steps=2)
    vf.eval()
    vf.save_pretrained(tmp_path)
    loaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path)
    assert type(loaded).__name__ == "PeftModelForSequenceClassification"
    assert loaded.peft_config["default"].task_type == "SEQ_CLS"
    assert_close_rel(logits_of(loaded, x), logits_of(vf, x), rtol=1e-6)


def test_save_pretrained_writes_only_on_the_main_process(tmp_path):
    """peft's ``is_main_process``: every rank may call it, only the one with True writes."""
    vf = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(task_type="SEQ_CLS"))
    vf.save_pretrained(tmp_path / "other", is_main_process=False)
    vf.save_pretrained(tmp_path / "other", selected_adapters=["default"], is_main_process=False)
    # (peft itself creates the folder on every rank; no file is written there)
    assert not (tmp_path / "other").exists() or not any(p.is_file() for p in (tmp_path / "other").rglob("*"))
    vf.save_pretrained(tmp_path / "main", is_main_process=True)
    assert (tmp_path / "main" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------- new head left frozen
def _pretrained_bert_without_head(tmp_path):
    _seeded(T.BertModel, _bert_config()).save_pretrained(tmp_path / "base")
    return T.BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)  # classifier is new


def test_warns_when_a_newly_initialised_head_would_stay_frozen(tmp_path):
    with pytest.warns(VectorFitWarning, match=r"classifier: newly initialised by from_pretrained.*task_type='SEQ_CLS'.*modules_to_save=\['classifier'\]"):
        get_vectorfit_model(_pretrained_bert_without_head(tmp_path), VectorFitConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)  # (transformers' own deprecation notices are not ours)
        get_vectorfit_model(_pretrained_bert_without_head(tmp_path), VectorFitConfig(task_type="SEQ_CLS"))
        get_vectorfit_model(_pretrained_bert_without_head(tmp_path), VectorFitConfig(modules_to_save=["classifier"]))
        # A model built from a config carries no loading information: no guess, no warning.
        get_vectorfit_model(make_tiny_bert(0), VectorFitConfig())


# ------------------------------------------------------------------------------------ unload
@pytest.mark.parametrize("builder, variant", [
    (make_tiny_bert, "vectorfit"), (make_tiny_gpt2, "no_avf"), (make_tiny_llama, "no_avf"), (make_tiny_bert, "sigma_attn_bias"),
])
def test_unload_gives_back_the_original_model(builder, variant):
    reference = builder(0)
    x = example_inputs(reference, labels=True)
    expected = logits_of(reference, x)
    head = ["classifier"] if hasattr(reference, "classifier") else None
    vf = get_vectorfit_model(builder(0), VectorFitConfig(variant=variant, modules_to_save=head))
    vf.train()
    train_steps(vf, x, steps=3)  # the trained vectors must not survive unload
    vf.eval()
    assert (logits_of(vf, x) - expected).abs().max() > 1e-3
    if head:
        trained_head = {k: t.detach().clone() for k, t in vf.base_model.model.classifier.modules_to_save["default"].state_dict().items()}
        assert not torch.equal(trained_head["weight"], reference.classifier.weight)
    base = vf.unload()
    assert type(base) is type(reference)
    assert not any(isinstance(m, VectorFitLayer) for m in base.modules())
    if head and not torch.equal(base.classifier.weight, reference.classifier.weight):
        # peft 0.21's unload() keeps a modules_to_save head's trained copy (for every peft method, LoRA
        # too); peft 0.22 gives the original head back. Either way everything VectorFit changed is the
        # original again. Reference: the original model with the head peft kept.
        assert torch.equal(base.classifier.weight, trained_head["weight"])
        with torch.no_grad():
            reference.classifier.load_state_dict(trained_head)
        expected = logits_of(reference, x)
    assert_close_rel(logits_of(base, x), expected, rtol=2e-6)
    assert sorted(base.state_dict()) == sorted(reference.state_dict())  # (their order: see the test below)
    ref_state = reference.state_dict()
    for n, a in base.state_dict().items():
        b = ref_state[n]
        assert a.shape == b.shape and a.dtype == b.dtype, n
        if "bias" in n or "classifier" in n or "norm" in n.lower() or "embed" in n:
            assert torch.equal(a, b), n  # biases, heads and untouched modules: bit for bit
    # Layers without a bias stay without one (VectorFit trained a zero bias on them).
    if builder is make_tiny_llama:
        assert base.model.layers[0].self_attn.q_proj.bias is None


@pytest.mark.parametrize("builder", [make_tiny_bert, make_tiny_gpt2])
def test_unload_keeps_the_state_dict_order(builder):
    reference = builder(0)
    base = get_vectorfit_model(builder(0), VectorFitConfig(variant="no_avf")).unload()
    assert list(base.state_dict()) == list(reference.state_dict())


def test_unload_is_exact_for_bias_only_layers():
    reference = make_tiny_bert(0)
    vf = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="sigma_attn_bias"))
    base = vf.unload()
    for name in ("bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"):  # f1 / f2: bias only
        assert torch.equal(base.get_submodule(name).weight, reference.get_submodule(name).weight), name


# ------------------------------------------------------------------- peft's adapter switches
def test_peft_switches_and_state_dict_act_on_the_vectorfit_adapter():
    """What vectorfit 0.1 answered with 'not supported, use ...': peft's own methods now do it."""
    from peft import get_peft_model_state_dict

    reference = make_tiny_bert(0)
    x = example_inputs(reference, labels=True)
    expected = logits_of(reference, x)
    vf = get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    vf.train()
    train_steps(vf, x, steps=3)
    vf.eval()
    trained = logits_of(vf, x)
    assert (trained - expected).abs().max() > 1e-3
    vf.base_model.disable_adapter_layers()
    assert_close_rel(logits_of(vf, x), expected, rtol=2e-6)
    vf.base_model.enable_adapter_layers()
    assert_close_rel(logits_of(vf, x), trained, rtol=1e-6)  # (factorised or cached dense W: round-off apart)
    state = get_peft_model_state_dict(vf)
    vectors = vf.trainable_vectors()
    layers = dict(vf.vectorfit_layers())
    assert len(state) == len(vectors) + 2  # the vectors, and the head's weight and bias
    for name, p in vectors.items():
        module, _, kind = name.rpartition(".")
        assert torch.equal(state[f"base_model.model.{module}.vectorfit_{kind}"], p.detach()), name
        assert module in layers
    head = vf.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(state["base_model.model.classifier.weight"], head.weight.detach())


def test_other_attributes_still_reach_the_base_model():
    base = make_tiny_gpt2(0)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    assert vf.config is base.config
    out = vf.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


# ------------------------------------------------------------------------ progress of the SVD
def _wrap(config: VectorFitConfig) -> nn.Module:
    return get_vectorfit_model(make_tiny_bert(0), config)


def test_progress_bar_shows_the_matrices_when_the_work_is_slow(monkeypatch, capsys):
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)  # tiny matrices are fast: show the bar at once
    monkeypatch.delenv("VECTORFIT_PROGRESS", raising=False)
    _wrap(VectorFitConfig(svd_cache=False))
    err = capsys.readouterr().err
    assert "VectorFit: fingerprint + SVD" in err and "12/12" in err  # 2 layers x (q, k, v, o, f1, f2)


def test_progress_bar_is_quiet_when_fast_or_switched_off(monkeypatch, capsys):
    monkeypatch.delenv("VECTORFIT_PROGRESS", raising=False)
    _wrap(VectorFitConfig(svd_cache=False))  # well under the 1 s delay
    assert "VectorFit:" not in capsys.readouterr().err
    monkeypatch.setattr(progress_mod, "DELAY_S", 0.0)
    _wrap(VectorFitConfig(svd_cache=False, progress=False))
    monkeypatch.setenv("VECTORFIT_PROGRESS", "0")
    _wrap(VectorFitConfig(svd_cache=False))
    assert "VectorFit:" not in capsys.readouterr().err
    _wrap(VectorFitConfig(svd_cache=False, progress=True))  # the config wins over the environment
    assert "VectorFit: fingerprint + SVD" in capsys.readouterr().err


def test_progress_setting_is_validated_and_not_saved_with_adapters():
    with pytest.raises(ConfigError, match=r"VectorFitConfig.progress='yes' is invalid"):
        VectorFitConfig(progress="yes")
    assert "progress" not in VectorFitConfig(progress=False).to_dict()
