"""Data parallelism across processes started by torchrun, with plain torch.distributed collectives.

Each rank rolls out its contiguous share of the step's prompts (every rank draws the same problems from the
same curriculum state, then keeps its slice), computes gradients on its samples with loss weights normalised by
GLOBAL counts, and the gradients are summed across ranks once per optimizer step (one all_reduce per parameter,
after all micro-batches: DDP's bucketed per-backward sync would only repeat it for every micro-batch). The
result equals one process holding the whole batch. Without torchrun (WORLD_SIZE unset) everything here is a
no-op, so the single-process path is the same code.

Every collective here must be called by every rank with the same shapes, whatever that rank's data: a rank
whose samples all have advantage 0 still reduces the same statistics and gradients (as zeros). This is the
replicated mode (--parallel ddp); e2h_min/engine/fsdp.py shards the model instead (--parallel fsdp).
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


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

    def shard_start(self, n: int) -> int:
        """Where this rank's contiguous share of n items starts (the first n % world_size ranks hold one more)."""
        return self.rank * (n // self.world_size) + min(self.rank, n % self.world_size)

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (equal shares when the world size divides its length)."""
        start, stop = self.shard_start(len(items)), self.shard_start(len(items)) + len(items) // self.world_size
        return items[start:stop + (self.rank < len(items) % self.world_size)]


class Compute(NamedTuple):
    """Where one step computes: its device, its rank among the processes, and autocast() (a context: bf16 compute
    on CUDA, fp32 elsewhere)."""

    device: torch.device
    dist: DistInfo
    autocast: Callable


def seed_step(seed: int, rank: int, step: int, generator: torch.Generator) -> None:
    """Seed every RNG from (seed, rank, step): a resumed or multi-rank run draws exactly what it would have.
    The rollout generator is seeded from (seed, step) alone, the same on every rank: the ranks draw the random
    numbers of the whole step's samples and each keeps its own rows' (see train.collect_samples), so a sample is the
    same whichever rank rolls it out and however many ranks there are."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1)
    random.seed(int(state[0])), np.random.seed(int(state[0])), torch.manual_seed(int(state[0]))
    generator.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU); single process if WORLD_SIZE <= 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        atexit.register(shutdown_distributed)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place where distributed); returns it."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Max of a tensor over ranks (in place where distributed); returns it."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def sum_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """grad <- sum over ranks of grad, for every parameter (a rank with no samples contributes zeros).
    FSDP2-sharded parameters (DTensors) are skipped: their backward already reduce-scattered the sum."""
    if not info.enabled:
        return
    for p in params:
        if isinstance(p, DTensor):
            continue
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


def shutdown_distributed() -> None:
    """Destroy the process group while the interpreter is fully alive (registered with atexit on init).

    A process that exits with its gloo group still alive tears the group down during interpreter finalization,
    while gloo's worker threads may still hold finished work objects whose tensors reference Python objects;
    freeing them then takes the GIL of a dying interpreter and the rank aborts (SIGABRT, exit code -6) after it
    already did all its work: the flaky torchrun failure. Idempotent; a no-op without a process group.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
