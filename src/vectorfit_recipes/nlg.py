"""Generation tasks for ``vectorfit train`` (``bbc-headline``): prompts, a loss on the target tokens
only, batched greedy generation, and ROUGE.

* Prompt: the model's chat template (SmolLM2-Instruct: ChatML with its default system line) around one
  user turn, :data:`INSTRUCTION` followed by the article body cut to ``article_tokens`` tokens
  (``--max-len``); the assistant turn is opened (``add_generation_prompt``).
* Target: the headline's tokens (at most :data:`MAX_TARGET_TOKENS` - 1) and the end-of-turn token
  (``eos``), i.e. exactly what the instruct model is expected to produce after the prompt.
* Training batches are padded on the left, so every target ends at the last position: the model
  computes logits only for the last ``max target length + 1`` positions (``logits_to_keep``; the
  output head over SmolLM2's 49,152-word vocabulary is ~20% of a forward pass) and the labels are the
  target tokens there, ``-100`` everywhere else (prompt and padding), so the loss is the mean
  cross-entropy over the batch's target tokens (transformers' causal-LM loss).
* Evaluation: greedy decoding (``generate``, KV cache), at most :data:`MAX_NEW_TOKENS` new tokens,
  prompts left-padded and batched by length; the output is the decoded new tokens up to the first
  ``eos``, whitespace collapsed. ROUGE-1/2/L F1 x 100 from Google's ``rouge-score`` package (the
  reference implementation of XSum papers), Porter stemming on, averaged over examples. ``rougeL`` is
  the metric that selects the epoch.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

__all__ = ["INSTRUCTION", "MAX_TARGET_TOKENS", "MAX_NEW_TOKENS", "ROUGE_KEYS", "N_SAMPLES", "build_prompt",
           "Encoded", "generate", "rouge", "evaluate", "result_fields"]

INSTRUCTION = "Write the headline of this BBC News article."
MAX_TARGET_TOKENS = 32  # headline tokens + eos; BBC headlines have 3-9 words (<= 25 SmolLM2 tokens)
MAX_NEW_TOKENS = 24  # generation cap
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
N_SAMPLES = 6  # (input head, reference, output) triples kept per evaluation for the report
SAMPLE_HEAD_CHARS = 160


def build_prompt(tokenizer: Any, source: str, article_tokens: Optional[int] = None) -> str:
    """The prompt text for one article: the instruction and the body cut to ``article_tokens`` tokens,
    in the tokenizer's chat template (a plain ``...\\n\\nHeadline:`` form if it has none)."""
    body = source
    if article_tokens is not None:
        ids = tokenizer(source, add_special_tokens=False)["input_ids"]
        if len(ids) > article_tokens:
            body = tokenizer.decode(ids[:article_tokens], skip_special_tokens=True).rstrip() + " ..."
    content = f"{INSTRUCTION}\n\n{body}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{content}\n\nHeadline:"


class Encoded:
    """One split of a generation task, tokenised once (the interface of ``train._Encoded``:
    ``len()`` and ``batch(idx, device)`` giving the model's inputs with ``labels``)."""

    generation = True

    def __init__(self, tokenizer: Any, examples: Sequence[Any], article_tokens: int) -> None:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("a generation task needs a tokenizer with an eos token")
        self.tokenizer = tokenizer
        self.eos_id = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.sources = [ex.source for ex in examples]
        self.references = [ex.target for ex in examples]
        self.prompts = [build_prompt(tokenizer, s, article_tokens) for s in self.sources]
        self.prompt_ids: list[list[int]] = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in self.prompts]
        heads = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.references]
        self.target_ids: list[list[int]] = [h[: MAX_TARGET_TOKENS - 1] + [eos] for h in heads]
        self.ids = [p + t for p, t in zip(self.prompt_ids, self.target_ids)]  # training sequences
        self.evals: list[dict] = []  # every evaluation of this split: desc, ROUGE, samples

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, idx: Sequence[int], device: Any) -> dict:
        """Left-padded prompt + target; labels (the last ``logits_to_keep`` positions) are the target
        tokens, -100 elsewhere."""
        import torch

        seqs = [self.ids[i] for i in idx]
        width = max(len(s) for s in seqs)
        keep = max(len(self.target_ids[i]) for i in idx) + 1  # the last prompt token predicts the first target token
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, (i, seq) in enumerate(zip(idx, seqs)):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
            t = self.target_ids[i]
            labels[row, width - len(t):] = torch.tensor(t, dtype=torch.long)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "position_ids": position_ids.to(device), "labels": labels[:, width - keep:].to(device),
                "logits_to_keep": keep}


def generate(model: Any, enc: Encoded, batch_size: int, device: Any, progress: bool = False,
             desc: str = "generate") -> list[str]:
    """Greedy outputs for every prompt of ``enc`` (in its order)."""
    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(enc)), key=lambda i: len(enc.prompt_ids[i]))  # less padding
    out: list[str] = [""] * len(enc)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False,
                          dynamic_ncols=True):
                idx = order[s: s + batch_size]
                width = max(len(enc.prompt_ids[i]) for i in idx)
                ids = torch.full((len(idx), width), enc.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    p = enc.prompt_ids[i]
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                     eos_token_id=enc.eos_id, pad_token_id=enc.pad_id)
                for row, i in enumerate(idx):
                    new = gen[row, width:].tolist()
                    if enc.eos_id in new:
                        new = new[: new.index(enc.eos_id)]
                    out[i] = " ".join(enc.tokenizer.decode(new, skip_special_tokens=True).split())
    finally:
        model.train(was_training)
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 (``rouge-score``, Porter stemmer on)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not references:
        raise ValueError("no examples to evaluate")
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("generation tasks need the `rouge-score` package: pip install rouge-score "
                          "(or the project's [recipes] extra)") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_KEYS, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)  # (target, prediction)
        for k in ROUGE_KEYS:
            sums[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(references) for k, v in sums.items()}


def _head(text: str) -> str:
    return text if len(text) <= SAMPLE_HEAD_CHARS else text[:SAMPLE_HEAD_CHARS].rsplit(" ", 1)[0] + " ..."


def evaluate(model: Any, enc: Encoded, batch_size: int, device: Any, progress: bool = False,
             desc: str = "eval") -> float:
    """Generate for the whole split and return its ROUGE-L F1 x 100 (the selection metric); the full
    ROUGE and the first :data:`N_SAMPLES` (input head, reference, output) are appended to ``enc.evals``."""
    preds = generate(model, enc, batch_size, device, progress, desc)
    scores = rouge(preds, enc.references)
    samples = [{"input_head": _head(enc.sources[i]), "reference": enc.references[i], "output": preds[i]}
               for i in range(min(N_SAMPLES, len(enc)))]
    enc.evals.append({"desc": desc, **scores, "samples": samples})
    return scores["rougeL"]


def _last(enc: Encoded, match: Any) -> Optional[dict]:
    hits = [e for e in enc.evals if match(e)]
    return hits[-1] if hits else None


def result_fields(data: Any, best_val: Optional[float], article_tokens: int) -> dict:
    """What a generation run's result records besides the train stages' fields: ROUGE-1/2/L of the
    test before and after fine-tuning and of the chosen validation, and sample outputs."""
    before = _last(data.test, lambda e: e["desc"] == "test (before)")
    # the kept weights' test: the final "test" evaluation, or the last curve point's when record reused it
    after = (_last(data.test, lambda e: e["desc"] == "test")
             or _last(data.test, lambda e: e["desc"].startswith("test @")))
    val = (None if best_val is None else
           _last(data.validation, lambda e: e["desc"].startswith("validation") and e["rougeL"] == best_val))

    def scores(e: Optional[dict]) -> Optional[dict]:
        return None if e is None else {k: e[k] for k in ROUGE_KEYS}

    return {
        "rouge": {"test": scores(after), "validation": scores(val), "test_before": scores(before)},
        "samples": None if after is None else after["samples"],
        "samples_before": None if before is None else before["samples"],
        "generation": {"instruction": INSTRUCTION, "article_tokens": article_tokens,
                       "max_new_tokens": MAX_NEW_TOKENS, "max_target_tokens": MAX_TARGET_TOKENS,
                       "decoding": "greedy", "rouge": "rouge-score 0.1.2, F1 x 100, use_stemmer=True"},
    }
