"""shard / gather / broadcast / all_sum of cdm_fast.distill.distributed, in one process and in two (gloo)."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.multiprocessing as mp

from cdm_fast.distill import distributed


def test_single_process_context_is_the_identity():
    context = distributed.Context()
    items = list(range(7))
    assert distributed.shard(items, context) == items
    assert distributed.gather(items, 7, context) == items
    assert distributed.broadcast("x", context) == "x"
    assert distributed.all_sum(2.5, context) == 2.5
    assert distributed.map_sharded(lambda xs: [x * 10 for x in xs], items, context) == [x * 10 for x in items]


def test_weight_grads_are_deferred_only_on_cuda_in_one_process():
    cuda = torch.device("cuda", 0)
    assert distributed.defers_weight_grads(distributed.Context(device=cuda))
    assert not distributed.defers_weight_grads(distributed.Context())
    assert not distributed.defers_weight_grads(distributed.Context(rank=1, world_size=2, device=cuda))
    # a device-mapped model's own device decides, not the context's
    assert distributed.defers_weight_grads(distributed.Context(), cuda)
    assert not distributed.defers_weight_grads(distributed.Context(device=cuda), torch.device("cpu"))
    no_op = distributed.deferred_weight_grads(distributed.Context())
    assert isinstance(no_op, contextlib.nullcontext)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    context = distributed.setup("cpu")
    try:
        items = [f"item{i}" for i in range(7)]
        mine = distributed.shard(items, context)
        gathered = distributed.gather([s.upper() for s in mine], len(items), context)
        results[rank] = {
            "mine": mine,
            "gathered": gathered,
            "broadcast": distributed.broadcast(f"from{rank}", context),
            "sum": distributed.all_sum(rank + 1.0, context),
            "mapped": distributed.map_sharded(lambda xs: [(x, rank) for x in xs], items, context),
            # one item: rank 1 has none and must not call the function (it would get an empty list)
            "one": distributed.map_sharded(
                lambda xs: [len(xs)] * len(xs) if xs else 1 / 0, items[:1], context
            ),
        }
    finally:
        distributed.shutdown()


def test_two_processes_shard_gather_broadcast_and_sum():
    port = _free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    expected = [f"ITEM{i}" for i in range(7)]
    assert results[0]["mine"] == ["item0", "item2", "item4", "item6"]
    assert results[1]["mine"] == ["item1", "item3", "item5"]
    for rank in (0, 1):
        assert results[rank]["gathered"] == expected
        assert results[rank]["broadcast"] == "from0"
        assert results[rank]["sum"] == 3.0
        assert results[rank]["mapped"] == [(f"item{i}", i % 2) for i in range(7)]
        assert results[rank]["one"] == [1]
