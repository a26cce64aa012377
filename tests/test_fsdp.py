"""VectorFit under FSDP2 (``torch.distributed.fsdp.fully_shard``): two real gloo processes on the CPU,
against one process training on the whole batch.

One spawn runs two set-ups (starting two interpreters that import transformers costs most of the
time): (a) ``fully_shard`` on the model as it is (the frozen U/Vh stay whole buffers on every rank),
absolute singular values; (b) :func:`vectorfit.distributed.prepare_fsdp` first (U/Vh sharded too),
relative singular values, then ``save_pretrained`` from the sharded model inside
:func:`vectorfit.distributed.full_parameters`, written by rank 0 only.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import make_tiny_bert
from ranks import GROUP_TIMEOUT, spawn_ranks
from safetensors.torch import load_file

from vectorfit import AVFConfig, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit import distributed as vdist

STEPS, WORLD, BATCH = 7, 2, 8
SETUPS = {"a": dict(sigma_param="absolute", prepare=False), "b": dict(sigma_param="relative", prepare=True)}


def _model(sigma_param: str):
    avf = AVFConfig(k=3, start_step=2, interval=2, num_freezes=3)
    cfg = VectorFitConfig(modules_to_save=["classifier"], avf=avf, sigma_param=sigma_param, progress=False)
    return get_vectorfit_model(make_tiny_bert(0, num_labels=2), cfg)


def _batch(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(0, 64, (BATCH, 9), generator=g), "labels": torch.randint(0, 2, (BATCH,), generator=g)}


def _train(model, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS AdamW steps with AVF; each rank takes its half of every batch. Returns the global
    batch's mean loss per step (equal shares, so the mean of the ranks' means)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(1, STEPS + 1):
        loss = model(**{k: v.chunk(world)[rank] for k, v in _batch(step).items()}).loss
        loss.backward()
        model.avf.step(step)
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / world)
    return losses


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=GROUP_TIMEOUT)
    out: dict = {}
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for key, setup in SETUPS.items():
            model = _model(setup["sigma_param"])
            if setup["prepare"]:
                vdist.prepare_fsdp(model)
            for block in model.base_model.bert.encoder.layer:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            layer = model.base_model.bert.encoder.layer[0].attention.self.query
            trained = layer.vectorfit_sigma["default"]
            res = {
                "vector_local_shape": tuple(trained.to_local().shape),
                "U_local_shape": tuple(layer.U.to_local().shape) if hasattr(layer.U, "to_local") else None,
                "U_is_buffer": "U" in layer._buffers,
            }
            res["losses"] = _train(model, rank, WORLD)
            res["history"] = model.avf.history
            with vdist.full_parameters(model):
                res["vectors"] = {n: p.detach().clone() for n, p in model.trainable_vectors().items()}
                res["head"] = {k: v.clone() for k, v in model.base_model.classifier.modules_to_save["default"].state_dict().items()}
                if key == "b" and rank == 0:
                    model.save_pretrained(os.path.join(out_dir, "adapter"))
            res["sharded_again"] = hasattr(layer.vectorfit_sigma["default"], "full_tensor")
            res["state_dict_factors"] = [k for k in model.state_dict() if k.endswith((".U", ".Vh"))]
            out[key] = res
            dist.barrier()
    finally:
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_process(tmp_path):
    spawn_ranks(_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for key, setup in SETUPS.items():
        model = _model(setup["sigma_param"])
        losses = _train(model)
        history = model.avf.history
        assert len(history) == 3
        for r in ranks:
            res = r[key]
            # Really sharded: each rank holds half of a 32-vector, and half of the frozen U (a frozen
            # parameter, which FSDP shards with or without prepare_fsdp).
            assert res["vector_local_shape"] == (16,)
            assert res["U_local_shape"] == (16, 32)
            assert res["U_is_buffer"] is False
            # The same AVF decisions as one process, on both ranks (identical lists).
            assert res["history"] == history, key
            # FSDP averages the two half-batch gradients = the full-batch mean gradient; summation
            # order differs (reduce-scatter), so round-off, amplified a little by AdamW.
            assert res["losses"] == pytest.approx(losses, abs=1e-5), key
            for n, v in model.trainable_vectors().items():
                torch.testing.assert_close(res["vectors"][n], v.detach(), rtol=0, atol=1e-5, msg=f"{key} {n}")
            for n, v in model.base_model.classifier.modules_to_save["default"].state_dict().items():
                torch.testing.assert_close(res["head"][n], v, rtol=0, atol=1e-5, msg=f"{key} head {n}")
            assert res["sharded_again"] is True and res["state_dict_factors"] == []
        for n, v in ranks[0][key]["vectors"].items():
            assert torch.equal(v, ranks[1][key]["vectors"][n]), n

        if key == "b":
            # save_pretrained from the sharded model: written once (rank 0), loads onto a fresh base,
            # and equals what the one-process run saves.
            model.save_pretrained(tmp_path / "one")
            saved, ref = load_file(tmp_path / "adapter" / "adapter_model.safetensors"), load_file(tmp_path / "one" / "adapter_model.safetensors")
            assert saved.keys() == ref.keys()
            for n in ref:
                torch.testing.assert_close(saved[n], ref[n], rtol=0, atol=1e-5, msg=n)
            reloaded = VectorFitModel.from_pretrained(make_tiny_bert(0, num_labels=2), tmp_path / "adapter")
            for n, v in reloaded.trainable_vectors().items():
                assert torch.equal(v, ranks[0][key]["vectors"][n]), n


def test_prepare_fsdp_keeps_the_model_and_its_checkpoints(tmp_path):
    """Without a process group: prepare_fsdp turns the frozen factors into frozen parameters (what
    FSDP shards) and changes nothing else: outputs, trainable parameters, state_dict keys, loading."""
    plain, prepared = _model("absolute"), _model("absolute")
    keys = set(plain.state_dict())
    assert vdist.prepare_fsdp(prepared) is prepared and vdist.prepare_fsdp(prepared) is prepared  # idempotent
    layer = prepared.base_model.bert.encoder.layer[0].attention.self.query
    assert "U" in layer._parameters and not layer.U.requires_grad and "U" not in layer._buffers
    assert [n for n, p in prepared.named_parameters() if p.requires_grad] == [n for n, p in plain.named_parameters() if p.requires_grad]
    assert set(prepared.state_dict()) == keys  # U/Vh stay out of checkpoints
    ids = _batch(1)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(prepared(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    with torch.no_grad():
        plain.base_model.bert.encoder.layer[0].attention.self.query.sigma.add_(0.5)
    prepared.load_state_dict(plain.state_dict())  # strict: a checkpoint without U/Vh loads
    with torch.no_grad():
        torch.testing.assert_close(prepared(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    with vdist.full_parameters(prepared):  # nothing sharded: does nothing
        assert prepared.base_model.bert.encoder.layer[0].attention.self.query.U is layer.U
    other = _model("absolute")
    other.merge()
    with pytest.raises(ValueError, match="unmerge"):
        vdist.prepare_fsdp(other)
