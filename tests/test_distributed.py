"""One decomposition for all ranks, checked with two real gloo processes (spawned, CPU).

One spawn runs every check of this file (starting two interpreters that import transformers costs
most of the time): rank 0 decomposes and broadcasts, rank 1 runs no SVD and reads no cache file and
gets bit-identical factors; ranks with different base weights, or with different targets, both fail
at set-up with a message that says which;
a model built on rank 0 alone inside ``local_decomposition()`` does not wait for rank 1; and DDP
with its default ``broadcast_buffers=True`` leaves the frozen factors alone while training.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_bert
from ranks import GROUP_TIMEOUT, spawn_ranks

from vectorfit import AVFConfig, VectorFitConfig, get_vectorfit_model
from vectorfit import distributed as vdist

WORLD = 2


def _config(cache_dir: str, **kw) -> VectorFitConfig:
    return VectorFitConfig(modules_to_save=["classifier"], cache_dir=cache_dir, progress=False, **kw)


def _factors(model) -> dict:
    return {n: (l.U.clone(), l.Vh.clone(), l.sigma0.clone()) for n, l in model.vectorfit_layers()}


def _worker(rank: int, init_file: str, out_dir: str, cache_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GROUP_TIMEOUT)
    out: dict = {}
    try:
        # 1. The same base model on both ranks: rank 0 decomposes (cold cache), rank 1 receives.
        avf = AVFConfig(k=3, start_step=1, interval=1, num_freezes=3)
        model = get_vectorfit_model(make_tiny_bert(0, num_labels=2), _config(cache_dir, avf=avf))
        out["factors"] = _factors(model)
        out["misses"], out["hits"] = model.svd_cache.misses, model.svd_cache.hits
        out["counts"] = dict(vdist.counts)

        # 2. Different base weights on the two ranks: every rank must fail, none may hang.
        try:
            get_vectorfit_model(make_tiny_bert(rank, num_labels=2), _config(cache_dir, svd_cache=False))
            out["mismatch_error"] = None
        except vdist.DistributedError as e:
            out["mismatch_error"] = str(e)

        # 2b. The same base but other target_modules on the two ranks (other targets; rank 1 with
        # fewer targets, which once left rank 0 waiting for a broadcast): every rank fails before any
        # SVD, saying that the configurations differ (not "the base weight differs").
        for key, targets in (("config_error", ["query", "value" if rank == 0 else "key"]),
                             ("fewer_error", ["query", "value"] if rank == 0 else ["query"])):
            try:
                get_vectorfit_model(make_tiny_bert(0, num_labels=2),
                                    _config(cache_dir, svd_cache=False, variant="no_avf", target_modules=targets))
                out[key] = None
            except vdist.DistributedError as e:
                out[key] = str(e)

        # 3. A model built on rank 0 only, inside local_decomposition(): no collective, no wait.
        if rank == 0:
            with vdist.local_decomposition():
                get_vectorfit_model(make_tiny_bert(0, num_labels=2), _config(cache_dir))
        dist.barrier()

        # 4. DDP with its default broadcast_buffers=True: the frozen factors are not in the buffers it
        # re-sends each forward, and training with gradient accumulation (two forwards before a
        # backward's version check would see a re-sent U) runs and keeps the ranks equal.
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        synced = {id(b) for b in ddp.modules_buffers}
        out["u_synced"] = any(id(l.U) in synced for _, l in model.vectorfit_layers())
        out["avf_synced"] = id(model.avf.ema) in synced
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(rank)
        for step in range(1, 4):
            for micro in range(2):
                ids = torch.randint(0, 64, (4, 7), generator=g)
                ctx = ddp.no_sync() if micro == 0 else torch.enable_grad()
                with ctx:
                    ddp(input_ids=ids, labels=torch.randint(0, 2, (4,), generator=g)).loss.backward()
            model.avf.step(step)
            opt.step()
            opt.zero_grad()
        out["trained"] = {n: p.detach().clone() for n, p in model.trainable_vectors().items()}
        del ddp  # before its process group goes
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_decomposition_for_all_ranks(tmp_path):
    cache_dir = tmp_path / "cache"
    spawn_ranks(_worker, (str(tmp_path / "init"), str(tmp_path), str(cache_dir)), WORLD)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    n = len(r0["factors"])
    assert n == 12  # 2 layers x (q, k, v, o, f1, f2)

    # The SVD ran n times on rank 0 (cold cache) and never on rank 1, which read no cache file either.
    assert (r0["misses"], r0["hits"]) == (n, 0)
    assert (r1["misses"], r1["hits"]) == (0, 0)
    assert r0["counts"] == {"decomposed": n, "received": 0}
    assert r1["counts"] == {"decomposed": 0, "received": n}
    assert len(list(cache_dir.glob("*.safetensors"))) == n

    # Bit for bit the same factors on both ranks ...
    assert r0["factors"].keys() == r1["factors"].keys()
    for name, (u0, vh0, s0) in r0["factors"].items():
        u1, vh1, s1 = r1["factors"][name]
        assert torch.equal(u0, u1) and torch.equal(vh0, vh1) and torch.equal(s0, s1), name
    # ... and the same as a one-process set-up reads back from the cache rank 0 filled.
    alone = get_vectorfit_model(make_tiny_bert(0, num_labels=2), _config(str(cache_dir)))
    assert alone.svd_cache.hits == n
    for name, (u, vh, s) in _factors(alone).items():
        assert torch.equal(u, r1["factors"][name][0]) and torch.equal(vh, r1["factors"][name][1]), name

    # Different base weights: both ranks fail with a message that says what to do.
    for r in (r0, r1):
        assert r["mismatch_error"] is not None
        assert "differs between ranks" in r["mismatch_error"] and "same base model" in r["mismatch_error"]
    # Different targets: both ranks name both modules and the cause.
    for r in (r0, r1):
        for key, n1 in (("config_error", 4), ("fewer_error", 2)):
            assert r[key] is not None and "base weight differs" not in r[key]
            assert r[key].startswith("the VectorFit configurations differ between ranks: rank 0 builds adapter 'default' "
                                     "on 4 targets (first ['bert.encoder.layer.0.attention.self.query', "), r[key]
            assert f"rank 1 adapter 'default' on {n1} (first ['bert.encoder.layer.0.attention.self.query', " in r[key], r[key]

    # DDP's per-forward buffer broadcast skips the frozen factors but keeps AVF's state in sync.
    for r in (r0, r1):
        assert r["u_synced"] is False and r["avf_synced"] is True
    for name, v in r0["trained"].items():
        assert torch.equal(v, r1["trained"][name]), name


def test_launched_without_a_process_group_warns_and_hides_nothing_from_ddp(tmp_path, monkeypatch):
    """torchrun's variables but no process group yet (the model built first): each rank decomposes on
    its own, which the user is told, and DDP must then sync the factors itself (nothing is hidden)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    from vectorfit import VectorFitWarning

    with pytest.warns(VectorFitWarning, match="not initialised yet.*before building the model"):
        model = get_vectorfit_model(make_tiny_bert(0, num_labels=2), _config(str(tmp_path)))
    assert model._ddp_params_and_buffers_to_ignore == []
    model._ddp_params_and_buffers_to_ignore = ["base_model.x"]  # what DDP's own setter does keeps working
    assert model._ddp_params_and_buffers_to_ignore == ["base_model.x"]
