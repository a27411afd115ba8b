"""The fast GRPO update: the same parameter change as e2h_min/rl/plain_update.py (read that first), with the work
savings of e2h_min/engine/batching.py and the ablation menu (--loss-type, --importance-sampling-level, the KL
estimators). PPO with a value head and GAE is in e2h_min/rl/ppo.py."""

from __future__ import annotations

import torch

from e2h_min.engine.batching import MicroBatchLimits, UpdateBatches, completion_mask, global_counts, samples_to_run
from e2h_min.engine.distributed import DistInfo, sum_gradients
from e2h_min.rl.diagnostics import UpdateDiagnostics
from e2h_min.rl.losses import kl_estimator_for, policy_token_loss, token_loss_weights


def policy_update(policy, reference, optimizer, prompt_ids, completions, advantages, sampler_logprobs, cfg,
                  device, autocast, dist_info: DistInfo = DistInfo(), limits: MicroBatchLimits | None = None) -> dict:
    """cfg.num_iterations clipped-surrogate steps on this rank's N samples (token lists, advantages [N], the
    sampler's log-probs: a numerics check only); returns the logged diagnostics. reference: None when beta = 0.
    pi_old is the first pass's log-probs (which the gradient needs anyway): the ratio is exactly 1 at first."""
    mask = completion_mask(completions)  # [N, T]
    num_samples, num_tokens = global_counts(mask, device, dist_info)
    weights = token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens, num_samples, num_tokens).to(device)
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    kl_in_loss = reference is not None and not cfg.kl_in_reward
    kl_estimator = kl_estimator_for(cfg) if kl_in_loss else None  # the KL options matter only with a KL term
    rows = samples_to_run(advantages, cfg.skip_zero_advantage, kl_in_loss)
    batches = UpdateBatches(policy, reference, prompt_ids, completions, rows, cfg, device, autocast, dist_info,
                            limits)
    stats = UpdateDiagnostics(["kl", "kl_reference"] if kl_in_loss else [], len(rows))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    old_logprobs: dict[int, torch.Tensor] = {}  # micro-batch -> log pi_old (before any update of this step)
    skipped = 0
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        last = iteration == cfg.num_iterations - 1
        prompt_kv = batches.prompts_forward()  # shared layout: each distinct prompt's keys/values, once (else None)
        for mb in batches.micro_batches(prompt_kv):
            logp, entropy = mb.logprobs()  # [R, T] log pi at the sampling temperature, with gradient
            old = old_logprobs.setdefault(mb.index, logp.detach())  # first pass: ratio exactly 1
            ref = mb.reference_logprobs() if kl_in_loss else None
            loss_tok, kl, flags = policy_token_loss(
                logp, old, advantages[mb.rows].to(device), mb.mask, cfg.epsilon, eps_high,
                cfg.importance_sampling_level, ref, cfg.beta, kl_estimator, cfg.use_bias_correction_kl)
            loss = (loss_tok * mb.select(weights)).sum()
            loss.backward()
            if last:
                stats.add(mb, loss, logp, old, entropy, flags, sampler_logprobs, kl, ref)
        batches.run_fsdp_fillers()  # FSDP: as many forwards as the busiest rank (else nothing)
        batches.prompts_backward(prompt_kv)  # the prompts' part of the gradient: now it is complete
        grad_norm, stepped = step_optimizer(params, optimizer, cfg.max_grad_norm, dist_info)
        skipped += not stepped
    return stats.summary(grad_norm, skipped, num_samples, device, dist_info)


def step_optimizer(params: list[torch.nn.Parameter], optimizer, max_grad_norm: float, dist_info: DistInfo
                   ) -> tuple[torch.Tensor, bool]:
    """After an iteration's backward: None gradients -> 0 (AdamW still steps its moments), sum over ranks, clip to
    max_grad_norm (0: off), step unless the norm is NaN/inf (that step is skipped). Returns (grad norm, stepped)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sum_gradients(params, dist_info)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    if torch.isfinite(grad_norm):
        optimizer.step()
        return grad_norm, True
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, False
