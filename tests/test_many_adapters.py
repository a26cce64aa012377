"""Several adapters on one base model (issue 11): load/switch without a new SVD, isolation of training,
selective saving, exact weighted combinations, mixed-adapter batches, hot swap."""

from __future__ import annotations

import pytest
import torch
from conftest import example_inputs, logits_of, make_tiny_bert, make_tiny_gpt2, max_rel_diff

from vectorfit import AVFConfig, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit.adapter_io import AdapterError

TOL = 1e-5  # float32 round-off of the same computation ordered differently


def _config(**kw) -> VectorFitConfig:
    return VectorFitConfig(**{"variant": "no_avf", "modules_to_save": ["classifier"], **kw})


@torch.no_grad()
def _perturb(vf: VectorFitModel, seed: int, scale: float = 0.2) -> None:
    """Move the active adapter's vectors and head as training would (but reproducibly)."""
    g = torch.Generator().manual_seed(seed)
    for p in [*vf.trainable_vectors().values(), *vf.base_model.classifier.trained_module.parameters()]:
        p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def _saved_adapter(tmp_path, seed: int, name: str, base_seed: int = 0, **kw) -> tuple[str, torch.Tensor]:
    """An adapter folder with perturbed vectors and the logits of the model that saved it."""
    vf = get_vectorfit_model(make_tiny_bert(base_seed), _config(**kw))
    _perturb(vf, seed)
    path = str(tmp_path / name)
    vf.save_pretrained(path)
    return path, logits_of(vf, example_inputs(vf))


def _snapshot(vf: VectorFitModel, name: str) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in vf._slot_params(name).items()}


def test_load_adapter_reuses_the_decomposition_and_switches(tmp_path, monkeypatch):
    path_a, logits_a = _saved_adapter(tmp_path, 1, "a")
    path_b, logits_b = _saved_adapter(tmp_path, 2, "b", sigma_param="relative")
    vf = VectorFitModel.from_pretrained(make_tiny_bert(0), path_a, adapter_name="a")
    factors = {n: (layer.U.data_ptr(), layer.Vh.data_ptr()) for n, layer in vf.vectorfit_layers()}

    def no_svd(*_, **__):
        raise AssertionError("load_adapter must not decompose again")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    vf.load_adapter(path_b, "b")
    assert vf.adapters == ["a", "b"] and vf.active_adapter == "a"  # loading does not activate (peft)
    assert {n: (layer.U.data_ptr(), layer.Vh.data_ptr()) for n, layer in vf.vectorfit_layers()} == factors
    inputs = example_inputs(vf)
    assert max_rel_diff(logits_of(vf, inputs), logits_a) < TOL
    vf.set_adapter("b")
    assert vf.active_adapter == "b" and vf.vectorfit_config.sigma_param == "relative"
    assert max_rel_diff(logits_of(vf, inputs), logits_b) < TOL
    assert any(k.endswith(".sigma_delta") for k in vf.trainable_vectors())  # b's own parameterisation
    vf.set_adapter("a")
    assert max_rel_diff(logits_of(vf, inputs), logits_a) < TOL
    assert not any(k.endswith(".sigma_delta") for k in vf.trainable_vectors())


def test_load_adapter_refuses_another_base_and_taken_names(tmp_path):
    path_other, _ = _saved_adapter(tmp_path, 1, "other", base_seed=1)
    path_same, _ = _saved_adapter(tmp_path, 1, "same")
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    with pytest.raises(AdapterError, match="does not fit this model at target"):
        vf.load_adapter(path_other, "x")
    assert vf.adapters == ["default"]
    with pytest.raises(ValueError, match="is loaded already"):
        vf.load_adapter(path_same, "default")
    with pytest.raises(ValueError, match="reserved for the base model"):
        vf.load_adapter(path_same, "__base__")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        vf.set_adapter("nope")


def test_add_adapter_refuses_a_config_with_other_vectors():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    with pytest.raises(ValueError, match="differs from this model's"):
        vf.add_adapter("s", _config(variant="sigma_attn"))
    with pytest.raises(ValueError, match="differs from this model's"):
        vf.add_adapter("h", _config(modules_to_save=None))
    assert vf.adapters == ["default"]


def test_training_one_adapter_leaves_the_others_untouched():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("new", _config(variant="vectorfit", avf=AVFConfig(k=2, start_step=1, interval=1, num_freezes=2)))
    before_default = _snapshot(vf, "default")
    before_new = _snapshot(vf, "new")
    vf.set_adapter("new")
    trainable = [p for p in vf.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in vf._slot_params("new").values() if p.requires_grad}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = example_inputs(vf, labels=True)
    for step in range(1, 4):
        vf(**batch).loss.backward()
        vf.avf.step(step)
        opt.step()
        opt.zero_grad()
    assert len(vf.avf.frozen) == 2  # the new adapter's own AVF ran
    after_default, after_new = _snapshot(vf, "default"), _snapshot(vf, "new")
    assert all(torch.equal(after_default[k], t) for k, t in before_default.items())
    assert sum(not torch.equal(after_new[k], t) for k, t in before_new.items()) > len(before_new) // 2
    vf.set_adapter("default")
    assert vf.avf is None  # default is no_avf: each adapter keeps its own controller


def _two_trained_adapters():
    """A model with adapters "default" and "b" moved apart, "default" active, and each one's logits."""
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("b")
    vf.set_adapter("b")
    _perturb(vf, 2)
    inputs = example_inputs(vf)
    logits_b = logits_of(vf, inputs)
    vf.set_adapter("default")
    logits_default = logits_of(vf, inputs)
    return vf, inputs, logits_default, logits_b


def test_save_active_and_selected_adapters(tmp_path):
    vf, inputs, logits_default, logits_b = _two_trained_adapters()
    vf.save_pretrained(tmp_path / "active")
    vf.save_pretrained(tmp_path / "both", selected_adapters=["default", "b"])
    assert vf.active_adapter == "default"  # saving another adapter switches back
    for folder, expected in [("active", logits_default), ("both", logits_default), ("both/b", logits_b)]:
        reloaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / folder)
        assert max_rel_diff(logits_of(reloaded, inputs), expected) < TOL, folder
    with pytest.raises(ValueError, match="must be a list"):
        vf.save_pretrained(tmp_path / "x", selected_adapters="b")


def test_delete_adapter():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    vf.add_adapter("b")
    vf.delete_adapter("default")
    assert vf.adapters == ["b"] and vf.active_adapter == "b"
    assert all(set(layer._adapters) == {"b"} for _, layer in vf.vectorfit_layers())
    assert set(vf.base_model.classifier._heads) == {"b"}
    with pytest.raises(ValueError, match="only adapter"):
        vf.delete_adapter("b")


def test_merge_unmerge_disable_with_several_adapters():
    reference = make_tiny_bert(0)
    vf, inputs, logits_default, logits_b = _two_trained_adapters()
    vf.merge()
    assert max_rel_diff(logits_of(vf, inputs), logits_default) < TOL
    vf.set_adapter("b")  # a merged model stays merged, with the new adapter
    assert all(layer.merged for _, layer in vf.vectorfit_layers())
    assert max_rel_diff(logits_of(vf, inputs), logits_b) < TOL
    with vf.disable_adapter():
        assert max_rel_diff(logits_of(vf, inputs), logits_of(reference, inputs)) < TOL
    vf.unmerge()
    assert max_rel_diff(logits_of(vf, inputs), logits_b) < TOL
    plain = vf.merge_and_unload()  # the active adapter
    assert max_rel_diff(logits_of(plain, inputs), logits_b) < TOL


@pytest.mark.parametrize("sigma_param", ["absolute", "relative"])
def test_add_weighted_adapter_is_the_weighted_sum_of_weight_updates(sigma_param):
    vf = get_vectorfit_model(make_tiny_bert(0), _config(sigma_param=sigma_param))
    _perturb(vf, 1)
    vf.add_adapter("b")
    vf.set_adapter("b")
    _perturb(vf, 2)
    weights = {"default": 0.7, "b": -0.4}
    deltas, biases, heads = {}, {}, {}
    for name in weights:
        vf.set_adapter(name)
        deltas[name] = {n: layer.delta_weight() for n, layer in vf.vectorfit_layers()}
        biases[name] = {n: layer.bias.detach() - layer.bias0 for n, layer in vf.vectorfit_layers()}
        heads[name] = {k: t.clone() for k, t in vf.base_model.classifier.trained_module.state_dict().items()}
    vf.add_weighted_adapter(list(weights), list(weights.values()), "mix")
    vf.set_adapter("mix")
    assert vf.vectorfit_config.sigma_param == sigma_param
    for n, layer in vf.vectorfit_layers():
        expected = sum(w * deltas[a][n] for a, w in weights.items())
        got = layer.delta_weight()
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), n
        expected_b = sum(w * biases[a][n] for a, w in weights.items())
        torch.testing.assert_close(layer.bias.detach() - layer.bias0, expected_b, rtol=0, atol=1e-6)
    original = vf.base_model.classifier.original_module.state_dict()
    for k, t in vf.base_model.classifier.trained_module.state_dict().items():
        expected = original[k] + sum(w * (heads[a][k] - original[k]) for a, w in weights.items())
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per adapter"):
        vf.add_weighted_adapter(["default", "b"], [1.0], "bad")
    with pytest.raises(ValueError, match="combination_type='svd' is not supported"):
        vf.add_weighted_adapter(["default", "b"], [1.0, 1.0], "bad", combination_type="svd")
    assert vf.adapters == ["default", "b", "mix"]  # a refused combination adds nothing


def _padded_bert_batch():
    ids = torch.tensor([[5, 9, 12, 7, 30, 2], [8, 4, 0, 0, 0, 0], [11, 3, 6, 9, 0, 0], [40, 41, 42, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.mark.parametrize("variant", ["no_avf", "sigma_attn_bias", "sigma_attn"])  # + bias-only layers; no biases
def test_mixed_batch_rows_equal_each_row_run_alone(variant):
    vf = get_vectorfit_model(make_tiny_bert(0), _config(variant=variant, sigma_param="relative"))
    _perturb(vf, 1)
    vf.add_adapter("b", _config(variant=variant))  # the other parameterisation: both forms in one batch
    vf.set_adapter("b")
    _perturb(vf, 2)
    batch = _padded_bert_batch()
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = vf(**batch, adapter_names=names).logits
    for i, name in enumerate(names):
        n = int(batch["attention_mask"][i].sum())  # the row alone, without its padding
        row = {k: v[i : i + 1, :n] for k, v in batch.items()}
        if name == "__base__":
            with vf.disable_adapter():
                alone = logits_of(vf, row)
        else:
            vf.set_adapter(name)
            alone = logits_of(vf, row)
        assert max_rel_diff(mixed[i : i + 1], alone) < TOL, (i, name)
    assert vf.active_adapter in ("b", "default") and all(layer._rows is None for _, layer in vf.vectorfit_layers())
    with pytest.raises(ValueError, match="unknown adapters"):
        vf(**batch, adapter_names=["b", "x", "b", "b"])
    with pytest.raises(ValueError, match="2 names for a batch of 4 rows"):
        vf(**batch, adapter_names=["b", "default"])
    vf.merge()
    with pytest.raises(ValueError, match="unmerge"):
        vf(**batch, adapter_names=names)


def test_a_batch_of_only_the_active_adapter_takes_the_ordinary_path():
    """adapter_names naming only the active adapter is the plain forward (cached dense weight, merged
    model allowed), not the per-row factorised pass; any other name still mixes."""
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("b", _config())
    batch = _padded_bert_batch()
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.append(m._rows is not None))
             for _, layer in vf.vectorfit_layers()]
    with torch.no_grad():
        for _ in range(3):  # the second no-grad call builds each layer's cached W, the third uses it
            plain = vf(**batch).logits
        same = vf(**batch, adapter_names=["default"] * 4).logits
        assert not any(seen)
        vf(**batch, adapter_names=["default", "default", "b", "default"])
        assert all(seen[-len(hooks):])
        vf.merge()
        merged = vf(**batch, adapter_names=["default"] * 4).logits  # no "unmerge first" error
    for h in hooks:
        h.remove()
    assert torch.equal(same, plain)
    assert max_rel_diff(merged, plain) < TOL


def test_mixed_batch_generate_with_kv_cache():
    vf = get_vectorfit_model(make_tiny_gpt2(0), VectorFitConfig(variant="no_avf"))

    @torch.no_grad()
    def perturb_vectors(seed: int) -> None:  # GPT-2 has no saved head: the vectors only
        g = torch.Generator().manual_seed(seed)
        for p in vf.trainable_vectors().values():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * p.abs().mean())

    perturb_vectors(1)
    vf.add_adapter("b")
    vf.set_adapter("b")
    perturb_vectors(2)
    prompts = torch.tensor([[5, 6, 7], [9, 10, 11], [12, 13, 14]])
    names = ["default", "b", "__base__"]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    mixed = vf.generate(prompts, adapter_names=names, **kw)
    for i, name in enumerate(names):
        if name == "__base__":
            with vf.disable_adapter():
                alone = vf.generate(prompts[i : i + 1], **kw)
        else:
            vf.set_adapter(name)
            alone = vf.generate(prompts[i : i + 1], **kw)
        assert torch.equal(mixed.sequences[i], alone.sequences[0]), name
        for step_mixed, step_alone in zip(mixed.scores, alone.scores):  # every cached decoding step
            assert max_rel_diff(step_mixed[i : i + 1], step_alone) < 1e-4, name


def test_hotswap_writes_in_place(tmp_path):
    path_b, logits_b = _saved_adapter(tmp_path, 2, "b")
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    params = {k: id(p) for k, p in vf._slot_params("default").items()}
    vf.load_adapter(path_b, "default", hotswap=True)
    assert {k: id(p) for k, p in vf._slot_params("default").items()} == params
    assert max_rel_diff(logits_of(vf, example_inputs(vf)), logits_b) < TOL
    path_rel, _ = _saved_adapter(tmp_path, 3, "rel", sigma_param="relative")
    with pytest.raises(AdapterError, match="the other form"):
        vf.load_adapter(path_rel, "default", hotswap=True)
    with pytest.raises(ValueError, match="no adapter named"):
        vf.load_adapter(path_b, "missing", hotswap=True)


def test_waiting_adapters_follow_dtype_and_device_moves():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    vf.add_adapter("b")
    waiting = vf._slot_params("b")
    vf.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in waiting.values())  # vectors and the waiting head
    assert {k: id(p) for k, p in vf._slot_params("b").items()} == {k: id(p) for k, p in waiting.items()}


def test_hotswap_does_not_recompile_a_compiled_model(tmp_path):
    path_b, logits_b = _saved_adapter(tmp_path, 2, "b")
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    graphs = []

    def counting_backend(gm, example_inputs):  # records each (re)compilation, runs the graph eagerly
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(vf, backend=counting_backend)
    inputs = example_inputs(vf)
    with torch.no_grad():
        before = compiled(**inputs).logits
        n = len(graphs)
        vf.load_adapter(path_b, "default", hotswap=True)
        after = compiled(**inputs).logits
    assert n >= 1 and len(graphs) == n  # no recompilation
    assert max_rel_diff(before, logits_b) > 1e-2  # the swap changed the outputs...
    assert max_rel_diff(after, logits_b) < TOL  # ...to the new adapter's
