#!/usr/bin/env python
"""VectorFit with a plain Hugging Face ``Trainer``: checkpoints and the final save are adapters, as with peft.

    python examples/train_with_trainer.py                     # 1,024 sentences, 2 epochs: ~2 min on 2 cores
    python examples/train_with_trainer.py --train-examples 64 --epochs 1 --eval-examples 32   # a smoke run

A VectorFit model is a ``peft.PeftModel``, so the plain ``Trainer`` treats it as it treats LoRA:
``save_model()`` and every ``checkpoint-*`` hold the adapter (``adapter_config.json`` +
``adapter_model.safetensors``, Adaptive Vector Freezing's state included) instead of the whole base
model, and ``resume_from_checkpoint`` / ``load_best_model_at_end`` read it back. The one addition is
``AVFCallback``, which runs AVF between the backward pass and the optimizer step.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

from vectorfit import VectorFitConfig, get_vectorfit_model
from vectorfit.integrations import AVFCallback
from vectorfit_recipes.data import load_dataset
from vectorfit_recipes.models import model_path


def encode(examples, tokenizer):
    """A list of feature dicts, which ``Trainer`` accepts as a dataset."""
    enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=64)
    return [{"input_ids": ids, "attention_mask": mask, "labels": int(ex.label)}
            for ids, mask, ex in zip(enc["input_ids"], enc["attention_mask"], examples)]


def compute_metrics(pred) -> dict:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-examples", type=int, default=1024, help="training sentences (default: %(default)s)")
    ap.add_argument("--eval-examples", type=int, default=400, help="validation / test sentences (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=2, help="(default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: %(default)s; docs/guides/cli.md, 'Learning rates')")
    ap.add_argument("--out", default="out/trainer", help="output folder: checkpoints and the final adapter (default: %(default)s)")
    args = ap.parse_args()

    data = load_dataset("movie")
    path = model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)  # the files are ordered by sentiment: take random subsets, not the first n
    train = encode(rng.sample(data.train, min(args.train_examples, len(data.train))), tokenizer)
    validation = encode(rng.sample(data.validation, min(args.eval_examples, len(data.validation))), tokenizer)
    test = encode(rng.sample(data.test, min(args.eval_examples, len(data.test))), tokenizer)

    torch.manual_seed(0)  # the new head's initialisation
    # transformers prints a LOAD REPORT listing classifier.* as MISSING: expected, the head is new.
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_vectorfit_model(base, VectorFitConfig(task_type="SEQ_CLS"))  # = peft.get_peft_model(base, config)
    model.print_trainable_parameters()

    training_args = TrainingArguments(
        output_dir=args.out,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        lr_scheduler_type="constant",  # the paper's setting: AdamW, no warm-up, no decay
        weight_decay=0.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,  # reads the best checkpoint's adapter back
        metric_for_best_model="accuracy",
        logging_strategy="epoch",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[AVFCallback()],  # AVF's schedule comes from the Trainer's run length
    )
    trainer.train()
    print("AVF steps taken:", [h["step"] for h in model.avf.history])
    print("test:", trainer.evaluate(test, metric_key_prefix="test"))
    trainer.save_model()  # the adapter, not the base model
    print(f"{args.out} holds {sorted(f for f in os.listdir(args.out) if not f.startswith('checkpoint-'))}")

    # The output folder is a peft adapter folder.
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = PeftModel.from_pretrained(fresh, args.out)
    reloaded.eval()
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], return_tensors="pt", padding=True)
    with torch.no_grad():
        print("predictions for two new sentences (1 = positive):", reloaded(**batch).logits.argmax(-1).tolist())


if __name__ == "__main__":
    main()
