"""What each KL option optimises: its expected gradient, computed exactly by enumeration (no sampling).

    python -m e2h_min.analysis.kl_gradients        # prints the KL table of the README

The policy is one categorical draw over a small vocabulary, pi = softmax(theta), against a fixed reference.
Every quantity goes through the functions the trainer runs, not a re-derivation:
- KL in the loss: losses.policy_token_loss (clipped surrogate + beta * kl_loss_term), one row per vocabulary
  item, each weighted by its probability pi(x) (detached): sum_x pi(x) loss(x) is the expected loss of a sample
  of pi, and its gradient the expected gradient of the update.
- KL in the reward: every group of G = 2 samples is enumerated (V^2 pairs, weight pi(x1) pi(x2)): verifier
  rewards -> advantages.compute_advantages, the sampled KL -> losses.sequence_kl -> advantages.kl_penalised_advantages,
  then losses.policy_token_loss, averaged over the group's two samples as the grpo loss weights do. The KL's
  own contribution is (gradient at beta - gradient at beta 0) / beta, so the verifier rewards (random 0/1, some
  groups constant, some not) must leave it untouched.
The gradients are compared with the two exact targets grad KL(pi||ref) and grad KL(ref||pi) (autograd of the
sums over the vocabulary). tests/test_kl_gradients.py pins the results.
"""

from __future__ import annotations

import argparse

import torch

from e2h_min.rl.advantages import compute_advantages, kl_penalised_advantages
from e2h_min.rl.losses import policy_token_loss, sequence_kl

# (placement, estimator, bias correction): every combination the flags allow
OPTIONS = [("loss", est, bc) for bc in (False, True) for est in ("k1", "k2", "k3")] + \
          [("reward", est, False) for est in ("k1", "k2", "k3")]


def categorical_setup(vocab: int = 50, kl: float = 0.03, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(theta [V], ref_logp [V], verifier rewards [V]) in float64: random reference logits, theta = ref + s * u
    with s set by bisection so that KL(pi||ref) = kl, and a random 0/1 verifier reward per vocabulary item."""
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(vocab, generator=g, dtype=torch.float64)
    direction = torch.randn(vocab, generator=g, dtype=torch.float64)
    rewards = (torch.rand(vocab, generator=g, dtype=torch.float64) < 0.5).double()
    ref_logp = torch.log_softmax(ref_logits, -1)
    lo, hi = 0.0, 1.0
    while exact_kl(ref_logits + hi * direction, ref_logp) < kl:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_kl(ref_logits + mid * direction, ref_logp) < kl else (lo, mid)
    return ref_logits + hi * direction, ref_logp, rewards


def exact_kl(theta: torch.Tensor, ref_logp: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """KL(pi||ref) = sum_x pi (log pi - log ref), or with reverse=True KL(ref||pi); theta [V] logits of pi."""
    logp = torch.log_softmax(theta, -1)
    if reverse:
        return (ref_logp.exp() * (ref_logp - logp)).sum()
    return (logp.exp() * (logp - ref_logp)).sum()


def target_gradient(theta: torch.Tensor, ref_logp: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """grad_theta KL(pi||ref) (or KL(ref||pi)) [V], by autograd of the exact sum."""
    theta = theta.detach().requires_grad_(True)
    exact_kl(theta, ref_logp, reverse).backward()
    return theta.grad


def expected_gradient(theta: torch.Tensor, ref_logp: torch.Tensor, placement: str, estimator: str,
                      bias_correction: bool = False, rewards: torch.Tensor | None = None, beta: float = 1.0,
                      level: str = "token") -> torch.Tensor:
    """E[gradient of the update's loss] [V] for one KL option, exactly; for "reward", the KL's part of it
    (divided by beta). See the module docstring for the enumeration."""
    if placement == "loss":
        return _loss_placement(theta, ref_logp, estimator, bias_correction, beta, level)
    if placement == "reward":
        rewards = torch.zeros_like(theta) if rewards is None else rewards
        with_kl = _reward_placement(theta, ref_logp, estimator, rewards, beta, level)
        without = _reward_placement(theta, ref_logp, estimator, rewards, 0.0, level)
        return (with_kl - without) / beta
    raise ValueError(f"unknown placement {placement!r}; use loss or reward")


def _loss_placement(theta, ref_logp, estimator, bias_correction, beta, level):
    theta = theta.detach().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)[:, None]  # [V, 1]: row x is the one-token completion x
    mask = torch.ones_like(logp, dtype=torch.bool)
    loss, _, _ = policy_token_loss(logp, logp.detach(), torch.zeros_like(theta), mask, 0.2, 0.2, level,
                                   ref_logp[:, None], beta, estimator, bias_correction)
    (logp.detach().exp() * loss).sum().backward()
    return theta.grad / beta


def _reward_placement(theta, ref_logp, estimator, rewards, beta, level):
    vocab, group = theta.shape[0], 2
    theta = theta.detach().requires_grad_(True)
    first = torch.arange(vocab).repeat_interleave(vocab)
    second = torch.arange(vocab).repeat(vocab)
    tokens = torch.stack([first, second], 1).reshape(-1)  # [2 V^2]: group k = samples 2k, 2k + 1
    logp = torch.log_softmax(theta, -1)[tokens][:, None]  # [N, 1]
    mask = torch.ones_like(logp, dtype=torch.bool)
    advantages = compute_advantages("grpo", rewards[tokens], group)
    kl = sequence_kl(logp.detach(), ref_logp[tokens][:, None], mask, estimator)
    advantages = kl_penalised_advantages(advantages, kl, beta, group)
    loss, _, _ = policy_token_loss(logp, logp.detach(), advantages, mask, 0.2, 0.2, level)
    pair_prob = logp.detach().exp().view(-1, group).prod(-1)  # [V^2]
    (pair_prob.repeat_interleave(group) / group * loss[:, 0]).sum().backward()
    return theta.grad


def compare(gradient: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """(ratio, cosine): ratio = g . t / |t|^2 (how much of t's push g delivers), cosine = g . t / (|g| |t|);
    a gradient that is 0 up to float64 round-off (|g| < 1e-9 |t|) gives (0, nan)."""
    if gradient.norm() < 1e-9 * target.norm():
        return 0.0, float("nan")
    dot = float(gradient @ target)
    return dot / float(target @ target), dot / float(gradient.norm() * target.norm())


def option_name(placement: str, estimator: str, bias_correction: bool) -> str:
    flags = ("--kl-in-reward " if placement == "reward" else "") + f"--kl-estimator {estimator}"
    return flags + (" --use-bias-correction-kl" if bias_correction else "")


def kl_table(kls: tuple[float, ...] = (0.001, 0.03, 0.3), vocab: int = 50, seed: int = 0) -> str:
    """The README's KL table (markdown): per option, ratio and cosine against both KL gradients at each KL."""
    setups = [categorical_setup(vocab, kl, seed) for kl in kls]
    levels = " / ".join(f"{kl:g}" for kl in kls)
    lines = [f"| flags (KL(pi\\|\\|ref) = {levels}) | ratio to grad KL(pi\\|\\|ref) | cos | "
             f"ratio to grad KL(ref\\|\\|pi) | cos |", "|---|---|---|---|---|"]
    for placement, estimator, bc in OPTIONS:
        cells = [[], [], [], []]
        for theta, ref_logp, rewards in setups:
            g = expected_gradient(theta, ref_logp, placement, estimator, bc, rewards)
            for k, reverse in enumerate((False, True)):
                ratio, cos = compare(g, target_gradient(theta, ref_logp, reverse))
                cells[2 * k].append(f"{ratio:.3f}" if ratio else "0")
                cells[2 * k + 1].append(f"{cos:.3f}" if cos == cos else "-")  # nan: no direction
        lines.append(f"| `{option_name(placement, estimator, bc)}` | "
                     + " | ".join(" / ".join(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(kl_table(vocab=args.vocab, seed=args.seed))


if __name__ == "__main__":
    main()
