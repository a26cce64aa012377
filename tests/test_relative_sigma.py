"""sigma_param="relative": s = s0 * (1 + z), z trained from 0. Exact at init, gradients equal the
chain rule through s, Adam moves singular values by relative amounts, and merge / save / load / AVF /
the inference cache work as with the paper's form."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import assert_close_rel, example_inputs, logits_of, make_tiny_bert, make_tiny_llama, train_steps
from vectorfit import AVFConfig, ConfigError, VectorFitConfig, VectorFitLayer, VectorFitModel, get_vectorfit_model


def _z(layer: VectorFitLayer) -> nn.Parameter:
    """The trained singular-value parameter of the default adapter (z in the relative form, s in the absolute)."""
    return layer.vectorfit_sigma["default"]


def _vf(sigma_param: str, variant: str = "no_avf", build=make_tiny_bert, **kw):
    return get_vectorfit_model(build(), VectorFitConfig(variant=variant, modules_to_save=["classifier"] if build is make_tiny_bert else None,
                                                        sigma_param=sigma_param, svd_cache=False, **kw))


def test_exact_at_init_and_the_parameter_is_z():
    rel, ab = _vf("relative"), _vf("absolute")
    x = example_inputs(rel)
    assert torch.equal(logits_of(rel, x), logits_of(ab, x))  # s0 * (1 + 0) == s0 exactly
    # Same parameter names in both forms (peft's vectorfit_sigma); the relative one holds z = 0, the
    # absolute one s = s0.
    names = {n for n, p in rel.named_parameters() if p.requires_grad}
    assert names == {n for n, p in ab.named_parameters() if p.requires_grad}
    assert any(".vectorfit_sigma." in n for n in names)
    la = dict(ab.vectorfit_layers())
    for name, layer in rel.vectorfit_layers():
        assert layer.vectorfit_sigma_param["default"] == "relative" and la[name].vectorfit_sigma_param["default"] == "absolute"
        assert torch.equal(_z(layer), torch.zeros_like(layer.sigma0))
        assert rel.trainable_vectors()[f"{name}.sigma"] is _z(layer)
        assert torch.equal(layer.sigma, layer.sigma0)
        assert torch.equal(_z(la[name]), la[name].sigma0) and layer.sigma0.abs().min() > 0
    assert rel.get_nb_trainable_parameters() == ab.get_nb_trainable_parameters()


def test_gradient_is_the_chain_rule_through_s():
    """dL/dz = s0 * dL/ds, against the absolute form's gradient on the same model and batch."""
    rel, ab = _vf("relative"), _vf("absolute")
    x = example_inputs(rel, labels=True)
    rel(**x).loss.backward()
    ab(**x).loss.backward()
    lr, la = dict(rel.vectorfit_layers()), dict(ab.vectorfit_layers())
    for name in lr:
        expected = la[name].sigma0 * _z(la[name]).grad
        assert expected.abs().max() > 0, name
        torch.testing.assert_close(_z(lr[name]).grad, expected, rtol=1e-5, atol=1e-9)


def test_adam_moves_each_singular_value_by_a_relative_amount():
    rel = _vf("relative", variant="sigma")
    x = example_inputs(rel, labels=True)
    layers = dict(rel.vectorfit_layers())
    before = {n: l.sigma.detach().clone() for n, l in layers.items()}
    zs = [_z(l) for l in layers.values()]
    opt = torch.optim.Adam(zs, lr=1e-3, eps=1e-15)
    rel(**x).loss.backward()
    live = {n: _z(l).grad.abs() > 1e-8 for n, l in layers.items()}
    assert all(m.sum() > 0 for m in live.values())
    opt.step()
    for n, l in layers.items():
        moved = (l.sigma.detach() - before[n]).abs()[live[n]]
        torch.testing.assert_close(moved, 1e-3 * l.sigma0[live[n]], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("build", [make_tiny_bert, make_tiny_llama])
def test_save_load_merge_round_trip(build, tmp_path):
    model = _vf("relative", build=build)
    x = example_inputs(model, labels=True)
    train_steps(model, x, steps=3)
    trained = logits_of(model, x)
    model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["sigma_param"] == "relative"
    # The file holds z (small, around 0), not s: the config's sigma_param says how to read it.
    n_sigma = 0
    for name, layer in model.vectorfit_layers():
        key = f"base_model.model.{name}.vectorfit_sigma"
        if "default" in layer.vectorfit_sigma:
            assert torch.equal(tensors[key], _z(layer).detach()), key
            s = layer.sigma.detach()
            torch.testing.assert_close(layer.sigma0 * (1.0 + tensors[key]), s, rtol=1e-6, atol=0)  # s0 (1 + z)
            assert (tensors[key] - s).abs().max() > 0.5 * layer.sigma0.max(), key  # z, not s itself
            n_sigma += 1
    assert n_sigma > 0
    loaded = VectorFitModel.from_pretrained(build(), tmp_path / "a", svd_cache=False)
    assert loaded.vectorfit_config.sigma_param == "relative"
    assert torch.equal(logits_of(loaded, x), trained)
    merged = loaded.merge_and_unload()
    assert_close_rel(logits_of(merged, x), trained, rtol=2e-5, what="merged")


def test_avf_freezes_z_and_ranks_by_the_strength_on_s():
    model = _vf("relative", variant="vectorfit", avf=AVFConfig(k=3, start_step=2, interval=1, num_freezes=2))
    x = example_inputs(model, labels=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for step in (1, 2):
        model(**x).loss.backward()
        model.avf.step(step)
        if step == 2:
            frozen = list(model.avf.frozen)
            params_of = model.trainable_vectors()  # "<module>.sigma" -> z, "<module>.bias" -> b
            assert len(params_of) == 2 * len(list(model.vectorfit_layers()))
            snap = {f: p.detach().clone() for f, p in params_of.items()}
        opt.step()
        opt.zero_grad()
    assert len(frozen) == 3
    for f in frozen:
        assert torch.equal(params_of[f], snap[f]), f  # a frozen vector does not move, not even by decay
    assert all(not torch.equal(p, snap[f]) for f, p in params_of.items() if f not in frozen)  # the others train
    strengths = model.training_strengths()
    for n, l in dict(model.vectorfit_layers()).items():
        by_hand = float((l.sigma.detach() - l.sigma0).abs().mean())
        assert strengths[f"{n}.sigma"] == pytest.approx(by_hand, rel=1e-6, abs=1e-12)


def test_inference_cache_follows_z_edits():
    model = _vf("relative").eval()
    x = example_inputs(model)
    first = logits_of(model, x)
    # the second call with the same z is served by the rebuilt dense weight (one GEMM per layer)
    assert_close_rel(logits_of(model, x), first, rtol=1e-5, what="second call")
    assert all(getattr(l, "_vf_dense_cache", None) is not None for _, l in model.vectorfit_layers())
    with torch.no_grad():
        for _, layer in model.vectorfit_layers():
            _z(layer).data.fill_(-0.5)  # .data: no version bump
    halved = logits_of(model, x)
    ref = _vf("absolute").eval()
    with torch.no_grad():
        for _, layer in ref.vectorfit_layers():
            _z(layer).mul_(0.5)
    assert_close_rel(halved, logits_of(ref, x), rtol=1e-5, what="after a .data edit")


def test_bad_sigma_param_is_named():
    with pytest.raises(ConfigError, match="sigma_param"):
        VectorFitConfig(sigma_param="log")
    with pytest.raises(ValueError, match="sigma_param"):
        VectorFitLayer(nn.Linear(3, 4), "default", True, False, sigma_param="log")
    layer = VectorFitLayer(nn.Linear(3, 4), "default", True, False)
    with pytest.raises(ValueError, match="sigma_param"):
        layer.update_layer("other", True, False, sigma_param="log")
    assert "other" not in layer.vectorfit_sigma
