"""Correctness guard for the fast VectorFit layer paths (vectorfit.functional).

Every path the selector can pick (factorised, dense; training and no-grad) is checked against the
straightforward implementation ``F.linear(F.linear(x, Vh) * s, U, b)``: fp64 gradcheck on small
shapes, fp32 values and gradients on realistic shapes, bf16 autocast with a loose tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vectorfit import SVDLinear
from vectorfit.functional import choose_path, force_path, low_memory, low_memory_enabled, svd_linear

PATHS = ["factorised", "dense"]


def reference(x, U, Vh, s, b):
    return F.linear(F.linear(x, Vh) * s.to(x.dtype), U, None if b is None else b.to(x.dtype))


def factors(d_out, d_in, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U.to(dtype), S.to(dtype), Vh.to(dtype)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------- gradcheck (fp64)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (6, 6)])  # d_out, d_in: tall, wide, square
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_every_path(path, shape, with_bias):
    d_out, d_in = shape
    U, S, Vh = factors(d_out, d_in)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    s = S.clone().requires_grad_(True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    with force_path(path):
        if with_bias:
            assert torch.autograd.gradcheck(lambda x, s, b: svd_linear(x, U, Vh, s, b), (x, s, b))
        else:
            assert torch.autograd.gradcheck(lambda x, s: svd_linear(x, U, Vh, s, None), (x, s))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("needs", ["x", "s", "b", "xs", "sb"])
def test_gradcheck_partial_requires_grad(path, needs):
    """Only some inputs need a gradient (first layer: x does not; frozen model: only the bias)."""
    U, S, Vh = factors(5, 4)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad="x" in needs)
    s = S.clone().requires_grad_("s" in needs)
    b = torch.randn(5, dtype=torch.float64, requires_grad="b" in needs)
    with force_path(path):
        assert torch.autograd.gradcheck(lambda x, s, b: svd_linear(x, U, Vh, s, b), (x, s, b))


# --------------------------------------------------------------------------------- fp32, real shapes
def _grads(fn, x, s, b, G):
    x = x.detach().clone().requires_grad_(True)
    s = s.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    y = fn(x, s, b)
    y.backward(G.to(y.dtype))
    return y.detach(), x.grad, s.grad, b.grad


@pytest.mark.parametrize("path", PATHS + ["auto"])
@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
def test_fp32_matches_reference_real_shapes(path, shape):
    d_out, d_in = shape
    U, S, Vh = factors(d_out, d_in, torch.float32)
    torch.manual_seed(0)
    x = torch.randn(32, 64, d_in)  # T = 2048 tokens
    b = torch.randn(d_out) * 0.1
    s = S * (1 + 0.1 * torch.randn_like(S))
    G = torch.randn(32, 64, d_out)
    ref = _grads(lambda x, s, b: reference(x, U, Vh, s, b), x, s, b, G)
    with force_path(path):
        got = _grads(lambda x, s, b: svd_linear(x, U, Vh, s, b), x, s, b, G)
    for what, a, r in zip(("y", "dx", "dsigma", "dbias"), got, ref):
        assert a.dtype == r.dtype and a.shape == r.shape, what
        assert rel(a, r) < 2e-5, f"{path} {shape} {what}: {rel(a, r):.2e}"


@pytest.mark.parametrize("path", PATHS + ["auto"])
@pytest.mark.parametrize("shape", [(384, 384), (1536, 384)])
def test_bf16_autocast_matches_reference(path, shape):
    d_out, d_in = shape
    U, S, Vh = factors(d_out, d_in, torch.float32)
    torch.manual_seed(0)
    x = torch.randn(4, 64, d_in)
    b = torch.randn(d_out) * 0.1
    G = torch.randn(4, 64, d_out)
    ref = _grads(lambda x, s, b: reference(x, U, Vh, s, b), x, S, b, G)  # fp32, no autocast
    with force_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grads(lambda x, s, b: svd_linear(x, U, Vh, s, b), x, S, b, G)
    assert got[0].dtype == torch.bfloat16  # like F.linear under autocast
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for what, a, r in zip(("y", "dx", "dsigma", "dbias"), got, ref):
        assert rel(a, r) < 3e-2, f"{path} {shape} {what}: {rel(a, r):.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", PATHS)
def test_half_storage(dtype, path):
    """bf16/fp16 factors and activations; fp32 sigma/bias get fp32 gradients."""
    U, S, Vh = factors(48, 32, torch.float32)
    x = torch.randn(3, 10, 32)
    b = torch.randn(48) * 0.1
    G = torch.randn(3, 10, 48)
    ref = _grads(lambda x, s, b: reference(x, U, Vh, s, b), x, S, b, G)
    with force_path(path):
        got = _grads(lambda x, s, b: svd_linear(x.to(dtype), U.to(dtype), Vh.to(dtype), s, b), x, S, b, G)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for what, a, r in zip(("y", "dx", "dsigma", "dbias"), got, ref):
        assert rel(a, r) < 5e-2, f"{path} {dtype} {what}: {rel(a, r):.2e}"


# --------------------------------------------------------------------------------- no grad / inference
@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_no_grad_paths_and_cache(path):
    U, S, Vh = factors(64, 48, torch.float32)
    s = torch.nn.Parameter(S.clone())
    b = torch.nn.Parameter(torch.randn(64) * 0.1)
    x = torch.randn(5, 48)

    class Owner:
        pass

    owner = Owner()
    with force_path(path), torch.no_grad():
        for _ in range(3):  # the second call with the same sigma builds the cached W (auto)
            y = svd_linear(x, U, Vh, s, b, owner=owner)
            assert not y.requires_grad
            assert rel(y, reference(x, U, Vh, s, b)) < 1e-5
        s.mul_(1.5)  # an optimizer step: the cache must not serve the old sigma
        y = svd_linear(x, U, Vh, s, b, owner=owner)
        assert rel(y, reference(x, U, Vh, s, b)) < 1e-5
    if path == "auto":
        y = svd_linear(x, U, Vh, s, b, owner=owner)  # with grad: the cache is dropped
        assert y.requires_grad and getattr(owner, "_vf_dense_cache", None) is None


def test_selector_choices():
    # square attention projections with many tokens: dense; MLP (rectangular) and few tokens: factorised
    assert choose_path(2048, 384, 384, 384, True, True) == "dense"
    assert choose_path(2048, 768, 768, 768, True, True) == "dense"
    assert choose_path(64, 384, 384, 384, True, True) == "factorised"
    assert choose_path(2048, 384, 1536, 384, True, True) == "factorised"
    assert choose_path(2048, 1536, 384, 384, True, True) == "factorised"
    assert choose_path(1024, 576, 192, 192, True, True) == "factorised"


# --------------------------------------------------------------------------------- the layer
def _layer(train_sigma=True, train_bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24).to(dtype)
    return lin, SVDLinear(lin.weight, lin.bias, train_sigma, train_bias)


@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_layer_fast_path_equals_reference(path):
    _, layer = _layer()
    with torch.no_grad():
        layer.sigma.mul_(1.2)
        layer.bias.add_(0.1)
    x = torch.randn(4, 9, 32, requires_grad=True)
    y_ref = reference(x, layer.U, layer.Vh, layer.sigma, layer.bias)
    gs_ref, gb_ref, gx_ref = torch.autograd.grad(y_ref.square().sum(), (layer.sigma, layer.bias, x))
    with force_path(path):
        y = layer(x)
    gs, gb, gx = torch.autograd.grad(y.square().sum(), (layer.sigma, layer.bias, x))
    for a, r in ((y, y_ref), (gs, gs_ref), (gb, gb_ref), (gx, gx_ref)):
        assert rel(a, r) < 1e-5


def test_layer_modes_unchanged():
    """bias-only, merged and disabled keep their forward semantics."""
    lin, layer = _layer()
    x = torch.randn(3, 32)
    with torch.no_grad():
        layer.sigma.mul_(1.1)
        assert rel(layer(x), reference(x, layer.U, layer.Vh, layer.sigma, layer.bias)) < 1e-5
        layer.disabled = True
        assert rel(layer(x), lin(x)) < 1e-5
        layer.disabled = False
        layer.merge()
        assert torch.equal(layer(x), F.linear(x, layer.merged_weight, layer.bias))
        layer.unmerge()
    lin2, bias_only = _layer(train_sigma=False)
    assert torch.equal(bias_only(x), lin2(x))


def test_layer_initialisation_exact_all_paths():
    lin, layer = _layer()
    x = torch.randn(2, 5, 32)
    for path in PATHS + ["auto"]:
        with force_path(path):
            assert rel(layer(x), lin(x)) < 1e-5
            with torch.no_grad():
                assert rel(layer(x), lin(x)) < 1e-5


def test_model_training_matches_reference_path():
    """A few AdamW steps of a whole model: the fast paths train like the straightforward layer."""
    import transformers as T

    from vectorfit import VectorFitConfig, get_vectorfit_model

    def run(path):
        torch.manual_seed(0)
        base = T.BertForSequenceClassification(T.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
        opt = torch.optim.AdamW([p for p in vf.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(3, 64, (4, 40), generator=g)
        labels = torch.randint(0, 3, (4,), generator=g)
        with force_path(path):
            for _ in range(3):
                vf(input_ids=ids, labels=labels).loss.backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                return vf(input_ids=ids).logits, {k: v.detach().clone() for k, v in vf.trainable_vectors().items()}

    ref_logits, ref_vec = run("reference")
    for path in ("auto", "factorised", "dense"):
        logits, vec = run(path)
        assert rel(logits, ref_logits) < 1e-4, path
        for k in ref_vec:
            # The key bias gets a zero gradient up to round-off (softmax is shift invariant), so Adam
            # moves it by noise: compare on the scale of an lr-sized step, not relative to ~1e-7.
            scale = max(float(ref_vec[k].abs().max()), 1e-2)
            assert float((vec[k] - ref_vec[k]).abs().max()) <= 1e-4 * scale, (path, k)


# --------------------------------------------------------------------------------- low-memory mode
def _saved_storages(fn):
    """Storages (data_ptr -> bytes) autograd keeps for the backward of ``fn()``."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (6, 6)])
def test_gradcheck_dense_low_memory(shape):
    d_out, d_in = shape
    U, S, Vh = factors(d_out, d_in)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    s = S.clone().requires_grad_(True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    with force_path("dense"), low_memory():
        assert torch.autograd.gradcheck(lambda x, s, b: svd_linear(x, U, Vh, s, b), (x, s, b))


def test_low_memory_dense_keeps_no_weight_and_same_gradients():
    """The dense path keeps W (c x a) for the backward by default and not in low-memory mode; the
    gradients are bitwise the same (W is rebuilt by the same operations)."""
    c, a, n = 24, 16, 40
    U, S, Vh = factors(c, a, torch.float32)
    x0 = torch.randn(n, a)
    grads = {}
    for low in (False, True):
        x = x0.clone().requires_grad_(True)
        s = S.clone().requires_grad_(True)
        with force_path("dense"), low_memory(low):
            y, saved = _saved_storages(lambda: svd_linear(x, U, Vh, s, None))
        assert low_memory_enabled() is False  # restored on exit
        own = {p: nb for p, nb in saved.items()
               if p not in (x.untyped_storage().data_ptr(), U.untyped_storage().data_ptr(), Vh.untyped_storage().data_ptr())}
        weight_sized = [nb for nb in own.values() if nb == c * a * 4]
        assert len(weight_sized) == (0 if low else 1), (low, own)
        assert sum(own.values()) <= (c * a * 4 if not low else 4 * min(c, a))
        y.backward(torch.ones_like(y))
        grads[low] = (x.grad, s.grad)
    assert torch.equal(grads[False][0], grads[True][0]) and torch.equal(grads[False][1], grads[True][1])


def test_low_memory_selector_and_env(monkeypatch):
    # d = 384, N = 845 (about 2.2 d): the dense path costs 3.91 vs 4 N d^2 when W is kept, but
    # 4.36 (x 0.95 = 4.15) when it is rebuilt -> low-memory mode stays factorised.
    assert choose_path(845, 384, 384, 384, True, True, low_mem=False) == "dense"
    assert choose_path(845, 384, 384, 384, True, True, low_mem=True) == "factorised"
    # BERT-base attention at N = 2048: 4.125 (x 0.95 = 3.92) vs 4 -> dense, for its smaller state.
    assert choose_path(2048, 768, 768, 768, True, True, low_mem=True) == "dense"
    assert choose_path(1024, 576, 576, 576, True, True, low_mem=True) == "factorised"
    monkeypatch.setenv("VECTORFIT_LOW_MEMORY", "1")
    assert low_memory_enabled() is True
    with low_memory(False):  # the context manager overrides the environment
        assert low_memory_enabled() is False
    monkeypatch.setenv("VECTORFIT_LOW_MEMORY", "maybe")
    with pytest.raises(ValueError, match="VECTORFIT_LOW_MEMORY='maybe'"):
        low_memory_enabled()


def test_low_memory_model_saves_one_weight_per_dense_layer_less():
    """On a real (tiny) BERT with every layer on the dense path, low-memory mode keeps exactly one
    d_out x d_in buffer per VectorFit layer less for the backward, and trains to the same logits."""
    import transformers as T

    from vectorfit import VectorFitConfig, get_vectorfit_model

    torch.manual_seed(0)
    base = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    vf = get_vectorfit_model(base, VectorFitConfig(variant="no_avf", modules_to_save=["classifier"]))
    layers = [m for m in vf.modules() if isinstance(m, SVDLinear) and m.sigma is not None]
    state = {t.untyped_storage().data_ptr() for t in list(vf.parameters()) + list(vf.buffers())}
    needs_dx = {}  # layer -> whether its input needs a gradient (layer 0's q/k/v: no, frozen embeddings)
    hooks = [m.register_forward_hook(lambda m, i, o: needs_dx.__setitem__(m, i[0].requires_grad)) for m in layers]
    ids = torch.randint(3, 64, (4, 40), generator=torch.Generator().manual_seed(1))
    out = {}
    for low in (False, True):
        with force_path("dense"), low_memory(low):
            loss, saved = _saved_storages(lambda: vf(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss)
        loss.backward()
        activations = sum(nb for ptr, nb in saved.items() if ptr not in state)
        out[low] = (activations, [m.sigma.grad.clone() for m in layers])
        vf.zero_grad()
    for h in hooks:
        h.remove()
    assert sum(needs_dx.values()) == len(layers) - 3
    expected = sum(m.out_features * m.in_features * 4 for m in layers if needs_dx[m])
    assert out[False][0] - out[True][0] == expected
    for g0, g1 in zip(out[False][1], out[True][1]):
        assert torch.equal(g0, g1)


def test_autocast_factor_casts_are_kept_between_training_calls():
    """Under bf16 autocast a training call keeps the layer's bf16 factors for the next one (no
    per-step re-cast); an in-place change of a factor invalidates them; inference drops them."""
    lin, layer = _layer()
    x = torch.randn(3, 7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1 = layer(x)
        first = layer._vf_cast_cache
        assert first[1].dtype == torch.bfloat16 and torch.equal(first[1], layer.U.to(torch.bfloat16))
        y2 = layer(x)
        assert layer._vf_cast_cache[1] is first[1] and layer._vf_cast_cache[2] is first[2]
        assert torch.equal(y1, y2)
        with torch.no_grad():
            layer.U.mul_(2.0)  # a changed factor must not be served stale
        y3 = layer(x)
        assert layer._vf_cast_cache[1] is not first[1]
        assert torch.equal(layer._vf_cast_cache[1], layer.U.to(torch.bfloat16))
        assert rel(y3, reference(x.to(torch.bfloat16), layer.U.to(torch.bfloat16), layer.Vh.to(torch.bfloat16),
                                 layer.sigma, layer.bias)) < 2e-2
        y3.float().sum().backward()
        with torch.no_grad():
            layer(x)
        assert layer._vf_cast_cache is None
