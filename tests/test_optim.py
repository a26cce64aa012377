"""Optimizer parameter groups: every trainable parameter in exactly one group, each at its rate."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_bert
from vectorfit import VectorFitConfig, get_vectorfit_model, param_groups


def _model(variant="vectorfit"):
    return get_vectorfit_model(make_tiny_bert(), VectorFitConfig(variant=variant, modules_to_save=["classifier"],
                                                               svd_cache=False))


def test_groups_partition_the_trainable_parameters_by_kind():
    model = _model()
    groups = param_groups(model, lr=1e-3, bias_lr=1e-4, head_lr=5e-3)
    by = {g["name"]: g for g in groups}
    assert list(by) == ["sigma", "bias", "head"]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed)) and set(listed) == trainable
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".vectorfit_sigma.default") for p in by["sigma"]["params"])
    assert all(names[id(p)].endswith(".vectorfit_bias.default") and "classifier" not in names[id(p)] for p in by["bias"]["params"])
    assert all(".classifier.modules_to_save.default." in names[id(p)] for p in by["head"]["params"])
    assert len(by["head"]["params"]) == 2  # the head's weight and bias (peft's trained copy)
    assert (by["sigma"]["lr"], by["bias"]["lr"], by["head"]["lr"]) == (1e-3, 1e-4, 5e-3)
    layers = [layer for _, layer in model.vectorfit_layers()]
    # exactly the layers' own vector objects, in model order
    assert [id(p) for p in by["sigma"]["params"]] == [id(layer.vectorfit_sigma["default"]) for layer in layers]
    assert [id(p) for p in by["bias"]["params"]] == [id(layer.vectorfit_bias["default"]) for layer in layers]

    # A parameter unfrozen by hand is none of the three kinds: it gets a group of its own, at lr.
    ln = model.get_base_model().bert.embeddings.LayerNorm.weight
    ln.requires_grad_(True)
    groups = param_groups(model, lr=1e-3, bias_lr=1e-4, head_lr=5e-3)
    assert [g["name"] for g in groups] == ["sigma", "bias", "head", "other"]
    assert [id(p) for p in groups[-1]["params"]] == [id(ln)] and groups[-1]["lr"] == 1e-3


def test_each_group_moves_by_its_own_rate_under_adam():
    """Adam's first step moves every entry with a non-zero gradient by its rate (sign of the gradient
    times lr, up to eps): checked per group against the rates asked for."""
    model = _model("no_avf")
    groups = param_groups(model, lr=1e-3, bias_lr=1e-5, head_lr=1e-2)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    opt = torch.optim.Adam(groups, eps=1e-12)
    x = torch.randint(0, 50, (4, 7))
    model(input_ids=x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    grads = {id(p): p.grad.clone() for g in groups for p in g["params"]}
    opt.step()
    for g in groups:
        for p in g["params"]:
            moved = (p.detach() - before[id(p)]).abs()
            live = grads[id(p)].abs() > 1e-8  # |g| / (|g| + eps) = 1 to 1e-4
            torch.testing.assert_close(moved[live], torch.full_like(moved[live], g["lr"]), rtol=2e-3, atol=0)


def test_bad_rates_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="bias_lr=-1"):
        param_groups(model, lr=1e-3, bias_lr=-1)
    with pytest.raises(ValueError, match="head_lr=nan"):
        param_groups(model, lr=1e-3, head_lr=float("nan"))
    with pytest.raises(TypeError, match="get_vectorfit_model"):
        param_groups(make_tiny_bert(), lr=1e-3)
