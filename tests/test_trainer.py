"""AVF inside ``transformers.Trainer``: same decisions as a plain loop, exact resume from checkpoints."""

from __future__ import annotations

import torch
from conftest import make_tiny_bert
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from vectorfit import AVFConfig, VectorFitConfig, get_vectorfit_model
from vectorfit.integrations import AVFCallback

N, BATCH, STEPS = 32, 8, 16  # 4 steps per epoch, 4 epochs


def _base() -> BertForSequenceClassification:
    return make_tiny_bert(0, num_labels=2)


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (N, 10), generator=g)
    labels = (ids[:, 0] % 2).tolist()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]} for i in range(N)]


def _model(avf: AVFConfig | None = None):
    return get_vectorfit_model(_base(), VectorFitConfig(modules_to_save=["classifier"], avf=avf or AVFConfig(k=3)))


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=2e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        logging_strategy="no", save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential",
    )
    base.update(kw)
    return TrainingArguments(**base)


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_trainer_and_plain_loop_freeze_the_same_vectors(tmp_path):
    model = _model()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[AVFCallback()]).train()
    trainer_history = model.avf.history
    # The callback derived the schedule from max_steps and the epoch length, as a plain loop would.
    expected = AVFConfig.for_training(STEPS, N // BATCH, k=3).schedule()
    assert [h["step"] for h in trainer_history] == expected

    # Plain loop over the same batches in the same order (sequential sampling in both).
    trainer = Trainer(model=_model(), args=_args(tmp_path / "b"), train_dataset=_data())
    batches = [b for _ in range(STEPS // (N // BATCH)) for b in trainer.get_train_dataloader()]
    assert len(batches) == STEPS
    plain = _model(AVFConfig.for_training(STEPS, N // BATCH, k=3))
    opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    plain.train()
    for step, batch in enumerate(batches[:STEPS], start=1):
        plain(**batch).loss.backward()
        plain.avf.step(step)
        opt.step()
        opt.zero_grad()
    assert plain.avf.history == trainer_history
    for (n, a), (_, b) in zip(plain.trainable_vectors().items(), model.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)


def test_trainer_resume_continues_with_the_same_frozen_sets(tmp_path):
    ref = _model()
    Trainer(model=ref, args=_args(tmp_path / "ref"), train_dataset=_data(), callbacks=[AVFCallback()]).train()

    out = tmp_path / "run"
    interrupted = _model()
    args = _args(out, save_strategy="steps", save_steps=6)
    Trainer(model=interrupted, args=args, train_dataset=_data(), callbacks=[AVFCallback(), _StopAt(6)]).train()
    assert (out / "checkpoint-6").is_dir()
    assert len(interrupted.avf.history) < len(ref.avf.history)

    resumed = _model()  # fresh process: rebuild from the base, then resume
    Trainer(model=resumed, args=args, train_dataset=_data(), callbacks=[AVFCallback()]).train(
        resume_from_checkpoint=str(out / "checkpoint-6")
    )
    assert resumed.avf.history == ref.avf.history
    for (n, a), (_, b) in zip(resumed.trainable_vectors().items(), ref.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
