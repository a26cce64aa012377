"""VectorFit as a registered peft method, driven through peft's, transformers' and TRL's own entry points.

Each test checks a property against an independent computation (a fresh base model, a per-row
forward, the dense weights), on tiny random models (conftest) and real files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file

import vectorfit
from vectorfit import AdapterError, AVFConfig, VectorFitConfig, VectorFitLayer, VectorFitWarning, distributed
from vectorfit.integrations import AVFCallback

from conftest import Rows, example_inputs, logits_of, make_tiny_bert, make_tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))


def _train(model, inputs, steps=4, lr=2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for t in range(1, steps + 1):
        model(**inputs).loss.backward()
        if model.avf is not None:
            model.avf.step(t)
        opt.step()
        opt.zero_grad()
    model.eval()


def _avf(**kw):
    return AVFConfig(**{"start_step": 2, "interval": 1, "num_freezes": 2, "k": 2, **kw})


def test_registered_peft_method_exact_at_init():
    assert PeftType.VECTORFIT == "VECTORFIT"
    cfg = VectorFitConfig(task_type="SEQ_CLS")
    assert isinstance(cfg, PeftConfig) and cfg.peft_type == PeftType.VECTORFIT
    base = make_tiny_bert()
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    model = get_peft_model(base, cfg)
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    assert isinstance(model.base_model, vectorfit.VectorFitModel)
    torch.testing.assert_close(logits_of(model, inputs), ref, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # only singular values, biases and the (peft-wrapped) classifier
    assert trainable and all(".vectorfit_sigma." in n or ".vectorfit_bias." in n or ".classifier.modules_to_save." in n for n in trainable)
    assert any(".classifier." in n for n in trainable)


def test_save_load_roundtrip_peft_files_and_avf_state(tmp_path):
    base = make_tiny_bert()
    inputs = example_inputs(base, labels=True)
    model = vectorfit.get_vectorfit_model(base, VectorFitConfig(modules_to_save=["classifier"], avf=_avf()))
    _train(model, inputs)
    assert model.avf.history and len(model.avf.history) == 2
    out = logits_of(model, {k: v for k, v in inputs.items() if k != "labels"})
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VECTORFIT"
    assert "cache_dir" not in cfg and "check_base" not in cfg  # machine-local fields are not saved
    first = next(iter(cfg["targets"].values()))
    assert len(first["fingerprint"]) == 64 and "signature" in first
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 50_000
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".vectorfit_sigma") for k in tensors) and "base_model.vectorfit_avf.ema" in tensors
    loaded = PeftModel.from_pretrained(make_tiny_bert(), tmp_path)
    torch.testing.assert_close(logits_of(loaded, {k: v for k, v in inputs.items() if k != "labels"}), out, rtol=0, atol=0)
    assert loaded.avf.history == model.avf.history
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False by default
    # the live config the user passed stays a plain config (it can wrap another base model)
    other = vectorfit.get_vectorfit_model(make_tiny_bert(seed=5), model.peft_config["default"])
    assert isinstance(other, PeftModel)


def test_wrong_base_refused_before_any_svd(tmp_path):
    model = vectorfit.get_vectorfit_model(make_tiny_bert(), VectorFitConfig(modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)
    before = dict(distributed.counts)
    with pytest.raises(AdapterError, match="base model mismatch at module"):
        PeftModel.from_pretrained(make_tiny_bert(seed=1), tmp_path)
    assert distributed.counts == before  # refused in the record check, no decomposition ran


def test_base_differing_outside_targets_needs_check_base_warn(tmp_path):
    model = vectorfit.get_vectorfit_model(make_tiny_bert(), VectorFitConfig(modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path)

    def edited():
        m = make_tiny_bert()
        with torch.no_grad():
            m.bert.embeddings.word_embeddings.weight[0] += 1.0
        return m

    with pytest.raises(AdapterError, match="differs outside the adapted matrices"):
        PeftModel.from_pretrained(edited(), tmp_path)
    with pytest.warns(VectorFitWarning, match="loaded anyway"):
        PeftModel.from_pretrained(edited(), tmp_path, check_base="warn")
    # load_adapter has no such argument in peft: the context manager is the escape there
    two = vectorfit.get_vectorfit_model(edited(), VectorFitConfig(modules_to_save=["classifier"]))
    with pytest.raises(AdapterError):
        two.load_adapter(tmp_path, "other")
    with vectorfit.allow_base_differences("warn"), pytest.warns(VectorFitWarning):
        two.load_adapter(tmp_path, "other")
    assert "other" in two.peft_config


def test_mixed_batch_matches_per_row_forwards_and_refuses_training(tmp_path):
    base = make_tiny_bert()
    inputs = example_inputs(base, batch=3, labels=True)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    model = vectorfit.get_vectorfit_model(base, VectorFitConfig(modules_to_save=["classifier"], variant="no_avf"), adapter_name="a")
    model.add_adapter("b", VectorFitConfig(modules_to_save=["classifier"], variant="no_avf"))
    _train(model, inputs)
    model.set_adapter("b")
    _train(model, inputs, lr=5e-2)
    names = ["a", "b", "__base__"]
    mixed = model(**x, adapter_names=names).logits
    for i, name in enumerate(names):
        row = {k: v[i:i + 1] for k, v in x.items()}
        if name == "__base__":
            with model.disable_adapter():
                ref = model(**row).logits
        else:
            model.set_adapter(name)
            ref = model(**row).logits
        torch.testing.assert_close(mixed[i:i + 1], ref, rtol=1e-5, atol=1e-6)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**x, adapter_names=names)


def test_weighted_adapter_is_the_exact_weighted_sum_of_weight_updates():
    base = make_tiny_bert()
    inputs = example_inputs(base, labels=True)
    cfg = dict(modules_to_save=["classifier"], variant="no_avf")
    model = vectorfit.get_vectorfit_model(base, VectorFitConfig(**cfg), adapter_name="a")
    model.add_adapter("b", VectorFitConfig(**cfg))
    _train(model, inputs)
    model.set_adapter("b")
    _train(model, inputs, lr=5e-2)
    w = (0.7, -0.4)
    model.add_weighted_adapter(["a", "b"], list(w), "mix")
    for name, layer in model.vectorfit_layers():
        if not layer.decomposed:
            continue
        expect = w[0] * layer.get_delta_weight("a").double() + w[1] * layer.get_delta_weight("b").double()
        got = layer.get_delta_weight("mix").double()
        assert (got - expect).abs().max() <= 1e-5 * expect.abs().max().clamp_min(1e-12), name
        db = layer.vectorfit_bias["mix"] - layer.bias0
        torch.testing.assert_close(db, w[0] * (layer.vectorfit_bias["a"] - layer.bias0) + w[1] * (layer.vectorfit_bias["b"] - layer.bias0))
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)
    # merged "mix" equals a dense model whose weights are W0 + w_a dW_a + w_b dW_b
    model.set_adapter("mix")
    x = {k: v for k, v in inputs.items() if k != "labels"}
    unmerged = model(**x).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**x).logits, unmerged, rtol=1e-4, atol=1e-5)


def test_merge_unload_disable():
    base = make_tiny_bert()
    inputs = example_inputs(base, labels=True)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    ref = logits_of(base, x)
    model = vectorfit.get_vectorfit_model(base, VectorFitConfig(modules_to_save=["classifier"], variant="no_avf"))
    _train(model, inputs)
    trained = logits_of(model, x)
    with model.disable_adapter():
        torch.testing.assert_close(model(**x).logits, ref, rtol=1e-5, atol=1e-6)
    model.merge_adapter()
    torch.testing.assert_close(logits_of(model, x), trained, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert type(merged.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert not any(isinstance(m, VectorFitLayer) for m in merged.modules())
    torch.testing.assert_close(logits_of(merged, x), trained, rtol=1e-5, atol=1e-6)
    unloaded = vectorfit.get_vectorfit_model(make_tiny_bert(), VectorFitConfig(modules_to_save=["classifier"])).unload()
    torch.testing.assert_close(logits_of(unloaded, x), ref, rtol=1e-5, atol=1e-6)


def test_hotswap_in_place_and_into_a_merged_model(tmp_path):
    base = make_tiny_bert()
    inputs = example_inputs(base, labels=True)
    x = {k: v for k, v in inputs.items() if k != "labels"}
    cfg = dict(modules_to_save=["classifier"], variant="no_avf")
    donor = vectorfit.get_vectorfit_model(make_tiny_bert(), VectorFitConfig(**cfg))
    _train(donor, inputs, lr=5e-2)
    donor.save_pretrained(tmp_path)
    want = logits_of(donor, x)
    model = vectorfit.get_vectorfit_model(base, VectorFitConfig(**cfg))
    params = {n: p for n, p in model.named_parameters() if "vectorfit_" in n}
    model.merge_adapter()
    model.hotswap_adapter(tmp_path, "default")
    assert {n: p for n, p in model.named_parameters() if "vectorfit_" in n} == params  # same objects
    torch.testing.assert_close(logits_of(model, x), want, rtol=1e-5, atol=1e-6)  # merged weights rebuilt
    model.unmerge_adapter()
    torch.testing.assert_close(logits_of(model, x), want, rtol=1e-5, atol=1e-6)
    wrong = vectorfit.get_vectorfit_model(make_tiny_bert(seed=3), VectorFitConfig(**cfg))
    before = {n: p.detach().clone() for n, p in wrong.named_parameters() if "vectorfit_" in n}
    with pytest.raises(AdapterError, match="does not fit"):
        wrong.hotswap_adapter(tmp_path, "default")
    assert all(torch.equal(p, before[n]) for n, p in wrong.named_parameters() if "vectorfit_" in n)


def _training_args(out, **kw):
    return T.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, learning_rate=2e-2, max_steps=6,
                               save_steps=3, logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
                               dataloader_num_workers=0, disable_tqdm=True, **kw)


def test_plain_trainer_saves_adapters_and_resumes_avf_exactly(tmp_path):
    def run(out, resume=None):
        base = make_tiny_bert()
        inputs = example_inputs(base, batch=8, labels=True)
        model = vectorfit.get_vectorfit_model(base, VectorFitConfig(task_type="SEQ_CLS", avf=AVFConfig(k=3)))
        trainer = T.Trainer(model=model, args=_training_args(out), train_dataset=Rows(inputs), callbacks=[AVFCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, trainer = run(tmp_path / "full")
    trainer.save_model(tmp_path / "final")
    assert (tmp_path / "final" / "adapter_config.json").is_file() and not (tmp_path / "final" / "model.safetensors").exists()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert "base_model.vectorfit_avf.ema" in load_file(ckpt / "adapter_model.safetensors")
    assert len(full.avf.history) >= 2
    # resume from the middle: the same freezing decisions and the same vectors as the uninterrupted run
    import shutil

    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "half" / "checkpoint-3")
    resumed, _ = run(tmp_path / "half", resume=str(tmp_path / "half" / "checkpoint-3"))
    assert resumed.avf.history == full.avf.history
    for (n, a), (_, b) in zip(full.trainable_vectors().items(), resumed.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    reloaded = PeftModel.from_pretrained(make_tiny_bert(), tmp_path / "final")
    x = example_inputs(full, batch=3)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(full, x), rtol=0, atol=0)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(97 + i): 3 + i for i in range(26)}, " ": 29}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def test_trl_sft_trainer_trains_and_saves_an_adapter_that_reloads_exactly(tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    tok = _tiny_tokenizer()
    base_dir = tmp_path / "base"
    make_tiny_llama(vocab_size=32, pad_token_id=0, eos_token_id=1).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    model = T.AutoModelForCausalLM.from_pretrained(base_dir)
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "a dog ran far away", "birds sing at dawn", "fish swim in a lake"] * 4})
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=2e-2,
                         report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=100, max_length=32,
                         disable_tqdm=True, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=VectorFitConfig(task_type="CAUSAL_LM", avf=AVFConfig(k=2)), callbacks=[AVFCallback()])
    trained_model = trainer.model
    assert isinstance(trained_model, PeftModel) and isinstance(trained_model.base_model, vectorfit.VectorFitModel)
    before = {n: p.detach().clone() for n, p in trained_model.named_parameters() if p.requires_grad}
    trainer.train()
    moved = [n for n, p in trained_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and all("vectorfit_" in n for n in moved)
    assert trained_model.avf.history
    trainer.save_model(str(tmp_path / "adapter"))
    ids = tok(["the cat", "a dog"], return_tensors="pt", padding=True)
    trained_model.eval()
    with torch.no_grad():
        want = trained_model(**ids).logits
    again = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))  # base from base_model_name_or_path
    with torch.no_grad():
        got = again(**ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_auto_peft_model_for_sequence_classification(tmp_path):
    base_dir = tmp_path / "base"
    make_tiny_bert().save_pretrained(base_dir)
    model = vectorfit.get_vectorfit_model(T.AutoModelForSequenceClassification.from_pretrained(base_dir), VectorFitConfig(task_type="SEQ_CLS", avf=_avf()))
    inputs = example_inputs(model, labels=True)
    _train(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    again = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "adapter"))
    x = {k: v for k, v in inputs.items() if k != "labels"}
    torch.testing.assert_close(logits_of(again, x), logits_of(model, x), rtol=0, atol=0)


def test_format_1_adapter_fixture_loads_and_converts(tmp_path, caplog):
    fixture = os.path.join(HERE, "fixtures", "v1_adapter")
    expected = json.load(open(os.path.join(HERE, "fixtures", "v1_adapter_expected.json")))
    ids = torch.tensor(expected["input_ids"])
    with caplog.at_level("WARNING"):
        model = vectorfit.VectorFitModel.from_pretrained(make_tiny_bert(), fixture)
    assert "vectorfit 0.1 adapter" in caplog.text
    torch.testing.assert_close(model(input_ids=ids).logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-6)
    out = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "vectorfit_recipes", "convert", fixture, str(out)], check=True, capture_output=True)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "VECTORFIT"
    again = PeftModel.from_pretrained(make_tiny_bert(), out)
    torch.testing.assert_close(again(input_ids=ids).logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="base model mismatch"):
        PeftModel.from_pretrained(make_tiny_bert(seed=1), out)


def test_untested_peft_version_fails_at_import_with_one_sentence():
    code = ("import importlib.metadata as md; real = md.version; "
            "md.version = lambda n: '0.14.0' if n == 'peft' else real(n); import vectorfit")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: vectorfit is tested with peft>=") and "pip install" in last
