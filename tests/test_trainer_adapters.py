"""Adapter-aware saving in ``transformers.Trainer``, as peft users expect it, with real Trainer runs.

A VectorFit model is a ``peft.PeftModel``: a plain ``Trainer`` writes adapters (not the base model)
in ``save_model`` and every checkpoint, with the AVF state inside ``adapter_model.safetensors``
(``base_model.vectorfit_avf.<buffer>``), resumes from them through peft, and loads the best checkpoint
at the end. ``AVFCallback`` runs AVF; ``VectorFitTrainer`` is a deprecated alias that adds it.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import example_inputs, logits_of
from safetensors.torch import load_file, save_file
from test_trainer import N, STEPS, _args, _base, _data, _model, _StopAt
from transformers import Trainer

from vectorfit import AVFError, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit.config import _sha256
from vectorfit.integrations import AVFCallback, VectorFitTrainer

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
AVF_PREFIX = "base_model.vectorfit_avf."  # the AVF state's keys in adapter_model.safetensors
AVF_BUFFERS = {"ema", "frozen_mask", "num_done", "schedule_spec", "frozen_history"}


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _inputs():
    return example_inputs(_base(), labels=False)


def _trainer(model, args, **kw) -> Trainer:
    return Trainer(model=model, args=args, train_dataset=_data(), callbacks=[AVFCallback(), *kw.pop("callbacks", [])], **kw)


def _saved_vector_key(name: str) -> str:
    """``<module>.sigma`` (trainable_vectors) -> its key in adapter_model.safetensors."""
    module, _, kind = name.rpartition(".")
    return f"base_model.model.{module}.vectorfit_{kind}"


def test_save_model_and_checkpoints_hold_loadable_adapters(tmp_path):
    model = _model()
    trainer = _trainer(model, _args(tmp_path, save_strategy="steps", save_steps=8))
    trainer.train()
    trainer.save_model()

    out_files = _files(tmp_path)
    assert ADAPTER_FILES | {"training_args.bin"} <= out_files
    assert "model.safetensors" not in out_files
    for step in (8, 16):
        ckpt = tmp_path / f"checkpoint-{step}"
        files = _files(ckpt)
        assert ADAPTER_FILES | {"optimizer.pt", "trainer_state.json"} <= files, files
        assert "model.safetensors" not in files
        assert (ckpt / "adapter_model.safetensors").stat().st_size < 50_000
        saved = load_file(str(ckpt / "adapter_model.safetensors"))
        assert {k[len(AVF_PREFIX):] for k in saved if k.startswith(AVF_PREFIX)} == AVF_BUFFERS
    # the final checkpoint holds exactly the model's AVF state and vectors
    final_file = load_file(str(tmp_path / "checkpoint-16" / "adapter_model.safetensors"))
    for buf, t in model.avf.state_dict().items():
        assert torch.equal(final_file[AVF_PREFIX + buf], t), buf
    for name, p in model.trainable_vectors().items():
        assert torch.equal(final_file[_saved_vector_key(name)], p.detach()), name

    # The final adapter reproduces the trained model on a fresh base.
    x = _inputs()
    model.eval()
    reloaded = VectorFitModel.from_pretrained(_base(), tmp_path)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(model, x), rtol=0, atol=1e-6)
    assert reloaded.avf.history == model.avf.history and reloaded.avf.history
    # The step-16 checkpoint is the final state; the step-8 one is an earlier, different state.
    final = VectorFitModel.from_pretrained(_base(), tmp_path / "checkpoint-16")
    torch.testing.assert_close(logits_of(final, x), logits_of(model, x), rtol=0, atol=1e-6)
    early = VectorFitModel.from_pretrained(_base(), tmp_path / "checkpoint-8")
    assert (logits_of(early, x) - logits_of(model, x)).abs().max() > 1e-4
    assert len(early.avf.history) < len(model.avf.history)


def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(tmp_path):
    ref = _model()
    _trainer(ref, _args(tmp_path / "ref")).train()

    out = tmp_path / "run"
    args = _args(out, save_strategy="steps", save_steps=6)
    interrupted = _model()
    _trainer(interrupted, args, callbacks=[_StopAt(6)]).train()
    assert "model.safetensors" not in _files(out / "checkpoint-6")
    assert 0 < len(interrupted.avf.history) < len(ref.avf.history)  # an AVF step before the cut, more after it

    resumed = _model()  # as in a fresh process: rebuild from the base, then resume
    _trainer(resumed, args).train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert resumed.avf.history == ref.avf.history
    for (n, a), (_, b) in zip(resumed.trainable_vectors().items(), ref.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    head_a = resumed.base_model.model.classifier.modules_to_save["default"].weight
    head_b = ref.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(head_a, head_b, rtol=0, atol=1e-6)


def test_resume_without_avf_state_is_a_clear_error(tmp_path):
    args = _args(tmp_path, save_strategy="steps", save_steps=8)
    first = _model()
    _trainer(first, args, callbacks=[_StopAt(8)]).train()
    assert len(first.avf.history) == 2  # AVF steps 6 and 8 ran before the checkpoint
    ckpt = tmp_path / "checkpoint-8"
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    stripped = {k: v for k, v in weights.items() if not k.startswith(AVF_PREFIX)}
    assert len(stripped) < len(weights)
    save_file(stripped, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["weights_sha256"] = _sha256(ckpt / "adapter_model.safetensors")  # a consistent pair, only without AVF state
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AVFError, match=r"resuming at step 8, where 2 AVF step.s. should have run, but the model.s AVF state records 0"):
        _trainer(_model(), args).train(resume_from_checkpoint=str(ckpt))


def test_load_best_model_at_end_reads_the_best_adapter(tmp_path):
    model = _model()
    # "best" = the highest eval loss: an earlier checkpoint than the last, so the end state must come from loading it
    args = _args(tmp_path, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                 load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = _trainer(model, args, eval_dataset=_data()[: N // 2])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}")
    saved = load_file(f"{best}/adapter_model.safetensors")
    vectors = model.trainable_vectors()
    assert len(vectors) == sum(k.endswith((".vectorfit_sigma", ".vectorfit_bias")) for k in saved)
    for name, p in vectors.items():
        torch.testing.assert_close(p.detach(), saved[_saved_vector_key(name)], rtol=0, atol=0, msg=name)
    head = model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(head.weight.detach(), saved["base_model.model.classifier.weight"], rtol=0, atol=0)
    assert int(model.avf.num_done) == int(saved[AVF_PREFIX + "num_done"]) < len(model.avf.schedule())  # its AVF state too


def test_variant_without_avf_saves_no_avf_state(tmp_path):
    model = get_vectorfit_model(_base(), VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_data())
    trainer.train()
    trainer.save_model()
    assert ADAPTER_FILES <= _files(tmp_path) and "model.safetensors" not in _files(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and not any(k.startswith(AVF_PREFIX) for k in saved)
    x = _inputs()
    model.eval()
    torch.testing.assert_close(logits_of(VectorFitModel.from_pretrained(_base(), tmp_path), x), logits_of(model, x),
                               rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="AVFCallback needs a VectorFit model whose variant uses AVF"):
        Trainer(model=model, args=_args(tmp_path / "b", max_steps=1), train_dataset=_data(), callbacks=[AVFCallback()]).train()


def test_vectorfit_trainer_is_a_deprecated_trainer_that_adds_the_callback(tmp_path):
    with pytest.warns(DeprecationWarning, match="VectorFitTrainer is deprecated"):
        trainer = VectorFitTrainer(model=_model(), args=_args(tmp_path, max_steps=8), train_dataset=_data())
    assert isinstance(trainer, Trainer)
    assert sum(isinstance(c, AVFCallback) for c in trainer.callback_handler.callbacks) == 1  # added by itself
    with pytest.warns(DeprecationWarning):
        again = VectorFitTrainer(model=_model(), args=_args(tmp_path / "b"), train_dataset=_data(), callbacks=[AVFCallback()])
    assert sum(isinstance(c, AVFCallback) for c in again.callback_handler.callbacks) == 1  # not twice
    no_avf = get_vectorfit_model(_base(), VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    with pytest.warns(DeprecationWarning):
        plain = VectorFitTrainer(model=no_avf, args=_args(tmp_path / "c"), train_dataset=_data())
    assert not any(isinstance(c, AVFCallback) for c in plain.callback_handler.callbacks)
    trainer.train()  # the callback it added runs AVF: the schedule of an 8-step run
    assert trainer.model.avf.history and [h["step"] for h in trainer.model.avf.history] == trainer.model.avf.schedule()
