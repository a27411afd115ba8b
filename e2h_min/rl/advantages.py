"""The advantages as small pure functions: group-relative (GRPO, Dr. GRPO), leave-one-out (RLOO), the KL penalty
subtracted from them (--kl-in-reward), and PPO's GAE and whitening.

Shapes: N = samples in the optimizer step (prompts x G), T = completion tokens (right-padded), G = group size.
Sample i belongs to group i // G. Every function here is pinned by a naive per-sample loop in tests/test_losses.py.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages A_i = (r_i - mean_g(r)) / (std + eps), rewards [N] -> [N], std unbiased (as TRL's) over the
    sample's group (scale "group", the paper), all N rewards ("batch") or not divided ("none", Dr. GRPO). An
    all-equal group gets exactly 0 (a rounded mean would leave +-1e-4), so the update can skip it.
    Example: rewards [1, 0, 0, 0], G=4, eps 0 -> mean .25, std .5 -> [1.5, -.5, -.5, -.5]."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    centered = centered.masked_fill(_constant_groups(grouped), 0.0)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; use group, batch or none")
    return centered.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i, same group} r_j = G/(G-1) * (r_i - mean_g(r)).

    rewards [N] -> [N]; exactly 0 for a group whose rewards are all equal. Example: [1, 0, 0, 0] -> [1, -1/3, -1/3,
    -1/3].
    """
    grouped = rewards.view(-1, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).masked_fill(_constant_groups(grouped), 0.0).reshape(-1)


def _constant_groups(grouped: torch.Tensor) -> torch.Tensor:
    """grouped [P, G] -> [P, 1] bool: True where every reward of the group equals its first."""
    return (grouped == grouped[:, :1]).all(dim=1, keepdim=True)


def compute_advantages(name: str, rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                       eps: float = 1e-4) -> torch.Tensor:
    """Dispatch by --advantage: grpo (scaled by --scale-rewards), dr_grpo (centred only), rloo."""
    if name in ("grpo", "dr_grpo"):
        return group_advantages(rewards, group_size, scale_rewards if name == "grpo" else "none", eps)
    if name == "rloo":
        return rloo_advantages(rewards, group_size)
    raise ValueError(f"unknown advantage estimator {name!r}")


def kl_penalised_advantages(advantages: torch.Tensor, sequence_kl_values: torch.Tensor, beta: float,
                            group_size: int) -> torch.Tensor:
    """--kl-in-reward for group advantages: A_i <- A_i - beta * (KL_i - mean_{j != i, same group} KL_j).

    advantages [N] are those of the verifier rewards alone (normalised by compute_advantages); the KL penalty is
    subtracted AFTER the normalisation, so its size is beta's, whatever the group's reward spread: a group whose
    rewards are all equal gets -beta * (its centred KL), not a unit-scale advantage made of KL alone. The
    leave-one-out baseline leaves the expectation unchanged: with k1, E[gradient] = beta * grad KL(pi||ref) of
    the whole completion exactly, for any group size, when every token has the same loss weight (dr_grpo, or
    equal lengths; tests/test_kl_gradients.py). sequence_kl_values [N] -> [N].
    Example: A = [0, 0], KL = [.3, .1], beta .1 -> [-.02, .02].
    """
    return advantages - beta * rloo_advantages(sequence_kl_values.to(advantages.dtype), group_size)


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) per completion token.

    rewards, values, mask [N, T]: rewards are per token (the verifier's reward on the last real token, plus any
    per-token penalty), values V(s_t) from the critic, mask True on real tokens (right-padded).
    delta_t = r_t + gamma V_{t+1} - V_t (V past the last real token is 0);
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Returns (advantages [N, T], returns [N, T]),
    zero at padding.
    Example: one sequence of 2 tokens, r = [0, 1], V = [.5, .5], gamma = lam = 1:
             delta = [0 + .5 - .5, 1 - .5] = [0, .5] -> A = [.5, .5], R = [1, 1].
    """
    m = mask.to(values.dtype)
    values = values * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value, next_advantage = values[:, t], advantages[:, t]
    return advantages, (advantages + values) * m


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO's per-batch advantage normalisation); 0 at padding.

    `reduce` (optional) sums a tensor over data-parallel ranks, so the moments are those of the global batch.
    Computed from the moments sum(x), sum(x^2), count: var = E[x^2] - E[x]^2.
    """
    m = mask.to(values.dtype)
    moments = torch.stack([(values * m).sum(), (values * values * m).sum(), m.sum()])
    if reduce is not None:
        moments = reduce(moments)
    count = moments[2].clamp(min=1.0)
    mean = moments[0] / count
    var = (moments[1] / count - mean * mean).clamp(min=0.0)
    return (values - mean) * torch.rsqrt(var + eps) * m
