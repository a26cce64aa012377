#!/usr/bin/env python
"""Generation speed with the KV cache: base model vs VectorFit and peft LoRA r=1, unmerged and merged.

What text generation costs. ``model.generate`` (greedy, KV cache on, exactly ``--new-tokens`` new
tokens per row: end-of-sequence is suppressed until then) on random-token prompts of
``--prompt-len`` tokens, at each batch size of ``--batches``, for:

* ``base``: the unmodified model;
* ``vectorfit_unmerged``: ``get_vectorfit_model`` with the default variant (singular values and
  biases; Llama has no biases, so zero-initialised ones are added), vectors moved off their
  pre-trained values as a trained adapter's are. While sigma does not change, each layer computes
  with a cached rebuilt weight (``vectorfit.functional``): the target is within 5% of ``base``;
* ``vectorfit_merged``: the same adapter after ``merge_and_unload()`` (plain ``nn.Linear``; target:
  within noise of ``base`` -- the only extra work is the added biases);
* ``lora_unmerged`` / ``lora_merged``: peft LoRA r=1 on the same target modules, ``lora_B`` moved off
  zero, before and after ``merge_and_unload()``;
* optionally ``vectorfit_factorised`` (``--methods``): the unmerged model forced to the factorised
  path (``U (s * (Vh x))``, no cached weight), to show what the cache buys.

All models are built once and timed side by side: the repeats are interleaved round-robin (the
order reversed every other round) after ``--warmup`` rounds, so that drift of a shared machine hits
every method alike. Reported per batch size: median wall time of one ``generate`` call, tokens per
second (new tokens of the whole batch / median time), the ratio to ``base`` (tokens/s, from the
medians) and the quartiles of the round-by-round ratio (each round times every method once). It
also checks that each merged model generates the same tokens as its unmerged form.

Usage::

    python benchmarks/generation_speed.py                       # smollm2, batches 1 and 8, 32 + 64 tokens
    python benchmarks/generation_speed.py --model tiny --smoke  # seconds: a tiny random Llama, no JSON
    python benchmarks/generation_speed.py --threads 2 --repeats 9

Writes ``benchmarks/speed/generation-<model>.json`` (``--json`` to change; a ``--smoke`` run writes
only where ``--json`` says) with the exact command, versions and machine information, and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import speed  # noqa: E402  (machine information, versions, medians, paired ratios, _materialise)
from _memory import trim  # noqa: E402

METHODS = ("base", "vectorfit_unmerged", "vectorfit_merged", "lora_unmerged", "lora_merged")
OPTIONAL = ("vectorfit_factorised",)
#: How far the benchmark moves the trained vectors from their pre-trained values (relative, random):
#: the size of a real adapter's change; any nonzero change makes merged weights differ from the base.
PERTURB = 0.02


# ================================================================================ models
def load_base(name: str) -> tuple[torch.nn.Module, str]:
    """The causal LM ``name`` in float32, in ordinary memory, and how it was loaded."""
    import transformers as T

    T.logging.set_verbosity_error()
    if name == "tiny":
        torch.manual_seed(0)
        cfg = T.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        return T.LlamaForCausalLM(cfg).eval(), "random tiny LlamaForCausalLM (hidden 64, 2 layers, vocab 256)"
    if name != "smollm2":
        raise SystemExit(f"--model {name!r}: use smollm2 or tiny")
    from vectorfit_recipes import models

    if hasattr(models, "load_causal_lm"):
        m, how = models.load_causal_lm("smollm2"), "vectorfit_recipes.models.load_causal_lm('smollm2')"
    else:
        import _smollm2

        m = T.AutoModelForCausalLM.from_pretrained(str(_smollm2.model_dir()), dtype=torch.float32)
        how = f"benchmarks/_smollm2.py ({_smollm2.PACKAGE}=={_smollm2.VERSION}, de-quantised to fp32)"
    return speed._materialise(m.float().eval()), how


@torch.no_grad()
def _perturb(params: list, seed: int, absolute: Optional[float] = None) -> None:
    """Move each tensor by ``PERTURB`` times its mean magnitude (or ``absolute``) times N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        noise = torch.randn(p.shape, generator=g).to(p.dtype)
        scale = absolute if absolute is not None else PERTURB * float(p.abs().mean().clamp_min(1e-3))
        p.add_(scale * noise)


def build_models(base: torch.nn.Module, methods: list) -> dict[str, torch.nn.Module]:
    """Every method's model, from deep copies of ``base``, in eval mode."""
    from vectorfit import VectorFitConfig, get_vectorfit_model, target_module_names

    targets = target_module_names(base, VectorFitConfig())
    out: dict[str, torch.nn.Module] = {}
    if "base" in methods:
        out["base"] = copy.deepcopy(base)
    if any(m.startswith("vectorfit") for m in methods):
        vf = get_vectorfit_model(copy.deepcopy(base), VectorFitConfig(progress=False))
        _perturb(list(vf.trainable_vectors().values()), seed=1)
        if "vectorfit_merged" in methods:
            out["vectorfit_merged"] = copy.deepcopy(vf).merge_and_unload()
        if "vectorfit_unmerged" in methods:
            out["vectorfit_unmerged"] = vf
        if "vectorfit_factorised" in methods:
            out["vectorfit_factorised"] = vf if "vectorfit_unmerged" not in methods else copy.deepcopy(vf)
    if any(m.startswith("lora") for m in methods):
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets))
        # lora_B starts at zero (the adapter would be a no-op); move it as training would.
        _perturb([p for n, p in lora.named_parameters() if "lora_B" in n], seed=2, absolute=PERTURB)
        if "lora_merged" in methods:
            out["lora_merged"] = copy.deepcopy(lora).merge_and_unload()
        if "lora_unmerged" in methods:
            out["lora_unmerged"] = lora
    for m in out.values():
        m.eval()
    trim()
    return {m: out[m] for m in methods}


# ================================================================================ measurement
def make_prompts(vocab: int, batch: int, length: int, seed: int = 0) -> dict:
    """Random token ids (a speed benchmark: the values do not matter), away from the special ids."""
    g = torch.Generator().manual_seed(seed)
    low = min(100, vocab // 4)
    ids = torch.randint(low, vocab, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate_once(name: str, model: torch.nn.Module, inputs: dict, new_tokens: int, pad: int) -> tuple[float, torch.Tensor]:
    """One timed ``generate`` call: ``(seconds, generated tokens)``."""
    from vectorfit.functional import force_path

    # (VECTORFIT_LAYER_PATH, if set, still applies to the other methods)
    path = force_path("factorised") if name == "vectorfit_factorised" else contextlib.nullcontext()
    gc.collect()
    with path, torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad)
        dt = time.perf_counter() - t0
    return dt, out[:, inputs["input_ids"].shape[1]:]


def measure(models: dict, vocab: int, pad: int, batch: int, prompt_len: int, new_tokens: int, warmup: int,
            repeats: int) -> dict:
    """Interleaved repeats of every method at one batch size."""
    inputs = make_prompts(vocab, batch, prompt_len)
    order = list(models)
    times: dict[str, list] = {m: [] for m in order}
    tokens: dict[str, torch.Tensor] = {}
    for i in range(warmup + repeats):
        for name in (order if i % 2 == 0 else order[::-1]):
            dt, out = generate_once(name, models[name], inputs, new_tokens, pad)
            assert out.shape == (batch, new_tokens), (name, tuple(out.shape))
            tokens.setdefault(name, out)
            if i >= warmup:
                times[name].append(dt)
    res: dict[str, Any] = {}
    for name in order:
        med = speed.median(times[name])
        res[name] = {"median_s": med, "min_s": min(times[name]), "raw_s": times[name],
                     "tokens_per_s": batch * new_tokens / med}
        if "base" in times:
            res[name]["speed_vs_base"] = speed.median(times["base"]) / med
            # round-by-round base_time / method_time: > 1 means faster than the base
            res[name]["speed_vs_base_paired_quartiles"] = speed.paired_quartiles(times["base"], times[name])
    res["same_tokens"] = {}
    for kind in ("vectorfit", "lora"):
        a, b = tokens.get(f"{kind}_unmerged"), tokens.get(f"{kind}_merged")
        if a is not None and b is not None:
            res["same_tokens"][kind] = bool(torch.equal(a, b))
    return res


# ================================================================================ report
def print_table(res: dict) -> None:
    batches = res["batches"]
    head = "| method |" + "".join(f" batch {b} tok/s | vs base (paired q1-q3) |" for b in batches)
    print(f"\n### Generation speed: {res['model']}, {res['prompt_len']}-token prompts, {res['new_tokens']} new tokens, "
          f"greedy, KV cache (median of {res['repeats']}, {res['machine']['torch_threads']} threads)\n")
    print(head)
    print("|---|" + "---:|---:|" * len(batches))
    for m in res["methods"]:
        row = f"| {m} |"
        for b in batches:
            r = res["results"][str(b)][m]
            q = r.get("speed_vs_base_paired_quartiles")
            spread = f" ({q[0]:.3f}-{q[2]:.3f})" if q else ""
            ratio = f"{r['speed_vs_base']:.3f}{spread}" if r.get("speed_vs_base") else "-"
            row += f" {r['tokens_per_s']:.1f} | {ratio} |"
        print(row)
    for b in batches:
        same = res["results"][str(b)]["same_tokens"]
        if same:
            print(f"\nbatch {b}: merged generates the same tokens as unmerged: "
                  + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items()), end="")
    print("\n\n(vs base: tokens/s of the method / tokens/s of the base model; > 1 is faster.)")


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 (SmolLM2-135M-Instruct, fp32) or tiny (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS + OPTIONAL)} (default: the first five)")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: 32; 8 with --smoke)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per row (default: 64; 8 with --smoke)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 7; 2 with --smoke)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--smoke", action="store_true", help="a few seconds: short runs, numbers meaningless, no JSON "
                                                        "unless --json")
    p.add_argument("--json", default=None, help="result file (default: benchmarks/speed/generation-<model>.json; "
                                                "none with --smoke)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS + OPTIONAL]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS + OPTIONAL)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    prompt_len = args.prompt_len or (8 if args.smoke else 32)
    new_tokens = args.new_tokens or (8 if args.smoke else 64)
    repeats = args.repeats or (2 if args.smoke else 7)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "benchmarks/generation_speed.py",
                                                *(argv if argv is not None else sys.argv[1:])])
    t_start = time.perf_counter()
    load_before = speed.loadavg()
    base, how = load_base(args.model)
    vocab = base.config.vocab_size
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else (base.config.eos_token_id or 0)
    if isinstance(pad, list):
        pad = pad[0]
    t0 = time.perf_counter()
    models = build_models(base, methods)
    setup_s = time.perf_counter() - t0
    del base
    trim()
    results = {}
    for b in batches:
        print(f"batch {b}: {len(methods)} methods x ({args.warmup} warm-up + {repeats}) generate calls ...", flush=True)
        results[str(b)] = measure(models, vocab, int(pad), b, prompt_len, new_tokens, args.warmup, repeats)
    res = {
        "command": command, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": speed.versions(),
        "machine": speed.machine_info(), "loadavg_before": load_before, "loadavg_after": speed.loadavg(),
        "env": {k: os.environ[k] for k in ("VECTORFIT_LAYER_PATH", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "model": args.model, "model_source": how, "smoke": args.smoke, "methods": methods, "batches": batches,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "warmup": args.warmup, "repeats": repeats,
        "perturb": PERTURB, "setup_s": setup_s, "results": results,
    }
    res["wall_s"] = time.perf_counter() - t_start
    print_table(res)
    out = args.json or (None if args.smoke else str(HERE / "speed" / f"generation-{args.model}.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
        print(f"wrote {out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
