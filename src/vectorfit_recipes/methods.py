"""Fine-tuning methods for the benchmark: VectorFit variants and the baselines people would use instead.

Every method is built the same way (``build(name, base, ...)``) and returns a :class:`Built` that the
one training loop drives: the same data order, the same newly initialised task head (trained in
full by every method, as peft's ``modules_to_save``), the same evaluation.

The baselines are ``peft``'s own implementations (LoRA, AdaLoRA, VeRA, IA3, BEFT), plus BitFit (the
biases of the same target layers and the head, a few lines over the plain model), a linear probe
(``head``: the new head alone) and full fine-tuning. Learning rates and their sources are in
``configs/methods.json`` (with a family's own rate, e.g. ``"image"``, where it has one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

VECTORFIT_METHODS = ("vectorfit", "no_avf", "sigma", "sigma_attn", "sigma_attn_bias")
PEFT_METHODS = ("lora_r1", "lora_r8", "adalora", "vera", "ia3", "beft")
PLAIN_METHODS = ("bitfit", "head", "full")
METHODS = VECTORFIT_METHODS + PEFT_METHODS + PLAIN_METHODS

HEAD = ["classifier"]  # the new sequence-classification head of BERT-like and MPNet models


def method_table() -> dict[str, dict[str, Any]]:
    """``configs/methods.json``: per method the learning rate, where it comes from, and options."""
    text = resources.files("vectorfit_recipes").joinpath("configs/methods.json").read_text()
    table = json.loads(text)["methods"]
    missing = set(METHODS) - set(table)
    if missing:  # pragma: no cover - guarded by a test
        raise RuntimeError(f"configs/methods.json lacks methods {sorted(missing)}")
    return table


def default_lr(method: str, family: Optional[str] = None) -> float:
    """The method's rate; with ``family`` (e.g. ``"image"``) that family's own rate where methods.json has one."""
    entry = method_table()[method]
    return float(entry.get(family, {}).get("lr", entry["lr"]) if family else entry["lr"])


@dataclass
class Built:
    """A model ready for the training loop.

    Attributes:
        model: the module to train (its ``requires_grad`` parameters are the trained ones).
        config: JSON-serialisable description of the method's configuration.
        before_optimizer_step: called with the step number after ``backward()`` (VectorFit's AVF).
        after_optimizer_step: called with the step number after ``optimizer.step()``, before the
            gradients are cleared (AdaLoRA's rank allocation).
        save: writes what the method trained (an adapter, or the whole model) to a folder.
        avf: VectorFit's AVF controller, if any.
    """

    model: nn.Module
    config: dict
    save: Callable[[str], None]
    before_optimizer_step: Optional[Callable[[int], None]] = None
    after_optimizer_step: Optional[Callable[[int], None]] = None
    avf: Any = None
    extra: dict = field(default_factory=dict)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) counted over the wrapped model's parameters."""
        if hasattr(self.model, "get_nb_trainable_parameters"):
            return self.model.get_nb_trainable_parameters()
        params = list(self.model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def bias_note(base: nn.Module, method: str) -> Optional[str]:
    """A line for the log when ``method`` trains biases that ``base``'s target layers do not have
    (e.g. a Llama: VectorFit then adds zero-initialised biases and trains them), else ``None``."""
    from vectorfit import VARIANTS, VectorFitConfig, target_module_names

    if method not in VECTORFIT_METHODS and method != "bitfit":
        return None
    roles = target_module_names(base, VectorFitConfig(), with_roles=True)
    missing = [n for n in roles if getattr(base.get_submodule(n), "bias", None) is None]
    if not missing:
        return None
    if method == "bitfit":
        return (f"{len(missing)} of the {len(roles)} target layers have no bias: bitfit trains no bias there "
                + ("(and so trains nothing but a new head)" if len(missing) == len(roles) else "(only the existing ones)"))
    trained = [n for n in missing if roles[n] in VARIANTS[method]["bias"]]
    if not trained:
        return (f"{len(missing)} of the {len(roles)} target layers have no bias; {method} trains no bias "
                "vectors, only singular values")
    return (f"{len(missing)} of the {len(roles)} target layers have no bias: {method} gives {len(trained)} of them "
            "a zero-initialised bias vector and trains it (the paper's Σ+b on a model without biases)")


def _jsonable(x: Any) -> Any:
    return sorted(x) if isinstance(x, (set, frozenset)) else str(x)


def _save_plain(model: nn.Module, names: Optional[set] = None) -> Callable[[str], None]:
    def save(directory: str) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in model.named_parameters() if names is None or k in names}
        save_file(sd, str(Path(directory) / "model.safetensors"))

    return save


def build(
    method: str,
    base: nn.Module,
    total_steps: int,
    steps_per_epoch: int,
    avf_options: Optional[dict] = None,
    vectorfit_options: Optional[dict] = None,
    head: Optional[list] = None,
    targets: Any = None,
    peft_targets: Any = None,
    bitfit_params: Optional[list] = None,
) -> Built:
    """Wrap ``base`` for ``method``.

    Args:
        method: one of :data:`METHODS`.
        base: a freshly loaded sequence-classification model (modified in place).
        total_steps: optimizer steps of the run (AVF and AdaLoRA schedules).
        steps_per_epoch: optimizer steps per epoch (AVF's interval).
        avf_options: ``AVFConfig`` fields for the ``vectorfit`` method (``None`` values are derived).
        vectorfit_options: further ``VectorFitConfig`` fields for the VectorFit methods (e.g.
            ``sigma_param``).
        head: the new task head's module names, trained in full by every method; ``None`` = :data:`HEAD`
            (sequence classification); ``[]`` for a language model, whose output head is pretrained
            (and tied to the embeddings) and stays frozen, as peft does for ``CAUSAL_LM``.
        targets: the layers to adapt (``VectorFitConfig.target_modules``: names or a full-match regex);
            ``None`` = the architecture's default (q, k, v, o, f1, f2).
        peft_targets: the peft baselines' ``target_modules`` where they differ from ``targets`` (peft's
            LoRA refuses depthwise convolutions); ``None`` = the same layers.
        bitfit_params: the parameters BitFit trains besides the head, where the targets have no biases
            (a CNN's BatchNorm biases); ``None`` = the targets' biases.

    Returns:
        A :class:`Built`.
    """
    from vectorfit import AVFConfig, VectorFitConfig, get_vectorfit_model, target_module_names

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    options = method_table()[method].get("options", {})
    heads = list(HEAD) if head is None else list(head)
    to_save = heads or None

    if method in VECTORFIT_METHODS:
        avf = None
        if method == "vectorfit":
            opts = {k: v for k, v in (avf_options or {}).items() if v is not None}
            avf = AVFConfig.for_training(total_steps, steps_per_epoch, **opts)
        cfg = VectorFitConfig(variant=method, target_modules=targets, modules_to_save=to_save, avf=avf,
                              **(vectorfit_options or {}))
        model = get_vectorfit_model(base, cfg)
        hook = model.avf.step if model.avf is not None else None
        return Built(model, {"library": "vectorfit", **cfg.to_dict()}, model.save_pretrained, before_optimizer_step=hook, avf=model.avf)

    roles = target_module_names(base, VectorFitConfig(target_modules=targets, modules_to_save=to_save), with_roles=True)
    names = list(roles)

    if method == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return Built(base, {"library": "torch", "trained": "all parameters"}, _save_plain(base))

    if method in ("bitfit", "head"):  # head: a linear probe, only the new head trains
        for p in base.parameters():
            p.requires_grad_(False)
        trained = set()
        own = [f"{n}.bias" for n in names] if bitfit_params is None else list(bitfit_params)
        params = dict(base.named_parameters())
        for name in own if method == "bitfit" else []:
            if name in params:  # a target without a bias has none to train
                params[name].requires_grad_(True)
                trained.add(name)
        for name, p in base.named_parameters():
            if any(name == f"{h}.{n}" or f".{h}." in f".{name}" for h in heads for n in ("weight", "bias")):
                p.requires_grad_(True)
                trained.add(name)
        what = ("the new head only" if method == "head" else "biases of the VectorFit targets + head"
                if bitfit_params is None else "the given biases + head")
        info = {"library": "torch", "trained": what, "targets": names}
        if method == "bitfit" and bitfit_params is not None:
            info["biases"] = sorted(trained)
        return Built(base, info, _save_plain(base, trained))

    import peft

    if peft_targets is not None:  # the layers of ``names`` peft can adapt (e.g. no depthwise convolutions)
        names = list(target_module_names(base, VectorFitConfig(target_modules=peft_targets, modules_to_save=to_save)))
    common = dict(target_modules=names, modules_to_save=to_save)
    if method in ("lora_r1", "lora_r8"):
        r = 1 if method == "lora_r1" else 8
        pcfg = peft.LoraConfig(r=r, lora_alpha=options.get("lora_alpha", 2 * r), lora_dropout=0.0, **common)
    elif method == "adalora":
        tinit = max(1, int(total_steps * options.get("tinit_frac", 0.1)))
        tfinal = max(1, int(total_steps * options.get("tfinal_frac", 0.2)))
        pcfg = peft.AdaLoraConfig(
            init_r=options.get("init_r", 12), target_r=options.get("target_r", 8), tinit=tinit, tfinal=tfinal,
            deltaT=options.get("deltaT", 10), lora_alpha=options.get("lora_alpha", 32), lora_dropout=0.0,
            total_step=total_steps, **common,
        )
    elif method == "vera":
        pcfg = peft.VeraConfig(r=options.get("r", 256), vera_dropout=0.0, **common)
    elif method == "ia3":
        pcfg = peft.IA3Config(target_modules=names, feedforward_modules=[t for t in names if roles[t] == "mlp"], modules_to_save=to_save)
    elif method == "beft":
        # BEFT's own choice of biases (peft's default mapping: the value projections' biases).
        pcfg = peft.BeftConfig(modules_to_save=to_save)
    else:  # pragma: no cover
        raise AssertionError(method)
    model = peft.get_peft_model(base, pcfg)
    # AdaLoRA reallocates ranks from the gradients after each optimizer step (peft's documented order).
    after = model.base_model.update_and_allocate if method == "adalora" else None
    cfg = {"library": "peft", "peft_version": peft.__version__, **json.loads(json.dumps(pcfg.to_dict(), default=_jsonable))}
    return Built(model, cfg, model.save_pretrained, after_optimizer_step=after)
