"""``VectorFitTrainer`` under DDP, launched the way ``torchrun`` does (environment variables, two real
CPU processes, gloo), with the Trainer's default ``ddp_broadcast_buffers``: it must train like one
process on the same global batch, and only rank 0 may write checkpoints."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from conftest import make_tiny_bert
from ranks import GROUP_TIMEOUT, spawn_ranks
from transformers import TrainingArguments

from vectorfit import AVFConfig, VectorFitConfig, VectorFitModel, get_vectorfit_model
from vectorfit.integrations import VectorFitTrainer

N, GLOBAL_BATCH, STEPS, WORLD = 32, 8, 8, 2  # 4 steps per epoch, 2 epochs


def _data() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (N, 10), generator=g)
    labels = (ids[:, 0] % 2).tolist()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": labels[i]} for i in range(N)]


def _args(out: str, per_device: int) -> TrainingArguments:
    # No ddp_broadcast_buffers: the point is that the user need not remember it.
    return TrainingArguments(
        output_dir=out, per_device_train_batch_size=per_device, max_steps=STEPS, learning_rate=2e-2,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        logging_strategy="no", save_strategy="steps", save_steps=4, report_to=[], seed=0, data_seed=0,
        use_cpu=True, ddp_timeout=int(GROUP_TIMEOUT.total_seconds()), dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential", average_tokens_across_devices=False,
    )


def _train(out: str, per_device: int):
    args = _args(out, per_device)  # under torchrun variables this initialises the gloo group
    model = get_vectorfit_model(make_tiny_bert(0, num_labels=2),
                                VectorFitConfig(modules_to_save=["classifier"], avf=AVFConfig(k=3), progress=False))
    trainer = VectorFitTrainer(model=model, args=args, train_dataset=_data())
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    return trainer, model


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    trainer, model = _train(out, GLOBAL_BATCH // WORLD)
    ddp = trainer.model_wrapped
    synced = {id(b) for b in getattr(ddp, "modules_buffers", [])}
    torch.save({
        "ddp": isinstance(ddp, torch.nn.parallel.DistributedDataParallel),
        "broadcast_buffers": getattr(ddp, "broadcast_buffers", None),
        "u_synced": any(id(l.U) in synced for _, l in model.vectorfit_layers()),
        "history": model.avf.history,
        "vectors": {n: p.detach().clone() for n, p in model.trainable_vectors().items()},
    }, os.path.join(out, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_trainer_under_ddp_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    spawn_ranks(_worker, (_free_port(), str(out)), WORLD)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    _, alone = _train(str(tmp_path / "one"), GLOBAL_BATCH)
    assert len(alone.avf.history) >= 2
    for r in ranks:
        # Real DDP, with its default per-forward buffer broadcast, which skips the frozen factors.
        assert r["ddp"] and r["broadcast_buffers"] is True and r["u_synced"] is False
        assert r["history"] == alone.avf.history
        for n, v in alone.trainable_vectors().items():
            # DDP averages the two half-batch gradients = the global batch's mean gradient.
            torch.testing.assert_close(r["vectors"][n], v, rtol=0, atol=1e-5, msg=n)
    for n, v in ranks[0]["vectors"].items():
        assert torch.equal(v, ranks[1]["vectors"][n]), n

    # Only rank 0 wrote, and what it wrote is the adapter (not a full state dict) and loads.
    for folder in ("checkpoint-4", "checkpoint-8", "final"):
        names = {p.name for p in (out / folder).iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names, folder
    reloaded = VectorFitModel.from_pretrained(make_tiny_bert(0, num_labels=2), out / "final")
    for n, v in reloaded.trainable_vectors().items():
        torch.testing.assert_close(v, ranks[0]["vectors"][n], rtol=0, atol=0, msg=n)
