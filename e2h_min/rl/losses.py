"""The loss terms as small pure functions: KL estimators, the clipped surrogate, the value loss, loss weights
(the advantages they weigh are in e2h_min/rl/advantages.py).

Shapes: N = samples in the optimizer step (prompts x G), T = completion tokens (right-padded), G = group size.
Sample i belongs to group i // G. Every function here is pinned by a naive per-sample loop in tests/test_losses.py.
"""

from __future__ import annotations

import torch


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi, with d = logp_ref - logp (Schulman, 2020).

    k1 = -d (unbiased, can be negative), k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, always >= 0).
    logp, ref_logp [N, T] -> [N, T]. All three are 0 where the policies agree; the penalty is ADDED to the loss.
    Example: logp = log .5, ref = log .25 -> d = -log 2 -> k3 = .5 + log 2 - 1 = .193.
    """
    d = ref_logp - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def importance_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token"
                         ) -> torch.Tensor:
    """log rho [N, T]: token level (PPO/GRPO) log pi - log pi_old; sequence level (GSPO, Zheng et al. 2025)
    (1/|o_i|) sum_t (log pi - log pi_old) for all its tokens. Example: token [[.2, .4]] -> sequence [[.3, .3]]."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        m = mask.to(log_ratio.dtype)
        per_seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        return per_seq.expand_as(log_ratio)
    raise ValueError(f"unknown importance sampling level {level!r}; use token or sequence")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                      epsilon_high: float, mask: torch.Tensor | None = None, level: str = "token"
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective per token: -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A), rho = exp(log rho).
    logp, old_logp [N, T]; advantages [N] (GRPO, broadcast over tokens) or [N, T] (PPO's GAE). Returns (loss
    [N, T], bool [N, T] flags): clipped_low (rho < 1 - eps_low, A < 0: zero gradient), clipped_high (rho >
    1 + eps_high, A > 0), region (rho outside [1 - eps_low, 1 + eps_high]). Example: rho 1.5, A 1, eps .2 -> -1.2.
    """
    if mask is None:
        mask = torch.ones_like(logp, dtype=torch.bool)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, mask, level))
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    low, high = ratio < 1.0 - epsilon_low, ratio > 1.0 + epsilon_high
    flags = {"clipped_low": low & (adv < 0), "clipped_high": high & (adv > 0), "region": low | high}
    return loss, flags


def kl_loss_term(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                 estimator: str = "k3", bias_correction: bool = False, level: str = "token") -> torch.Tensor:
    """The per-token KL term [N, T] the update adds to the loss (times beta) when the KL sits in the loss.

    Plain: k(d). The loss's gradient is the estimator's own gradient at samples of pi, whose expectation is, per
    position with the sampled prefix held fixed (exactly, tests/test_kl_gradients.py; not the gradient of a whole
    completion's KL, docs/algorithms.md): k1 -> 0 (E_pi[grad log pi] = 0: noise only); k2 -> grad KL(pi||ref);
    k3 -> grad KL(ref||pi) (DeepSeekMath's choice).
    bias_correction (TRL's use_bias_correction_kl): rho * k(d), rho = exp(importance_log_ratio) as in the
    surrogate (not clipped), so E_{pi_old}[rho k] = E_pi[k] and the gradient is that of the KL the estimator
    estimates: k1 and k3 -> grad KL(pi||ref).
    logp, ref_logp, old_logp [N, T]; mask [N, T] (real tokens, for the sequence-level ratio).
    Example: on-policy (old = logp), rho = 1 in value, so both forms print the same loss; only gradients differ.
    """
    kl = kl_penalty(logp, ref_logp, estimator)
    if bias_correction:
        kl = torch.exp(importance_log_ratio(logp, old_logp, mask, level)) * kl
    return kl


def policy_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      epsilon_low: float, epsilon_high: float, level: str = "token",
                      ref_logp: torch.Tensor | None = None, beta: float = 0.0, kl_estimator: str = "k3",
                      kl_bias_correction: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """Per-token policy loss [N, T]: clipped surrogate + beta * kl_loss_term (when ref_logp is given; ADDED, so
    descending it moves pi toward pi_ref). Returns (loss, kl [N, T] or None, clip flags)."""
    loss, flags = clipped_surrogate(logp, old_logp, advantages, epsilon_low, epsilon_high, mask, level)
    kl = None
    if ref_logp is not None:
        kl = kl_loss_term(logp, ref_logp, old_logp, mask, kl_estimator, kl_bias_correction, level)
        loss = loss + beta * kl
    return loss, kl, flags


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str = "k1"
                ) -> torch.Tensor:
    """Per-sequence KL estimate sum_t KL_t [N], for --kl-in-reward (see kl_penalised_advantages)."""
    return (kl_penalty(logp, ref_logp, estimator) * mask.to(logp.dtype)).sum(-1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float
                       ) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).

    values, old_values, returns [N, T] -> [N, T]. Example: V = 1, V_old = 0, R = 1, c = .2 -> .5 max(0, .64) = .32.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def token_loss_weights(completion_mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None,
                       num_sequences: int | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Weights w [N, T] (completion_mask [N, T] -> float32) with the step's loss = sum_{i,t} w_it * loss_it:
    grpo:    w_it = m_it / (|o_i| * N)   per-sequence token mean, then mean over sequences (the paper; length bias)
    dapo:    w_it = m_it / sum(m)        one mean over every completion token of the step
    dr_grpo: w_it = m_it / (N * L_max)   sum divided by a constant
    Fixed for the WHOLE step before micro-batching: any split of the rows sums to the full-step loss and gradient,
    and with the GLOBAL N and token count, so do the ranks. Example: grpo, [[1,1],[1,0]] -> [[.25,.25],[.5,0]]."""
    mask = completion_mask.float()
    n_seq = num_sequences if num_sequences is not None else mask.shape[0]
    total = num_tokens if num_tokens is not None else float(mask.sum())
    if loss_type == "grpo":
        return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1.0) * max(n_seq, 1))
    if loss_type == "dapo":
        return mask / max(total, 1.0)
    if loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("dr_grpo aggregation needs max_completion_length")
        return mask / (n_seq * max_completion_length)
    raise ValueError(f"unknown loss type {loss_type!r}; use grpo, dapo or dr_grpo")


def kl_estimator_for(cfg) -> str:
    """The KL estimator a run uses: the one given, else the one whose expected gradient is grad KL(pi||ref) or
    the paper's where it sits: k1 in the reward (InstructGPT), k3 in the loss (DeepSeekMath). README: KL."""
    if cfg.kl_estimator is not None:
        return cfg.kl_estimator
    return "k1" if cfg.kl_in_reward else "k3"
