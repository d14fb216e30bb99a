"""torch.distributed for the distillation loops: one process per device, started by `torchrun`.

Both loops run unchanged in a single process; under `torchrun --nproc-per-node N` (WORLD_SIZE > 1 in the
environment) `setup()` joins the process group (NCCL on CUDA, gloo on the CPU) and the loops
- shard per-prompt work (generation, CDM scoring, teacher forwards) with `shard` and reassemble it on every
  rank, in the original order, with `gather`;
- wrap the trained module in DistributedDataParallel, each rank taking its own micro-batches of a global
  batch, so one optimizer step sees `world_size` times the examples of a single process;
- write files on rank 0 only (`Context.is_main`), with `barrier()` where the others must wait for them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = Context()


def defers_weight_grads(context: Context, device: torch.device | None = None) -> bool:
    """Whether `cdm_fast.wgrad`'s deferral applies: on CUDA (the deferred weight-gradient GEMMs run on a side
    stream) in a single process (under DDP they would run after the reducer's gradient hooks have fired).

    device: where the trained weights are, when not `context.device` (a model placed by a device map).
    """
    device = context.device if device is None else device
    return device.type == "cuda" and not context.distributed


def deferred_weight_grads(
    context: Context, device: torch.device | None = None
) -> contextlib.AbstractContextManager:
    """`cdm_fast.wgrad.deferred()` where `defers_weight_grads` says it applies, a no-op elsewhere."""
    if defers_weight_grads(context, device):
        from cdm_fast import wgrad

        return wgrad.deferred()
    return contextlib.nullcontext()


def check_device_map(device_map: Any, context: Context) -> None:
    """Refuse a device map under several processes: it spreads one model over every visible device, and each
    rank would spread its own copy over the same devices."""
    if device_map is not None and context.distributed:
        raise ValueError(
            f"device_map: {device_map!r} spreads one model over every visible device; expected a single "
            f"process, got world size {context.world_size} (drop --device-map under torchrun)"
        )


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_rank() -> int:
    """This process's rank as its launcher set it (0 without one), before `setup` and after `shutdown`."""
    return int(os.environ.get("RANK", "0"))


def setup(device: str | torch.device | None = None) -> Context:
    """Join the process group when launched with several processes; a single-process Context otherwise.

    device: None picks cuda:LOCAL_RANK when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=60),  # rank 0 alone writes reports and plots meanwhile
        )
    return Context(rank=rank, world_size=world_size, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def shard(items: Sequence[T], context: Context) -> list[T]:
    """This rank's items: every world_size-th one from its rank (rank 0 of 1 gets them all)."""
    return list(items[context.rank :: context.world_size])


def gather(local: list[T], total: int, context: Context) -> list[T]:
    """The inverse of `shard`: every rank's results, in the original order, on every rank."""
    if not context.distributed:
        return list(local)
    parts: list[Any] = [None] * context.world_size
    dist.all_gather_object(parts, local)
    out: list[Any] = [None] * total
    for rank, part in enumerate(parts):
        out[rank :: context.world_size] = part
    return out


def map_sharded(function: Callable[[list[T]], list[R]], items: Sequence[T], context: Context) -> list[R]:
    """`function` (this rank's items -> one result each) over the items sharded across ranks: every result,
    in item order, on every rank. A rank left without items does not call `function`."""
    mine = shard(items, context)
    return gather(function(mine) if mine else [], len(items), context)


def broadcast(value: T, context: Context) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not context.distributed:
        return value
    box = [value if context.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: float, context: Context) -> float:
    """The sum of a number over ranks."""
    if not context.distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor)
    return float(tensor.item())


def _collective_device(context: Context) -> torch.device:
    # NCCL reduces device tensors only; gloo takes CPU tensors.
    return context.device if context.device.type == "cuda" else torch.device("cpu")
