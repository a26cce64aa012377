"""``vectorfit train`` under a launcher (``torchrun``, ``python -m torch.distributed.run``,
``accelerate launch --multi_gpu``, which is torchrun underneath and also starts CPU processes; its
``--cpu`` starts one process): data parallel.

What a run with N processes does, and why:

* The process group is created from the launcher's environment (``WORLD_SIZE``, ``RANK``,
  ``MASTER_ADDR``...) *before* the model is built, so the VectorFit library decomposes on rank 0 and
  broadcasts (``vectorfit.distributed``): every rank trains in the same bases.
* Every rank draws the same data order (the loop's generator is seeded by ``--seed`` alone) and takes
  its contiguous share of each global batch of ``--batch-size`` examples (sizes differ by at most one;
  a rank may get none of a short last batch).
* The loss is a mean over a batch, so the global batch's gradient is ``sum_r n_r * grad_r / N``: each
  rank scales its gradient by its share, one all-reduce sums them, every rank divides by ``N``. This is
  the one-process gradient up to summation order, also for uneven shares (plain DDP averaging would
  weight a rank with 15 examples like one with 16). Gradients are reduced before AVF and the optimizer
  step, so every rank freezes the same vectors and takes the same step.
* Only rank 0 evaluates, logs and writes (``--output``, ``--save-adapter``, the learning curve): the
  other ranks run with those switched off and return no result. Checkpointing for resume is off under
  a launcher (``--stop-at-step`` is refused): a resumed multi-process run would need every rank to
  reload the same state, which is not implemented.
* Dropout: every rank draws its own masks (the seed plus its rank, after the model is built), so the
  run is statistically, not numerically, the one-process run; with dropout disabled in the model the
  two agree to float round-off (tests/test_recipes_distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, Sequence

__all__ = ["launched", "active", "is_main", "rank", "world_size", "session", "decorrelate_dropout",
           "forward_backward", "annotate"]


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1).

    Returns:
        ``True`` under ``torchrun --nproc_per_node N`` with N > 1.
    """
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a process group with more than one process is initialised.

    Returns:
        ``True`` inside :func:`session` under a launcher.
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    """Processes in the group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that evaluates, logs and writes."""
    return rank() == 0


def _quiet(*_: Any) -> None:
    pass


@contextlib.contextmanager
def session(cfg: Any, log: Callable[..., Any]) -> Iterator[tuple[Any, Callable[..., Any]]]:
    """The training run's process group, when a launcher started several processes.

    Without a launcher this yields ``(cfg, log)`` unchanged and does nothing else.

    Args:
        cfg: the run's ``TrainConfig``.
        log: the run's logger.

    Returns:
        A context manager yielding ``(cfg, log)`` for this rank: on rank 0 the configuration (with
        ``device`` ``cuda`` pinned to the local GPU) and the logger; on the others a configuration that
        writes nothing, evaluates nothing before training and shows no progress, and a silent logger.

    Raises:
        ValueError: ``--stop-at-step`` under a launcher (checkpointing is not supported there).
    """
    if not launched():
        yield cfg, log
        return
    import torch
    import torch.distributed as dist

    if cfg.stop_at_step is not None:
        raise ValueError("--stop-at-step is not supported under a launcher (torchrun): checkpoint and resume are "
                         "one-process only; run the multi-process job in one go")
    device = str(cfg.device)
    if device.startswith("cuda"):  # one GPU per process
        device = f"cuda:{_env_int('LOCAL_RANK', 0)}"
        torch.cuda.set_device(torch.device(device))
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        created = True
    try:
        main = dist.get_rank() == 0
        cfg = dataclasses.replace(cfg, device=device)
        if main:
            log(f"[vectorfit] data parallel over {dist.get_world_size()} processes ({dist.get_backend()}): "
                f"each takes its share of every batch of {cfg.batch_size}; only this rank (0) evaluates and "
                "writes; checkpoint/resume is off under a launcher")
        else:
            cfg = dataclasses.replace(cfg, output=None, save_adapter=None, progress=False, eval_before=False)
            log = _quiet
        yield cfg, log
    finally:
        if created:
            dist.destroy_process_group()


def decorrelate_dropout(seed: int) -> None:
    """After the model is built (the head's initialisation must be the same on every rank), give each
    rank other than 0 its own random stream, so that ranks do not share dropout masks. Rank 0 keeps
    the one-process stream. Without a process group this does nothing.

    Args:
        seed: the run's seed.
    """
    if active() and rank() != 0:
        import torch

        torch.manual_seed(seed + 1_000_003 * rank())


def forward_backward(model: Any, make_batch: Callable[[Sequence[int]], dict], idx: Sequence[int],
                     params: Sequence[Any]) -> Any:
    """Forward and backward over a global batch: all of it in one process, this rank's share under
    a process group, with the gradients then combined as the one-process gradient (module docstring).

    Args:
        model: returns an output with a mean ``.loss`` over the batch.
        make_batch: builds the model's inputs for a list of example indices.
        idx: the global batch's example indices (the same on every rank).
        params: the trained parameters (the same list, in the same order, on every rank).

    Returns:
        The global batch's mean loss (a detached scalar tensor under a process group).
    """
    if not active():
        loss = model(**make_batch(idx)).loss
        loss.backward()
        return loss
    import torch
    import torch.distributed as dist

    r, w, n = rank(), world_size(), len(idx)
    mine = list(idx[n * r // w: n * (r + 1) // w])
    local_loss = None
    if mine:  # a rank with no share of a short last batch only contributes zeros
        loss = model(**make_batch(mine)).loss
        loss.backward()
        local_loss = loss.detach().float()
    device = params[0].device if str(dist.get_backend()) == "nccl" else torch.device("cpu")
    parts, present = [], []
    for p in params:
        g = p.grad
        present.append(0.0 if g is None else 1.0)
        parts.append(torch.zeros(p.numel(), device=device) if g is None
                     else g.detach().reshape(-1).to(device=device, dtype=torch.float32) * len(mine))
    loss_sum = local_loss.to(device) * len(mine) if local_loss is not None else torch.zeros((), device=device)
    # One message per step: gradients, which parameters have one on any rank, and the loss.
    flat = torch.cat(parts + [torch.tensor(present, device=device), loss_sum.reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for i, p in enumerate(params):
        k = p.numel()
        if flat[-1 - len(params) + i] > 0:  # a parameter no rank gave a gradient stays without one
            p.grad = (flat[offset: offset + k] / n).view_as(p).to(device=p.device, dtype=p.dtype)
        offset += k
    return flat[-1] / n


def annotate(result: dict) -> dict:
    """Record the number of processes in a result written under a launcher (a one-process result
    keeps the fields it always had).

    Args:
        result: a dictionary (part of rank 0's result).

    Returns:
        ``result``, with ``processes`` set when more than one process trained.
    """
    if active():
        result["processes"] = world_size()
    return result
