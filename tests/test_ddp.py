"""AVF under DistributedDataParallel: two real processes (gloo, CPU) must take the same freezing
decisions as one process training on the whole batch, and stay in sync with each other."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_bert
from ranks import GROUP_TIMEOUT, spawn_ranks

from vectorfit import AVFConfig, VectorFitConfig, get_vectorfit_model

STEPS, WORLD = 10, 2


def _model():
    avf = AVFConfig(k=3, start_step=2, interval=2, num_freezes=4)
    return get_vectorfit_model(make_tiny_bert(0, num_labels=2), VectorFitConfig(modules_to_save=["classifier"], avf=avf))


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(0, 64, (8, 9), generator=g), "labels": torch.randint(0, 2, (8,), generator=g)}


def _train(model, forward_model, rank: int = 0, world: int = 1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.1)
    model.train()
    for step in range(1, STEPS + 1):
        batch = {k: v.chunk(world)[rank] for k, v in _batch(step).items()}
        forward_model(**batch).loss.backward()
        model.avf.step(step)
        opt.step()
        opt.zero_grad()
    return model.avf.history, {n: p.detach().clone() for n, p in model.trainable_vectors().items()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GROUP_TIMEOUT)
    try:
        model = _model()
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        history, vectors = _train(model, ddp, rank, WORLD)
        torch.save({"history": history, "vectors": vectors}, os.path.join(out_dir, f"rank{rank}.pt"))
        del ddp  # before its process group goes
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    spawn_ranks(_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    model = _model()
    history, vectors = _train(model, model)
    assert len(history) == 4
    for r in ranks:
        assert r["history"] == history
        for n, v in vectors.items():
            # DDP averages the two half-batch gradients = the full-batch mean gradient.
            torch.testing.assert_close(r["vectors"][n], v, rtol=0, atol=1e-5, msg=n)
    for n in vectors:
        assert torch.equal(ranks[0]["vectors"][n], ranks[1]["vectors"][n]), n
