"""Several adapters on one base model: load/switch without a new SVD, isolation of training,
selective saving, exact weighted combinations, mixed-adapter batches, hot swap.

The model is a ``peft.PeftModel`` whose tuner is VectorFit: adapters are peft's (``peft_config``,
``add_adapter(name, config)``, ``load_adapter``, ``set_adapter``, ``delete_adapter``), and each one's
tensors are ``layer.vectorfit_sigma[name]`` / ``layer.vectorfit_bias[name]`` and the head copy
``classifier.modules_to_save[name]``."""

from __future__ import annotations

import pytest
import torch
from conftest import example_inputs, logits_of, make_tiny_bert, make_tiny_gpt2, max_rel_diff

from vectorfit import AdapterError, AVFConfig, VectorFitConfig, VectorFitModel, get_vectorfit_model

TOL = 1e-5  # float32 round-off of the same computation ordered differently


def _config(**kw) -> VectorFitConfig:
    return VectorFitConfig(**{"variant": "no_avf", "modules_to_save": ["classifier"], **kw})


def _head(vf, name: str) -> torch.nn.Module:
    """Adapter ``name``'s copy of the classifier (peft's ``ModulesToSaveWrapper``)."""
    return vf.base_model.model.classifier.modules_to_save[name]


def _adapter_params(vf, name: str) -> dict[str, torch.nn.Parameter]:
    """Every parameter that belongs to adapter ``name``: its vectors and its head copy, by peft name
    (adapter names contain no '.', so the name is the last component of a vector's key)."""
    out = {}
    for key, p in vf.named_parameters():
        parts = key.split(".")
        if (parts[-2] in ("vectorfit_sigma", "vectorfit_bias") and parts[-1] == name) or f".modules_to_save.{name}." in key:
            out[key] = p
    return out


def _assert_rows_match_alone(vf, batch, names, mixed) -> None:
    """Row ``i`` of a mixed batch equals that row alone (without its padding) under adapter ``names[i]``."""
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


@torch.no_grad()
def _perturb(vf, seed: int, scale: float = 0.2) -> None:
    """Move the active adapter's vectors and head as training would (but reproducibly)."""
    g = torch.Generator().manual_seed(seed)
    heads = vf.base_model.model.classifier.modules_to_save
    head = list(heads[vf.active_adapter].parameters()) if vf.active_adapter in heads else []  # an adapter may have none
    for p in [*vf.trainable_vectors().values(), *head]:
        p.add_(scale * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))


def _saved_adapter(tmp_path, seed: int, name: str, base_seed: int = 0, **kw) -> tuple[str, torch.Tensor]:
    """An adapter folder with perturbed vectors and the logits of the model that saved it."""
    vf = get_vectorfit_model(make_tiny_bert(base_seed), _config(**kw))
    _perturb(vf, seed)
    path = str(tmp_path / name)
    vf.save_pretrained(path)
    return path, logits_of(vf, example_inputs(vf))


def _snapshot(vf, name: str) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in _adapter_params(vf, name).items()}


def test_load_adapter_reuses_the_decomposition_and_switches(tmp_path, monkeypatch):
    path_a, logits_a = _saved_adapter(tmp_path, 1, "a")
    path_b, logits_b = _saved_adapter(tmp_path, 2, "b", sigma_param="relative")
    vf = VectorFitModel.from_pretrained(make_tiny_bert(0), path_a, adapter_name="a")
    factors = {n: (layer.U.data_ptr(), layer.Vh.data_ptr()) for n, layer in vf.vectorfit_layers()}

    def no_svd(*_, **__):
        raise AssertionError("load_adapter must not decompose again")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    vf.load_adapter(path_b, "b")
    assert list(vf.peft_config) == ["a", "b"] and vf.active_adapter == "a"  # loading does not activate (peft)
    assert {n: (layer.U.data_ptr(), layer.Vh.data_ptr()) for n, layer in vf.vectorfit_layers()} == factors
    inputs = example_inputs(vf)
    assert max_rel_diff(logits_of(vf, inputs), logits_a) < TOL
    vf.set_adapter("b")
    assert vf.active_adapter == "b" and vf.peft_config["b"].sigma_param == "relative"
    assert max_rel_diff(logits_of(vf, inputs), logits_b) < TOL
    # b's own parameterisation: its trained "sigma" vector is z, with s = s0 (1 + z)
    layers = dict(vf.vectorfit_layers())
    for key, p in vf.trainable_vectors().items():
        module, _, kind = key.rpartition(".")
        layer = layers[module]
        if kind == "sigma":
            assert p is layer.vectorfit_sigma["b"] and layer.vectorfit_sigma_param["b"] == "relative"
            torch.testing.assert_close(layer.sigma, layer.sigma0 * (1 + p.detach()), rtol=0, atol=0)
    vf.set_adapter("a")
    assert max_rel_diff(logits_of(vf, inputs), logits_a) < TOL
    for key, p in vf.trainable_vectors().items():
        module, _, kind = key.rpartition(".")
        if kind == "sigma":  # a's: s itself
            assert p is layers[module].vectorfit_sigma["a"] and layers[module].vectorfit_sigma_param["a"] == "absolute"
            assert torch.equal(layers[module].sigma, p)


def test_load_adapter_refuses_another_base_and_invalid_names(tmp_path):
    path_other, _ = _saved_adapter(tmp_path, 1, "other", base_seed=1)
    path_same, logits_same = _saved_adapter(tmp_path, 1, "same")
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    with pytest.raises(AdapterError, match="does not fit this model at target"):
        vf.load_adapter(path_other, "x")
    assert list(vf.peft_config) == ["default"]  # rolled back: no trace of "x"
    assert all(set(layer.vectorfit_sigma_param) == {"default"} for _, layer in vf.vectorfit_layers())
    assert set(vf.base_model.model.classifier.modules_to_save) == {"default"}
    with pytest.raises(ValueError, match="'__base__' is invalid"):
        vf.load_adapter(path_same, "__base__")
    with pytest.raises(ValueError, match="'a.b' is invalid"):
        vf.load_adapter(path_same, "a.b")
    assert list(vf.peft_config) == ["default"]
    with pytest.raises(ValueError, match="Adapter nope not found"):
        vf.set_adapter("nope")
    # peft loads into an existing name by replacing its weights (what Trainer's resume relies on)
    vf.load_adapter(path_same, "default")
    assert list(vf.peft_config) == ["default"]
    assert max_rel_diff(logits_of(vf, example_inputs(vf)), logits_same) < TOL


def test_adapters_with_other_vectors_and_heads_coexist():
    """Each adapter has its own config (peft): another variant trains other vectors on the same layers,
    an adapter without modules_to_save computes with the original head."""
    reference = make_tiny_bert(0)
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("s", _config(variant="sigma_attn"))
    vf.add_adapter("h", _config(modules_to_save=None))
    assert list(vf.peft_config) == ["default", "s", "h"]
    for _, layer in vf.vectorfit_layers():
        assert ("s" in layer.vectorfit_sigma) == (layer.role == "attn") and "s" not in layer.vectorfit_bias
        assert "h" in layer.vectorfit_sigma and "h" in layer.vectorfit_bias
    assert set(vf.base_model.model.classifier.modules_to_save) == {"default", "s"}
    inputs = example_inputs(vf)
    want = logits_of(reference, inputs)
    for name in ("s", "h"):  # fresh adapters are exact at init, whatever "default" did to its vectors and head
        vf.set_adapter(name)
        assert max_rel_diff(logits_of(vf, inputs), want) < TOL, name
    vf.set_adapter("s")
    trainable = {k for k, p in vf.named_parameters() if p.requires_grad}
    assert trainable == {k for k, p in _adapter_params(vf, "s").items()}
    assert trainable and all(".vectorfit_bias." not in k for k in trainable)
    vf.set_adapter("h")
    trainable = {k for k, p in vf.named_parameters() if p.requires_grad}
    assert trainable == set(_adapter_params(vf, "h")) and not any("classifier" in k for k in trainable)


def test_training_one_adapter_leaves_the_others_untouched():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("new", _config(variant="vectorfit", avf=AVFConfig(k=2, start_step=1, interval=1, num_freezes=2)))
    before_default = _snapshot(vf, "default")
    before_new = _snapshot(vf, "new")
    vf.set_adapter("new")
    trainable = [p for p in vf.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in _adapter_params(vf, "new").values()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    batch = example_inputs(vf, labels=True)
    vf.train()
    for step in range(1, 4):
        vf(**batch).loss.backward()
        vf.avf.step(step)
        opt.step()
        opt.zero_grad()
    vf.eval()
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
    vf.add_adapter("b", _config())
    vf.set_adapter("b")
    _perturb(vf, 2)
    inputs = example_inputs(vf)
    logits_b = logits_of(vf, inputs)
    vf.set_adapter("default")
    logits_default = logits_of(vf, inputs)
    assert max_rel_diff(logits_b, logits_default) > 1e-2  # they differ, so the checks below can tell them apart
    return vf, inputs, logits_default, logits_b


def test_save_all_and_selected_adapters(tmp_path):
    """peft's layout: save_pretrained writes every adapter ("default" in the folder, others in
    folder/<name>) unless selected_adapters picks some."""
    vf, inputs, logits_default, logits_b = _two_trained_adapters()
    vf.save_pretrained(tmp_path / "all")
    vf.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert vf.active_adapter == "default"  # saving another adapter leaves the active one active
    assert not (tmp_path / "only_b" / "adapter_config.json").exists()
    for folder, expected in [("all", logits_default), ("all/b", logits_b), ("only_b/b", logits_b)]:
        reloaded = VectorFitModel.from_pretrained(make_tiny_bert(0), tmp_path / folder)
        assert max_rel_diff(logits_of(reloaded, inputs), expected) < TOL, folder
    with pytest.raises(ValueError, match="invalid `selected_adapters`"):
        vf.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_delete_adapter():
    vf = get_vectorfit_model(make_tiny_bert(0), _config(variant="vectorfit", avf=AVFConfig(k=2)))
    vf.add_adapter("b", _config())
    vf.delete_adapter("default")
    assert list(vf.peft_config) == ["b"] and vf.active_adapter == "b"
    for _, layer in vf.vectorfit_layers():
        assert set(layer.vectorfit_sigma) == set(layer.vectorfit_bias) == set(layer.vectorfit_sigma_param) == {"b"}
    assert set(vf.base_model.model.classifier.modules_to_save) == {"b"}
    assert "default" not in vf.base_model.vectorfit_avf  # its AVF controller went with it
    assert not any(".default" in k for k in vf.state_dict())
    with pytest.raises(ValueError, match="Adapter default does not exist"):
        vf.delete_adapter("default")


def test_merge_unmerge_disable_with_several_adapters():
    reference = make_tiny_bert(0)
    vf, inputs, logits_default, logits_b = _two_trained_adapters()
    vf.merge()
    assert all(layer.merged for _, layer in vf.vectorfit_layers())
    assert max_rel_diff(logits_of(vf, inputs), logits_default) < TOL
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        vf.set_adapter("b")  # peft: switching adapters unmerges
    assert not any(layer.merged for _, layer in vf.vectorfit_layers())
    assert max_rel_diff(logits_of(vf, inputs), logits_b) < TOL
    vf.merge()
    assert all(layer.merged_adapters == ["b"] for _, layer in vf.vectorfit_layers())
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
    vf.add_adapter("b", _config(sigma_param=sigma_param))
    vf.set_adapter("b")
    _perturb(vf, 2)
    weights = {"default": 0.7, "b": -0.4}
    deltas, biases, heads = {}, {}, {}
    for name in weights:
        vf.set_adapter(name)
        deltas[name] = {n: layer.delta_weight() for n, layer in vf.vectorfit_layers()}
        biases[name] = {n: layer.vectorfit_bias[name].detach() - layer.bias0 for n, layer in vf.vectorfit_layers()}
        heads[name] = {k: t.clone() for k, t in _head(vf, name).state_dict().items()}
    vf.add_weighted_adapter(list(weights), list(weights.values()), "mix")
    vf.set_adapter("mix")
    assert vf.peft_config["mix"].sigma_param == sigma_param
    for n, layer in vf.vectorfit_layers():
        expected = sum(w * deltas[a][n] for a, w in weights.items())
        got = layer.delta_weight()
        assert float((got - expected).abs().max()) <= 1e-5 * float(expected.abs().max()), n
        expected_b = sum(w * biases[a][n] for a, w in weights.items())
        torch.testing.assert_close(layer.vectorfit_bias["mix"].detach() - layer.bias0, expected_b, rtol=0, atol=1e-6)
    original = vf.base_model.model.classifier.original_module.state_dict()
    for k, t in _head(vf, "mix").state_dict().items():
        expected = original[k] + sum(w * (heads[a][k] - original[k]) for a, w in weights.items())
        torch.testing.assert_close(t, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="one weight per adapter"):
        vf.add_weighted_adapter(["default", "b"], [1.0], "bad")
    with pytest.raises(ValueError, match="combination_type='svd' is not supported"):
        vf.add_weighted_adapter(["default", "b"], [1.0, 1.0], "bad", combination_type="svd")
    assert list(vf.peft_config) == ["default", "b", "mix"]  # a refused combination adds nothing


def _padded_bert_batch():
    ids = torch.tensor([[5, 9, 12, 7, 30, 2], [8, 4, 0, 0, 0, 0], [11, 3, 6, 9, 0, 0], [40, 41, 42, 0, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def _no_hooks_left(vf) -> bool:
    """The per-row adapter names reach the layers through forward pre-hooks, removed after each call."""
    heads = [vf.base_model.model.classifier]
    return all(not m._forward_pre_hooks for m in [*(layer for _, layer in vf.vectorfit_layers()), *heads])


@pytest.mark.parametrize("variant", ["no_avf", "sigma_attn_bias", "sigma_attn"])  # + bias-only layers; no biases
def test_mixed_batch_rows_equal_each_row_run_alone(variant):
    vf = get_vectorfit_model(make_tiny_bert(0), _config(variant=variant, sigma_param="relative"))
    _perturb(vf, 1)
    vf.add_adapter("b", _config(variant=variant))  # the other parameterisation: both forms in one batch
    vf.set_adapter("b")
    _perturb(vf, 2)
    vf.eval()  # mixed batches are for inference (peft refuses them in training mode)
    batch = _padded_bert_batch()
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = vf(**batch, adapter_names=names).logits
    assert _no_hooks_left(vf)
    _assert_rows_match_alone(vf, batch, names, mixed)
    assert vf.active_adapter in ("b", "default") and _no_hooks_left(vf)
    with pytest.raises(ValueError, match="non-existing adapter.*x"):
        vf(**batch, adapter_names=["b", "x", "b", "b"])
    with pytest.raises(ValueError, match="2 names for a batch of 4 rows"):
        vf(**batch, adapter_names=["b", "default"])
    assert _no_hooks_left(vf)
    vf.train()
    with pytest.raises(ValueError, match="training mode"):
        vf(**batch, adapter_names=names)
    vf.eval()
    vf.merge()
    with pytest.raises(ValueError, match="unmerge"):
        vf(**batch, adapter_names=names)


@pytest.mark.parametrize("active", ["default", "h"])
def test_mixed_batch_with_an_adapter_that_has_no_head(active):
    """An adapter without modules_to_save computes with the original head (as it does when active alone)."""
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("h", _config(modules_to_save=None))
    vf.set_adapter("h")
    _perturb(vf, 2)  # vectors only: "h" has no head
    vf.set_adapter(active)
    vf.eval()
    batch = _padded_bert_batch()
    names = ["default", "h", "__base__", "h"]
    with torch.no_grad():
        mixed = vf(**batch, adapter_names=names).logits
    _assert_rows_match_alone(vf, batch, names, mixed)


def test_a_batch_of_only_the_active_adapter_takes_the_ordinary_path():
    """adapter_names naming only the active adapter is the plain forward (cached dense weight, merged
    model allowed), not the per-row factorised pass; any other name still mixes."""
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.add_adapter("b", _config())
    vf.eval()
    batch = _padded_bert_batch()
    seen = []  # per layer call: did the layer get per-row adapter names?
    hooks = [layer.register_forward_hook(lambda m, a, kw, out: seen.append(kw.get("adapter_names") is not None), with_kwargs=True)
             for _, layer in vf.vectorfit_layers()]
    with torch.no_grad():
        for _ in range(3):  # the second no-grad call builds each layer's cached W, the third uses it
            plain = vf(**batch).logits
        same = vf(**batch, adapter_names=["default"] * 4).logits
        assert seen and not any(seen)
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
    vf.add_adapter("b", VectorFitConfig(variant="no_avf"))
    vf.set_adapter("b")
    perturb_vectors(2)
    vf.eval()
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
    params = {k: id(p) for k, p in _adapter_params(vf, "default").items()}
    assert len(params) == 24 + 2  # 12 layers x (sigma, bias), the head's weight and bias
    vf.hotswap_adapter(path_b, "default")
    assert {k: id(p) for k, p in _adapter_params(vf, "default").items()} == params
    assert max_rel_diff(logits_of(vf, example_inputs(vf)), logits_b) < TOL
    path_rel, _ = _saved_adapter(tmp_path, 3, "rel", sigma_param="relative")
    before = _snapshot(vf, "default")
    with pytest.raises(AdapterError, match="the other form"):
        vf.hotswap_adapter(path_rel, "default")
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        vf.hotswap_adapter(path_b, "missing")
    assert all(torch.equal(p, before[k]) for k, p in _adapter_params(vf, "default").items())  # nothing written


def test_waiting_adapters_follow_dtype_and_device_moves():
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    vf.add_adapter("b", _config())
    waiting = _adapter_params(vf, "b")
    assert waiting and all(p.dtype == torch.float32 for p in waiting.values())
    vf.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in _adapter_params(vf, "b").values())  # vectors and the waiting head
    assert {k: id(p) for k, p in _adapter_params(vf, "b").items()} == {k: id(p) for k, p in waiting.items()}


def test_hotswap_does_not_recompile_a_compiled_model(tmp_path):
    path_b, logits_b = _saved_adapter(tmp_path, 2, "b")
    vf = get_vectorfit_model(make_tiny_bert(0), _config())
    _perturb(vf, 1)
    vf.eval()
    graphs = []

    def counting_backend(gm, example_inputs):  # records each (re)compilation, runs the graph eagerly
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(vf, backend=counting_backend)
    inputs = example_inputs(vf)
    with torch.no_grad():
        before = compiled(**inputs).logits
        n = len(graphs)
        vf.hotswap_adapter(path_b, "default")
        after = compiled(**inputs).logits
    assert n >= 1 and len(graphs) == n  # no recompilation
    assert max_rel_diff(before, logits_b) > 1e-2  # the swap changed the outputs...
    assert max_rel_diff(after, logits_b) < TOL  # ...to the new adapter's
