"""State changes that must never leave a silent mix: a merged model follows every change of its
adapters' vectors, a hot-swap takes the new adapter's AVF along, files from elsewhere cannot hang or
crash loading, and AVF that never runs is reported.

Every expected output is computed independently: a fresh model loaded with the adapter alone.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
import torch
import transformers as T
from conftest import Rows, example_inputs, logits_of, make_tiny_bert, make_tiny_llama, train_steps

import vectorfit
from peft import PeftModel
from vectorfit import AVFConfig, VectorFitConfig, VectorFitWarning
from vectorfit.integrations import AVFCallback

CFG = dict(modules_to_save=["classifier"], progress=False)


def _trained(tmp_path, name: str, steps: int, variant: str = "vectorfit", seed: int = 0):
    """Train a tiny BERT adapter for ``steps`` steps (AVF never steps here: k is never reached) and save it."""
    model = vectorfit.get_vectorfit_model(make_tiny_bert(0),
                                          VectorFitConfig(variant=variant, avf=AVFConfig(k=3) if variant == "vectorfit" else None,
                                                          **CFG))
    torch.manual_seed(seed)
    x = example_inputs(model, labels=True, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VectorFitWarning)  # AVF is not stepped in these helpers
        train_steps(model.train(), x, steps=steps)
        model.eval().save_pretrained(tmp_path / name)
    return tmp_path / name


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    return _trained(tmp, "a", 3, seed=1), _trained(tmp, "b", 5, seed=2)


def _alone(path) -> torch.Tensor:
    model = PeftModel.from_pretrained(make_tiny_bert(0), path).eval()
    return logits_of(model, example_inputs(model, batch=3))


def _loaded(path, **kw):
    return PeftModel.from_pretrained(make_tiny_bert(0), path, **kw).eval()


# ------------------------------------------------------------------ a merged model follows its vectors
def test_peft_load_adapter_into_the_merged_adapter_recomputes_the_merge(two_adapters):
    a, b = two_adapters
    model = _loaded(a)
    model.merge_adapter()
    model.load_adapter(str(b), "default")  # what a Trainer's resume / best-model reload calls
    x = example_inputs(model, batch=3)
    torch.testing.assert_close(logits_of(model, x), _alone(b), rtol=1e-5, atol=1e-6)
    assert all(layer.merged for _, layer in model.vectorfit_layers())


def test_hotswap_into_a_merged_model(two_adapters):
    a, b = two_adapters
    model = _loaded(a)
    model.merge_adapter()
    model.hotswap_adapter(b, "default")
    torch.testing.assert_close(logits_of(model, example_inputs(model, batch=3)), _alone(b), rtol=1e-5, atol=1e-6)


def test_set_adapter_on_a_merged_model_computes_the_new_adapter(two_adapters):
    a, b = two_adapters
    model = _loaded(a)
    model.load_adapter(str(b), "other")
    model.merge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Adapter cannot be set when the model is merged. Unmerging..."
        model.set_adapter("other")
    torch.testing.assert_close(logits_of(model, example_inputs(model, batch=3)), _alone(b), rtol=1e-5, atol=1e-6)


def test_deleting_the_merged_adapter_unmerges_it_first(two_adapters):
    a, b = two_adapters
    model = _loaded(a)
    model.load_adapter(str(b), "other")
    model.merge_adapter()
    with pytest.warns(VectorFitWarning, match="is merged: unmerging"):
        model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    assert not any(layer.merged for _, layer in model.vectorfit_layers())
    torch.testing.assert_close(logits_of(model, example_inputs(model, batch=3)), _alone(b), rtol=1e-5, atol=1e-6)


def test_add_weighted_adapter_and_load_adapter_leave_a_merged_model_as_it_was(two_adapters):
    a, b = two_adapters
    model = _loaded(a)
    model.merge_adapter()
    x = example_inputs(model, batch=3)
    model.load_adapter(str(b), "other")
    model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    torch.testing.assert_close(logits_of(model, x), _alone(a), rtol=1e-5, atol=1e-6)


def test_an_optimizer_step_on_a_merged_model_is_seen_by_the_merge(two_adapters):
    a, _ = two_adapters
    model = _loaded(a, is_trainable=True)
    reference = _loaded(a, is_trainable=True)
    model.merge_adapter()
    for m in (model, reference):  # the same in-place change of every trained vector (weight decay alone)
        with torch.no_grad():
            for v in m.trainable_vectors().values():
                v.mul_(0.9)
    x = example_inputs(model, batch=3)
    torch.testing.assert_close(logits_of(model, x), logits_of(reference, x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ hot-swap takes the adapter's AVF along
@pytest.mark.parametrize("slot,new", [("vectorfit", "no_avf"), ("no_avf", "vectorfit")])
def test_hotswap_replaces_config_and_avf_controller(tmp_path, slot, new):
    model = _loaded(_trained(tmp_path, "slot", 2, variant=slot))
    model.hotswap_adapter(_trained(tmp_path, "new", 3, variant=new, seed=4), "default")
    assert model.peft_config["default"].variant == new
    assert (model.avf is not None) == (new == "vectorfit")
    torch.testing.assert_close(logits_of(model, example_inputs(model, batch=3)), _alone(tmp_path / "new"), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ files from elsewhere
def test_a_catastrophic_regex_in_a_saved_config_is_never_run(two_adapters, tmp_path):
    a, _ = two_adapters
    shutil.copytree(a, tmp_path / "evil")
    path = tmp_path / "evil" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = cfg["exclude_modules"] = "(.*.*.*.*.*.*.*.*)*Z"  # minutes of backtracking per name
    path.write_text(json.dumps(cfg))
    start = time.perf_counter()
    model = _loaded(tmp_path / "evil")
    assert time.perf_counter() - start < 10.0  # loading itself takes well under a second here
    torch.testing.assert_close(logits_of(model, example_inputs(model, batch=3)), _alone(a), rtol=0, atol=0)
    model.save_pretrained(tmp_path / "again")  # the exact names it now carries save and load again
    torch.testing.assert_close(_alone(tmp_path / "again"), _alone(a), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["adapter_config.json", "../x", "a/b", "", "__base__"])
def test_adapter_names_that_cannot_be_folders_are_refused_everywhere(two_adapters, name):
    a, b = two_adapters
    model = _loaded(a)
    with pytest.raises(ValueError, match="adapter_name=.*invalid"):
        model.load_adapter(str(b), name)
    with pytest.raises(ValueError, match="adapter_name=.*invalid"):
        model.add_weighted_adapter(["default"], [1.0], name)
    assert list(model.peft_config) == ["default"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_add_weighted_adapter_refuses_non_finite_weights(two_adapters, bad):
    a, b = two_adapters
    model = _loaded(a)
    model.load_adapter(str(b), "other")
    with pytest.raises(ValueError, match="not a finite number"):
        model.add_weighted_adapter(["default", "other"], [1.0, bad], "mix")
    assert "mix" not in model.peft_config


# ------------------------------------------------------------------ AVF that never runs
def _avf_model():
    return vectorfit.get_vectorfit_model(make_tiny_bert(0), VectorFitConfig(avf=AVFConfig(k=3), **CFG))


def _loop(model, steps: int, avf: bool) -> None:
    x = example_inputs(model, labels=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        model(**x).loss.backward()
        if avf:
            model.avf.set_total_steps(steps)
            model.avf.step(step)
        opt.step()
        opt.zero_grad()


def test_a_loop_that_never_steps_avf_is_warned_once():
    model = _avf_model()
    with pytest.warns(VectorFitWarning, match="without any call of model.avf.step") as record:
        _loop(model, 4, avf=False)
    assert sum("model.avf.step" in str(w.message) for w in record) == 1


def test_a_loop_that_steps_avf_is_not_warned(tmp_path):
    model = _avf_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", VectorFitWarning)
        _loop(model, 4, avf=True)
        model.save_pretrained(tmp_path / "ok")


def test_saving_an_avf_adapter_trained_without_avf_warns(tmp_path):
    model = _avf_model()
    x = example_inputs(model, labels=True)
    with torch.no_grad():  # trained by hand, no optimizer: only the save can notice
        next(iter(model.trainable_vectors().values())).add_(0.1)
    with pytest.warns(VectorFitWarning, match="its vectors trained without any call of model.avf.step"):
        model.save_pretrained(tmp_path / "a")
    assert x  # the inputs were only built to keep the model's shape honest


# ------------------------------------------------------------------ the plain Trainer and a tied model
@pytest.mark.parametrize("callback", [True, False])
def test_plain_trainer_on_a_tied_embedding_llama_saves_and_reloads(tmp_path, callback):
    def base():
        m = make_tiny_llama(0, tie_word_embeddings=True)
        assert m.lm_head.weight is m.model.embed_tokens.weight  # the case that crashed safetensors
        return m

    model = vectorfit.get_vectorfit_model(base(), VectorFitConfig(task_type="CAUSAL_LM", avf=AVFConfig(k=3), progress=False))
    ids = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(0))
    args = T.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, learning_rate=2e-2,
                               max_steps=4, save_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                               dataloader_num_workers=0)
    trainer = T.Trainer(model=model, args=args, train_dataset=Rows({"input_ids": ids, "labels": ids.clone()}),
                        callbacks=[AVFCallback()] if callback else [])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", VectorFitWarning)
        trainer.train()
        trainer.save_model(str(tmp_path / "final"))
    avf_warnings = [w for w in record if "model.avf.step" in str(w.message)]
    assert len(avf_warnings) == (0 if callback else 1)  # without the callback AVF never ran: said once
    assert (tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(base(), tmp_path / "final").eval()
    model.eval()
    x = {"input_ids": ids[:3]}
    torch.testing.assert_close(reloaded(**x).logits, model(**x).logits, rtol=0, atol=0)
