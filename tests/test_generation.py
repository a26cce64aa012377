"""Text generation: ``generate()`` with the KV cache gives the same greedy tokens for the
trained wrapped model, the adapter saved and reloaded onto a fresh base, and the merged model; the
``vectorfit generate`` command prints what the Python API generates; the generation speed benchmark
runs (smoke size: its numbers are measured by the script, not asserted here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_tiny_gpt2, make_tiny_llama, train_steps

from vectorfit import VectorFitConfig, VectorFitLayer, VectorFitModel, get_vectorfit_model
from vectorfit_recipes import cli
from vectorfit_recipes import generate_cli

ROOT = Path(__file__).resolve().parents[1]

#: Logits of every decoding step agree to this (max |difference| / max |logit|): the wrapped model
#: computes U diag(s) Vh x (factorised, or with a cached dense W), the merged one W x with W built
#: once in float32 -- the same numbers up to float32 round-off (~1e-7 measured).
LOGIT_RTOL = 1e-5

PAD = 0
NEW_TOKENS = 8
# Three prompts of different lengths, left-padded with PAD (attention mask 0 on the padding).
PROMPTS = torch.tensor([[PAD, PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15], [PAD, PAD, PAD, PAD, PAD, 20, 21]])
MASK = (PROMPTS != PAD).long()

BUILDERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def _generate(model, use_cache: bool = True):
    with torch.no_grad():
        return model.generate(input_ids=PROMPTS, attention_mask=MASK, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=PAD, use_cache=use_cache, output_logits=True, return_dict_in_generate=True)


def _trained(arch: str):
    """The default variant (singular values and biases; Llama's zero-initialised biases) after a few
    AdamW steps of next-token loss on random sequences."""
    vf = get_vectorfit_model(BUILDERS[arch](0), VectorFitConfig())
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    vf.train()
    train_steps(vf, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, steps=4, lr=1e-2)
    vf.eval()
    return vf


def _logit_gap(a, b) -> float:
    """max over decoding steps of max |a - b| / max |b|."""
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a.logits, b.logits))


def _smallest_margin(out) -> float:
    """The smallest gap between the best and second-best logit over all steps and rows, relative to
    the largest logit: greedy tokens cannot flip under differences well below it."""
    gaps = [(s.topk(2).values[:, 0] - s.topk(2).values[:, 1]).min() / s.abs().max() for s in out.logits]
    return float(min(gaps))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_wrapped_reloaded_and_merged_generate_the_same_tokens(arch, tmp_path):
    vf = _trained(arch)
    layers = dict(vf.vectorfit_layers())
    sigma_layers = [layer for layer in layers.values() if "default" in layer.vectorfit_sigma]
    bias_layers = [layer for layer in layers.values() if "default" in layer.vectorfit_bias]
    assert sigma_layers and bias_layers
    # the adapter changed something: singular values and biases moved
    assert max(float((layer.sigma.detach() - layer.sigma0).abs().max()) for layer in sigma_layers) > 1e-3
    assert max(float((layer.vectorfit_bias["default"].detach() - layer.bias0).abs().max()) for layer in bias_layers) > 1e-3
    if arch == "gpt2":  # GPT-2's attention and MLP matrices are transposed Conv1D layers
        assert all(layer.conv1d and type(layer.base_layer).__name__ == "Conv1D" for layer in layers.values())

    wrapped = _generate(vf)
    base = _generate(BUILDERS[arch](0))
    cont = wrapped.sequences[:, PROMPTS.shape[1]:]
    assert cont.shape == (3, NEW_TOKENS)
    assert not torch.equal(cont, base.sequences[:, PROMPTS.shape[1]:]), "the adapter does not change the output"
    # the test can only pass by computing the same logits, not by luck: every greedy choice has a
    # margin well above the tolerance (so logits within it cannot pick another token)
    assert _smallest_margin(wrapped) > 10 * LOGIT_RTOL
    # the KV cache changes nothing
    no_cache = _generate(vf, use_cache=False)
    assert torch.equal(no_cache.sequences, wrapped.sequences) and _logit_gap(no_cache, wrapped) < LOGIT_RTOL
    # while sigma does not change, generation runs on the cached dense weight (one GEMM per layer)
    assert all(getattr(layer, "_vf_dense_cache", None) is not None for layer in sigma_layers)

    # (b) saved, then reloaded onto a fresh copy of the base
    vf.save_pretrained(tmp_path / "adapter")
    record = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["targets"]
    assert set(record) == set(layers) and all(info["conv1d"] == (arch == "gpt2") for info in record.values())
    reloaded = VectorFitModel.from_pretrained(BUILDERS[arch](0), tmp_path / "adapter")
    out = _generate(reloaded)
    assert torch.equal(out.sequences, wrapped.sequences) and _logit_gap(out, wrapped) < LOGIT_RTOL

    # (c) merged in place, then merged into plain layers
    vf.merge()
    out = _generate(vf)
    assert torch.equal(out.sequences, wrapped.sequences) and _logit_gap(out, wrapped) < LOGIT_RTOL
    vf.unmerge()
    merged = vf.merge_and_unload()
    assert not any(isinstance(m, VectorFitLayer) for m in merged.modules())
    out = _generate(merged)
    assert torch.equal(out.sequences, wrapped.sequences) and _logit_gap(out, wrapped) < LOGIT_RTOL


def test_a_batch_generates_what_each_prompt_generates_alone():
    """Left padding is masked: a padded row continues exactly as the same prompt alone."""
    vf = _trained("llama")
    batch = _generate(vf)
    for i in range(PROMPTS.shape[0]):
        ids = PROMPTS[i : i + 1, MASK[i].bool()]
        with torch.no_grad():
            alone = vf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=PAD)
        assert torch.equal(alone[0, ids.shape[1]:], batch.sequences[i, PROMPTS.shape[1]:]), i


# ------------------------------------------------------------------------------ vectorfit generate
WORDS = ["[PAD]", "<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 4)]
CHAT_TEMPLATE = ("{% for m in messages %}<s> w1 {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w2{% endif %}")


def _save_tiny_llama(folder: Path, seed: int) -> Path:
    """A tiny random Llama with a real (word-level) tokenizer and a chat template, saved as a
    Hugging Face folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins the words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")
    fast.chat_template = CHAT_TEMPLATE
    model = make_tiny_llama(seed, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """(base folder, VectorFit adapter trained on it, a second base with its own adapter)."""
    root = tmp_path_factory.mktemp("generate")
    base = _save_tiny_llama(root / "base", 0)
    other = _save_tiny_llama(root / "other", 1)
    for folder, name in ((base, "adapter"), (other, "other-adapter")):
        from transformers import AutoModelForCausalLM

        vf = get_vectorfit_model(AutoModelForCausalLM.from_pretrained(folder), VectorFitConfig())
        ids = torch.randint(4, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
        vf.train()
        train_steps(vf, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}, steps=3, lr=5e-3)
        vf.save_pretrained(root / name)
    return base, root / "adapter", root / "other-adapter"


CLI_PROMPTS = ["w5 w6 w7 w8", "w9 w10", "w30 w31 w32"]


def _api_outputs(base: Path, adapter, chat: bool, max_new_tokens: int = 6) -> list:
    """What a user of the Python API gets: transformers + VectorFitModel.from_pretrained, greedy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base)
    if adapter is not None:
        model = VectorFitModel.from_pretrained(model, adapter)
    texts = CLI_PROMPTS
    if chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in CLI_PROMPTS]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    with torch.no_grad():
        seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return [t.strip() for t in tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def _cli_jsonl(capsys, argv: list) -> list:
    assert cli.main(["generate", *argv, "--jsonl"]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == CLI_PROMPTS
    return [r["output"] for r in rows]


def test_generate_command_prints_what_the_python_api_generates(llama_folder, capsys):
    base, adapter, _ = llama_folder
    prompts = [a for p in CLI_PROMPTS for a in ("--prompt", p)]
    common = ["--model", str(base), *prompts, "--max-new-tokens", "6"]
    expected = _api_outputs(base, adapter, chat=True)
    assert any(expected), expected  # something is generated (not only end-of-sequence)
    # the tokenizer has a chat template: used by default
    assert _cli_jsonl(capsys, [*common, "--adapter", str(adapter)]) == expected
    assert _cli_jsonl(capsys, [*common, "--adapter", str(adapter), "--merge", "--batch-size", "2"]) == expected
    plain = _api_outputs(base, adapter, chat=False)
    assert plain != expected  # so the comparisons below tell whether the template was applied
    assert _cli_jsonl(capsys, [*common, "--adapter", str(adapter), "--no-chat"]) == plain
    # without --adapter: the base model, which generates something else
    base_out = _cli_jsonl(capsys, [*common, "--no-chat"])
    assert base_out == _api_outputs(base, None, chat=False) and base_out != plain


def test_generate_command_end_to_end_in_a_subprocess(llama_folder, tmp_path):
    base, adapter, _ = llama_folder
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(CLI_PROMPTS[0] + "\n\n" + CLI_PROMPTS[1] + "\n")
    cmd = [sys.executable, "-m", "vectorfit_recipes", "generate", "--model", str(base), "--adapter", str(adapter),
           "--prompt-file", str(prompt_file), "--max-new-tokens", "6", "--no-chat"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    expected = _api_outputs(base, adapter, chat=False)[:2]
    assert proc.stdout == f"=== 1: {CLI_PROMPTS[0]}\n{expected[0]}\n\n=== 2: {CLI_PROMPTS[1]}\n{expected[1]}\n"
    assert "vectorfit adapter" in proc.stderr and "greedy" in proc.stderr


def test_generate_command_reads_peft_adapters_and_trained_parameters(llama_folder, tmp_path, capsys):
    """What `vectorfit train --save-adapter` writes for the baselines: a peft adapter (LoRA), or a
    model.safetensors of the trained parameters by name (BitFit, full fine-tuning)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _, _ = llama_folder
    tok = AutoTokenizer.from_pretrained(base, padding_side="left")
    enc = tok(CLI_PROMPTS, return_tensors="pt", padding=True)

    def api(model) -> list:
        with torch.no_grad():
            seqs = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        return [t.strip() for t in tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]

    argv = ["--model", str(base), "--max-new-tokens", "6", "--no-chat"] + [a for p in CLI_PROMPTS for a in ("--prompt", p)]
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=1, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    lora.save_pretrained(tmp_path / "lora")
    expected = api(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "lora"))
    assert expected != api(AutoModelForCausalLM.from_pretrained(base))
    assert _cli_jsonl(capsys, [*argv, "--adapter", str(tmp_path / "lora")]) == expected
    assert _cli_jsonl(capsys, [*argv, "--adapter", str(tmp_path / "lora"), "--merge"]) == expected

    tuned = AutoModelForCausalLM.from_pretrained(base)
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        w = tuned.get_parameter(name)
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    (tmp_path / "full").mkdir()
    save_file({name: w.detach().clone()}, str(tmp_path / "full" / "model.safetensors"))
    assert _cli_jsonl(capsys, [*argv, "--adapter", str(tmp_path / "full")]) == api(tuned) != api(
        AutoModelForCausalLM.from_pretrained(base))
    (tmp_path / "other").mkdir()
    save_file({"transformer.h.0.ln_1.weight": torch.ones(4)}, str(tmp_path / "other" / "model.safetensors"))
    err = _error_of(capsys, [*argv, "--adapter", str(tmp_path / "other")])
    assert "this model does not have (first: 'transformer.h.0.ln_1.weight')" in err


def test_sampling_is_seeded(llama_folder, capsys):
    base, adapter, _ = llama_folder
    argv = ["--model", str(base), "--adapter", str(adapter), "--max-new-tokens", "8", "--no-chat"]
    argv += [a for p in CLI_PROMPTS for a in ("--prompt", p)]
    sampling = ["--temperature", "1.5", "--top-p", "0.95"]
    first = _cli_jsonl(capsys, [*argv, *sampling, "--seed", "1"])
    assert _cli_jsonl(capsys, [*argv, *sampling, "--seed", "1"]) == first
    assert first != _cli_jsonl(capsys, [*argv, *sampling, "--seed", "2"])
    greedy = _cli_jsonl(capsys, argv)
    assert _cli_jsonl(capsys, [*argv, "--temperature", "0", "--seed", "2"]) == greedy  # 0: greedy, seed unused
    assert first != greedy


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model or tokenizer is loaded: these checks must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded; the arguments should have been rejected first")

    monkeypatch.setattr(generate_cli, "load_base", refuse)
    monkeypatch.setattr(generate_cli, "load_tokenizer", refuse)


def _error_of(capsys, argv: list) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    # (transformers' weight-loading progress bar may come first)
    assert "usage: vectorfit generate" in err and "Traceback" not in err, err[-1000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("vectorfit generate: error: "), err[-500:]
    return lines[0]


def test_bad_arguments_are_rejected_before_loading_anything(llama_folder, tmp_path, capsys, no_loading):
    base, adapter, _ = llama_folder
    ok = ["--model", str(base), "--prompt", "w5"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "not-an-adapter").mkdir()
    cases = [
        ([*ok, "--adapter", str(tmp_path / "missing")], "no such folder"),
        ([*ok, "--adapter", str(tmp_path / "not-an-adapter")], "no adapter in this folder"),
        (["--model", str(base)], "no prompt"),
        (["--model", str(base), "--prompt-file", str(tmp_path / "nope.txt")], "--prompt-file"),
        (["--model", str(base), "--prompt-file", str(tmp_path / "empty.txt")], "holds no prompt"),
        (["--model", str(tmp_path / "missing-model"), "--prompt", "w5"], "neither a model folder nor a registered"),
        (["--model", str(tmp_path), "--prompt", "w5"], "no config.json"),
        (["--model", "minilm", "--prompt", "w5"], "not a causal language model"),
        ([*ok, "--max-new-tokens", "0"], "--max-new-tokens 0"),
        ([*ok, "--top-p", "1.5"], "--top-p 1.5"),
        ([*ok, "--temperature", "-1"], "--temperature -1.0"),
        ([*ok, "--temperature", "0", "--top-p", "0.9"], "give one of them"),
        ([*ok, "--merge"], "--merge needs --adapter"),
        ([*ok, "--device", "nonsense"], "--device 'nonsense'"),
    ]
    for argv, expected in cases:
        assert expected in _error_of(capsys, argv), argv


def test_an_adapter_of_another_base_is_refused_without_a_traceback(llama_folder, capsys):
    base, _, other_adapter = llama_folder
    err = _error_of(capsys, ["--model", str(base), "--adapter", str(other_adapter), "--prompt", "w5"])
    assert "cannot use --adapter" in err and "base model mismatch" in err


def test_chat_without_a_template_is_refused(llama_folder, tmp_path, capsys):
    import shutil

    base, _, _ = llama_folder
    plain = tmp_path / "plain"
    shutil.copytree(base, plain)
    (plain / "chat_template.jinja").unlink()
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "has no chat template" in _error_of(capsys, ["--model", str(plain), "--prompt", "w5", "--chat"])


# ------------------------------------------------------------------------------ speed benchmark
def test_generation_speed_benchmark_smoke(tmp_path):
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation_speed.py"), "--model", "tiny", "--smoke",
           "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    methods = ["base", "vectorfit_unmerged", "vectorfit_merged", "lora_unmerged", "lora_merged"]
    assert res["methods"] == methods and res["smoke"] is True
    for b in res["batches"]:
        for m in methods:
            r = res["results"][str(b)][m]
            assert r["tokens_per_s"] > 0 and len(r["raw_s"]) == res["repeats"]
            assert f"| {m} |" in proc.stdout
        # a merged model generates what its unmerged form generates
        assert res["results"][str(b)]["same_tokens"] == {"vectorfit": True, "lora": True}
