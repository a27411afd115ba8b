"""The fast update (train.policy_update, with every saving on) equals the plain update
(e2h_min/rl/plain_update.py): same parameter change under SGD, where the change is exactly -lr * gradient."""

import pytest
import torch

import train
from e2h_min.run.config import Config
from e2h_min.rl.advantages import group_advantages
from e2h_min.engine.models import frozen_copy
from e2h_min.rl.plain_update import grpo_update_plain
from tests.test_shared_prompts import grouped_batch
from tests.test_train import random_model, requires_tiny


def parameter_change(update, cfg, lr, advantages, rows, completions):
    policy = random_model()
    reference = frozen_copy(random_model(seed=5)) if cfg.beta else None
    before = [p.detach().clone() for p in policy.parameters()]
    update(policy, reference, torch.optim.SGD(policy.parameters(), lr=lr), rows, completions, advantages, cfg)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, policy.parameters())])


def fast_update(policy, reference, optimizer, rows, completions, advantages, cfg):
    train.policy_update(policy, reference, optimizer, rows, completions, advantages,
                        [[0.0] * len(c) for c in completions], cfg, torch.device("cpu"),
                        lambda: torch.autocast("cpu", enabled=False))


@pytest.mark.parametrize("overrides, lr", [
    ({}, 1.0),                                   # the defaults: beta 0.001 (k3 in the loss), one iteration
    ({"beta": 0.0}, 1.0),                        # no KL: the fast path skips the two constant groups' samples
    ({"beta": 0.05}, 1.0),                       # k3 KL in the loss: every sample runs
    ({"num_iterations": 2}, 0.3),                # the second iteration's ratios != 1: about 2/3 of tokens clipped
    ({"num_iterations": 2, "beta": 0.0}, 0.3),   # two iterations with skipped samples
    ({"num_iterations": 2, "beta": 0.05, "epsilon_high": 0.28}, 0.3),
])
def test_fast_update_equals_the_plain_update(overrides, lr):
    rows, completions = grouped_batch()
    completions[0] = [3]  # a one-token completion (the EOS alone) must still move the weights
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    advantages = group_advantages(rewards, 3).float()  # two constant groups (skipped without a KL in the loss)
    cfg = Config(num_generations=3, max_new_tokens=8, temperature=0.9, micro_batch_size=4, micro_batch_tokens=9,
                 max_grad_norm=0.0, **overrides)
    plain = parameter_change(grpo_update_plain, cfg, lr, advantages, rows, completions)
    fast = parameter_change(fast_update, cfg, lr, advantages, rows, completions)
    assert plain.abs().max() > 1e-3  # the update is not trivially zero
    assert torch.allclose(fast, plain, atol=1e-6, rtol=0), (fast - plain).abs().max()


@requires_tiny
def test_plain_update_flag_trains_with_the_plain_update(tmp_path, monkeypatch):
    """python train.py --plain-update: the loop calls grpo_update_plain (and not the fast update) on the samples
    it trains, and the weights move."""
    calls = []
    real_plain = train.grpo_update_plain

    def recording_plain(policy, reference, optimizer, prompt_ids, completions, advantages, cfg):
        calls.append(len(completions))
        before = [p.detach().clone() for p in policy.parameters()]
        loss = real_plain(policy, reference, optimizer, prompt_ids, completions, advantages, cfg)
        calls.append(max(float((b - p.detach()).abs().max()) for b, p in zip(before, policy.parameters())))
        return loss

    monkeypatch.setattr(train, "grpo_update_plain", recording_plain)
    monkeypatch.setattr(train, "policy_update", None)  # the fast update must not run
    train.main(["--plain-update", "--total-steps", "1", "--prompts-per-step", "4", "--num-generations", "4",
                "--max-new-tokens", "16", "--eval-problems", "1", "--eval-every", "0", "--save-every", "0",
                "--log-completions-every", "0", "--threads", "1", "--beta", "0.05", "--out-dir", str(tmp_path)])
    assert calls[0] == 16 and calls[1] > 0


def test_plain_update_flag_refuses_what_the_plain_update_does_not_write_out():
    from e2h_min.errors import UserError
    from e2h_min.run.presets import parse_config
    for flags in (["--advantage", "ppo"], ["--loss-type", "dapo"], ["--kl-in-reward", "--beta", "0.1"],
                  ["--importance-sampling-level", "sequence"]):
        with pytest.raises(UserError, match="--plain-update"):
            parse_config(["--plain-update", *flags])
    assert parse_config(["--plain-update", "--advantage", "rloo"]).plain_update  # advantages are the loop's
