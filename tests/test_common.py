"""Common tests over the architecture matrix, in the spirit of peft's ``testing_common``.

For BERT, GPT-2 (Conv1D), Llama (gated MLP, no biases), T5, BART, ViT, ResNet (Conv2d without biases,
a 7x7 stride-2 stem, 1x1 shortcuts) and ConvNeXt (depthwise 7x7 Conv2d with groups = channels):

* outputs equal the base model's at initialisation;
* after AdamW steps only the singular values, the chosen biases and the head changed, checked
  independently of the implementation (merge, then ``U0^T W_new V0`` is diagonal for the SVD of the
  *original* weight, and every other tensor is bit-identical);
* save -> load on a fresh base reproduces the outputs; the adapter (peft's layout) holds only the vectors
  (+ head, + the AVF state);
* a different base is refused, naming the first mismatching module;
* merge equivalence and idempotence, unmerge, ``merge_and_unload`` to plain layers, disable.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import (
    ARCHS,
    SPEC_VARIANTS,
    assert_close_rel,
    example_inputs,
    logits_of,
    matrix_of,
    max_rel_diff,
    spread_singular_values,
    train_steps,
)
from peft import PeftModel

from vectorfit import AdapterError, VectorFitConfig, VectorFitLayer, VectorFitModel, get_vectorfit_model

# fp32 round-off: the factorised path U (s * (Vh x)) differs from W x by a few ulps per layer.
RTOL = 1e-5
# The same computation run twice: CPU BLAS results can differ in the last bit between calls (the
# kernels depend on buffer alignment), so "unchanged" means equal to well below fp32 round-off.
SAME = 1e-6


def _config(arch, variant: str = "no_avf", **kw) -> VectorFitConfig:
    return VectorFitConfig(variant=variant, modules_to_save=[arch.head] if arch.head else None, **kw)


def _trained(arch, variant: str = "no_avf", seed: int = 0, steps: int = 3, spread: bool = False):
    """(original base copy, trained PeftModel over a VectorFitModel, inputs-with-labels)."""
    base = arch.build(seed)
    if spread:
        spread_singular_values(base, [n for n, _ in arch.expected_targets(base)], arch.conv1d)
    orig = copy.deepcopy(base)
    vf = get_vectorfit_model(base, _config(arch, variant))
    inputs = example_inputs(orig, labels=True)
    train_steps(vf, inputs, steps=steps, lr=2e-2, weight_decay=0.1)
    return orig, vf, inputs


def _is_vectorfit_module(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "vectorfit"


# ------------------------------------------------------------------------------------------ init
@pytest.mark.parametrize("variant", ["vectorfit", "sigma_attn_bias"])
def test_outputs_equal_base_at_init(arch, variant):
    base = arch.build(0)
    inputs = example_inputs(base)
    ref = logits_of(base, inputs)
    vf = get_vectorfit_model(base, _config(arch, variant))
    got = logits_of(vf, inputs)
    assert_close_rel(got, ref, RTOL, f"{arch.name} init outputs")
    # The same with gradients on (the training code path).
    with_grad = vf(**inputs).logits
    assert with_grad.requires_grad
    assert_close_rel(with_grad.detach().float(), ref, RTOL, f"{arch.name} init outputs, training path")
    # The layers really are decomposed (else the check above would be vacuous).
    layers = dict(vf.vectorfit_layers())
    sigma_roles, bias_roles, _ = SPEC_VARIANTS[variant]
    expected = {n for n, r in arch.expected_targets(base) if r in sigma_roles | bias_roles}
    assert set(layers) == expected
    assert all(isinstance(m, VectorFitLayer) for m in layers.values())
    # A layer is decomposed exactly where the variant trains its singular values (bias-only layers
    # keep their dense weight), so the factorised path is what computed the outputs above.
    roles = dict(arch.expected_targets(base))
    for n, m in layers.items():
        assert m.decomposed == (roles[n] in sigma_roles), n
        if m.decomposed:
            assert "default" in m.vectorfit_sigma and m.sigma is not None, n
        else:
            assert "default" not in m.vectorfit_sigma and m.sigma is None, n
        assert ("default" in m.vectorfit_bias) == (roles[n] in bias_roles), n


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("variant", ["no_avf", "sigma", "sigma_attn_bias"])
def test_training_changes_only_singular_values_biases_and_head(arch, variant):
    # Distinct singular values: the original weight's singular bases are then well defined.
    orig, vf, _ = _trained(arch, variant, spread=True)
    sigma_roles, bias_roles, _ = SPEC_VARIANTS[variant]
    targets = dict(arch.expected_targets(orig))
    merged = vf.merge_and_unload()

    o_sd, m_sd = orig.state_dict(), merged.state_dict()
    assert not set(o_sd) - set(m_sd), "merge_and_unload lost tensors"
    # Only targets without a bias that train their bias gain one (Llama, T5).
    expected_new = {
        f"{t}.bias" for t, role in targets.items() if role in bias_roles and getattr(orig.get_submodule(t), "bias", None) is None
    }
    assert set(m_sd) - set(o_sd) == expected_new
    for key in expected_new:
        assert m_sd[key].abs().max() > 1e-3, f"{key}: the new bias did not train"

    head_changed = False
    n_sigma_checked = 0
    for key, w0 in o_sd.items():
        module_name, _, pname = key.rpartition(".")
        w1 = m_sd[key]
        if module_name in targets and pname == "weight":
            if targets[module_name] not in sigma_roles:
                assert torch.equal(w1, w0), f"{key}: singular values are not trained here but the weight changed"
                continue
            # Independent check: in the ORIGINAL weight's singular bases the new weight is diagonal.
            W0 = matrix_of(orig.get_submodule(module_name), arch.conv1d).double()
            W1 = (w1.t() if arch.conv1d else w1.reshape(W0.shape)).double()  # a Conv2d kernel as its matrix
            assert W1.shape == W0.shape
            U0, S0, Vh0 = torch.linalg.svd(W0, full_matrices=False)
            D = U0.T @ W1 @ Vh0.T
            diag = torch.diagonal(D)
            off = D - torch.diag(diag)
            # fp32 SVD round-off rotates the factors by ~n*eps*|W|/gap, which shows up scaled by the
            # change of the singular values (~1e-6 relative here). Training anything else with this
            # lr moves single entries by ~1e-2, i.e. off-diagonals of >= 1e-2/sqrt(d_out*d_in) ~ 5e-4.
            assert off.abs().max() <= 1e-4 * S0.max(), (
                f"{key}: U0^T W_new V0 is not diagonal (max off-diagonal {off.abs().max():.3e}, max sigma {S0.max():.3e}); "
                "something other than the singular values changed"
            )
            # The reconstruction is complete: W_new = U0 diag(d) V0^T.
            assert torch.allclose(U0 @ torch.diag(diag) @ Vh0, W1, rtol=0, atol=1e-4 * float(S0.max()))
            assert (diag - S0).abs().max() > 1e-3, f"{key}: the singular values did not train"
            n_sigma_checked += 1
        elif module_name in targets and pname == "bias":
            if targets[module_name] in bias_roles:
                assert not torch.equal(w1, w0), f"{key}: the bias did not train"
            else:
                assert torch.equal(w1, w0), f"{key}: the bias changed although the variant does not train it"
        elif arch.head and (module_name == arch.head or module_name.startswith(arch.head + ".")):
            head_changed |= not torch.equal(w1, w0)
        else:
            assert torch.equal(w1, w0), f"{key}: a tensor outside the targets and the head changed"
    assert n_sigma_checked == sum(1 for r in targets.values() if r in sigma_roles)
    if arch.head:
        assert head_changed, "the task head did not train"


# ------------------------------------------------------------------------------------------ save / load
def test_save_load_roundtrip_and_adapter_contents(arch, tmp_path):
    orig, vf, inputs = _trained(arch, "vectorfit")
    trained = logits_of(vf, inputs)
    assert max_rel_diff(trained, logits_of(orig, inputs)) > 1e-4, "training did not move the outputs"
    out = tmp_path / "adapter"
    vf.save_pretrained(out)
    # peft's layout (README.md is peft's model card); nothing else, in particular no base weights.
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    tensors = load_file(str(out / "adapter_model.safetensors"))
    expected = {}
    n_vectors = 0
    for t, _ in arch.expected_targets(orig):
        W = matrix_of(orig.get_submodule(t), arch.conv1d)
        expected[f"base_model.model.{t}.vectorfit_sigma"] = (min(W.shape),)
        expected[f"base_model.model.{t}.vectorfit_bias"] = (W.shape[0],)
        n_vectors += 2
    if arch.head:
        for k, v in orig.get_submodule(arch.head).state_dict().items():
            expected[f"base_model.model.{arch.head}.{k}"] = tuple(v.shape)
    # The AVF controller's state (variant "vectorfit"): one EMA entry and one mask entry per vector.
    avf = {k: tuple(v.shape) for k, v in tensors.items() if k.startswith("base_model.vectorfit_avf.")}
    assert avf.pop("base_model.vectorfit_avf.ema") == (n_vectors,)
    assert avf.pop("base_model.vectorfit_avf.frozen_mask") == (n_vectors,)
    assert set(avf) == {f"base_model.vectorfit_avf.{b}" for b in ("num_done", "schedule_spec", "frozen_history")}
    assert {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith("base_model.vectorfit_avf.")} == expected
    vectors = vf.trainable_vectors()
    assert len(vectors) == n_vectors
    for name, p in vectors.items():
        module, _, kind = name.rpartition(".")
        key = f"base_model.model.{module}.vectorfit_{kind}"
        assert torch.equal(tensors[key], p.detach().to(tensors[key].dtype)), key
    if arch.head:
        head = vf.get_submodule(f"base_model.model.{arch.head}").modules_to_save["default"]
        for k, v in head.state_dict().items():
            assert torch.equal(tensors[f"base_model.model.{arch.head}.{k}"], v), k

    fresh = arch.build(0)
    loaded = VectorFitModel.from_pretrained(fresh, out)
    assert isinstance(loaded, PeftModel) and isinstance(loaded.base_model, VectorFitModel)
    assert_close_rel(logits_of(loaded, inputs), trained, RTOL, f"{arch.name} outputs after save -> load")
    assert not any(p.requires_grad for p in loaded.parameters()), "a loaded adapter is frozen unless is_trainable=True"

    again = VectorFitModel.from_pretrained(arch.build(0), out, is_trainable=True)
    assert {n for n, p in again.trainable_vectors().items() if p.requires_grad} == set(vectors)


def test_wrong_base_is_refused_naming_first_mismatch(arch, tmp_path):
    base = arch.build(0)
    targets = [n for n, _ in arch.expected_targets(base)]
    vf = get_vectorfit_model(base, _config(arch))
    vf.save_pretrained(tmp_path / "a")

    other = arch.build(seed=1)
    with pytest.raises(AdapterError, match="base model mismatch at module") as e:
        VectorFitModel.from_pretrained(other, tmp_path / "a")
    # Every target differs here: the error names one of them (which one: see the model-order test below).
    assert sum(repr(t) in str(e.value) for t in targets) == 1, str(e.value)
    assert not any(_is_vectorfit_module(m) for m in other.modules()), "a refused base must be left untouched"

    # Same base except one matrix in the middle: the error names exactly that one.
    mid = targets[len(targets) // 2 + 1]
    tampered = arch.build(0)
    with torch.no_grad():
        tampered.get_submodule(mid).weight.view(-1)[3] += 1e-3
    with pytest.raises(AdapterError) as e:
        VectorFitModel.from_pretrained(tampered, tmp_path / "a")
    msg = str(e.value)
    assert repr(mid) in msg
    assert not any(repr(t) in msg for t in targets if t != mid)


# The record is stored sorted (bert: "attention.output.dense" sorts before "attention.self.query"; llama: "mlp.down_proj" before
# "self_attn.q_proj"; t5: "decoder..." before "encoder..."), but the error names the first in model order.
@pytest.mark.parametrize("name", ["bert", "llama", "t5"])
def test_wrong_base_error_names_the_first_target_in_model_order(name, tmp_path):
    arch = ARCHS[name]
    base = arch.build(0)
    targets = [n for n, _ in arch.expected_targets(base)]
    assert sorted(targets)[0] != targets[0]  # else this test could not tell the two orders apart
    get_vectorfit_model(base, _config(arch)).save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError) as e:
        VectorFitModel.from_pretrained(arch.build(seed=1), tmp_path / "a")
    assert repr(targets[0]) in str(e.value)


# ------------------------------------------------------------------------------------------ merge
def test_merge_equivalence_idempotence_and_unmerge(arch):
    _, vf, inputs = _trained(arch)
    adapted = logits_of(vf, inputs)

    vf.merge()
    merged = logits_of(vf, inputs)
    assert_close_rel(merged, adapted, RTOL, f"{arch.name} merged vs adapted")
    vf.merge()
    assert_close_rel(logits_of(vf, inputs), merged, SAME, "merging twice changed the outputs")

    vf.unmerge()
    assert_close_rel(logits_of(vf, inputs), adapted, SAME, "unmerge did not restore the factorised outputs")
    # The factorised path is live again: moving a singular value moves the outputs.
    with torch.no_grad():
        for _, layer in vf.vectorfit_layers():
            layer.vectorfit_sigma["default"].mul_(2.0)
    assert max_rel_diff(logits_of(vf, inputs), adapted) > 1e-3, "after unmerge, the singular values no longer act"


def test_merge_and_unload_returns_plain_base_model(arch):
    orig, vf, inputs = _trained(arch)
    adapted = logits_of(vf, inputs)
    vf.merge()  # merge first, then unload: must not fold the vectors in twice
    merged = vf.merge_and_unload()

    assert type(merged) is type(orig)
    assert not any(_is_vectorfit_module(m) for m in merged.modules()), "VectorFit modules left after merge_and_unload"
    assert [n for n, _ in merged.named_modules()] == [n for n, _ in orig.named_modules()]
    for t, _ in arch.expected_targets(orig):
        m = merged.get_submodule(t)
        assert type(m) is type(orig.get_submodule(t)), f"{t} is a {type(m).__name__}"  # plain Linear / Conv1D / Conv2d
        if isinstance(m, nn.Conv2d):  # a convolution keeps every attribute of the original
            o = orig.get_submodule(t)
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
                assert getattr(m, attr) == getattr(o, attr), f"{t}.{attr}"
        assert m.weight.dtype == orig.get_submodule(t).weight.dtype
        assert m.weight.shape == orig.get_submodule(t).weight.shape
        assert m.bias is not None, f"{t}: the trained bias was dropped"
    if arch.head:
        assert type(merged.get_submodule(arch.head)) is type(orig.get_submodule(arch.head))
    assert_close_rel(logits_of(merged, inputs), adapted, RTOL, f"{arch.name} merge_and_unload vs adapted")


# ------------------------------------------------------------------------------------------ disable
def test_disable_adapter(arch):
    orig, vf, inputs = _trained(arch)
    base_out = logits_of(orig, inputs)
    adapted = logits_of(vf, inputs)
    assert max_rel_diff(adapted, base_out) > 1e-4

    with vf.disable_adapter():
        assert_close_rel(logits_of(vf, inputs), base_out, RTOL, f"{arch.name} outputs with the adapter disabled")
    assert_close_rel(logits_of(vf, inputs), adapted, SAME, "after disable_adapter")

    with pytest.raises(RuntimeError, match="boom"):
        with vf.disable_adapter():
            raise RuntimeError("boom")
    assert_close_rel(logits_of(vf, inputs), adapted, SAME, "an exception inside disable_adapter left it disabled")

    vf.merge()
    with vf.disable_adapter():
        assert_close_rel(logits_of(vf, inputs), base_out, RTOL, f"{arch.name} disabled while merged")
    assert_close_rel(logits_of(vf, inputs), adapted, RTOL, f"{arch.name} merged, after disable")


# ------------------------------------------------------------------------------------------ default targets
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_default_targets_and_roles(name):
    """The built-in table finds exactly q, k, v, o, f1, f2 (gate/up/down) per block, with the right role.
    Pattern check only: no SVD."""
    from vectorfit.targets import find_targets

    arch = ARCHS[name]
    model = arch.build(0)
    got = [(n, role) for n, _, role in find_targets(model)]
    assert got == arch.expected_targets(model)
    per_block = {"gpt2": 4, "llama": 7, "mistral": 7, "qwen2": 7}.get(name, 6)
    if name not in ("t5", "bart") and not arch.conv2d:  # encoder-decoders: 6 per encoder block, 10 per decoder block
        assert len(got) == per_block * 2
    allowed = (Conv1D,) if arch.conv1d else (nn.Linear, nn.Conv2d) if arch.conv2d else (nn.Linear,)
    for n, module, _ in find_targets(model):
        assert type(module) in allowed, n
    if arch.conv2d:
        assert any(type(module) is nn.Conv2d for _, module, _ in find_targets(model))


_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)


@pytest.mark.parametrize(
    "model_cls, config_cls, kwargs, n_targets",
    [
        pytest.param("ElectraModel", "ElectraConfig", dict(embedding_size=32, **_SMALL), 2 * 6, id="electra"),
        pytest.param("XLMRobertaModel", "XLMRobertaConfig", _SMALL, 2 * 6, id="xlm-roberta"),
        # DeBERTa v1 fuses q, k, v in one in_proj
        pytest.param("DebertaModel", "DebertaConfig", _SMALL, 2 * 4, id="deberta-v1"),
        pytest.param("GemmaModel", "GemmaConfig", dict(head_dim=8, num_key_value_heads=2, **_SMALL), 2 * 7, id="gemma"),
        pytest.param("Qwen3Model", "Qwen3Config", dict(head_dim=8, num_key_value_heads=2, **_SMALL), 2 * 7, id="qwen3"),
        pytest.param("MBartModel", "MBartConfig", dict(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                                       decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48), 2 * 6 + 2 * 10, id="mbart"),
        # T5 v1.1 / flan-t5: gated MLP wi_0, wi_1, wo
        pytest.param("T5Model", "T5Config", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                                 feed_forward_proj="gated-gelu"), 2 * 7 + 2 * 11, id="t5-gated"),
    ],
)
def test_default_targets_of_other_table_entries(model_cls, config_cls, kwargs, n_targets):
    """Every Linear of these backbones is a default target, with role attn exactly under attention."""
    import re

    import transformers as T
    from vectorfit.targets import find_targets

    torch.manual_seed(0)
    model = getattr(T, model_cls)(getattr(T, config_cls)(**kwargs))
    got = list(find_targets(model))
    assert len(got) == n_targets
    linear = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith("pooler.dense")]
    assert [n for n, _, _ in got] == linear
    for n, _, role in got:
        assert role == ("attn" if re.search("attn|attention", n, re.I) else "mlp"), n
