"""Run under torchrun: one policy_update on this rank's half of a fixed batch; rank 0 saves the result.

Used by tests/test_distributed.py, which compares it with one process holding the whole batch.
"""

import sys

import torch

import train
from e2h_min.config import Config
from e2h_min.distributed import init_distributed
from tests.test_train import random_model, sample_batch
from e2h_min.models import frozen_copy


def run(out_path: str, loss_type: str, dist_info) -> None:
    policy = random_model()
    reference = frozen_copy(random_model(seed=5))
    prompts, completions = sample_batch(n=8)
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(3))
    mine = dist_info.shard(list(range(8)))
    cfg = Config(micro_batch_size=2, loss_type=loss_type, beta=0.05, max_new_tokens=8, max_grad_norm=1.0,
                 temperature=0.9)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stats = train.policy_update(policy, reference, optimizer, [prompts[i] for i in mine],
                                [completions[i] for i in mine], advantages[mine], [[0.0] * len(completions[i])
                                                                                   for i in mine],
                                cfg, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False),
                                None, dist_info)
    if dist_info.is_main:
        torch.save({"params": [p.detach() for p in policy.parameters()], "stats": stats}, out_path)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], init_distributed("cpu"))
