"""Correctness guard for the fast VectorFit layer paths (vectorfit.functional).

Every path the selector can pick (factorised, dense; training and no-grad) is checked against the
straightforward implementation ``F.linear(F.linear(x, Vh) * s, U, b)``: fp64 gradcheck on small
shapes, fp32 values and gradients on realistic shapes, bf16 autocast with a loose tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vectorfit import VectorFitLayer
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
    """(an untouched copy of the Linear, a VectorFitLayer wrapping the Linear itself)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 24).to(dtype)
    ref = copy.deepcopy(lin)  # the layer releases lin's dense weight once decomposed
    return ref, VectorFitLayer(lin, "default", train_sigma, train_bias)


def _s(layer):
    """The default adapter's trained singular values (absolute form: s itself)."""
    return layer.vectorfit_sigma["default"]


def _b(layer):
    """The default adapter's trained bias (``layer.bias`` is peft's view of the base layer's bias)."""
    return layer.vectorfit_bias["default"]


@pytest.mark.parametrize("path", PATHS + ["auto"])
def test_layer_fast_path_equals_reference(path):
    _, layer = _layer()
    with torch.no_grad():
        _s(layer).mul_(1.2)
        _b(layer).add_(0.1)
    x = torch.randn(4, 9, 32, requires_grad=True)
    y_ref = reference(x, layer.U, layer.Vh, _s(layer), _b(layer))
    gs_ref, gb_ref, gx_ref = torch.autograd.grad(y_ref.square().sum(), (_s(layer), _b(layer), x))
    with force_path(path):
        y = layer(x)
    gs, gb, gx = torch.autograd.grad(y.square().sum(), (_s(layer), _b(layer), x))
    for a, r in ((y, y_ref), (gs, gs_ref), (gb, gb_ref), (gx, gx_ref)):
        assert rel(a, r) < 1e-5


def test_layer_modes_unchanged():
    """bias-only, merged and disabled keep their forward semantics."""
    lin, layer = _layer()
    x = torch.randn(3, 32)
    with torch.no_grad():
        _s(layer).mul_(1.1)
        _b(layer).add_(0.05)
        adapted = reference(x, layer.U, layer.Vh, _s(layer), _b(layer))
        assert rel(layer(x), adapted) < 1e-5
        assert rel(adapted, lin(x)) > 1e-2  # the edits above are visible
        layer.enable_adapters(False)  # peft's switch (what PeftModel.disable_adapter() flips)
        assert layer.disable_adapters
        assert rel(layer(x), lin(x)) < 1e-5
        layer.enable_adapters(True)
        assert rel(layer(x), adapted) < 1e-5
        layer.merge()
        assert layer.merged and layer.merged_adapters == ["default"]
        # merged: one dense matmul with W = U diag(s) Vh (built in float32) and the trained bias
        W = (layer.U.double() * _s(layer).double()) @ layer.Vh.double()
        assert rel(layer.dense_weight(_s(layer)), W) < 1e-6
        assert torch.equal(layer(x), F.linear(x, layer.dense_weight(_s(layer)), _b(layer)))
        assert rel(layer(x), adapted) < 1e-5
        layer.unmerge()
        assert not layer.merged
        _s(layer).mul_(1.1)  # the factorised path is live again
        assert rel(layer(x), reference(x, layer.U, layer.Vh, _s(layer), _b(layer))) < 1e-5
    lin2, bias_only = _layer(train_sigma=False)
    assert not bias_only.decomposed and bias_only.sigma is None and "default" not in bias_only.vectorfit_sigma
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


@pytest.mark.parametrize("path", ["dense", "factorised"])
# factorised: r == d_in (keeps x), r < d_in (keeps h), square
@pytest.mark.parametrize("shape", [(5, 4), (4, 6), (6, 6)])
def test_gradcheck_low_memory(path, shape):
    d_out, d_in = shape
    U, S, Vh = factors(d_out, d_in)
    x = torch.randn(2, 3, d_in, dtype=torch.float64, requires_grad=True)
    s = S.clone().requires_grad_(True)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    with force_path(path), low_memory():
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
    # 4.36 when it is rebuilt (low-memory mode) -> factorised, if it may keep h ...
    assert choose_path(845, 384, 384, 384, True, True, low_mem=False) == "dense"
    assert choose_path(845, 384, 384, 384, True, True, low_mem=True, keep_input=False) == "factorised"
    # ... but a square layer keeps x in low-memory mode (the default for r == d_in), and the
    # factorised path then recomputes h (5 N d^2): the dense path keeps x for less.
    assert choose_path(845, 384, 384, 384, True, True, low_mem=True) == "dense"
    assert choose_path(2048, 768, 768, 768, True, True, low_mem=True) == "dense"
    assert choose_path(1024, 576, 576, 576, True, True, low_mem=True) == "dense"  # SmolLM2 q, o: 4.69 vs 5
    assert choose_path(256, 576, 576, 576, True, True, low_mem=True) == "factorised"  # few tokens: 5 vs 9.75
    # widening MLP layer (r == d_in): keeps x, still factorised with the recomputation (2.83 vs 4.25 GMAC)
    assert choose_path(1024, 576, 1536, 576, True, True, low_mem=True) == "factorised"
    # narrowing layers keep h unless told x is kept anyway (GQA k/v after q: then the dense path, by 3%)
    assert choose_path(1024, 576, 192, 192, True, True, low_mem=True) == "factorised"
    assert choose_path(1024, 576, 192, 192, True, True, low_mem=True, keep_input=True) == "dense"
    assert choose_path(1024, 1536, 576, 576, True, True, low_mem=True) == "factorised"
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
    layers = [m for m in vf.modules() if isinstance(m, VectorFitLayer) and m.decomposed]
    assert len(layers) == 12
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
        out[low] = (activations, [_s(m).grad.clone() for m in layers])
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
                                 _s(layer), _b(layer))) < 2e-2
        y3.float().sum().backward()
        with torch.no_grad():
            layer(x)
        assert layer._vf_cast_cache is None


# --------------------------------------------------------------------------------- low-memory: keep x
@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536)])
def test_factorised_keeps_input_instead_of_projection(shape):
    """Low-memory mode, factorised path: a layer with r == d_in keeps its input x (no N x r
    projection), recomputes h = Vh x in the backward, and gives bitwise the same values and
    gradients as the default (which keeps h), and the reference's to 2e-5."""
    d_out, d_in = shape
    r = min(shape)
    U, S, Vh = factors(d_out, d_in, torch.float32)
    torch.manual_seed(0)
    x0, G = torch.randn(8, 64, d_in), torch.randn(8, 64, d_out)
    s0, b0 = S * (1 + 0.1 * torch.randn_like(S)), torch.randn(d_out) * 0.1
    ref = _grads(lambda x, s, b: reference(x, U, Vh, s, b), x0, s0, b0, G)
    got = {}
    for low in (False, True):
        x, s, b = (t.clone().requires_grad_(True) for t in (x0, s0, b0))
        with force_path("factorised"), low_memory(low):
            y, saved = _saved_storages(lambda: svd_linear(x, U, Vh, s, b))
        own = {p: nb for p, nb in saved.items() if p not in (U.untyped_storage().data_ptr(), Vh.untyped_storage().data_ptr())}
        keeps_x = x.untyped_storage().data_ptr() in own
        projection = [nb for p, nb in own.items() if nb == 8 * 64 * r * 4 and p != x.untyped_storage().data_ptr()]
        assert keeps_x == (low and r == d_in), (low, shape)
        assert len(projection) == (0 if keeps_x else 1), (low, shape)
        y.backward(G)
        got[low] = (y.detach(), x.grad, s.grad, b.grad)
    for what, a, l, rf in zip(("y", "dx", "dsigma", "dbias"), got[False], got[True], ref):
        assert torch.equal(a, l), what
        assert rel(l, rf) < 2e-5, (what, rel(l, rf))


def test_low_memory_shared_input_kept_once():
    """q, k, v read the same tensor: in low-memory mode q keeps it (r == d_in) and k, v (r < d_in,
    which would keep a projection each) keep the same tensor instead -- nothing else is saved but
    r-vectors. A copy with the same values is not the same tensor and does not count as kept."""
    torch.manual_seed(0)
    n, d, dkv = 96, 48, 16
    fac = {name: factors(o, d, torch.float32, seed=i) for i, (name, o) in enumerate((("q", d), ("k", dkv), ("v", dkv)))}
    x0 = torch.randn(n, d)
    G = {name: torch.randn(n, U.shape[0]) for name, (U, _, _) in fac.items()}

    def run(low, same_tensor=True):
        x = x0.clone().requires_grad_(True)
        sig = {name: S.clone().requires_grad_(True) for name, (_, S, _) in fac.items()}

        def fwd():
            inp = {name: (x if same_tensor or name == "q" else x * 1.0) for name in fac}
            return {name: svd_linear(inp[name], U, Vh, sig[name], None) for name, (U, _, Vh) in fac.items()}

        with force_path("factorised"), low_memory(low):
            ys, saved = _saved_storages(fwd)
        state = {t.untyped_storage().data_ptr() for U, _, Vh in fac.values() for t in (U, Vh)}
        big = {p: nb for p, nb in saved.items() if p not in state and nb > 4 * d}
        torch.autograd.backward([ys[k] for k in fac], [G[k] for k in fac])
        return big, x, {k: v.grad for k, v in sig.items()}, x.grad

    big, x, ds, dx = run(low=True)
    assert big == {x.untyped_storage().data_ptr(): n * d * 4}  # x once, no projection
    big_default, _, ds_default, dx_default = run(low=False)
    assert sorted(big_default.values()) == sorted([n * d * 4, n * dkv * 4, n * dkv * 4])  # h_q, h_k, h_v
    big_copy, _, _, _ = run(low=True, same_tensor=False)
    assert sorted(big_copy.values()) == sorted([n * d * 4, n * dkv * 4, n * dkv * 4])  # x (q), h_k, h_v
    for k in fac:
        assert torch.equal(ds[k], ds_default[k]), k
    assert torch.equal(dx, dx_default)
    xr = x0.clone().requires_grad_(True)
    sr = {k: S.clone().requires_grad_(True) for k, (_, S, _) in fac.items()}
    ys = [reference(xr, U, Vh, sr[k], None) for k, (U, _, Vh) in fac.items()]
    torch.autograd.backward(ys, [G[k] for k in fac])
    for k in fac:
        assert rel(ds[k], sr[k].grad) < 2e-5, k
    assert rel(dx, xr.grad) < 2e-5


def test_low_memory_keeps_no_input_alive():
    """The note of the last kept input is weak: it never keeps a tensor alive."""
    import gc
    import weakref

    U, S, Vh = factors(16, 16, torch.float32)
    x = torch.randn(10, 16)
    s = S.clone().requires_grad_(True)
    with low_memory():
        svd_linear(x, U, Vh, s, None).sum().backward()
    ref = weakref.ref(x)
    del x
    gc.collect()
    assert ref() is None


def _tiny_llama(attn="eager"):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return T.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_low_memory_decoder_keeps_shared_inputs_once(attn):
    """A tiny Llama (GQA, gated MLP): in low-memory mode each block keeps, for the VectorFit layers,
    the attention input (shared by q, k, v), the o-projection's input, the MLP input (shared by
    gate, up) and down's projection -- 4 tokens x d per block instead of q, k, v, o, gate, up and
    down's 7 projections (d + 2 d/2 + d + d + d + d = 6 d). With eager attention the o input is a
    copy nobody else keeps; with SDPA it is the kernel's saved output: the o-projection then keeps
    nothing new. Values and gradients equal the straightforward layer's."""
    from vectorfit import VectorFitConfig, get_vectorfit_model

    vf = get_vectorfit_model(_tiny_llama(attn), VectorFitConfig(variant="vectorfit"))
    layers = [m for m in vf.modules() if isinstance(m, VectorFitLayer) and m.decomposed]
    assert len(layers) == 14
    state = {t.untyped_storage().data_ptr() for t in list(vf.parameters()) + list(vf.buffers())}
    ids = torch.randint(3, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    n, d = ids.numel(), 32
    out = {}
    for mode in ("reference", "default", "low"):
        with force_path("reference" if mode == "reference" else "factorised"), low_memory(mode == "low"):
            loss, saved = _saved_storages(lambda: vf(input_ids=ids, labels=ids).loss)
        loss.backward()
        out[mode] = (sum(nb for p, nb in saved.items() if p not in state),
                     [_s(m).grad.clone() for m in layers], [_b(m).grad.clone() for m in layers])
        vf.zero_grad()
    blocks = 2
    o_input = n * d * 4 if attn == "eager" else 0
    assert out["default"][0] - out["low"][0] == blocks * (6 * n * d * 4 - (3 * n * d * 4 + o_input))
    for mode in ("default", "low"):
        for g, r in zip(out[mode][1] + out[mode][2], out["reference"][1] + out["reference"][2]):
            assert rel(g, r) < 1e-4, mode
    for g0, g1 in zip(out["default"][1], out["low"][1]):
        assert torch.equal(g0, g1)  # same operations: bitwise


def test_low_memory_training_under_torch_compile():
    """Under torch.compile only the shape rule applies (no storage pointers, no Python-side note):
    a compiled low-memory training call gives the reference's values and gradients."""
    U, S, Vh = factors(24, 16, torch.float32)
    x0, G = torch.randn(3, 5, 16), torch.randn(3, 5, 24)
    ref = _grads(lambda x, s, b: reference(x, U, Vh, s, b), x0, S, torch.zeros(24), G)

    def fn(x, s, b):
        return svd_linear(x, U, Vh, s, b)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with low_memory(), force_path("factorised"):
        got = _grads(compiled, x0, S, torch.zeros(24), G)
    for what, a, r in zip(("y", "dx", "dsigma", "dbias"), got, ref):
        assert rel(a, r) < 2e-5, what
