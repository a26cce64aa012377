"""Conv2d targets: every kind of 2-D convolution a real network uses, under the same contract as a
Linear (exact at init, only the vectors train, save -> load, merge -> a plain ``nn.Conv2d`` with the
same attributes, unmerge, disable, many adapters and mixed batches, the SVD cache, the base check).

A Conv2d is the matrix ``out x (in/groups * kh * kw)``: its kernel tensor reshaped. A grouped or
depthwise convolution is one matrix too (its kernel is one tensor); rebuilding the kernel from the
factors and running the layer's own convolution keeps stride, padding (also ``"same"`` and the
reflect/replicate/circular modes), dilation and groups exactly as the base layer has them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vectorfit
from peft import PeftModel
from vectorfit import AdapterError, TargetError, VectorFitConfig, get_vectorfit_model

# Every convolution here: (name, constructor). Inputs are 3 x 12 x 12, channels chosen to chain.
KINDS = {
    "3x3": lambda: nn.Conv2d(3, 8, 3, padding=1),
    "1x1-no-bias": lambda: nn.Conv2d(3, 8, 1, bias=False),
    "1x3-stride-dilation": lambda: nn.Conv2d(3, 8, (1, 3), stride=2, dilation=(1, 2), padding=(0, 2)),
    "same-reflect": lambda: nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"),
    "circular-no-bias": lambda: nn.Conv2d(3, 8, 5, padding=2, padding_mode="circular", bias=False),
    "replicate-stride2": lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="replicate"),
    "depthwise": lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)),
    "grouped": lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4)),
    "7x7-stride2-stem": lambda: nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False),
}


class Net(nn.Module):
    """One convolution of the given kind (plus a 1x1 in front for the grouped kinds), then a head."""

    def __init__(self, kind: str, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = KINDS[kind]()
        with torch.no_grad():  # distinct singular values: the diagonal check below is then well posed
            for m in self.body.modules():
                if isinstance(m, nn.Conv2d):
                    w = m.weight.reshape(m.weight.shape[0], -1).double()
                    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                    S = torch.linspace(1.0, 0.2, S.numel(), dtype=torch.float64) * S.max()
                    m.weight.copy_(((U * S) @ Vh).reshape(m.weight.shape).float())
        self.head = nn.Linear(8 if kind not in ("depthwise",) else 6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).mean((2, 3)))


def _convs(net: nn.Module) -> list[str]:
    return [f"body.{n}" if n else "body" for n, m in net.body.named_modules() if isinstance(m, nn.Conv2d)]


def _x(seed: int = 0, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))


def _config(net, **kw) -> VectorFitConfig:
    kw.setdefault("variant", "no_avf")
    return VectorFitConfig(target_modules=_convs(net), modules_to_save=["head"], progress=False, **kw)


def _train(model, steps: int = 3, dtype: torch.dtype = torch.float32) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.1)
    model.train()
    for _ in range(steps):
        model(_x(1).to(dtype)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_contract_of_a_linear_holds_for_every_kind_of_conv(kind, tmp_path):
    base = Net(kind).eval()
    orig = copy.deepcopy(base)
    x = _x()
    with torch.no_grad():
        ref = orig(x)
    model = get_vectorfit_model(base, _config(orig))
    layers = dict(model.vectorfit_layers())
    assert set(layers) == set(_convs(orig)) and all(layer.conv2d and layer.decomposed for layer in layers.values())
    # exact at init, on the inference path and on the training path
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x).detach(), ref, rtol=1e-5, atol=1e-6)
    _train(model)
    with torch.no_grad():
        adapted = model(x)
    assert (adapted - ref).abs().max() > 1e-3
    # save -> a fresh base -> load: the same outputs
    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(Net(kind).eval(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=0)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x), adapted, rtol=1e-5, atol=1e-6)
        loaded.unmerge_adapter()
        torch.testing.assert_close(loaded(x), adapted, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-6)
    for name in _convs(orig):
        o, m = orig.get_submodule(name), merged.get_submodule(name)
        assert type(m) is nn.Conv2d, name
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
            assert getattr(m, attr) == getattr(o, attr), f"{name}.{attr}"
        assert m.weight.shape == o.weight.shape and m.bias is not None  # the trained bias is kept
        # Independent check that only the singular values changed: in the ORIGINAL matrix's
        # singular bases, the merged matrix is diagonal.
        W0 = o.weight.detach().reshape(o.out_channels, -1).double()
        W1 = m.weight.detach().reshape(o.out_channels, -1).double()
        U0, S0, Vh0 = torch.linalg.svd(W0, full_matrices=False)
        D = U0.T @ W1 @ Vh0.T
        off = D - torch.diag(torch.diagonal(D))
        assert off.abs().max() <= 1e-4 * S0.max(), f"{name}: something other than the singular values changed"
        assert (torch.diagonal(D) - S0).abs().max() > 1e-3, f"{name}: the singular values did not train"


def test_many_adapters_and_mixed_batches_on_convolutions(tmp_path):
    base = Net("grouped").eval()
    orig = copy.deepcopy(base)
    model = get_vectorfit_model(base, _config(orig), adapter_name="a")
    _train(model)
    model.add_adapter("b", _config(orig))  # the same factors: no SVD
    model.set_adapter("b")
    _train(model, steps=2)
    x = _x(n=3)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(x)
        with model.disable_adapter():
            alone["__base__"] = model(x)
        rows = ["a", "__base__", "b"]
        mixed = model(x, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-6, msg=name)
    # an exact weighted sum: dW = 0.5 dW_a + 0.5 dW_b, layer by layer
    model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "blend")
    for _, layer in model.vectorfit_layers():
        want = 0.5 * layer.get_delta_weight("a") + 0.5 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight("blend"), want, rtol=1e-5, atol=1e-6)


def test_svd_cache_and_base_fingerprint_cover_convolutions(tmp_path):
    orig = Net("3x3")
    first = get_vectorfit_model(copy.deepcopy(orig), _config(orig, cache_dir=str(tmp_path / "cache")))
    second = get_vectorfit_model(copy.deepcopy(orig), _config(orig, cache_dir=str(tmp_path / "cache")))
    assert first.svd_cache.misses == 1 and second.svd_cache.hits == 1
    first.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="body"):
        PeftModel.from_pretrained(Net("3x3", seed=5), tmp_path / "a")  # other weights: refused before any SVD


def test_bf16_convolution_is_exact_at_init_and_trains():
    orig = Net("3x3").to(torch.bfloat16).eval()
    model = get_vectorfit_model(copy.deepcopy(orig), _config(orig))
    x = _x().to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(x).float(), orig(x).float(), rtol=2e-2, atol=2e-2)
    layer = dict(model.vectorfit_layers())["body"]
    assert layer.U.dtype == torch.bfloat16 and layer.vectorfit_sigma["default"].dtype == torch.float32
    _train(model, steps=1, dtype=torch.bfloat16)
    assert not torch.equal(layer.vectorfit_sigma["default"], layer.sigma0)


def test_avf_runs_on_a_convolutional_network():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 12 * 12, 3))
    avf = vectorfit.AVFConfig(k=2, start_step=1, interval=1, num_freezes=2)
    model = get_vectorfit_model(net, VectorFitConfig(target_modules=["0", "2", "4"], modules_to_save=["6"], avf=avf,
                                                     progress=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2, 3):
        model(_x()).pow(2).mean().backward()
        model.avf.step(step)
        opt.step()
        opt.zero_grad()
    assert [h["step"] for h in model.avf.history] == [1, 2] and len(model.avf.frozen) == 2


@pytest.mark.parametrize("layer, what", [(nn.ConvTranspose2d(3, 8, 3), "ConvTranspose2d"), (nn.Conv3d(3, 8, 3), "Conv3d"),
                                         (nn.Conv1d(3, 8, 3), "Conv1d")])
def test_other_convolutions_are_refused_naming_them(layer, what):
    net = nn.Sequential(layer)
    with pytest.raises(TargetError, match=f"{what}.*transposed or 1-D/3-D convolution"):
        get_vectorfit_model(net, VectorFitConfig(target_modules=["0"], progress=False))


def test_all_linear_leaves_convolutions_alone():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 10 * 10, 16), nn.Linear(16, 3))
    from vectorfit.targets import find_targets

    assert [n for n, _, _ in find_targets(net, "all-linear")] == ["2"]  # as peft's "all-linear": no conv, no output layer
