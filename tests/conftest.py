"""Shared fixtures and tiny-model factories for the vectorfit test suite.

Every model here is a tiny, randomly initialised ``transformers`` model built from a config (no
downloads), in eval mode so that outputs are deterministic. Factories take a ``seed``: the same
seed gives bit-identical weights, which is what "a fresh copy of the same pre-trained base" means in
the save/load tests.

Reuse from another test file either through the fixtures (``def test_x(tiny_bert): m = tiny_bert()``)
or by importing the plain functions (``from conftest import make_tiny_bert, example_inputs``).

At import this file points ``VECTORFIT_CACHE`` at a fresh temporary folder (removed at the end of the
session) so no test reads or writes the user's ``~/.cache``, and sets ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_SESSION_CACHE = tempfile.mkdtemp(prefix="vectorfit-test-cache-")
os.environ["VECTORFIT_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)  # also after --collect-only runs
os.environ.pop("VECTORFIT_SVD_CACHE", None)

from dataclasses import dataclass  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as T  # noqa: E402
from torch import nn  # noqa: E402

T.logging.set_verbosity_error()

# The models here are tiny: one thread is fastest, and on a shared, oversubscribed CPU MKL's
# multi-threaded LAPACK spins in its barriers (a 32 x 32 SVD then takes ~0.1 s instead of ~0.1 ms).
torch.set_num_threads(int(os.environ.get("VECTORFIT_TEST_THREADS", "1")))

VOCAB = 64
HIDDEN = 32
INTER = 48
LAYERS = 2
HEADS = 4
NUM_LABELS = 3


@pytest.fixture(scope="session", autouse=True)
def _vectorfit_session_cache():
    """The per-session SVD cache folder (already exported as ``VECTORFIT_CACHE``)."""
    assert os.environ["VECTORFIT_CACHE"] == _SESSION_CACHE
    yield _SESSION_CACHE
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


def _seeded(cls, config, seed: int, dtype: Optional[torch.dtype] = None) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------- factories
def make_tiny_bert(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=64, num_labels=NUM_LABELS,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return _seeded(T.BertForSequenceClassification, T.BertConfig(**cfg), seed, dtype)


def make_tiny_roberta(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=72, num_labels=NUM_LABELS, pad_token_id=1,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return _seeded(T.RobertaForSequenceClassification, T.RobertaConfig(**cfg), seed, dtype)


def make_tiny_distilbert(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=INTER,
               max_position_embeddings=64, num_labels=NUM_LABELS, dropout=0.0, attention_dropout=0.0)
    cfg.update(overrides)
    return _seeded(T.DistilBertForSequenceClassification, T.DistilBertConfig(**cfg), seed, dtype)


def make_tiny_mpnet(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=72, num_labels=NUM_LABELS,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return _seeded(T.MPNetForSequenceClassification, T.MPNetConfig(**cfg), seed, dtype)


def make_tiny_deberta_v2(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    """DeBERTa-v3 style (relative attention, shared attention keys, c2p + p2c)."""
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               intermediate_size=INTER, max_position_embeddings=64, num_labels=NUM_LABELS,
               relative_attention=True, position_buckets=16, max_relative_positions=-1, norm_rel_ebd="layer_norm",
               share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pooler_dropout=0.0)
    cfg.update(overrides)
    return _seeded(T.DebertaV2ForSequenceClassification, T.DebertaV2Config(**cfg), seed, dtype)


def make_tiny_gpt2(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    return _seeded(T.GPT2LMHeadModel, T.GPT2Config(**cfg), seed, dtype)


def _llama_like(model_cls, config_cls, seed, dtype, overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(overrides)
    return _seeded(model_cls, config_cls(**cfg), seed, dtype)


def make_tiny_llama(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    """Gated MLP, grouped-query attention (k/v are 16 x 32), no biases anywhere."""
    return _llama_like(T.LlamaForCausalLM, T.LlamaConfig, seed, dtype, overrides)


def make_tiny_mistral(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    return _llama_like(T.MistralForCausalLM, T.MistralConfig, seed, dtype, overrides)


def make_tiny_qwen2(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    """Like Llama but q/k/v carry biases."""
    return _llama_like(T.Qwen2ForCausalLM, T.Qwen2Config, seed, dtype, overrides)


def make_tiny_t5(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=INTER, num_layers=LAYERS, num_decoder_layers=LAYERS,
               num_heads=HEADS, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
               pad_token_id=0, eos_token_id=1)
    cfg.update(overrides)
    return _seeded(T.T5ForConditionalGeneration, T.T5Config(**cfg), seed, dtype)


def make_tiny_bart(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
               encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTER,
               decoder_ffn_dim=INTER, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
               activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    cfg.update(overrides)
    return _seeded(T.BartForConditionalGeneration, T.BartConfig(**cfg), seed, dtype)


def make_tiny_vit(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    cfg = dict(image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=INTER, num_labels=NUM_LABELS,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg.update(overrides)
    return _seeded(T.ViTForImageClassification, T.ViTConfig(**cfg), seed, dtype)


def make_tiny_resnet(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    """Convolutions without biases (each followed by batch norm), 7x7 stride-2 stem, 1x1 shortcut."""
    cfg = dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
               num_labels=NUM_LABELS)
    cfg.update(overrides)
    return _seeded(T.ResNetForImageClassification, T.ResNetConfig(**cfg), seed, dtype)


def make_tiny_convnext(seed: int = 0, dtype=None, **overrides) -> nn.Module:
    """Depthwise 7x7 convolutions (groups = channels, with bias), a 2x2 stride-2 patch convolution
    and downsampling convolutions, Linear pointwise MLPs."""
    # layer_scale_init_value: ConvNeXt's per-channel output scale starts at 1e-6, which would hide
    # every block's change from the outputs; a pretrained model's learned scales are far larger.
    cfg = dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, num_labels=NUM_LABELS,
               layer_scale_init_value=1.0)
    cfg.update(overrides)
    return _seeded(T.ConvNextForImageClassification, T.ConvNextConfig(**cfg), seed, dtype)


_IMAGE_MODELS = {"vit": 8, "resnet": 16, "convnext": 16, "mobilenet_v2": 32}  # model_type -> image side


# ---------------------------------------------------------------------------------------- inputs
def example_inputs(model: nn.Module, batch: int = 2, seq: int = 7, seed: int = 1234, labels: bool = False) -> dict:
    """Deterministic inputs for any model built above (same seed -> same tensors)."""
    g = torch.Generator().manual_seed(seed)
    mtype = model.config.model_type
    if mtype in _IMAGE_MODELS:
        side = _IMAGE_MODELS[mtype]
        px = torch.randn(batch, 3, side, side, generator=g).to(next(model.parameters()).dtype)
        out = {"pixel_values": px}
        if labels:
            out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
        return out
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if mtype in ("t5", "bart"):
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
    if labels:
        if mtype in ("gpt2", "llama", "mistral", "qwen2"):
            out["labels"] = ids.clone()
        elif mtype in ("t5", "bart"):
            out["labels"] = torch.randint(3, VOCAB, (batch, 5), generator=g)
        else:
            out["labels"] = torch.randint(0, NUM_LABELS, (batch,), generator=g)
    return out


def logits_of(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits for ``inputs`` (labels dropped), as float32."""
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "labels"})
    return out.logits.detach().float()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str = "outputs") -> None:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    d = max_rel_diff(a, b)
    assert d <= rtol, f"{what}: max relative difference {d:.3e} > {rtol:.1e}"


def train_steps(model: nn.Module, inputs: dict, steps: int = 3, lr: float = 2e-2, weight_decay: float = 0.1) -> None:
    """A few AdamW steps on every trainable parameter (the loss from ``inputs['labels']``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "nothing is trainable"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


class Rows(torch.utils.data.Dataset):
    """A dict of batched tensors as a dataset of rows (for ``transformers.Trainer``)."""

    def __init__(self, inputs: dict) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.inputs.items()}


# ---------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Arch:
    """One architecture of the test matrix.

    ``expected_targets(model)`` lists the default targets ``[(name, role)]`` in model order, written
    out by hand from the model's config (independent of vectorfit's own tables).
    """

    name: str
    build: Callable[..., nn.Module]
    expected_targets: Callable[[nn.Module], list]
    head: Optional[str] = None  # a new task head, trained and saved ("modules_to_save")
    conv1d: bool = False  # GPT-2 style: weight stored d_in x d_out
    conv2d: bool = False  # some targets are Conv2d (adapted as out x in/groups*kh*kw)
    has_bias: bool = True


def _bert_like(prefix: str, attn: tuple, attn_out: str, mlp: tuple) -> Callable[[nn.Module], list]:
    def targets(model: nn.Module) -> list:
        n = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
        out = []
        for i in range(n):
            p = f"{prefix}.{i}."
            out += [(p + a, "attn") for a in attn] + [(p + attn_out, "attn")] + [(p + m, "mlp") for m in mlp]
        return out

    return targets


def _gpt2_targets(model):
    return [(f"transformer.h.{i}.{n}", r) for i in range(model.config.n_layer)
            for n, r in (("attn.c_attn", "attn"), ("attn.c_proj", "attn"), ("mlp.c_fc", "mlp"), ("mlp.c_proj", "mlp"))]


def _llama_targets(model):
    return [(f"model.layers.{i}.{n}", r) for i in range(model.config.num_hidden_layers)
            for n, r in (("self_attn.q_proj", "attn"), ("self_attn.k_proj", "attn"), ("self_attn.v_proj", "attn"),
                         ("self_attn.o_proj", "attn"), ("mlp.gate_proj", "mlp"), ("mlp.up_proj", "mlp"),
                         ("mlp.down_proj", "mlp"))]


def _t5_targets(model):
    out = []
    qkvo = ("q", "k", "v", "o")
    for i in range(model.config.num_layers):
        p = f"encoder.block.{i}.layer."
        out += [(p + f"0.SelfAttention.{x}", "attn") for x in qkvo] + [(p + "1.DenseReluDense.wi", "mlp"), (p + "1.DenseReluDense.wo", "mlp")]
    for i in range(model.config.num_decoder_layers):
        p = f"decoder.block.{i}.layer."
        out += [(p + f"0.SelfAttention.{x}", "attn") for x in qkvo] + [(p + f"1.EncDecAttention.{x}", "attn") for x in qkvo]
        out += [(p + "2.DenseReluDense.wi", "mlp"), (p + "2.DenseReluDense.wo", "mlp")]
    return out


def _bart_targets(model):
    qkvo = ("k_proj", "v_proj", "q_proj", "out_proj")  # BartAttention registers k, v, q, out
    out = []
    for i in range(model.config.encoder_layers):
        p = f"model.encoder.layers.{i}."
        out += [(p + f"self_attn.{x}", "attn") for x in qkvo] + [(p + "fc1", "mlp"), (p + "fc2", "mlp")]
    for i in range(model.config.decoder_layers):
        p = f"model.decoder.layers.{i}."
        out += [(p + f"self_attn.{x}", "attn") for x in qkvo] + [(p + f"encoder_attn.{x}", "attn") for x in qkvo]
        out += [(p + "fc1", "mlp"), (p + "fc2", "mlp")]
    return out


_BERT_MLP = ("intermediate.dense", "output.dense")


def _resnet_targets(model):
    # Every pretrained convolution (no attention in a CNN: all "mlp"), not the classifier: the stem,
    # each basic block's two 3x3 convolutions, and the 1x1 shortcut where a block changes the width
    # or the stride (registered before the block's own convolutions).
    c = model.config
    out, width = [("resnet.embedder.embedder.convolution", "mlp")], c.embedding_size
    for i, (hidden, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
        for j in range(depth):
            p = f"resnet.encoder.stages.{i}.layers.{j}."
            stride = 2 if j == 0 and (i > 0 or c.downsample_in_first_stage) else 1
            if (width if j == 0 else hidden) != hidden or stride != 1:
                out.append((p + "shortcut.convolution", "mlp"))
            out += [(p + f"layer.{k}.convolution", "mlp") for k in range(2)]
        width = hidden
    return out


def _convnext_targets(model):
    # The blocks' depthwise convolutions and pointwise Linear MLPs; not the patch / downsampling convs.
    return [(f"convnext.encoder.stages.{i}.layers.{j}.{x}", "mlp") for i, d in enumerate(model.config.depths)
            for j in range(d) for x in ("dwconv", "pwconv1", "pwconv2")]

ARCHS: dict[str, Arch] = {
    "bert": Arch("bert", make_tiny_bert, _bert_like("bert.encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense", _BERT_MLP), head="classifier"),
    "roberta": Arch("roberta", make_tiny_roberta, _bert_like("roberta.encoder.layer", ("attention.self.query", "attention.self.key", "attention.self.value"), "attention.output.dense", _BERT_MLP), head="classifier"),
    "distilbert": Arch("distilbert", make_tiny_distilbert, _bert_like("distilbert.transformer.layer", ("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin", ("ffn.lin1", "ffn.lin2")), head="classifier"),
    "mpnet": Arch("mpnet", make_tiny_mpnet, _bert_like("mpnet.encoder.layer", ("attention.attn.q", "attention.attn.k", "attention.attn.v"), "attention.attn.o", _BERT_MLP), head="classifier"),
    "deberta-v2": Arch("deberta-v2", make_tiny_deberta_v2, _bert_like("deberta.encoder.layer", ("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"), "attention.output.dense", _BERT_MLP), head="classifier"),
    # transformers 5 names ViT's modules like Llama's (vit.layers.N.attention.q_proj, .mlp.fc1).
    "vit": Arch("vit", make_tiny_vit, _bert_like("vit.layers", ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj", ("mlp.fc1", "mlp.fc2")), head="classifier"),
    "gpt2": Arch("gpt2", make_tiny_gpt2, _gpt2_targets, conv1d=True),
    "llama": Arch("llama", make_tiny_llama, _llama_targets, has_bias=False),
    "mistral": Arch("mistral", make_tiny_mistral, _llama_targets, has_bias=False),
    "qwen2": Arch("qwen2", make_tiny_qwen2, _llama_targets),
    "t5": Arch("t5", make_tiny_t5, _t5_targets, has_bias=False),
    "bart": Arch("bart", make_tiny_bart, _bart_targets),
    "resnet": Arch("resnet", make_tiny_resnet, _resnet_targets, head="classifier", has_bias=False, conv2d=True),
    "convnext": Arch("convnext", make_tiny_convnext, _convnext_targets, head="classifier", conv2d=True),
}

#: The architectures every common test runs on (ResNet and ConvNeXt: Conv2d targets).
CORE_ARCHS = ["bert", "gpt2", "llama", "t5", "bart", "vit", "resnet", "convnext"]


def matrix_of(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """A Linear's / Conv1D's weight as the ``d_out x d_in`` matrix it applies; a Conv2d's kernel
    ``(out, in/groups, kh, kw)`` as ``out x (in/groups * kh * kw)``."""
    w = module.weight.detach()
    if conv1d:
        return w.t()
    return w.reshape(w.shape[0], -1) if w.dim() == 4 else w


# ---------------------------------------------------------------------------------------- fixtures
def _factory(fn):
    @pytest.fixture
    def fixture():
        return fn

    fixture.__doc__ = f"The factory ``{fn.__name__}(seed=0, dtype=None, **config_overrides)``."
    return fixture


tiny_bert = _factory(make_tiny_bert)
tiny_roberta = _factory(make_tiny_roberta)
tiny_distilbert = _factory(make_tiny_distilbert)
tiny_mpnet = _factory(make_tiny_mpnet)
tiny_deberta_v2 = _factory(make_tiny_deberta_v2)
tiny_gpt2 = _factory(make_tiny_gpt2)
tiny_llama = _factory(make_tiny_llama)
tiny_mistral = _factory(make_tiny_mistral)
tiny_qwen2 = _factory(make_tiny_qwen2)
tiny_t5 = _factory(make_tiny_t5)
tiny_bart = _factory(make_tiny_bart)
tiny_vit = _factory(make_tiny_vit)


@pytest.fixture(params=CORE_ARCHS)
def arch(request) -> Arch:
    """Parametrises a test over the core architecture matrix."""
    return ARCHS[request.param]



#: The SPEC table, written out independently of ``vectorfit.VARIANTS``:
#: variant -> (roles whose singular values train, roles whose biases train, uses AVF).
SPEC_VARIANTS = {
    "sigma_attn": ({"attn"}, set(), False),
    "sigma": ({"attn", "mlp"}, set(), False),
    "sigma_attn_bias": ({"attn"}, {"attn", "mlp"}, False),
    "no_avf": ({"attn", "mlp"}, {"attn", "mlp"}, False),
    "vectorfit": ({"attn", "mlp"}, {"attn", "mlp"}, True),
}


@torch.no_grad()
def spread_singular_values(model: nn.Module, names, conv1d: bool = False, low: float = 0.05) -> nn.Module:
    """Give each named matrix evenly spaced singular values (its largest down to ``low`` times it),
    keeping its singular vectors, in place.

    A random init has near-repeated singular values (gaps of ~1e-4), whose singular vectors an fp32
    SVD only determines to ~1e-4: ``U0^T W V0`` checks then see round-off rotations inside those
    near-degenerate pairs. With distinct singular values the singular bases are well defined and the
    check can be tight.
    """
    for name in names:
        m = model.get_submodule(name)
        W = matrix_of(m, conv1d).double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        s = torch.linspace(1.0, low, S.numel(), dtype=torch.float64) * S.max()
        W2 = (U * s) @ Vh
        m.weight.copy_((W2.t() if conv1d else W2.reshape(m.weight.shape)).to(m.weight.dtype))
    return model
