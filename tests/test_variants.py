"""The five variants of the SPEC table: exactly which vectors train, and how many parameters that is.

Expected sets and counts are computed here from the model *config* (hidden sizes, heads, layers) and
the SPEC table written out in ``conftest.SPEC_VARIANTS``, not from vectorfit's own tables.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (
    ARCHS,
    SPEC_VARIANTS,
    example_inputs,
    make_tiny_llama,
    make_tiny_qwen2,
    train_steps,
)
from vectorfit import AVFConfig, AdaptiveVectorFreezing, ConfigError, VectorFitConfig, VectorFitLayer, get_vectorfit_model

VARIANT_NAMES = list(SPEC_VARIANTS)
NON_AVF = [v for v in VARIANT_NAMES if not SPEC_VARIANTS[v][2]]


# ---------------------------------------------------------------------------------------- shapes from configs
def matrix_shapes(name: str, c) -> list:
    """``[(role, d_out, d_in)]`` of every default target, derived from the config only."""
    if name in ("bert", "vit"):
        H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        return L * ([("attn", H, H)] * 4 + [("mlp", I, H), ("mlp", H, I)])
    if name == "gpt2":
        H, L = c.n_embd, c.n_layer
        I = c.n_inner or 4 * H
        return L * [("attn", 3 * H, H), ("attn", H, H), ("mlp", I, H), ("mlp", H, I)]
    if name == "llama":
        H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        kv = c.num_key_value_heads * (H // c.num_attention_heads)
        return L * [("attn", H, H), ("attn", kv, H), ("attn", kv, H), ("attn", H, H), ("mlp", I, H), ("mlp", I, H), ("mlp", H, I)]
    if name in ("t5", "bart"):
        if name == "t5":
            D, F, inner = c.d_model, c.d_ff, c.num_heads * c.d_kv
            Le, Ld = c.num_layers, c.num_decoder_layers
        else:
            D, F, inner = c.d_model, c.encoder_ffn_dim, c.d_model
            Le, Ld = c.encoder_layers, c.decoder_layers
        attn = [("attn", inner, D)] * 3 + [("attn", D, inner)]
        mlp = [("mlp", F, D), ("mlp", D, F)]
        return Le * (attn + mlp) + Ld * (attn + attn + mlp)
    raise KeyError(name)


def vector_count(shapes: list, variant: str) -> int:
    sigma_roles, bias_roles, _ = SPEC_VARIANTS[variant]
    return sum((min(o, i) if r in sigma_roles else 0) + (o if r in bias_roles else 0) for r, o, i in shapes)


def _head_numel(model, head):
    return sum(p.numel() for p in model.get_submodule(head).parameters()) if head else 0


# ---------------------------------------------------------------------------------------- the table
@pytest.mark.parametrize("variant", VARIANT_NAMES)
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "t5"])
def test_variant_trains_exactly_the_spec_vectors(name, variant):
    arch = ARCHS[name]
    base = arch.build(0)
    head_numel = _head_numel(base, arch.head)
    targets = arch.expected_targets(base)
    originals = {n: base.get_submodule(n).weight.detach().clone() for n, _ in targets}
    vf = get_vectorfit_model(base, VectorFitConfig(variant=variant, modules_to_save=[arch.head] if arch.head else None))
    sigma_roles, bias_roles, uses_avf = SPEC_VARIANTS[variant]

    expected_vectors = []
    for t, role in targets:
        if role in sigma_roles:
            expected_vectors.append(f"{t}.sigma")
        if role in bias_roles:
            expected_vectors.append(f"{t}.bias")
    assert list(vf.trainable_vectors()) == expected_vectors  # also in model order

    # peft's names: base_model.model.<module>.vectorfit_<kind>.default, heads in a ModulesToSaveWrapper.
    trainable = {n.removeprefix("base_model.model."): p for n, p in vf.named_parameters() if p.requires_grad}
    head_params = {n: p for n, p in trainable.items() if arch.head and n.startswith(f"{arch.head}.modules_to_save.default.")}
    as_vectors = {}
    for n, p in trainable.items():
        if n in head_params:
            continue
        module, kind, adapter = n.rsplit(".", 2)
        assert adapter == "default" and kind in ("vectorfit_sigma", "vectorfit_bias"), f"{n} trains"
        as_vectors[f"{module}.{kind.removeprefix('vectorfit_')}"] = p
    assert set(as_vectors) == set(expected_vectors), "something besides the SPEC vectors (and the head) trains"
    assert all(as_vectors[n] is p for n, p in vf.trainable_vectors().items())
    assert sum(p.numel() for p in head_params.values()) == head_numel
    # Singular-value vectors have the rank's length, biases the output size.
    for n, p in vf.trainable_vectors().items():
        t, attr = n.rsplit(".", 1)
        d_out, d_in = (originals[t].shape[::-1] if arch.conv1d else originals[t].shape)
        assert p.shape == ((min(d_out, d_in),) if attr == "sigma" else (d_out,)), n
        assert p.dtype == torch.float32

    plain = Conv1D if arch.conv1d else nn.Linear
    for t, role in targets:
        m = vf.get_base_model().get_submodule(t)
        if role not in sigma_roles | bias_roles:  # e.g. f1/f2 in sigma_attn: left exactly as they were
            assert type(m) is plain, f"{t} should stay a plain {plain.__name__}, is {type(m).__name__}"
            assert torch.equal(m.weight, originals[t])
        else:
            assert isinstance(m, VectorFitLayer), t
            assert type(m.base_layer) is plain, t
            assert ("default" in m.vectorfit_sigma) == (role in sigma_roles), t
            assert ("default" in m.vectorfit_bias) == (role in bias_roles), t
            if role not in sigma_roles:  # bias only: no decomposition, no singular values, the dense weight kept
                assert not m.decomposed and m.sigma is None and m.U is None, t
                assert torch.equal(m.base_layer.weight, originals[t]), t
            else:
                assert m.decomposed and m.sigma is not None, t

    if uses_avf:
        assert isinstance(vf.avf, AdaptiveVectorFreezing)
        assert vf.avf.names == expected_vectors
    else:
        assert vf.avf is None

    expected = vector_count(matrix_shapes(name, base.config), variant)
    assert sum(p.numel() for p in vf.trainable_vectors().values()) == expected
    assert vf.get_nb_trainable_parameters()[0] == expected + head_numel


def test_total_parameter_count():
    """total = base parameters - the decomposed dense weights + their frozen factors U (d_out x r) and
    Vh (r x d_in) + added singular values + added biases."""
    base = make_tiny_llama(0)
    n_base = sum(p.numel() for p in base.parameters())
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    shapes = matrix_shapes("llama", base.config)
    added = sum(min(o, i) + o for _, o, i in shapes)  # Llama has no biases: every one is new
    dense = sum(o * i for _, o, i in shapes)  # released once decomposed (a placeholder, not a parameter)
    factors = sum(min(o, i) * (o + i) for _, o, i in shapes)
    assert vf.get_nb_trainable_parameters() == (added, n_base - dense + factors + added)
    frozen = {n for n, p in vf.named_parameters() if not p.requires_grad}
    assert not any(n.endswith(".base_layer.weight") for n in frozen), "a decomposed weight is still a parameter"
    assert sum(n.endswith((".U", ".Vh")) for n in frozen) == 2 * len(shapes)


@pytest.mark.slow
def test_deberta_v3_base_has_138240_vector_parameters():
    """The paper's "0.15M": 12 layers x (6 x 768 singular values + 6,912 bias entries)."""
    torch.manual_seed(0)
    cfg = T.DebertaV2Config(
        vocab_size=128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512, relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, max_relative_positions=-1,
    )
    base = T.DebertaV2Model(cfg).eval()
    vf = get_vectorfit_model(base, VectorFitConfig(variant="vectorfit", svd_cache=False))  # ~0.5 GB of SVDs: not cached
    per_layer = 6 * 768 + (4 * 768 + 3072 + 768)
    assert per_layer == 11_520
    assert sum(p.numel() for p in vf.trainable_vectors().values()) == 12 * per_layer == 138_240
    assert vf.get_nb_trainable_parameters()[0] == 138_240
    assert len(vf.trainable_vectors()) == 12 * 12  # 6 matrices x (sigma, bias) per layer
    assert len(vf.avf.names) == 144


# ---------------------------------------------------------------------------------------- biases
def test_llama_without_biases_gets_zero_biases_and_merges_to_linear_with_bias():
    base = make_tiny_llama(0)
    assert all(base.get_submodule(n).bias is None for n, _ in ARCHS["llama"].expected_targets(base))
    inputs = example_inputs(base, labels=True)
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    biases = {n: p for n, p in vf.trainable_vectors().items() if n.endswith(".bias")}
    assert len(biases) == 14
    for n, b in biases.items():
        assert torch.equal(b, torch.zeros_like(b)), f"{n} does not start at zero"
    train_steps(vf, inputs, steps=2)
    trained = {n: b.detach().clone() for n, b in biases.items()}
    merged = vf.merge_and_unload()
    for n, b in trained.items():
        layer = merged.get_submodule(n.removesuffix(".bias"))
        assert type(layer) is nn.Linear and layer.bias is not None, n
        assert b.abs().max() > 0
        assert torch.equal(layer.bias.detach(), b.to(layer.bias.dtype)), n


def test_llama_sigma_only_adds_no_biases():
    base = make_tiny_llama(0)
    merged = get_vectorfit_model(base, VectorFitConfig(variant="sigma")).merge_and_unload()
    for n, _ in ARCHS["llama"].expected_targets(merged):
        assert merged.get_submodule(n).bias is None, f"{n} gained a bias its variant does not train"


def test_qwen2_mixed_biases_start_from_the_originals():
    base = make_tiny_qwen2(0)
    with torch.no_grad():  # Qwen2 initialises its q/k/v biases to zero; make them recognisable
        for layer in base.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.1)
    q0 = base.model.layers[0].self_attn.q_proj.bias.detach().clone()
    assert base.model.layers[0].self_attn.o_proj.bias is None
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf"))
    v = vf.trainable_vectors()
    assert torch.equal(v["model.layers.0.self_attn.q_proj.bias"], q0)
    assert q0.abs().max() > 0
    o = v["model.layers.0.self_attn.o_proj.bias"]
    assert torch.equal(o, torch.zeros_like(o))


# ---------------------------------------------------------------------------------------- AVF config per variant
@pytest.mark.parametrize("variant", NON_AVF)
@pytest.mark.parametrize("avf", [AVFConfig(), {"k": 3}], ids=["AVFConfig", "dict"])
def test_variants_without_avf_refuse_an_avf_config(variant, avf):
    with pytest.raises(ConfigError) as e:
        VectorFitConfig(variant=variant, avf=avf)
    msg = str(e.value)
    assert "avf" in msg and repr(variant) in msg


def test_vectorfit_variant_gets_default_avf():
    cfg = VectorFitConfig()
    assert cfg.variant == "vectorfit"
    assert isinstance(cfg.avf, AVFConfig) and cfg.avf.k == 5 and cfg.avf.beta == 0.99
    assert VectorFitConfig(avf={"k": 3}).avf == AVFConfig(k=3)
