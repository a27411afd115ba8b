"""One GRPO update written plainly: read this before the fast one, update.policy_update (e2h_min/rl/update.py).

It computes the same parameter change as the fast update at the same settings (tests/test_plain_update.py
checks it to 1e-6), with none of the fast update's savings: every sample is run, each as a whole
prompt + completion row, in one batch, through a full log-softmax over the vocabulary. It covers GRPO with the
paper's per-sequence aggregation (--loss-type grpo), token-level ratios and the KL in the loss (k3); the fast
update adds the ablation menu (dapo / dr_grpo aggregation, sequence-level ratios, PPO) and the work savings.

Shapes: N samples (prompts x G), L = longest prompt + completion row, T = longest completion, V = vocabulary.
"""

from __future__ import annotations

import torch


def completion_logprobs_plain(model, input_ids, attention_mask, positions, targets, temperature):
    """log pi(o_t | q, o_<t) [N, T] at the sampling temperature: the full [N, L, V] log-softmax, then the entry
    of each completion token, read at the position just before it (`positions` [N, T] into the row)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # [N, L, V]
    logp_all = torch.log_softmax(logits / temperature, dim=-1)                        # [N, L, V]
    logp_at = logp_all.gather(1, positions[..., None].expand(-1, -1, logp_all.shape[-1]))  # [N, T, V]
    return logp_at.gather(2, targets[..., None]).squeeze(-1)                            # [N, T]


def grpo_update_plain(policy, reference, optimizer, prompt_ids, completions, advantages, cfg) -> float:
    """cfg.num_iterations optimizer steps on one batch; returns the last iteration's loss.

    prompt_ids, completions: N token lists; advantages [N], one per sample (group-relative, from
    advantages.group_advantages); reference: a models.Reference (or None when cfg.beta is 0).
    Per token t of sample i, with rho = pi / pi_old and d = log pi_ref - log pi:
        loss_it = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i) + beta (exp(d) - d - 1)
    loss = mean over samples of (mean over the sample's completion tokens of loss_it).
    The completion tokens include the last one (EOS or the token that completes the stop string): the model
    learns to stop. Padding is outside the mask.
    """
    n, rows = len(completions), [p + c for p, c in zip(prompt_ids, completions)]
    input_ids = torch.zeros(n, max(map(len, rows)), dtype=torch.long)  # right-padded with id 0 (masked out)
    attention_mask = torch.zeros_like(input_ids)
    t_max = max(map(len, completions))
    positions = torch.zeros(n, t_max, dtype=torch.long)
    targets = torch.zeros(n, t_max, dtype=torch.long)
    mask = torch.zeros(n, t_max)                                         # [N, T] 1 on completion tokens
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        input_ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, :len(p) + len(c)] = 1
        positions[i, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))  # token j is predicted at P-1+j
        targets[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = 1.0
    device = next(policy.parameters()).device
    batch = (input_ids.to(device), attention_mask.to(device), positions.to(device), targets.to(device),
             cfg.temperature)
    mask = mask.to(device)
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    A = advantages.float().to(device)[:, None]                           # [N, 1], broadcast over tokens
    if cfg.beta:
        with torch.no_grad(), reference.context():
            ref_logp = completion_logprobs_plain(reference.model, *batch)
    old_logp = None
    for _ in range(cfg.num_iterations):
        logp = completion_logprobs_plain(policy, *batch)                 # [N, T], with gradient
        if old_logp is None:  # pi_old, the policy that sampled: this first pass (same dropout draw as logp)
            old_logp = logp.detach()
        ratio = torch.exp(logp - old_logp)                               # exactly 1 on the first iteration
        loss_tok = -torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)
        if cfg.beta:
            d = ref_logp - logp
            loss_tok = loss_tok + cfg.beta * (torch.exp(d) - d - 1)      # k3 estimate of KL(pi || pi_ref)
        loss = ((loss_tok * mask).sum(-1) / mask.sum(-1)).mean()         # per sequence, then over the batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        optimizer.step()
    return float(loss.detach())
