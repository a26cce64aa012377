"""sigma_param="relative": s = s0 * (1 + z), z trained from 0. Exact at init, gradients equal the
chain rule through s, Adam moves singular values by relative amounts, and merge / save / load / AVF /
the inference cache work as with the paper's form."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_rel, example_inputs, logits_of, make_tiny_bert, make_tiny_llama, train_steps
from vectorfit import AVFConfig, ConfigError, SVDLinear, VectorFitConfig, VectorFitModel, get_vectorfit_model


def _vf(sigma_param: str, variant: str = "no_avf", build=make_tiny_bert, **kw) -> VectorFitModel:
    return get_vectorfit_model(build(), VectorFitConfig(variant=variant, modules_to_save=["classifier"] if build is make_tiny_bert else None,
                                                        sigma_param=sigma_param, svd_cache=False, **kw))


def test_exact_at_init_and_the_parameter_is_z():
    rel, ab = _vf("relative"), _vf("absolute")
    x = example_inputs(rel)
    assert torch.equal(logits_of(rel, x), logits_of(ab, x))  # s0 * (1 + 0) == s0 exactly
    names = {n for n, p in rel.named_parameters() if p.requires_grad}
    assert any(n.endswith(".sigma_delta") for n in names) and not any(n.endswith(".sigma") for n in names)
    for _, layer in rel.vectorfit_layers():
        assert torch.equal(layer.sigma_delta, torch.zeros_like(layer.sigma0))
        assert torch.equal(layer.sigma, layer.sigma0)
    assert rel.get_nb_trainable_parameters() == ab.get_nb_trainable_parameters()


def test_gradient_is_the_chain_rule_through_s():
    """dL/dz = s0 * dL/ds, against the absolute form's gradient on the same model and batch."""
    rel, ab = _vf("relative"), _vf("absolute")
    x = example_inputs(rel, labels=True)
    rel(**x).loss.backward()
    ab(**x).loss.backward()
    lr, la = dict(rel.vectorfit_layers()), dict(ab.vectorfit_layers())
    for name in lr:
        expected = la[name].sigma0 * la[name].sigma.grad
        torch.testing.assert_close(lr[name].sigma_delta.grad, expected, rtol=1e-5, atol=1e-9)


def test_adam_moves_each_singular_value_by_a_relative_amount():
    rel = _vf("relative", variant="sigma")
    x = example_inputs(rel, labels=True)
    layers = dict(rel.vectorfit_layers())
    before = {n: l.sigma.detach().clone() for n, l in layers.items()}
    zs = [l.sigma_delta for l in layers.values()]
    opt = torch.optim.Adam(zs, lr=1e-3, eps=1e-15)
    rel(**x).loss.backward()
    live = {n: l.sigma_delta.grad.abs() > 1e-8 for n, l in layers.items()}
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

    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert any(k.endswith(".sigma_delta") for k in keys) and not any(k.endswith(".sigma") for k in keys)
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
            layers = dict(model.vectorfit_layers())
            params_of = {f"{n}.{a}": getattr(l, l.trained_attr(a)) for n, l in layers.items() for a in ("sigma", "bias")}
            snap = {f: params_of[f].detach().clone() for f in frozen}
        opt.step()
        opt.zero_grad()
    assert len(frozen) == 3
    for f in frozen:
        assert torch.equal(params_of[f], snap[f]), f  # a frozen vector does not move, not even by decay
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
            layer.sigma_delta.data.fill_(-0.5)  # .data: no version bump
    halved = logits_of(model, x)
    ref = _vf("absolute").eval()
    with torch.no_grad():
        for _, layer in ref.vectorfit_layers():
            layer.sigma.mul_(0.5)
    assert_close_rel(halved, logits_of(ref, x), rtol=1e-5, what="after a .data edit")


def test_bad_sigma_param_is_named():
    with pytest.raises(ConfigError, match="sigma_param"):
        VectorFitConfig(sigma_param="log")
    with pytest.raises(ValueError, match="sigma_param"):
        SVDLinear(torch.randn(4, 3), None, True, False, sigma_param="log")
