"""Adapter-aware saving in ``transformers.Trainer`` (issue 13, item 2), with real Trainer runs.

``VectorFitTrainer`` writes adapters (not the base model) in ``save_model`` and every checkpoint,
resumes from them with the AVF state, and loads the best checkpoint at the end; a plain ``Trainer``
with ``AVFCallback`` gets the adapter files in each checkpoint too.
"""

from __future__ import annotations

import pytest
import torch
from conftest import example_inputs, logits_of
from safetensors.torch import load_file
from test_trainer import N, STEPS, _args, _base, _data, _model
from transformers import Trainer

from vectorfit import AdapterError, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit.integrations import AVF_STATE_NAME, AVFCallback, VectorFitTrainer

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def _files(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _inputs():
    return example_inputs(_base(), labels=False)


def test_save_model_and_checkpoints_hold_loadable_adapters(tmp_path):
    model = _model()
    trainer = VectorFitTrainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=8), train_dataset=_data())
    assert sum(isinstance(c, AVFCallback) for c in trainer.callback_handler.callbacks) == 1  # added by itself
    trainer.train()
    trainer.save_model()

    out_files = _files(tmp_path)
    assert ADAPTER_FILES | {AVF_STATE_NAME, "training_args.bin"} <= out_files
    assert "model.safetensors" not in out_files
    for step in (8, 16):
        ckpt = tmp_path / f"checkpoint-{step}"
        files = _files(ckpt)
        assert ADAPTER_FILES | {AVF_STATE_NAME, "optimizer.pt", "trainer_state.json"} <= files, files
        assert "model.safetensors" not in files
        assert (ckpt / "adapter_model.safetensors").stat().st_size < 50_000

    # The final adapter reproduces the trained model on a fresh base.
    x = _inputs()
    model.eval()
    reloaded = VectorFitModel.from_pretrained(_base(), tmp_path)
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(model, x), rtol=0, atol=1e-6)
    # The step-16 checkpoint is the final state; the step-8 one is an earlier, different state.
    final = VectorFitModel.from_pretrained(_base(), tmp_path / "checkpoint-16")
    torch.testing.assert_close(logits_of(final, x), logits_of(model, x), rtol=0, atol=1e-6)
    early = VectorFitModel.from_pretrained(_base(), tmp_path / "checkpoint-8")
    assert (logits_of(early, x) - logits_of(model, x)).abs().max() > 1e-4


def test_resume_from_adapter_checkpoint_matches_uninterrupted_run(tmp_path):
    ref = _model()
    VectorFitTrainer(model=ref, args=_args(tmp_path / "ref"), train_dataset=_data()).train()

    out = tmp_path / "run"
    args = _args(out, save_strategy="steps", save_steps=6)
    interrupted = _model()
    from test_trainer import _StopAt

    VectorFitTrainer(model=interrupted, args=args, train_dataset=_data(), callbacks=[_StopAt(6)]).train()
    assert "model.safetensors" not in _files(out / "checkpoint-6")
    assert len(interrupted.avf.history) < len(ref.avf.history)

    resumed = _model()  # as in a fresh process: rebuild from the base, then resume
    VectorFitTrainer(model=resumed, args=args, train_dataset=_data()).train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert resumed.avf.history == ref.avf.history
    for (n, a), (_, b) in zip(resumed.trainable_vectors().items(), ref.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    head_a = resumed.base_model.classifier.trained_module.weight
    head_b = ref.base_model.classifier.trained_module.weight
    torch.testing.assert_close(head_a, head_b, rtol=0, atol=1e-6)


def test_resume_without_avf_state_is_a_clear_error(tmp_path):
    from test_trainer import _StopAt

    args = _args(tmp_path, save_strategy="steps", save_steps=4)
    VectorFitTrainer(model=_model(), args=args, train_dataset=_data(), callbacks=[_StopAt(4)]).train()
    (tmp_path / "checkpoint-4" / AVF_STATE_NAME).unlink()
    with pytest.raises(AdapterError, match=AVF_STATE_NAME):
        VectorFitTrainer(model=_model(), args=args, train_dataset=_data()).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_load_best_model_at_end_reads_the_best_adapter(tmp_path):
    model = _model()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=4, save_strategy="steps", save_steps=4,
                 load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)
    trainer = VectorFitTrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data()[: N // 2])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    saved = load_file(f"{best}/adapter_model.safetensors")
    for name, p in model.trainable_vectors().items():
        torch.testing.assert_close(p.detach(), saved[name], rtol=0, atol=0, msg=name)


def test_variant_without_avf_saves_no_avf_state(tmp_path):
    model = get_vectorfit_model(_base(), VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    trainer = VectorFitTrainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_data())
    assert not any(isinstance(c, AVFCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    trainer.save_model()
    assert ADAPTER_FILES <= _files(tmp_path) and AVF_STATE_NAME not in _files(tmp_path)
    VectorFitModel.from_pretrained(_base(), tmp_path)


def test_plain_trainer_with_callback_adds_the_adapter_to_each_checkpoint(tmp_path):
    model = _model()
    Trainer(model=model, args=_args(tmp_path, save_strategy="steps", save_steps=STEPS // 2), train_dataset=_data(),
            callbacks=[AVFCallback()]).train()
    ckpt = tmp_path / f"checkpoint-{STEPS // 2}"
    files = _files(ckpt)
    assert "model.safetensors" in files  # what the plain Trainer resumes from
    assert ADAPTER_FILES | {AVF_STATE_NAME} <= files
    # The adapter holds the same vectors as the Trainer's own state dict of that step.
    full = load_file(str(ckpt / "model.safetensors"))
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    vectors = [k for k in adapter if k.endswith((".sigma", ".bias")) and not k.startswith("classifier")]
    assert len(vectors) == len(model.trainable_vectors())
    for k in vectors:
        torch.testing.assert_close(adapter[k], full[f"base_model.{k}"], rtol=0, atol=0, msg=k)
    VectorFitModel.from_pretrained(_base(), ckpt)
