"""``vectorfit generate``: try a trained adapter on a causal language model in one line.

    vectorfit generate --model smollm2 --adapter out/adapter --prompt "Write a headline: ..."
    vectorfit generate --model PATH --adapter DIR --prompt-file prompts.txt --max-new-tokens 32
    vectorfit generate --model smollm2 --prompt "..."                # the base model, no adapter

``--model`` is a registered model name (``vectorfit data list``) or a local Hugging Face folder
(``config.json``, weights, tokenizer; ``--tokenizer`` takes the tokenizer from another model or
folder, e.g. for a merged model saved without one). ``--adapter`` is a folder written by ``vectorfit
train --save-adapter`` or ``save_pretrained``: a VectorFit adapter, a peft adapter (LoRA runs), or a
``model.safetensors`` of trained parameters by name (BitFit / full fine-tuning runs). A merged (full)
model folder is refused as ``--adapter`` (it belongs in ``--model``), and so is a damaged adapter
file or a ``model.safetensors`` that holds no tensor: either would otherwise fail with a traceback
or generate with the untouched base model under the adapter's name.

Decoding is greedy unless ``--temperature`` (> 0) or ``--top-p`` asks for sampling (seeded by
``--seed``). Prompts go through the tokenizer's chat template when it has one (``--no-chat`` to
send them as plain text), are left-padded into batches, and only the generated continuation is
printed: the bare text for one prompt, one block per prompt for several, or one JSON object per line
with ``--jsonl``. Messages about what was loaded go to stderr.

Every check that needs no weights (prompts, adapter folder, model name or folder, numbers, device)
runs before anything is loaded; a base the adapter was not trained on is refused with the library's
message, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .cli_messages import one_line

__all__ = ["add_arguments", "generate_command", "generate_texts", "load_base", "apply_adapter", "adapter_kind",
           "read_prompts"]

#: Adapter folder kinds: ``vectorfit`` (VectorFitModel.save_pretrained), ``peft`` (PeftModel.save_pretrained),
#: ``params`` (``model.safetensors`` of trained parameters by name, as ``vectorfit train`` saves BitFit/full FT).
ADAPTER_KINDS = ("vectorfit", "peft", "params")

#: Weight files of a whole Hugging Face model folder (one file or the index of shards).
FULL_MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")

#: Any of these in a model folder means a tokenizer was saved there (transformers writes
#: tokenizer_config.json with every tokenizer; the others are the vocabularies of older saves).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="a registered model name (see `vectorfit data list`) or a local Hugging Face model folder "
                        "(default: %(default)s)")
    p.add_argument("--tokenizer", default=None,
                   help="take the tokenizer from this registered model name or local folder instead of --model's "
                        "(for a model folder saved without its tokenizer, e.g. a merged model)")
    p.add_argument("--adapter", default=None,
                   help="adapter folder (vectorfit train --save-adapter / save_pretrained); without it the base "
                        "model generates")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt; repeat the flag for several")
    p.add_argument("--prompt-file", default=None, help="a UTF-8 text file with one prompt per line (blank lines skipped)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generated tokens per prompt at most (default: %(default)s)")
    p.add_argument("--merge", action="store_true",
                   help="merge the adapter into the weights before generating (same output, plain layers)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap each prompt in the tokenizer's chat template as a user message (default: on when the "
                        "tokenizer has a template)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample with this temperature (> 0); 0 or unset: greedy decoding")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest token set of this probability "
                                                             "(0 < p <= 1; turns sampling on)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--jsonl", action="store_true", help='print one JSON object {"prompt", "output"} per line')


# --------------------------------------------------------------------------------------- checks
@dataclass
class Request:
    """What ``vectorfit generate`` was asked to do, checked (nothing loaded yet)."""

    model: str
    model_dir: Optional[Path]  # a local folder, or None for a registered name
    tokenizer: str  # a registered name or a local folder (--tokenizer, else --model)
    tokenizer_dir: Optional[Path]
    adapter: Optional[Path]
    kind: Optional[str]  # one of ADAPTER_KINDS when adapter is given
    prompts: list
    do_sample: bool


def read_prompts(prompts: Optional[Sequence[str]], prompt_file: Optional[str]) -> list:
    """The prompts from ``--prompt`` flags, then ``--prompt-file`` lines (blank lines skipped)."""
    out = [p for p in (prompts or [])]
    if any(not p.strip() for p in out):
        raise ValueError("--prompt: an empty prompt; give some text")
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise ValueError(f"--prompt-file {prompt_file}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompt-file {prompt_file}: cannot be read as UTF-8 text ({e})") from None
        file_prompts = [line for line in lines if line.strip()]
        if not file_prompts:
            raise ValueError(f"--prompt-file {prompt_file}: holds no prompt (one prompt per line)")
        out += file_prompts
    if not out:
        raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return out


def adapter_kind(path: Path) -> str:
    """Which of :data:`ADAPTER_KINDS` the folder ``path`` holds (reads only its config file).

    Raises:
        ValueError: no such folder, or no adapter in it.
    """
    if not path.exists():
        raise ValueError(f"--adapter {path}: no such folder")
    if not path.is_dir():
        raise ValueError(f"--adapter {path}: is a file; give the folder written by --save-adapter / save_pretrained")
    cfg = path / "adapter_config.json"
    if cfg.is_file():
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"--adapter {path}: {cfg.name} is not valid JSON ({e})") from None
        if isinstance(meta, dict) and (meta.get("format") == "vectorfit-adapter" or meta.get("peft_type") == "VECTORFIT"):
            return "vectorfit"  # peft's layout, or vectorfit 0.1's (converted on load)
        if isinstance(meta, dict) and "peft_type" in meta:
            return "peft"
        raise ValueError(f"--adapter {path}: {cfg.name} is neither a VectorFit nor a peft adapter config")
    if (path / "config.json").is_file() and any((path / f).is_file() for f in FULL_MODEL_WEIGHTS):
        # merge_and_unload().save_pretrained() writes a whole model: loading it as trained parameters
        # would either replace every weight or fail with hundreds of "tensors this model does not have"
        raise ValueError(f"--adapter {path}: this folder is a merged (full) model (config.json and weights), not an "
                         f"adapter; pass it as --model {path} (with --tokenizer NAME_OR_FOLDER if it has no tokenizer "
                         "files)")
    if (path / "model.safetensors").is_file():
        return "params"
    raise ValueError(f"--adapter {path}: no adapter in this folder (expected adapter_config.json, or model.safetensors "
                     "of trained parameters); save one with `vectorfit train --save-adapter DIR`")


def _model_spec(model: str, flag: str = "--model") -> Optional[Path]:
    """The local folder ``model`` names, or ``None`` for a registered causal LM."""
    from . import models

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{flag} {model}: the folder has no config.json (not a Hugging Face model folder)")
        return path
    causal = sorted(n for n, m in models.MODELS.items() if getattr(m, "kind", "causal") == "causal")
    if model in models.MODELS:
        if model not in causal:
            raise ValueError(f"{flag} {model}: a sentence encoder, not a causal language model; use "
                             f"{', '.join(causal) or 'a local model folder'}")
        return None
    raise ValueError(f"{flag} {model}: neither a model folder nor a registered causal language model "
                     f"({', '.join(causal) or 'none registered'})")


def check(ns: argparse.Namespace) -> Request:
    """Every check that needs no weights; raises ``ValueError`` naming the flag."""
    if ns.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {ns.max_new_tokens}: must be >= 1")
    if ns.batch_size < 1:
        raise ValueError(f"--batch-size {ns.batch_size}: must be >= 1")
    if ns.temperature is not None and not (math.isfinite(ns.temperature) and ns.temperature >= 0):
        raise ValueError(f"--temperature {ns.temperature}: must be a finite number >= 0 (0: greedy)")
    if ns.top_p is not None and not (0 < ns.top_p <= 1):
        raise ValueError(f"--top-p {ns.top_p}: must be in (0, 1]")
    if ns.temperature == 0 and ns.top_p is not None:
        raise ValueError("--temperature 0 means greedy decoding, --top-p sampling: give one of them")
    if ns.merge and ns.adapter is None:
        raise ValueError("--merge needs --adapter (there is nothing to merge into the base model)")
    prompts = read_prompts(ns.prompt, ns.prompt_file)
    adapter = Path(ns.adapter).expanduser() if ns.adapter is not None else None
    kind = adapter_kind(adapter) if adapter is not None else None
    model_dir = _model_spec(ns.model)
    tokenizer = ns.model if ns.tokenizer is None else ns.tokenizer
    if ns.tokenizer is None:
        tokenizer_dir = model_dir
    elif Path(ns.tokenizer).expanduser().is_dir():  # a tokenizer folder needs no config.json
        tokenizer_dir = Path(ns.tokenizer).expanduser()
    else:
        tokenizer_dir = _model_spec(ns.tokenizer, "--tokenizer")
    if tokenizer_dir is not None and not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        # transformers would fail deep inside AutoTokenizer with a message about sentencepiece
        flag = "--model" if ns.tokenizer is None else "--tokenizer"
        raise ValueError(f"{flag} {tokenizer}: the folder has no tokenizer files "
                         f"({', '.join(TOKENIZER_FILES[:2])}, ...); save the tokenizer there "
                         f"(tokenizer.save_pretrained({str(tokenizer_dir)!r})) or pass --tokenizer with the "
                         "registered name or folder of the model it was trained from")
    from .train_config import _check_device

    _check_device(ns.device)
    do_sample = bool(ns.temperature) or ns.top_p is not None
    return Request(ns.model, model_dir, tokenizer, tokenizer_dir, adapter, kind, prompts, do_sample)


# --------------------------------------------------------------------------------------- loading
def load_tokenizer(model: str, model_dir: Optional[Path]) -> Any:
    """The tokenizer of a registered model, or of a local folder (which needs no config.json: a
    ``--tokenizer`` folder may hold only the tokenizer)."""
    from . import models

    if model_dir is None:
        return models.load_tokenizer(model)
    models.set_offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_base(model: str, model_dir: Optional[Path]) -> Any:
    """The causal LM in float32 (``models.load_causal_lm``: a registered name or a local folder)."""
    from . import models

    return models.load_causal_lm(str(model_dir) if model_dir is not None else model)


def apply_adapter(base: Any, adapter: Path, kind: str, merge: bool = False) -> Any:
    """``base`` with the adapter at ``adapter`` (of :func:`adapter_kind` ``kind``) loaded, frozen,
    merged into plain layers when ``merge``.

    Raises:
        ValueError: the adapter does not fit this base (the message says why).
    """
    from safetensors import SafetensorError

    if kind == "vectorfit":
        from vectorfit import AdapterError, VectorFitModel

        try:
            model = VectorFitModel.from_pretrained(base, adapter)
        except AdapterError as e:
            raise ValueError(str(e)) from None
        except SafetensorError as e:
            raise ValueError(_damaged(adapter / "adapter_model.safetensors", e)) from None
        return model.merge_and_unload() if merge else model
    if kind == "peft":
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base, str(adapter))
        except SafetensorError as e:
            raise ValueError(_damaged(adapter / "adapter_model.safetensors", e)) from None
        except (ValueError, RuntimeError, KeyError) as e:
            raise ValueError(f"the peft adapter at {adapter} does not fit this model: {e}") from None
        return model.merge_and_unload() if merge else model
    if kind == "params":
        from safetensors.torch import load_file

        weights = adapter / "model.safetensors"
        try:
            tensors = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise ValueError(_damaged(weights, e)) from None
        if not tensors:
            # loading nothing would generate with the untouched base model under the adapter's name
            raise ValueError(f"{weights} holds no tensors, so it would change nothing; save the trained parameters "
                             "again (`vectorfit train --save-adapter DIR`)")
        try:
            result = base.load_state_dict(tensors, strict=False)
        except RuntimeError as e:
            raise ValueError(f"the trained parameters at {adapter} do not fit this model: {e}") from None
        if result.unexpected_keys:
            raise ValueError(f"the trained parameters at {adapter} name {len(result.unexpected_keys)} tensors this model "
                             f"does not have (first: {result.unexpected_keys[0]!r}); was it trained on another model?")
        return base  # the trained tensors are now the weights: nothing to merge
    raise ValueError(f"unknown adapter kind {kind!r}; expected one of {ADAPTER_KINDS}")


def _damaged(path: Path, e: BaseException) -> str:
    return (f"{path} cannot be read as safetensors ({' '.join(str(e).split())}): the file is damaged or truncated; "
            "save the adapter again")


# --------------------------------------------------------------------------------------- generation
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 64, chat: bool = False,
                   do_sample: bool = False, temperature: Optional[float] = None, top_p: Optional[float] = None,
                   seed: int = 0, batch_size: int = 8) -> list:
    """The generated continuation of each prompt, decoded without special tokens.

    Prompts are left-padded into batches of ``batch_size``; with ``chat`` each becomes one user
    message through the tokenizer's chat template (with the assistant turn opened). Greedy unless
    ``do_sample`` (then ``temperature`` and ``top_p``, seeded by ``seed``); the model's KV cache is on.
    """
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad a batch with")
        tokenizer.pad_token = tokenizer.eos_token
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
                 for p in prompts]
    else:
        texts = list(prompts)
    options: dict = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                         use_cache=True)
    if do_sample:
        options.update(temperature=temperature or 1.0, top_p=1.0 if top_p is None else top_p, top_k=0)
        torch.manual_seed(seed)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    out: list = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                # The chat template already holds the special tokens the model expects.
                enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=not chat)
                enc = {k: v.to(device) for k, v in enc.items()}
                seqs = model.generate(**enc, **options)
                new = seqs[:, enc["input_ids"].shape[1]:]
                out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


def _short(prompt: str, n: int = 60) -> str:
    one = " ".join(prompt.split())
    return one if len(one) <= n else one[: n - 3] + "..."


def generate_command(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``vectorfit generate``: checks, then loading, then one output per prompt on stdout."""
    try:
        req = check(ns)
    except (ValueError, KeyError) as e:
        parser.error(one_line(e))
    try:
        tokenizer = load_tokenizer(req.tokenizer, req.tokenizer_dir)
    except (OSError, ValueError) as e:  # files present but unusable (a traceback from deep inside transformers)
        flag = "--model" if ns.tokenizer is None else "--tokenizer"
        parser.error(f"{flag} {req.tokenizer}: its tokenizer cannot be loaded ({one_line(e)[:300]}); save a working "
                     "tokenizer there or pass --tokenizer with the model it was trained from")
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if ns.chat and not has_template:
        parser.error(f"--chat: the tokenizer of {req.tokenizer} has no chat template; use --no-chat")
    chat = has_template if ns.chat is None else ns.chat
    model = load_base(req.model, req.model_dir)
    what = "the base model"
    if req.adapter is not None:
        try:
            model = apply_adapter(model, req.adapter, req.kind, merge=ns.merge)
        except ValueError as e:
            parser.error(f"cannot use --adapter {req.adapter} with --model {req.model}: {one_line(e)}")
        what = f"{req.kind} adapter {req.adapter}" + (" (merged)" if ns.merge else "")
    model.to(ns.device)
    mode = "sampling" if req.do_sample else "greedy"
    print(f"vectorfit generate: {req.model} with {what}; {len(req.prompts)} prompt(s), {mode}, "
          f"chat template {'on' if chat else 'off'}", file=sys.stderr, flush=True)
    texts = generate_texts(model, tokenizer, req.prompts, max_new_tokens=ns.max_new_tokens, chat=chat,
                           do_sample=req.do_sample, temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed,
                           batch_size=ns.batch_size)
    for i, (prompt, text) in enumerate(zip(req.prompts, texts)):
        if ns.jsonl:
            print(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))
        elif len(req.prompts) == 1:
            print(text)
        else:
            print(f"{'' if i == 0 else chr(10)}=== {i + 1}: {_short(prompt)}")
            print(text)
    return 0
