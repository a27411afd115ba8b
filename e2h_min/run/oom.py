"""The update's out-of-memory retry: a CUDA OOM halves the micro-batch limits and runs the update again."""

from __future__ import annotations

from typing import Callable

import torch

from e2h_min.engine.batching import MicroBatchLimits


def optimizer_steps(optimizer) -> int:
    """How many steps the optimizer has taken (Adam keeps a per-parameter step count; none before its first)."""
    return int(next(iter(optimizer.state.values()), {}).get("step", 0))


def update_with_oom_retry(update: Callable[[MicroBatchLimits], dict], limits: MicroBatchLimits, optimizer,
                          may_retry: bool, log) -> tuple[dict, MicroBatchLimits]:
    """(update(limits)'s diagnostics, the micro-batch limits from now on). A CUDA out-of-memory error halves the
    limits and retries: exact (the loss weights do not depend on the micro-batch size) while no optimizer step was
    taken, and only where may_retry (one process: under torchrun the other ranks already wait in the update's
    next collective; not --plain-update, one whole batch that smaller limits would not help)."""
    while True:
        steps_before = optimizer_steps(optimizer)
        try:
            return update(limits), limits
        except torch.OutOfMemoryError:
            if not may_retry or limits.rows == 1 or optimizer_steps(optimizer) != steps_before:
                raise
            limits = smaller_limits(optimizer, limits, log)


def smaller_limits(optimizer, limits: MicroBatchLimits, log) -> MicroBatchLimits:
    """After an out-of-memory error: the gradients dropped, the CUDA cache emptied, the limits halved."""
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    limits = limits.halved()
    log(f"warning: out of memory in the update; retrying with --micro-batch-size {limits.rows}"
        + (f" --micro-batch-tokens {limits.tokens}" if limits.tokens else ""))
    return limits
