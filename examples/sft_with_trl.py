#!/usr/bin/env python
"""Supervised fine-tuning of a causal LM with TRL's ``SFTTrainer`` and a VectorFit adapter.

    python examples/sft_with_trl.py                  # SmolLM2-135M, BBC article -> headline, 64 steps
    python examples/sft_with_trl.py --max-steps 4 --train-examples 16   # a smoke run

``SFTTrainer(..., peft_config=VectorFitConfig(task_type="CAUSAL_LM"))`` wraps the model exactly as it
wraps a ``LoraConfig``; ``AVFCallback`` runs Adaptive Vector Freezing. The saved folder is a peft
adapter (``AutoPeftModelForCausalLM`` or ``PeftModel.from_pretrained`` load it). Only the completion
(the headline) is trained on, TRL's default for prompt/completion data.

Precision: ``SFTConfig`` turns on bf16 autocast where the hardware has it. VectorFit's frozen
factors ``U``, ``Vh`` stay in the model's dtype (fp32 here) and are cast inside autocast like any
weight; the trained vectors are float32 parameters either way. Pass ``--bf16`` to ask for it on a CPU.
The BBC data is for non-commercial research only.
"""

from __future__ import annotations

import argparse
import random

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from vectorfit import AVFConfig, VectorFitConfig
from vectorfit.integrations import AVFCallback
from vectorfit_recipes.data import load_dataset
from vectorfit_recipes.models import load_causal_lm, load_tokenizer
from vectorfit_recipes.nlg import build_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face folder (default: %(default)s)")
    ap.add_argument("--train-examples", type=int, default=256, help="articles to train on (default: %(default)s)")
    ap.add_argument("--max-steps", type=int, default=64, help="optimizer steps (default: %(default)s)")
    ap.add_argument("--article-tokens", type=int, default=96, help="article tokens kept in a prompt (default: %(default)s)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example, prompt + completion (default: %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s, the paper's)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (SFTConfig's default on a GPU that has it)")
    ap.add_argument("--out", default="out/sft", help="output folder (default: %(default)s)")
    args = ap.parse_args()

    tok = load_tokenizer(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = random.Random(0).sample(load_dataset("bbc-headline").train, args.train_examples)
    data = Dataset.from_list([{"prompt": build_prompt(tok, ex.source, args.article_tokens),
                               "completion": " " + ex.target + (tok.eos_token or "")} for ex in rows])
    model = load_causal_lm(args.model)
    config = SFTConfig(output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=8, learning_rate=args.lr,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, args.max_steps // 4),
                       save_strategy="no", report_to=[], bf16=args.bf16, use_cpu=not torch.cuda.is_available(),
                       max_length=args.max_length, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=VectorFitConfig(task_type="CAUSAL_LM", avf=AVFConfig(k=5)), callbacks=[AVFCallback()])
    trainer.model.print_trainable_parameters()
    trainer.train()
    print("AVF steps taken:", [h["step"] for h in trainer.model.avf.history])
    trainer.save_model()
    print(f"adapter saved to {args.out}")

    trainer.model.eval()
    ex = rows[0]
    ids = tok(build_prompt(tok, ex.source, args.article_tokens), return_tensors="pt")
    with torch.no_grad():
        out = trainer.model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    print("reference:", ex.target)
    print("generated:", tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
