"""Targets VectorFit must leave out or refuse, with real layers and tiny models.

* ``"all-linear"`` leaves out the output layer, as peft's does: a causal LM's ``lm_head``, a task
  head (``score``, ``classifier``), a plain classifier's last Linear (a ResNet's ``fc``).
* A quantised target (bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, which *are* ``nn.Linear``
  subclasses; torchao / optimum-quanto tensor subclasses; int8 or float8 storage) is refused with
  the module's name before any SVD and before anything is cached: its SVD would be of the raw
  storage without its scales.
* A target on the meta device (``accelerate.init_empty_weights()``, CPU offloading) is refused the
  same way instead of failing with "Cannot copy out of meta tensor".

The "before any SVD" checks quantise the *last* target and use an on-disk cache: a check made
while decomposing would leave the earlier targets' SVDs in the cache folder.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import _llama_like, example_inputs, make_tiny_bert, make_tiny_llama
from torch import nn

from vectorfit import TargetError, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit.targets import find_targets

LAST = "model.layers.1.mlp.down_proj"  # the last default target of the tiny Llama


def _names(model, targets="all-linear", **kw):
    return [n for n, _, _ in find_targets(model, targets, **kw)]


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _cfg(tmp_path, **kw):
    return VectorFitConfig(cache_dir=str(tmp_path / "cache"), svd_cache=True, progress=False, **kw)


def _cached(tmp_path, folder="cache") -> list:
    folder = tmp_path / folder
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _replace(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ------------------------------------------------------------------------------ "all-linear" and heads
class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class _TinyResNet(nn.Module):
    """torchvision's ResNet layout in miniature: convolutions, pooling, and one Linear ``fc``."""

    def __init__(self, classes=3):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(_Block(8), _Block(8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(torch.relu(self.bn1(self.conv1(x))))), 1))


class _MLPClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.drop = nn.Dropout(0.0)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        return self.out(self.drop(self.body(x)))


class _Backbone(nn.Module):
    """A plain module around a transformers backbone, with no Linear head: its last Linear
    (``down_proj``, followed by the final norm) is no output layer and stays a target."""

    def __init__(self):
        super().__init__()
        self.backbone = make_tiny_llama(0).model


def test_all_linear_leaves_out_a_plain_classifiers_last_linear():
    m = _MLPClassifier()
    assert _names(m) == ["body.0", "body.2"]
    vf = get_vectorfit_model(m, VectorFitConfig(target_modules="all-linear", variant="no_avf", progress=False))
    assert [n for n, _ in vf.vectorfit_layers()] == ["body.0", "body.2"]
    assert type(vf.get_base_model().out) is nn.Linear
    assert vf(torch.randn(2, 16)).shape == (2, 3)
    # Named explicitly, the output layer is adapted.
    assert _names(_MLPClassifier(), ["out"]) == ["out"]


def test_all_linear_on_a_resnet_leaves_out_fc_and_says_so():
    with pytest.raises(TargetError, match=r"matched no Linear.*leaves out the output layer\(s\) \['fc'\]"):
        get_vectorfit_model(_TinyResNet(), VectorFitConfig(target_modules="all-linear", progress=False))
    assert _names(_TinyResNet(), ["fc"]) == ["fc"]


def test_all_linear_keeps_a_backbones_last_linear_followed_by_a_norm():
    m = _Backbone()
    assert _names(m) == _linear_names(m) and _names(m)[-1] == "backbone.layers.1.mlp.down_proj"


@pytest.mark.parametrize("tie", [False, True])
def test_all_linear_leaves_out_a_causal_lms_lm_head(tie):
    m = make_tiny_llama(0, tie_word_embeddings=tie)
    assert _names(m) == [n for n in _linear_names(m) if n != "lm_head"]
    vf = get_vectorfit_model(m, VectorFitConfig(target_modules="all-linear", progress=False))
    assert type(vf.get_base_model().lm_head) is nn.Linear


@pytest.mark.parametrize("head", ["score", "classifier"])
def test_all_linear_leaves_out_a_sequence_classification_head(head):
    if head == "score":
        m = _llama_like(T.LlamaForSequenceClassification, T.LlamaConfig, 0, None, {"num_labels": 3, "pad_token_id": 0})
    else:
        m = make_tiny_bert(0)
    got = _names(m)
    assert head in _linear_names(m) and head not in got
    assert got == [n for n in _linear_names(m) if n != head]


# ------------------------------------------------------------------------------ quantised targets
def _bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install -e .[test])")


def _quantised(kind: str, linear: nn.Linear) -> nn.Module:
    """A real bitsandbytes layer holding ``linear``'s weights; moving it to a device quantises it."""
    bnb = _bnb()
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    elif kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    else:  # a bnb layer not yet moved to a device: float storage, but a bnb parameter class
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False)
        return q
    return q.to("cpu")


@pytest.mark.parametrize("kind, storage", [("int8", "Int8Params"), ("nf4", "Params4bit"), ("unmoved", "Int8Params")])
def test_bitsandbytes_target_is_refused_before_any_svd(tmp_path, kind, storage):
    m = make_tiny_llama(0)
    q = _quantised(kind, m.get_submodule(LAST))
    assert isinstance(q, nn.Linear)  # what makes it look like a target
    if kind != "unmoved":
        assert q.weight.dtype in (torch.int8, torch.uint8)
    _replace(m, LAST, q)
    ids = example_inputs(m)["input_ids"]
    m(input_ids=ids)  # the quantised base itself runs
    with pytest.raises(TargetError) as e:
        get_vectorfit_model(m, _cfg(tmp_path))
    msg = str(e.value)
    assert f"module {LAST!r}" in msg and "bitsandbytes" in msg and storage in msg
    assert "unquantised" in msg and "not supported yet" in msg
    assert _cached(tmp_path) == []  # nothing decomposed, nothing cached
    assert not any(type(x).__name__ == "VectorFitLayer" for x in m.modules())


def test_bitsandbytes_target_is_refused_by_all_linear_too(tmp_path):
    m = make_tiny_llama(0)
    _replace(m, LAST, _quantised("int8", m.get_submodule(LAST)))
    with pytest.raises(TargetError, match=rf"{LAST}.*quantised"):
        get_vectorfit_model(m, _cfg(tmp_path, target_modules="all-linear"))
    assert _cached(tmp_path) == []


class _StandInQuantisedTensor(torch.Tensor):
    """A torch tensor subclass, standing in for torchao's / optimum-quanto's quantised tensors."""


@pytest.mark.parametrize("storage", ["subclass", "int8", "float8"])
def test_non_plain_float_weights_are_refused(tmp_path, storage):
    m = make_tiny_llama(0)
    layer = m.get_submodule(LAST)
    w = layer.weight.data
    if storage == "subclass":
        new = w.clone().as_subclass(_StandInQuantisedTensor)
    elif storage == "int8":
        new = (w * 127 / w.abs().max()).round().to(torch.int8)
    else:
        new = w.to(torch.float8_e4m3fn)
    layer.weight = nn.Parameter(new, requires_grad=False)
    with pytest.raises(TargetError) as e:
        get_vectorfit_model(m, _cfg(tmp_path))
    msg = str(e.value)
    assert f"module {LAST!r}" in msg and "quantised" in msg and "unquantised" in msg
    assert (_StandInQuantisedTensor.__name__ if storage == "subclass" else str(new.dtype)) in msg
    assert _cached(tmp_path) == []


def test_torchao_int8_target_is_refused(tmp_path):
    torchao = pytest.importorskip("torchao", reason="torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = make_tiny_llama(0)
    quantize_(m.get_submodule(LAST.rpartition(".")[0]), Int8WeightOnlyConfig())
    assert type(m.get_submodule(LAST).weight).__module__.startswith("torchao"), torchao.__version__
    with pytest.raises(TargetError, match=r"module 'model\.layers\.1\.mlp\.gate_proj'.*quantised weight \(torchao"):
        get_vectorfit_model(m, _cfg(tmp_path))
    assert _cached(tmp_path) == []


@pytest.mark.parametrize("frozen", [False, True])
def test_quanto_target_is_refused(tmp_path, frozen):
    quanto = pytest.importorskip("optimum.quanto", reason="optimum-quanto is not installed")
    m = make_tiny_llama(0)
    quanto.quantize(m.get_submodule(LAST.rpartition(".")[0]), weights=quanto.qint8)
    if frozen:
        quanto.freeze(m)  # the weight becomes a QTensor; unfrozen, it is a float Parameter quantised in forward
    with pytest.raises(TargetError, match=r"module 'model\.layers\.1\.mlp\.gate_proj' \(optimum\.quanto.*quantised"):
        get_vectorfit_model(m, _cfg(tmp_path))
    assert _cached(tmp_path) == []


# ------------------------------------------------------------------------------ meta-device targets
def test_empty_weights_are_refused_with_the_module_name(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        m = make_tiny_llama(0)
    with pytest.raises(TargetError) as e:
        get_vectorfit_model(m, _cfg(tmp_path))
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "meta device" in msg and "not loaded" in msg
    assert "init_empty_weights" in msg and "offload" in msg
    assert _cached(tmp_path) == []


def test_cpu_offloaded_targets_are_refused_before_any_svd(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    m = make_tiny_llama(0)
    accelerate.cpu_offload(m.model.layers[1].mlp, execution_device=torch.device("cpu"))
    m(input_ids=example_inputs(m)["input_ids"])  # the offloaded base runs (accelerate loads in forward)
    with pytest.raises(TargetError, match=r"'model\.layers\.1\.mlp\.gate_proj'.*meta device"):
        get_vectorfit_model(m, _cfg(tmp_path))
    assert _cached(tmp_path) == []


# ------------------------------------------------------------------------------ loading an adapter
@pytest.mark.parametrize("base", ["bnb-int8", "meta"])
def test_loading_an_adapter_onto_a_quantised_or_empty_base_is_refused(tmp_path, base):
    get_vectorfit_model(make_tiny_llama(0), _cfg(tmp_path, variant="no_avf")).save_pretrained(tmp_path / "a")
    if base == "meta":
        accelerate = pytest.importorskip("accelerate")
        with accelerate.init_empty_weights():
            m = make_tiny_llama(0)
    else:
        m = make_tiny_llama(0)
        _replace(m, LAST, _quantised("int8", m.get_submodule(LAST)))
    with pytest.raises(TargetError, match="meta device" if base == "meta" else rf"{LAST}.*quantised"):
        VectorFitModel.from_pretrained(m, tmp_path / "a", cache_dir=str(tmp_path / "cache2"))
    assert _cached(tmp_path, "cache2") == []


def test_find_targets_can_list_the_targets_of_a_meta_skeleton():
    """Listing names reads no weight: ``check_weights=False`` lists a skeleton built on the meta device
    (as the recipes' ``trained_vector_count`` does through ``target_module_names``)."""
    with torch.device("meta"):
        m = make_tiny_llama(0)
    assert len(_names(m, None, check_weights=False)) == 14
    with pytest.raises(TargetError, match="meta device"):
        _names(m, None)


def test_target_module_names_of_a_meta_skeleton():
    from vectorfit import target_module_names

    with torch.device("meta"):
        m = make_tiny_llama(0)
    assert len(target_module_names(m)) == 14
