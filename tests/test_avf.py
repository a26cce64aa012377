"""Adaptive Vector Freezing: the decisions, the freezing itself, the schedule and resuming.

The freezing decisions are checked against an independent re-implementation of the paper's rule
(training strength, EMA, top-k) computed from snapshots of the parameters, not from AVF's buffers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_bert
from transformers import BertForSequenceClassification

from vectorfit import AVFConfig, AVFError, ConfigError, VectorFitConfig, get_vectorfit_model

K = 3
SCHEDULE = dict(start_step=3, interval=3, num_freezes=4)  # AVF at steps 3, 6, 9, 12
TOTAL = 16


def _base(seed: int = 0) -> BertForSequenceClassification:
    return make_tiny_bert(seed, num_labels=2)


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(1000 + step)
    return {"input_ids": torch.randint(0, 64, (4, 9), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def _model(seed: int = 0, **avf):
    cfg = VectorFitConfig(modules_to_save=["classifier"], avf=AVFConfig(k=K, **(avf or SCHEDULE)))
    return get_vectorfit_model(_base(seed), cfg)


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.1)


def _train(model, opt, first: int, last: int, on_step=None):
    model.train()
    for step in range(first, last + 1):
        model(**_batch(step)).loss.backward()
        model.avf.step(step)
        if on_step:
            on_step(step)
        opt.step()
        opt.zero_grad()


def test_freezing_matches_independent_rule_and_frozen_vectors_do_not_move():
    model = _model()
    opt = _optimizer(model)
    vectors = model.trainable_vectors()
    names = list(vectors)
    assert names == model.avf.names
    v0 = {n: p.detach().clone() for n, p in vectors.items()}
    ema = torch.zeros(len(names), dtype=torch.float64)
    expected_history = []
    snapshots = {}
    adam_state = {}

    def on_step(step):
        nonlocal ema
        if step in model.avf.schedule():
            # Independent rule: S_v = mean |v0 - v|, EMA with beta, freeze the top-k.
            s = torch.tensor([(vectors[n].detach() - v0[n]).abs().mean().item() for n in names], dtype=torch.float64)
            ema = 0.99 * ema + 0.01 * s
            top = sorted(sorted(range(len(names)), key=lambda i: (-ema[i].item(), i))[:K])
            expected_history.append({"step": step, "frozen": [names[i] for i in top]})
            assert sorted(model.avf.frozen) == sorted(names[i] for i in top)
            for n in model.avf.frozen:
                snapshots[n] = (step, vectors[n].detach().clone())
                st = opt.state.get(vectors[n])
                adam_state[n] = {k: v.clone() for k, v in st.items()} if st else {}
        # Grads of frozen vectors are gone before the optimizer runs.
        for n in model.avf.frozen:
            assert vectors[n].grad is None
        assert len(model.avf.frozen) == (K if step >= 3 else 0)

    before_first = {}

    def record_then(step):
        if step == 2:
            before_first.update({n: p.detach().clone() for n, p in vectors.items()})
        on_step(step)

    _train(model, opt, 1, TOTAL, on_step=record_then)

    assert model.avf.history == expected_history
    assert len(model.avf.history) == SCHEDULE["num_freezes"]
    # After the last AVF step (12) the set does not change: the vectors frozen at 12 are frozen
    # through step 16 and must be bit-identical to their value at step 12, optimizer state too.
    last = model.avf.history[-1]["frozen"]
    assert sorted(model.avf.frozen) == sorted(last)
    for n in last:
        step, value = snapshots[n]
        assert step == 12
        assert torch.equal(vectors[n].detach(), value), n
        st = opt.state.get(vectors[n], {})
        for k, v in adam_state[n].items():
            assert torch.equal(st[k], v), (n, k)
    # Vectors not frozen at the end did move after step 12 (the check above is not vacuous).
    moving = [n for n in names if n not in last]
    assert any(not torch.equal(vectors[n].detach(), snapshots.get(n, (0, before_first[n]))[1]) for n in moving)


def test_released_vectors_train_again():
    model = _model(start_step=2, interval=2, num_freezes=6)
    opt = _optimizer(model)
    _train(model, opt, 1, 13)
    hist = model.avf.history
    # Some vector frozen at one AVF step and not at the next: it must have moved in between.
    released = [(h0, h1) for h0, h1 in zip(hist, hist[1:]) if set(h0["frozen"]) - set(h1["frozen"])]
    assert released, "expected AVF to release at least one vector"
    # Re-run, checking the released vector moves while released.
    model2 = _model(start_step=2, interval=2, num_freezes=6)
    opt2 = _optimizer(model2)
    h0, h1 = released[0]
    name = sorted(set(h0["frozen"]) - set(h1["frozen"]))[0]
    values = {}

    def grab(step):
        if step in (h1["step"], h1["step"] + 1):
            values[step] = model2.trainable_vectors()[name].detach().clone()

    _train(model2, opt2, 1, h1["step"] + 1, on_step=grab)
    assert model2.avf.history[: len(model2.avf.history)] == hist[: len(model2.avf.history)]
    assert not torch.equal(values[h1["step"]], model2.trainable_vectors()[name].detach())


@pytest.mark.parametrize("interrupt_at", [4, 6, 11])
def test_resume_from_checkpoint_is_exact(tmp_path, interrupt_at):
    ref = _model()
    ref_opt = _optimizer(ref)
    _train(ref, ref_opt, 1, TOTAL)

    first = _model()
    opt = _optimizer(first)
    _train(first, opt, 1, interrupt_at)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, path)
    del first, opt

    resumed = _model()  # a fresh process would rebuild the model from the base exactly so
    ckpt = torch.load(path, weights_only=True)
    resumed.load_state_dict(ckpt["model"])
    opt = _optimizer(resumed)
    opt.load_state_dict(ckpt["optimizer"])
    _train(resumed, opt, interrupt_at + 1, TOTAL)

    assert resumed.avf.history == ref.avf.history
    assert resumed.avf.frozen == ref.avf.frozen
    for (n, a), (_, b) in zip(resumed.trainable_vectors().items(), ref.trainable_vectors().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)


def test_avf_state_dict_roundtrip_restores_schedule_and_history():
    model = _model(start_step=None, interval=None, num_freezes=None)
    model.avf.set_total_steps(20, steps_per_epoch=5)
    sched = model.avf.schedule()
    opt = _optimizer(model)
    _train(model, opt, 1, sched[1])
    sd = copy.deepcopy(model.avf.state_dict())
    fresh = _model(start_step=None, interval=None, num_freezes=None)
    assert not fresh.avf.is_scheduled
    fresh.avf.load_state_dict(sd)
    assert fresh.avf.schedule() == sched
    assert fresh.avf.history == model.avf.history
    assert fresh.avf.frozen == model.avf.frozen
    # An explicit schedule restored from a checkpoint is not overridden by set_total_steps.
    fresh.avf.set_total_steps(1000)
    assert fresh.avf.schedule() == sched


def test_misuse_is_a_clear_error():
    model = _model(start_step=None, interval=None, num_freezes=None)
    with pytest.raises(AVFError, match="set_total_steps"):
        model.avf.step(1)
    model = _model()
    model(**_batch(1)).loss.backward()
    with pytest.raises(AVFError, match="step\\(\\) was not called"):
        model.avf.step(6)  # AVF step 3 never ran
    with pytest.raises(ConfigError, match="AVFConfig.k"):
        get_vectorfit_model(_base(), VectorFitConfig(avf=AVFConfig(k=10_000)))
    with pytest.raises(ConfigError, match="AVFConfig.beta=1.5"):
        AVFConfig(beta=1.5)


@pytest.mark.parametrize("total,per_epoch", [(10, None), (100, 10), (600, 200), (3000, 100), (7, 7), (1, None)])
def test_derived_schedule_follows_appendix_c(total, per_epoch):
    cfg = AVFConfig.for_training(total, per_epoch)
    steps = cfg.schedule()
    assert len(steps) == cfg.num_freezes >= 1
    assert 1 <= steps[0] <= total and steps[-1] <= total
    assert cfg.num_freezes <= 27
    if total >= 20:
        assert total / 3 - 1 <= cfg.start_step <= total / 2  # paper: about 1/3 to 1/2 of training
        assert cfg.num_freezes >= 4
    if per_epoch and (total - cfg.start_step) // per_epoch >= 4:
        assert cfg.interval == per_epoch  # about one epoch apart when the run is long enough
    explicit = AVFConfig.for_training(total, per_epoch, start_step=1, interval=1, num_freezes=1)
    assert explicit.schedule() == [1]
