"""Process-group setup for torchrun, and the two ways to spread a model over processes.

* ddp  (default): every process holds the whole model; gradients are averaged (DistributedDataParallel).
* fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`), each decoder layer and then the root sharded, for
  models whose parameters + optimizer state do not fit one device.
Both average gradients over processes, so the loop scales each process's loss by the world size (see
loop.py) to get the gradient of the global token-mean loss.
"""

from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; one process per GPU on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        if world > torch.cuda.device_count():
            raise RuntimeError(f"{world} processes but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        _import_modules_that_capture_the_group()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                store=_store_for_a_new_group(rank, world), rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank, dev)


# The env:// rendezvous store, one per process, and how many process groups init_distributed has made on it.
_rendezvous_stores: dict = {}
_groups_made = 0


def _store_for_a_new_group(rank: int, world: int) -> dist.Store:
    """The store for the next process group of this process: the env:// rendezvous store (made once, then
    reused), under a prefix of its own for each group.

    init_process_group(init_method='env://') would put every default group of a process under the same
    keys: under torchrun all of them share the launcher's store, which keeps the keys of earlier groups,
    and a destroyed default group resets the group counter, so the next one is named "0" again. Gloo's
    rendezvous waits for each peer's key (`default_pg/0//cpu//0/<rank>`, its listening address) and a
    leftover key satisfies that wait at once: in a second train() in the same process (train_chain), a
    process that reaches init_process_group first reads its peer's address from the previous run, while
    the peer is still finishing it (rank 0 plots the loss after the last collective). It connects to the
    peer's old group, still listening or already closed, and the new group hangs in connectFullMesh or
    fails with "Connection reset by peer" at its first collective. A prefix per group gives every group
    keys that nobody has written yet. Every process makes its groups in the same order (each runs the
    same phases), so the counter agrees between them. Reusing the store also keeps a second group off a
    store that rank 0 would otherwise recreate on MASTER_PORT (when no launcher store is used) while the
    previous one may still be serving there."""
    global _groups_made
    key = (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), rank, world)
    store = _rendezvous_stores.get(key)
    if store is None:
        from torch.distributed.constants import default_pg_timeout

        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=default_pg_timeout))
        _rendezvous_stores[key] = store
    _groups_made += 1
    return dist.PrefixStore(f"nosa_group_{_groups_made}", store)


def wrap_model(model: torch.nn.Module, info: DistInfo, parallel: str) -> torch.nn.Module:
    """The module the loop calls; `unwrap` gives back the transformers model for saving."""
    if not info.enabled:
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "config") else model


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def skip_gradient_sync(model: torch.nn.Module, skip: bool):
    """Accumulation micro-steps before the last need no gradient communication."""
    if not skip:
        yield
    elif is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _import_modules_that_capture_the_group() -> None:
    """Imported before the process group exists, for what their import captures: the functions of
    torch.distributed.nn.functional (which torch.distributed.fsdp imports) take `group=group.WORLD` as a
    default argument, evaluated at import. Imported after init_process_group, that default is the live
    default group, which destroy_process_group then cannot free (see `cleanup`)."""
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401


def _release_device_mesh_groups() -> None:
    """Drop the process groups that DeviceMesh objects still hold after destroy_process_group.

    FSDP2 parameters are DTensors on a DeviceMesh, and a DeviceMesh keeps its groups in `_pg_registry`.
    DTensor's sharding-propagation caches (lru_caches, whose entries the garbage collector cannot see)
    keep DTensorSpecs, and through them the mesh, alive after the model is gone; so destroy_process_group
    unregisters the group but does not free it. The gloo group's worker threads then outlive the run, and
    one that drops its last collective's tensors while the interpreter is shutting down takes the GIL of
    a finalizing interpreter, is ended by pthread_exit inside a noexcept destructor and aborts the process
    ("terminate called without an active exception", exit -6 after a complete run). Freed here, the
    group's destructor joins those threads now. The meshes are found by type, since their holders are
    invisible to gc.get_referrers; a torch without `_pg_registry` has nothing to clear."""
    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()  # the model (FSDP's hooks make it a reference cycle) and its DTensors
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()


def cleanup(info: DistInfo, completed: bool = False) -> None:
    """Destroy the process group. `completed`: every collective of this process has returned (the run
    ended normally), so the group can also be freed now, which joins its worker threads (see
    `_release_device_mesh_groups`). Not after a failure: freeing a group waits for its queued work, which
    may wait on processes that will never take part."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        if completed:
            _release_device_mesh_groups()
