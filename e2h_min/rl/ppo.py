"""PPO with a value head and GAE (--advantage ppo), in its own room: the GRPO update (e2h_min/rl/update.py) has no
PPO branch. It shares the clipped surrogate and the KL terms (losses.py), the work savings (engine/batching.py)
the diagnostics (diagnostics.py) and the optimizer step (update.step_optimizer) with GRPO; what is PPO's own is here:
- the critic: models.ValueHead reads the policy trunk's hidden states (no second model, no extra forward);
- per-token rewards: the verifier's reward on the last real token, minus beta * KL on every token with
  --kl-in-reward (the InstructGPT form; the estimator is k1 unless --kl-estimator says otherwise);
- per-token advantages: GAE(gamma, lambda) from V_old, whitened over the step's real tokens (all ranks);
- the loss adds vf_coef * the clipped value loss.
Every sample runs (the value loss has a gradient for each), so there is no zero-advantage skip.
"""

from __future__ import annotations

import torch

from e2h_min.engine.distributed import DistInfo, all_reduce_sum
from e2h_min.rl.advantages import gae_advantages, whiten
from e2h_min.rl.diagnostics import UpdateDiagnostics
from e2h_min.rl.losses import (clipped_value_loss, kl_estimator_for, kl_penalty, policy_token_loss,
                               token_loss_weights)
from e2h_min.rl.update import step_optimizer
from e2h_min.engine.batching import MicroBatchLimits, UpdateBatches, completion_mask, global_counts


def ppo_update(policy, reference, optimizer, prompt_ids, completions, rewards, sampler_logprobs, cfg, device,
               autocast, value_head, dist_info: DistInfo = DistInfo(), limits: MicroBatchLimits | None = None
               ) -> dict:
    """cfg.num_iterations PPO steps on one rollout batch; returns the logged diagnostics (+ value_loss and
    explained_variance).

    rewards [N]: the verifier's reward of each of this rank's samples (not an advantage: GAE makes those).
    value_head: the models.ValueHead, trained by the same optimizer. Other arguments as update.policy_update.
    Per token: loss = -min(rho A_t, clip(rho) A_t) [+ beta * KL term, --kl-in-reward off] + vf_coef * value loss.
    pi_old is the first iteration's own log-probs, as in update.policy_update: with dropout (LoRA's) a separate pass
    draws other masks, and the ratio of a fresh rollout would not start at exactly 1. V_old (and the reward's KL)
    come from a pass before any step, since GAE needs every token's value first.
    """
    mask = completion_mask(completions)  # [N, T]
    n, width = mask.shape
    reduce = lambda t: all_reduce_sum(t, dist_info)  # noqa: E731  (identity in a single process)
    num_samples, num_tokens = global_counts(mask, device, dist_info)
    weights = token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens, num_samples, num_tokens).to(device)
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    kl_in_loss = reference is not None and not cfg.kl_in_reward
    batches = UpdateBatches(policy, reference, prompt_ids, completions, None, cfg, device, autocast, dist_info,
                            limits)
    stats = UpdateDiagnostics(["kl"] * kl_in_loss + ["value_loss"] + ["kl_reference"] * (reference is not None), n)

    # GAE needs V_old (and with --kl-in-reward the reference's KL) at every token before any step
    old_values = torch.zeros((n, width), device=device)
    token_rewards = torch.zeros((n, width), device=device)
    with torch.no_grad():
        for mb in batches.micro_batches(batches.prompts_forward()):
            with autocast():
                logp, _, hidden = mb.logprobs(return_hidden=True)
                old_values[mb.rows, :logp.shape[1]] = value_head(hidden) * mb.mask
            if cfg.kl_in_reward and reference is not None:  # per-token reward penalty -beta * k (default k1)
                kl = kl_penalty(logp, mb.reference_logprobs(), kl_estimator_for(cfg))
                token_rewards[mb.rows, :logp.shape[1]] -= cfg.beta * kl * mb.mask
    valid = mask.to(device)
    if n:
        lengths = mask.sum(-1).to(device)
        token_rewards[torch.arange(n, device=device), lengths - 1] += rewards.to(device)  # verifier reward
    gae, returns = gae_advantages(token_rewards, old_values, valid, cfg.gamma, cfg.lam)
    token_advantages = whiten(gae, valid, reduce=reduce)

    params = [p for group in optimizer.param_groups for p in group["params"]]
    old_logprobs: dict[int, torch.Tensor] = {}  # micro-batch -> log pi_old
    skipped = 0
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        last = iteration == cfg.num_iterations - 1
        prompt_kv = batches.prompts_forward()
        for mb in batches.micro_batches(prompt_kv):
            logp, entropy, hidden = mb.logprobs(return_hidden=True)
            old = old_logprobs.setdefault(mb.index, logp.detach())  # first iteration: ratio exactly 1
            ref = mb.reference_logprobs() if kl_in_loss else None
            loss_tok, kl, flags = policy_token_loss(
                logp, old, mb.select(token_advantages), mb.mask, cfg.epsilon, eps_high,
                cfg.importance_sampling_level, ref, cfg.beta, kl_estimator_for(cfg), cfg.use_bias_correction_kl)
            with autocast():
                values = value_head(hidden)
            value_loss = clipped_value_loss(values, mb.select(old_values), mb.select(returns), cfg.cliprange_value)
            loss_tok = loss_tok + cfg.vf_coef * value_loss
            loss = (loss_tok * mb.select(weights)).sum()
            loss.backward()
            if last:
                stats.add(mb, loss, logp, old, entropy, flags, sampler_logprobs, kl,
                          batches.cached_reference_logprobs(mb.index), value_loss)
        batches.run_fsdp_fillers()
        batches.prompts_backward(prompt_kv)  # the prompts' part of the gradient: now it is complete
        grad_norm, stepped = step_optimizer(params, optimizer, cfg.max_grad_norm, dist_info)
        skipped += not stepped
    extra = {"explained_variance": explained_variance(returns, old_values, valid, reduce)}
    return stats.summary(grad_norm, skipped, num_samples, device, dist_info, extra)


def explained_variance(returns: torch.Tensor, old_values: torch.Tensor, valid: torch.Tensor, reduce) -> float:
    """1 - Var(R - V_old) / Var(R) over the step's real tokens (all ranks): how much of the returns the critic
    predicted before this update; 1 is perfect, 0 no better than a constant. returns, old_values, valid [N, T]."""
    residual = (returns - old_values) * valid
    moments = reduce(torch.stack([residual.sum(), (residual ** 2).sum(), (returns * valid).sum(),
                                  (returns ** 2 * valid).sum(), valid.sum()]))
    count = moments[4].clamp(min=1)
    var_residual = moments[1] / count - (moments[0] / count) ** 2
    var_returns = moments[3] / count - (moments[2] / count) ** 2
    return float(1 - var_residual / var_returns.clamp(min=1e-8))
