"""FSDP2 (torch.distributed.fsdp.fully_shard): each rank holds 1/world_size of the policy's weights, gradients and
AdamW state, for full fine-tuning of models whose training state does not fit one GPU (--parallel fsdp).

What differs from the replicated (--parallel ddp) path, and why:
- Every decoder layer is its own FSDP unit, the rest (embeddings, final norm, the tied LM head) the root unit.
  Gradients are SUMMED over ranks (the loss weights already hold global counts), not averaged.
- The chunked LM-head log-probs (logprobs.completion_logprobs) read the head's weight outside the model's
  forward; `shard_policy` registers that function as an FSDP forward method of the root, so the root's weights
  are gathered around it and their gradients reduce-scattered after it, like a forward call.
- Every FSDP forward all-gathers, so every rank must run the same number of forward/backward passes:
  batching.UpdateBatches pads a rank's micro-batches up to the largest count with zero-weight ones.
- Rollouts and evaluation run on a full (unsharded) copy of the weights on every rank, refreshed from the
  shards after each update (one all-gather per parameter): a decode runs a variable number of steps per rank,
  and a sharded decode would need every rank in lockstep for every token. The copy costs one model's weights
  per rank, no gradients or optimizer state; that copy is also what checkpoints and the final model save.
- Checkpoints gather the AdamW state to full tensors (torch.distributed.checkpoint.state_dict, full_state_dict)
  and rank 0 writes it into the same optimizer.pt a single-process run writes, beside the full weights: a
  sharded run resumes from it on any number of ranks (each rank loads the file and keeps its shards), and the
  checkpoint format stays one. DCP's sharded files would save the gather's time and rank-0 memory on very large
  models; at 1.5B-3B the gathered AdamW state (2 x 4 bytes x params) fits host memory.
"""

from __future__ import annotations

import copy

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def shard_policy(policy) -> torch.nn.Module:
    """Shard `policy` in place (decoder layers, then the root) and return a full frozen copy for rollouts.

    The copy is taken before sharding, so it starts equal to the weights; `refresh_full_copy` keeps it so.
    """
    from e2h_min.engine import logprobs  # the LM-head function registered as a forward method below

    full = copy.deepcopy(policy).eval().requires_grad_(False)
    for layer in policy.get_decoder().layers:
        fully_shard(layer)
    fully_shard(policy)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)  # sum, not mean: the loss weights are global already
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)

    def sharded_completion_logprobs(*args, **kwargs):
        return logprobs.local_completion_logprobs(policy, *args, **kwargs)

    policy.e2h_completion_logprobs = sharded_completion_logprobs
    register_fsdp_forward_method(policy, "e2h_completion_logprobs")
    return full


@torch.no_grad()
def refresh_full_copy(policy, full: torch.nn.Module) -> None:
    """full's weights <- the gathered shards (every rank, same order: one all-gather per parameter)."""
    for (name, p), (full_name, q) in zip(policy.named_parameters(), full.named_parameters(), strict=True):
        assert name == full_name, (name, full_name)
        q.copy_(p.full_tensor() if isinstance(p, DTensor) else p)


class FullOptimizerState:
    """The optimizer's state as one full state dict, for checkpoint.save_checkpoint / load_training_state:
    state_dict() gathers (a collective: every rank calls it; rank 0 gets the tensors), load_state_dict() takes
    the full dict on every rank and keeps this rank's shards."""

    def __init__(self, policy, optimizer):
        self.policy, self.optimizer = policy, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.policy, self.optimizer, options=FULL)

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.policy, self.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))


def local_training_bytes(model, optimizer) -> int:
    """Bytes of this rank's parameters + gradients + optimizer state (the shards' local parts under FSDP)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += local(value).numel() * local(value).element_size()
    return total


def log_sharded_memory(policy, full_copy, optimizer, dist_info, log) -> dict:
    """Log (and return) this rank's parameter + gradient + AdamW bytes next to what one process holds (the sum of
    the shards), and the full rollout copy's weights that every rank adds."""
    from e2h_min.engine.distributed import all_reduce_sum

    mine = local_training_bytes(policy, optimizer)
    device = next(full_copy.parameters()).device  # (nccl reduces CUDA tensors only)
    every_rank = int(all_reduce_sum(torch.tensor([float(mine)], device=device), dist_info).item())
    copy_bytes = sum(p.numel() * p.element_size() for p in full_copy.parameters())
    figures = {"rank_bytes": mine, "one_process_bytes": every_rank, "rollout_copy_bytes": copy_bytes}
    log(f"fsdp: weights + gradients + AdamW state {mine / 2**20:.1f} MiB on this rank vs {every_rank / 2**20:.1f} "
        f"MiB in one process ({mine / every_rank:.2f}x); + {copy_bytes / 2**20:.1f} MiB full rollout weights")
    return figures
