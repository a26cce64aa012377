"""VectorFit under ``torch.distributed``: one decomposition for all ranks, and what DDP should not sync.

Why rank 0 decomposes for everyone: the frozen bases ``U`` and ``Vh`` define what each trained
singular value means. SVD routines on different devices or library builds agree on ``U diag(s) Vh``
but not on the individual vectors where singular values are close (a near-repeated pair may come
back rotated). If each rank decomposed on its own, ranks could average gradients of vectors that live
in different bases, and nothing would fail. So, under an initialised process group with more than one
process, rank 0 computes (or reads from its disk cache) each target's ``U, s, Vh`` and broadcasts the
bytes; the other ranks run no SVD and touch no cache file. Every rank also checks that its base weight
has rank 0's fingerprint, so ranks that loaded different base models fail at set-up, on every rank.

This is a collective operation: every rank of the default process group must build the same
VectorFit model (same base model, same config) in the same order. A model built on one rank only
(for example an evaluation copy on rank 0) must be built inside :func:`local_decomposition`,
otherwise rank 0 waits for the others until the process group's timeout.

What DDP need not sync: a VectorFit layer's frozen ``U`` and ``Vh`` are frozen parameters, which
DDP broadcasts once at construction and never reduces; when rank 0 decomposed for everyone they are
already identical, and :func:`ddp_ignored_names` lists them (with ``sigma0``) so that even the
initial, model-sized broadcast is skipped. The tuner exposes the list as
``_ddp_params_and_buffers_to_ignore``, the attribute DDP reads at construction (through the
``PeftModel``). A model built before the process group existed (each rank decomposed on its own)
hides nothing: DDP's initial sync then copies rank 0's factors to the other ranks.

FSDP (PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``; tested on CPU with gloo): the trained
vectors and heads are parameters, so FSDP shards them and reduce-scatters their gradients like any
other; the optimizer steps on the shards. AVF reads whole vectors: on a sharded parameter it
all-gathers the vector on every rank (``avf.training_strength``; vectors are tiny), so every rank
computes the one-process strengths and takes the same decision; a frozen vector's sharded gradient
is dropped on every rank. The frozen ``U``/``Vh`` are frozen parameters, so FSDP shards them too.
``save_pretrained`` reads whole tensors: :func:`full_parameters` gathers every sharded parameter on
every rank for the duration of a ``with`` block (a collective: enter it on every rank); inside it,
rank 0 saves (``if dist.get_rank() == 0: model.save_pretrained(path)``).

FSDP1 (``FullyShardedDataParallel``, flat parameters) is not supported: outside its forward a rank
holds only its slice of a flat buffer, which neither AVF nor saving can read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .layer import VectorFitLayer
from .notices import warn

__all__ = [
    "DistributedError",
    "shared_decomposition_active",
    "begin_decomposition",
    "check_same_targets",
    "is_main_process",
    "local_decomposition",
    "decompose",
    "ddp_ignored_names",
    "counts",
    "prepare_fsdp",
    "full_parameters",
]


class DistributedError(RuntimeError):
    """Ranks of a process group disagree about what they are building (raised on every rank)."""


#: Per-process counters, read by tests and diagnostics: ``decomposed`` = factors this process
#: obtained itself (computed or read from its cache), ``received`` = factors it got from rank 0.
counts: dict[str, int] = {"decomposed": 0, "received": 0}

_local_depth = 0  # > 0 inside local_decomposition()


def _group_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def shared_decomposition_active() -> bool:
    """Whether decompositions are made on rank 0 and broadcast: an initialised default process group
    with more than one process, and not inside :func:`local_decomposition`.

    Returns:
        ``True`` when :func:`decompose` communicates.
    """
    return _local_depth == 0 and _group_size() > 1


def is_main_process() -> bool:
    """``True`` without a process group and on its rank 0 (where progress bars are shown).

    Returns:
        Whether this process is rank 0 or runs alone.
    """
    return _group_size() == 1 or dist.get_rank() == 0


def begin_decomposition() -> bool:
    """Called once as a model is built: whether its factors will come from rank 0.

    Warns when a launcher started several processes (``WORLD_SIZE`` > 1) but the process group does
    not exist yet: then every rank decomposes on its own, and DDP must equalise the factors itself
    (its initial sync does) and keep re-sending them before every forward pass.

    Returns:
        :func:`shared_decomposition_active`.
    """
    shared = shared_decomposition_active()
    try:
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        launched = False
    if not shared and launched and _local_depth == 0:
        warn(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not initialised yet, so every rank runs "
            "its own SVD, and DDP will re-send rank 0's U/Vh before every forward pass. Initialise the process "
            "group before building the model (torch.distributed.init_process_group(), accelerate's "
            "PartialState(), or create the TrainingArguments first) so rank 0 decomposes for all ranks"
        )
    return shared


@contextlib.contextmanager
def local_decomposition() -> Iterator[None]:
    """Within the block, every process decomposes on its own, as without a process group.

    Use it to build a VectorFit model on some ranks only (an evaluation copy on rank 0):
    :func:`decompose` is a collective call and would otherwise wait for the other ranks.
    """
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def _comm_device() -> torch.device:
    """Where tensors must be for the default group's backend: NCCL only moves CUDA tensors, gloo and
    MPI only CPU tensors; a mixed backend (``"cpu:gloo,cuda:nccl"``) takes CPU tensors."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend in ("gloo", "mpi") or "gloo" in backend:
        return torch.device("cpu")
    acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    return acc if acc is not None else torch.device("cpu")


def _digest(key: str) -> Tensor:
    """32 bytes identifying a fingerprint string (of any length), as a uint8 tensor."""
    return torch.tensor(list(hashlib.sha256(key.encode()).digest()), dtype=torch.uint8)


def check_same_targets(adapter_name: str, targets: list[str]) -> None:
    """Before any decomposition: every rank is about to adapt the same modules, in the same order.

    A rank with other (or fewer) targets would otherwise meet rank 0 in mismatched broadcasts: wrong
    factors, or a wait until the group's timeout. One 32-byte broadcast and one all-reduce per adapter.

    Raises:
        DistributedError: on every rank, naming the first rank and target list that differ.
    """
    if not shared_decomposition_active():
        return
    device = _comm_device()
    mine = _digest(adapter_name + "\n" + "\n".join(targets)).to(device)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    differs = torch.tensor([int(not torch.equal(ref, mine))], dtype=torch.int64, device=device)
    dist.all_reduce(differs)
    if int(differs.item()):
        views: list = [None] * dist.get_world_size()
        dist.all_gather_object(views, (adapter_name, len(targets), targets[:3], bytes(mine.cpu().tolist())))
        r = next(i for i, v in enumerate(views) if v[3] != views[0][3])
        raise DistributedError(
            f"the VectorFit configurations differ between ranks: rank 0 builds adapter {views[0][0]!r} on {views[0][1]} "
            f"targets (first {views[0][2]}), rank {r} adapter {views[r][0]!r} on {views[r][1]} (first {views[r][2]}). "
            "Every rank must build the same VectorFit model (same base model and the same VectorFitConfig: "
            "target_modules, exclude_modules, variant, modules_to_save) in the same order; build a model on some "
            "ranks only inside vectorfit.distributed.local_decomposition()")


def decompose(cache, matrix: Tensor, key: str, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """The float32 thin SVD of a target matrix, made once for all ranks.

    Without a process group (or inside :func:`local_decomposition`) this is
    ``cache.get_or_compute(matrix, key, name)``. Under one, rank 0 does that and broadcasts the
    factors; the other ranks receive bit-identical copies and neither compute nor read the cache.

    Args:
        cache: the model's :class:`~vectorfit.cache.SVDCache` (used on rank 0 only).
        matrix: the ``d_out x d_in`` base weight.
        key: its fingerprint (compared across ranks).
        name: the module's name, for messages.

    Returns:
        ``(U, S, Vh)`` in float32 on the CPU.

    Raises:
        DistributedError: on every rank, when some rank's weight has another fingerprint than rank 0's,
            and on ranks other than 0 when rank 0 failed (rank 0 raises its own error).
        TargetError: on rank 0, for a weight holding NaN/Inf (from the cache).
    """
    if not shared_decomposition_active():
        counts["decomposed"] += 1
        return cache.get_or_compute(matrix, key=key, name=name)
    rank, world, device = dist.get_rank(), dist.get_world_size(), _comm_device()
    factors: Optional[tuple[Tensor, Tensor, Tensor]] = None
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            factors = cache.get_or_compute(matrix, key=key, name=name)
        except Exception as e:  # re-raised below, after the other ranks have been told
            error = e
    mine = _digest(key)
    # Header: [failed on rank 0?] + rank 0's fingerprint digest. Rank 0's failure must reach the
    # others, or they would wait in the payload broadcast below until the group's timeout. (That
    # every rank decomposes the same modules in the same order was checked before any of them, by
    # check_same_targets.)
    header = torch.cat([torch.tensor([int(error is not None)], dtype=torch.uint8), mine]).to(device)
    dist.broadcast(header, src=0)
    header = header.cpu()
    if header[0]:
        if error is not None:
            raise error
        raise DistributedError(f"rank 0 could not decompose module {name!r}; its own error (in rank 0's output) says why")
    other_weight = not torch.equal(header[1:], mine)
    differs = torch.tensor([int(other_weight)], dtype=torch.int64, device=device)
    dist.all_reduce(differs)  # every rank learns whether any rank differs, so all fail together
    if int(differs.item()):
        raise DistributedError(
            f"module {name!r}: the base weight differs between ranks ({int(differs.item())} of {world} ranks have "
            f"another fingerprint than rank 0; this rank {'does' if other_weight else 'does not'}). "
            "Every rank must load the same base model (same checkpoint, dtype and modifications) before "
            "get_vectorfit_model / VectorFitModel.from_pretrained"
        )
    d_out, d_in = matrix.shape
    r = min(d_out, d_in)
    sizes = [d_out * r, r, r * d_in]
    if rank == 0:
        U, S, Vh = factors  # type: ignore[misc]
        flat = torch.cat([U.reshape(-1), S.reshape(-1), Vh.reshape(-1)]).to(device=device, dtype=torch.float32)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dist.broadcast(flat, src=0)  # one message per matrix; bytes are copied, so the copies are bit-identical
    if rank == 0:
        counts["decomposed"] += 1
        return factors  # type: ignore[return-value]
    counts["received"] += 1
    U, S, Vh = (t.cpu().clone() for t in flat.split(sizes))
    return U.view(d_out, r), S, Vh.view(r, d_in)


def ddp_ignored_names(model: nn.Module) -> list[str]:
    """Names (relative to ``model``) of the frozen factors (``U``, ``Vh``, ``sigma0``) of the VectorFit
    layers whose factors came from rank 0: identical on every rank by construction and never changed
    by training, so DDP's initial sync need not send them.

    Args:
        model: a module holding VectorFit layers (the base model inside a ``PeftModel``).

    Returns:
        Fully qualified names, every alias of a shared layer included.
    """
    names = []
    for prefix, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, VectorFitLayer) and module.decomposed and getattr(module, "vectorfit_shared_factors", False):
            names += [f"{prefix}.{b}" if prefix else b for b in ("U", "Vh", "sigma0")]
    return names


def prepare_fsdp(model: nn.Module) -> nn.Module:
    """Check that ``model`` can be sharded with FSDP2's ``fully_shard``; returns it unchanged.

    The frozen factors ``U`` and ``Vh`` are frozen parameters (``requires_grad=False``), so FSDP
    shards them and all-gathers them for each forward/backward, as it does a LoRA model's frozen base
    weights; nothing needs converting any more (this function once did). Apply ``fully_shard`` per
    block and then to the whole model.

    Raises:
        ValueError: a layer is merged (``merge()``): unmerge first.
    """
    for name, layer in model.named_modules():
        if isinstance(layer, VectorFitLayer) and layer.merged:
            raise ValueError(f"prepare_fsdp: layer {name!r} is merged; call model.unmerge() before sharding")
    return model


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every parameter FSDP2 has sharded is whole (a plain tensor) on every rank:
    ``save_pretrained`` and ``trainable_vectors()`` then read whole tensors as without FSDP (tested).
    On exit the sharded parameters are put back, unchanged.

    A collective: every rank must enter it (and only rank 0 should write)::

        with vectorfit.distributed.full_parameters(model):
            if torch.distributed.get_rank() == 0:
                model.save_pretrained("adapter")

    It holds the whole model's parameters on every rank for the duration (like FSDP's full state
    dict); do not run forward passes or optimizer steps inside it. Without sharded parameters it
    does nothing.

    Args:
        model: the model after ``fully_shard``.

    Yields:
        ``model``.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}  # a parameter shared by two modules (tied) stays shared
    try:
        # The module order is the same on every rank, so the all-gathers pair up.
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and hasattr(p, "full_tensor"):  # DTensor
                    if id(p) not in whole:
                        whole[id(p)] = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                    module._parameters[name] = whole[id(p)]
                    swapped.append((module, name, p))
        yield model
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p
