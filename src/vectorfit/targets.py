"""Which modules VectorFit adapts, and whether each is an attention or an MLP matrix.

The paper adapts the attention projections q, k, v, o and the two MLP matrices f1, f2 of every
transformer block. Module names differ between architectures, so each known ``model_type`` gets
two regexes (matched against the end of the dotted module name): one for attention, one for MLP.
The role matters because the variants train singular values or biases only on some roles.

Some targets are refused before any SVD (:func:`check_target_weight`): quantised layers, whose stored
weight is not the matrix they apply, and layers whose weight is on the meta device (not loaded).
"""

from __future__ import annotations

import re
from typing import Iterator, Optional, Union

import torch
from torch import nn

ATTN, MLP = "attn", "mlp"
_NOTHING = r"(?!)"  # a regex that matches no name

_BERT_LIKE = {
    ATTN: r"layer\.\d+\.attention\.(self\.(query|key|value)|output\.dense)",
    MLP: r"layer\.\d+\.(intermediate\.dense|output\.dense)",
}
_LLAMA_LIKE = {
    ATTN: r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    MLP: r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
}

#: model_type (``model.config.model_type``) -> {role: regex over the module name's tail}
ARCHITECTURES: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": {
        ATTN: r"layer\.\d+\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)",
        MLP: r"layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    "deberta": {
        ATTN: r"layer\.\d+\.attention\.(self\.in_proj|output\.dense)",
        MLP: r"layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    "distilbert": {
        ATTN: r"layer\.\d+\.attention\.(q_lin|k_lin|v_lin|out_lin)",
        MLP: r"layer\.\d+\.ffn\.(lin1|lin2)",
    },
    "mpnet": {
        ATTN: r"layer\.\d+\.attention\.attn\.(q|k|v|o)",
        MLP: r"layer\.\d+\.(intermediate\.dense|output\.dense)",
    },
    # transformers < 5: vit.encoder.layer.N.attention.attention.query ...; >= 5: vit.layers.N.attention.q_proj ...
    "vit": {
        ATTN: r"layer\.\d+\.attention\.(attention\.(query|key|value)|output\.dense)|layers\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)",
        MLP: r"layer\.\d+\.(intermediate\.dense|output\.dense)|layers\.\d+\.mlp\.(fc1|fc2)",
    },
    # GPT-2 keeps q, k, v in one fused Conv1D (c_attn); it is one target with one SVD.
    "gpt2": {ATTN: r"h\.\d+\.attn\.(c_attn|c_proj)", MLP: r"h\.\d+\.mlp\.(c_fc|c_proj)"},
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "bart": {
        ATTN: r"layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)",
        MLP: r"layers\.\d+\.(fc1|fc2)",
    },
    "mbart": {
        ATTN: r"layers\.\d+\.(self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)",
        MLP: r"layers\.\d+\.(fc1|fc2)",
    },
    "t5": {
        ATTN: r"block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention)\.(q|k|v|o)",
        MLP: r"block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)",
    },
    # Convolutional networks have no attention: every pretrained convolution is a feed-forward
    # ("mlp") matrix, so the attention-only variants train nothing there (and say so).
    "resnet": {ATTN: _NOTHING, MLP: r"(embedder|layer\.\d+|shortcut)\.convolution"},
    "mobilenet_v2": {ATTN: _NOTHING, MLP: r"(conv_stem\.(first_conv|conv_3x3|reduce_1x1)|layer\.\d+\.(expand_1x1|conv_3x3|reduce_1x1)|conv_1x1)\.convolution"},
    "convnext": {ATTN: _NOTHING, MLP: r"layers\.\d+\.(dwconv|pwconv1|pwconv2)"},
}

# Used to tell attention from MLP for explicit targets on architectures not listed above.
_GENERIC_ATTN = re.compile(
    r"(^|.*\.)(q|k|v|o|query|key|value|q_proj|k_proj|v_proj|o_proj|out_proj|qkv|qkv_proj|c_attn|"
    r"q_lin|k_lin|v_lin|out_lin|Wqkv|in_proj|to_q|to_k|to_v|to_out\.0)$|(^|.*\.)(attn\d*|attention|self_attn|SelfAttention)\."
)

# Output heads are never "all-linear" targets: they are new or tied to the embeddings.
_HEAD_NAMES = {"lm_head", "classifier", "score", "qa_outputs", "cls", "head", "pooler", "classification_head", "pre_classifier"}


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 style ``Conv1D`` (a linear map whose weight is stored ``d_in x d_out``),
    recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_peft_layer(module: nn.Module) -> bool:
    """A layer wrapped by peft (LoRA, IA3, ...): peft's tuner layers derive from ``BaseTunerLayer``
    and keep the wrapped layer as ``base_layer``. Recognised without importing peft."""
    return any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__) or isinstance(
        getattr(module, "base_layer", None), nn.Module
    )


def is_vectorfit_layer(module: nn.Module) -> bool:
    """A VectorFit tuner layer (a later adapter targets it again), recognised without importing peft."""
    return type(module).__name__ == "VectorFitLayer" and hasattr(module, "vectorfit_sigma")


def is_conv2d(module: nn.Module) -> bool:
    """A plain 2-D convolution (not a transposed one), adapted as the matrix
    ``out_channels x (in_channels / groups * kh * kw)`` (its weight tensor, reshaped)."""
    return isinstance(module, nn.Conv2d)


def is_linear(module: nn.Module) -> bool:
    """A linear map: ``nn.Linear``, a GPT-2 ``Conv1D``, or a VectorFit layer over one."""
    if is_vectorfit_layer(module):
        return not is_conv2d(module.base_layer)
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_linear_like(module: nn.Module) -> bool:
    """What VectorFit can adapt: a linear map (:func:`is_linear`) or a 2-D convolution."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_conv2d(module) or is_vectorfit_layer(module)


def model_type_of(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def _tail_match(pattern: str, name: str) -> bool:
    return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name) is not None


def _names_match(entries: list, name: str) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct Linear/Conv1D/Conv2d module names with layer numbers folded to ``*`` (for error messages)."""
    seen: dict[str, None] = {}
    for name, module in model.named_modules():
        if is_linear_like(module):
            seen[re.sub(r"\.\d+\.", ".*.", name)] = None
    return list(seen)


def _output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        return get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):  # some transformers models do not implement it
        return None


def output_layer_names(model: nn.Module) -> set:
    """Names of the modules ``"all-linear"`` leaves out: the model's output layer(s).

    As peft's ``"all-linear"``: the output embeddings (``model.get_output_embeddings()``, e.g. a
    causal LM's ``lm_head``); task heads by their usual names (a module named ``classifier``,
    ``score``, ``qa_outputs``, ..., and everything inside a top-level one, e.g. RoBERTa's
    ``classifier.dense``); and for a model that is not a transformers model (no
    ``get_output_embeddings``), the last Linear/Conv1D in registration order when no module with
    parameters follows it -- a plain classifier's ``fc``. An output layer is new (randomly
    initialised), tied to the input embeddings, or has as many outputs as there are classes: its SVD
    is no pretrained spectrum to re-weight, and a classifier's few singular values would not leave
    AVF's ``k`` vectors to freeze.
    """
    names = set()
    head = _output_embeddings(model)
    last: Optional[str] = None
    inside: list = []  # VectorFit / peft layers: their base_layer is not a separate candidate
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if name.split(".")[-1] in _HEAD_NAMES or name.split(".")[0] in _HEAD_NAMES:
            names.add(name)
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if is_vectorfit_layer(module) or is_peft_layer(module):
            inside.append(name)
        if is_linear(module):
            last = name
        elif last is not None and next(module.parameters(recurse=False), None) is not None:
            # A layer with weights after it (a backbone's final norm): that Linear is no output layer.
            last = None
    if not callable(getattr(model, "get_output_embeddings", None)) and last is not None:
        names.add(last)
    return names


# dtypes whose values are the matrix itself; float8 weights carry separate scales (FP8 quantisation).
_PLAIN_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Packages whose layers compute from a quantised weight, even where the ``weight`` attribute is a
# float tensor (optimum-quanto's QLinear before freeze(), for example).
_QUANT_PACKAGES = ("bitsandbytes", "torchao", "optimum.quanto", "quanto", "auto_gptq", "gptqmodel", "awq", "hqq",
                   "eetq", "aqlm", "vptq", "fbgemm_gpu", "compressed_tensors", "fp_quant", "bitnet")
_UNQUANTISED_FIX = ("load the base model unquantised (e.g. from_pretrained(..., dtype=torch.bfloat16) without a "
                    "quantization_config) -- quantised bases are not supported yet")


def _qualname(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _quantisation_library(module: nn.Module) -> Optional[str]:
    for cls in type(module).__mro__:
        top = cls.__module__ or ""
        if any(top == p or top.startswith(p + ".") for p in _QUANT_PACKAGES):
            return top.split(".")[0] if not top.startswith("optimum.") else "optimum.quanto"
    return None


def check_target_weight(name: str, module: nn.Module) -> None:
    """Refuse a target whose weight VectorFit cannot decompose, before any SVD or cache entry.

    The SVD is taken of ``module.weight`` as stored. A quantised layer stores integers or packed
    bytes plus scales kept elsewhere (bitsandbytes' ``Int8Params`` / ``Params4bit``, torchao's and
    optimum-quanto's tensor subclasses, int8 or float8 storage), so its "SVD" would be of garbage, be
    cached, and the forward fail later or, worse, run on wrong weights. A weight on the meta device
    (``accelerate.init_empty_weights()``, or a layer a ``device_map`` offloads to CPU/disk, whose
    values accelerate loads only inside the forward) has no values at all. Both are checked on the
    weight itself, not on the module class: bitsandbytes' ``Linear8bitLt`` / ``Linear4bit`` *are*
    ``nn.Linear`` subclasses.

    Raises:
        TargetError: naming the module, its layer type, the weight's type/dtype/device and the fix.
    """
    if is_vectorfit_layer(module):
        return  # its base weight was checked when it was first adapted
    w = getattr(module, "weight", None)
    layer = _qualname(module)
    lib = _quantisation_library(module)
    if not isinstance(w, torch.Tensor):
        raise TargetError(f"module {name!r} ({layer}) has no weight tensor (weight={type(w).__name__}); "
                          + (_UNQUANTISED_FIX if lib else "VectorFit adapts Linear/Conv1D layers with a weight matrix"))
    if type(w) not in (torch.Tensor, nn.Parameter):
        what = f"{_qualname(w)}, dtype {w.dtype}"
        if type(w).__name__ == "DTensor":  # FSDP2 / tensor parallel: each rank holds a shard
            raise TargetError(f"module {name!r} ({layer}) has a sharded weight ({what}): VectorFit decomposes whole "
                              "matrices; apply fully_shard / tensor parallelism after get_vectorfit_model")
        raise TargetError(f"module {name!r} ({layer}) has a quantised weight ({what}: a tensor subclass, not a plain "
                          "floating-point tensor), whose SVD would be of the raw storage without its scales; "
                          + _UNQUANTISED_FIX)
    if w.dtype not in _PLAIN_FLOAT_DTYPES:
        raise TargetError(f"module {name!r} ({layer}) has a quantised weight ({w.dtype} storage), whose SVD would be of "
                          "the stored values without their scales; " + _UNQUANTISED_FIX)
    if lib is not None:
        raise TargetError(f"module {name!r} ({layer}) is a quantised layer from {lib}: it computes with a quantised "
                          "form of its weight, not the matrix VectorFit would decompose; " + _UNQUANTISED_FIX)
    if w.device.type == "meta":
        raise TargetError(
            f"module {name!r} ({layer}) has its weight on the meta device (shape {tuple(w.shape)}): the weights are "
            "not loaded (accelerate's init_empty_weights, or a device_map that offloads this layer to CPU/disk), so "
            "there is nothing to decompose. Load the real weights before get_vectorfit_model (from_pretrained "
            "without init_empty_weights) and keep the adapted layers on a device (no CPU/disk offloading of them, "
            "e.g. device_map={'': 0} or no device_map)")


def role_of(model: nn.Module, name: str) -> str:
    """``"attn"`` or ``"mlp"`` for a module name, by the architecture table or generic patterns."""
    arch = ARCHITECTURES.get(model_type_of(model) or "")
    if arch is not None:
        if _tail_match(arch[ATTN], name):
            return ATTN
        if _tail_match(arch[MLP], name):
            return MLP
    return ATTN if _GENERIC_ATTN.match(name) else MLP


class TargetError(ValueError):
    """The targets could not be resolved; the message lists the model's candidate modules."""


def find_targets(
    model: nn.Module,
    target_modules: Union[None, str, list] = None,
    exclude_modules: Union[None, str, list] = None,
    skip: Optional[list] = None,
    check_weights: bool = True,
) -> Iterator[tuple[str, nn.Module, str]]:
    """Yield ``(name, module, role)`` for every module VectorFit should adapt, in model order.

    ``"all-linear"`` is every Linear/Conv1D except the model's output layer(s), as in peft: the
    output embeddings (a causal LM's ``lm_head``), task heads (``classifier``, ``score``, ``pooler``,
    ...), and for a plain ``nn.Module`` the last Linear (a classifier's ``fc``); see
    :func:`output_layer_names`. Name an output layer in a list to adapt it anyway.

    Args:
        model: the base model.
        target_modules: see :class:`vectorfit.VectorFitConfig`.
        exclude_modules: names / suffixes (list) or a regex (full match) to leave out.
        skip: module names that are never targets (e.g. ``modules_to_save``), with their children.
        check_weights: refuse targets whose weight cannot be decomposed (:func:`check_target_weight`:
            quantised, or on the meta device). Checked as each target is found, so a caller that
            collects the targets first (the tuner does) fails before any SVD.

    Raises:
        TargetError: unknown architecture without explicit targets, a target that is not a
            Linear/Conv1D, a quantised or meta-device target, or nothing matched.
    """
    mtype = model_type_of(model)
    heads = output_layer_names(model) if target_modules == "all-linear" else set()
    skip = list(skip or [])
    if target_modules is None:
        arch = ARCHITECTURES.get(mtype or "")
        if arch is None:
            raise TargetError(
                f"no default VectorFit targets for model_type={mtype!r} (known: {sorted(ARCHITECTURES)}); "
                f"set VectorFitConfig.target_modules to a list of names, a regex or 'all-linear'. "
                f"Linear modules of this model: {candidate_names(model)}"
            )

        def selected(name: str, module: nn.Module) -> bool:
            return _tail_match(arch[ATTN], name) or _tail_match(arch[MLP], name)

    elif target_modules == "all-linear":

        def selected(name: str, module: nn.Module) -> bool:
            return name not in heads and is_linear(module)  # as in peft: no convolutions

    elif isinstance(target_modules, str):

        def selected(name: str, module: nn.Module) -> bool:
            return re.fullmatch(target_modules, name) is not None

    else:

        def selected(name: str, module: nn.Module) -> bool:
            return _names_match(target_modules, name)

    def excluded(name: str) -> bool:
        # ``skip`` entries are names or dotted suffixes (as in modules_to_save): skip the module they
        # name and everything inside it, e.g. "pooler" skips "bert.pooler.dense".
        prefixes = [name.rsplit(".", k)[0] for k in range(name.count(".") + 1)]
        if any(_names_match(skip, p) for p in prefixes):
            return True
        if exclude_modules is None:
            return False
        if isinstance(exclude_modules, str):
            return re.fullmatch(exclude_modules, name) is not None
        return _names_match(exclude_modules, name)

    found = 0
    peft_layers: list[str] = []
    vf_layers: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(v + ".") for v in vf_layers):
            continue  # inside a VectorFit layer (its base_layer): the layer itself is the target
        if is_vectorfit_layer(module):
            vf_layers.append(name)
        elif name and is_peft_layer(module):
            peft_layers.append(name)
        if not name or not selected(name, module) or excluded(name):
            continue
        inside = [p for p in peft_layers if name == p or name.startswith(p + ".")]
        if inside:
            # peft's LoRA layer is also called "Linear": without this check it would be reported
            # as "(Linear) ... is not a Linear", and "all-linear" would adapt LoRA's own A/B matrices.
            raise TargetError(
                f"module {name!r} is {'inside ' if name != inside[0] else ''}a peft adapter layer "
                f"({inside[0]!r}, {type(model.get_submodule(inside[0])).__module__}.{type(model.get_submodule(inside[0])).__name__}); "
                "VectorFit does not stack on peft adapters: merge them first (peft_model.merge_and_unload()) "
                "and pass the merged base model, or start from the base model without peft"
            )
        if not is_linear_like(module):
            if isinstance(target_modules, list) or isinstance(target_modules, str) and target_modules != "all-linear":
                # A user-named container (e.g. "attention") is not an error if its name also
                # matches nothing else; only leaf matrices can be adapted.
                if any(True for _ in module.children()):
                    continue
            lib = _quantisation_library(module)
            if lib is not None:  # e.g. a GPTQ/AWQ QuantLinear: an nn.Module with packed qweight, no weight
                raise TargetError(f"module {name!r} ({_qualname(module)}) is a quantised layer (from {lib}); "
                                  + _UNQUANTISED_FIX)
            kind = type(module).__name__
            why = (" (a transposed or 1-D/3-D convolution: VectorFit adapts Linear, Conv1D and Conv2d layers)"
                   if isinstance(module, nn.modules.conv._ConvNd) else "")
            raise TargetError(
                f"module {name!r} ({kind}) matched the targets but is not a Linear/Conv1D/Conv2d{why}; "
                f"VectorFit adapts matrix layers only. Its candidate modules: {candidate_names(model)}"
            )
        if check_weights:
            check_target_weight(name, module)
        found += 1
        yield name, module, role_of(model, name)
    if found == 0:
        left_out = f" ('all-linear' leaves out the output layer(s) {sorted(heads)}; name them to adapt them)" if heads else ""
        raise TargetError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matched no Linear/Conv1D "
            f"module of this {type(model).__name__}{left_out}. Linear modules of this model: {candidate_names(model)}"
        )
