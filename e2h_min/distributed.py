"""Data parallelism across processes started by torchrun, with plain torch.distributed collectives.

Each rank rolls out its contiguous share of the step's prompts (every rank draws the same problems from the
same curriculum state, then keeps its slice), computes gradients on its samples with loss weights normalised by
GLOBAL counts, and the gradients are summed across ranks once per optimizer step (one all_reduce per parameter,
after all micro-batches: DDP's bucketed per-backward sync would only repeat it for every micro-batch). The
result equals one process holding the whole batch. Without torchrun (WORLD_SIZE unset) everything here is a
no-op, so the single-process path is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's contiguous slice of a list whose length the world size divides."""
        per_rank = len(items) // self.world_size
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); single process if WORLD_SIZE <= 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); returns it."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """grad <- sum over ranks of grad, for every parameter (a rank with no samples contributes zeros)."""
    if not info.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def gather_lists(local: list, info: DistInfo) -> list:
    """Concatenate a picklable list from every rank, in rank order (the single-process order)."""
    if not info.enabled:
        return list(local)
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, local)
    return [x for part in parts for x in part]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
