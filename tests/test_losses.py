"""The RL formulas against naive per-sample Python loops, and the invariants other trainers get wrong."""

import math
import statistics

import pytest
import torch

from e2h_min.rl.advantages import (compute_advantages, gae_advantages, group_advantages, kl_penalised_advantages,
                                   whiten, rloo_advantages)
from e2h_min.rl.losses import (clipped_surrogate, clipped_value_loss, importance_log_ratio, kl_loss_term, kl_penalty,
                               policy_token_loss, sequence_kl, token_loss_weights)

torch.manual_seed(0)


def naive_grpo(rewards, g, eps=1e-4, scale="group"):
    out = []
    all_std = statistics.stdev(rewards)
    for start in range(0, len(rewards), g):
        group = rewards[start:start + g]
        mean = sum(group) / g
        std = statistics.stdev(group)  # Bessel-corrected, as TRL and the paper's code
        for r in group:
            if scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (all_std + eps))
            else:
                out.append(r - mean)
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_naive_loop(scale):
    rewards = [1.0, 0.1, 0.1, 0.0, 1.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    got = group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale)
    assert got.tolist() == pytest.approx(naive_grpo(rewards, 4, scale=scale), abs=1e-12)


def test_group_advantages_hand_worked_and_zero_mean_per_group():
    got = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 4, eps=0.0)
    assert got.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    rewards = torch.rand(64, dtype=torch.float64)
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = compute_advantages(name, rewards, 8).view(-1, 8)
        assert adv.mean(dim=1).abs().max() < 1e-12, name


def test_all_equal_group_gives_zero_advantage_not_nan():
    adv = group_advantages(torch.tensor([0.1] * 8 + [1.0] * 8, dtype=torch.float64), 8)
    assert torch.all(adv == 0)


def test_rloo_matches_leave_one_out_loop():
    rewards = [1.0, 0.0, 0.1, 0.5, 0.2, 0.2, 0.9, 0.0]
    expected = []
    for start in range(0, 8, 4):
        group = rewards[start:start + 4]
        for i, r in enumerate(group):
            others = group[:i] + group[i + 1:]
            expected.append(r - sum(others) / 3)
    got = rloo_advantages(torch.tensor(rewards, dtype=torch.float64), 4)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert rloo_advantages(torch.tensor([1.0, 0, 0, 0]), 4).tolist() == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])


def test_kl_estimators_match_formulas_and_vanish_when_equal():
    logp = torch.log(torch.rand(5, 7)).double()
    ref = torch.log(torch.rand(5, 7)).double()
    for i in range(5):
        for j in range(7):
            d = ref[i, j].item() - logp[i, j].item()
            assert kl_penalty(logp, ref, "k1")[i, j].item() == pytest.approx(-d)
            assert kl_penalty(logp, ref, "k2")[i, j].item() == pytest.approx(0.5 * d * d)
            assert kl_penalty(logp, ref, "k3")[i, j].item() == pytest.approx(math.exp(d) - d - 1)
    for est in ("k1", "k2", "k3"):
        assert torch.all(kl_penalty(logp, logp, est) == 0)
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    # hand-worked: pi = .5, ref = .25 -> k3 = .5 + ln 2 - 1
    assert kl_penalty(torch.tensor([math.log(.5)]), torch.tensor([math.log(.25)])).item() == pytest.approx(
        0.5 + math.log(2) - 1)


def test_kl_sign_pulls_policy_toward_reference():
    """The penalty is added to the loss: a gradient step on the trainer's loss (zero advantage, only the KL term)
    moves pi toward pi_ref with k2 and k3, and the k3 estimator's mean under pi is the exact KL(pi||ref). k1 in the
    loss has no expected gradient at all (E_pi[grad log pi] = 0): the trap that makes k1 belong in the reward."""
    ref = torch.log_softmax(torch.tensor([2.0, 0.0, 0.0, 0.0]), -1)
    probs = torch.softmax(torch.zeros(4), -1)
    assert (probs * kl_penalty(torch.log(probs), ref, "k3")).sum().item() == pytest.approx(
        (probs * (torch.log(probs) - ref)).sum().item(), rel=1e-5)
    for estimator in ("k1", "k2", "k3"):
        logits = torch.zeros(4, requires_grad=True)  # pi uniform
        logp = torch.log_softmax(logits, -1)[:, None]  # each of the 4 tokens as a one-token sample [4, 1]
        loss, _, _ = policy_token_loss(logp, logp.detach(), torch.zeros(4), torch.ones(4, 1, dtype=torch.bool),
                                       0.2, 0.2, ref_logp=ref[:, None], beta=1.0, kl_estimator=estimator)
        (probs[:, None] * loss).sum().backward()  # the expected loss over the sampled token
        if estimator == "k1":
            assert logits.grad.abs().max() < 1e-7
            continue
        assert logits.grad[0] < 0, estimator  # descending it raises the logit the reference prefers
        assert (logits.grad[1:] > 0).all(), estimator


def test_clipped_surrogate_matches_naive_loop():
    logp = torch.randn(6, 5) * 0.3
    old = torch.randn(6, 5) * 0.3
    adv = torch.tensor([1.0, -1.0, 0.5, -0.3, 2.0, 0.0])
    loss, flags = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    low, high = flags["clipped_low"], flags["clipped_high"]
    for i in range(6):
        for t in range(5):
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            clipped_ratio = min(max(ratio, 0.8), 1.28)
            assert loss[i, t].item() == pytest.approx(-min(ratio * a, clipped_ratio * a), rel=1e-5, abs=1e-7)
            assert bool(low[i, t]) == (ratio < 0.8 and a < 0)
            assert bool(high[i, t]) == (ratio > 1.28 and a > 0)


def test_first_on_policy_iteration_ratio_is_one_and_loss_is_unclipped():
    logp = (torch.randn(4, 6) * 2).requires_grad_()
    adv = torch.randn(4)
    loss, flags = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2)
    low, high = flags["clipped_low"], flags["clipped_high"]
    assert torch.equal(loss, -adv[:, None].expand(4, 6))
    assert not low.any() and not high.any()
    loss.sum().backward()
    # the gradient of the surrogate at ratio 1 is the policy gradient -A * d logp
    assert torch.allclose(logp.grad, -adv[:, None].expand(4, 6))


def test_clipped_tokens_have_no_gradient():
    logp = torch.tensor([[math.log(1.5)]], requires_grad=True)
    loss, flags = clipped_surrogate(logp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.2)
    high = flags["clipped_high"]
    loss.sum().backward()
    assert high.item() and loss.item() == pytest.approx(-1.2) and logp.grad.item() == 0.0


def naive_aggregate(loss, lengths, loss_type, max_len):
    n = len(lengths)
    if loss_type == "grpo":
        return sum(sum(loss[i][:lengths[i]]) / lengths[i] for i in range(n)) / n
    if loss_type == "dapo":
        return sum(sum(loss[i][:lengths[i]]) for i in range(n)) / sum(lengths)
    return sum(sum(loss[i][:lengths[i]]) for i in range(n)) / (n * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_token_loss_weights_match_naive_aggregation(loss_type):
    lengths = [3, 1, 5, 2]
    mask = torch.zeros(4, 5, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    loss = torch.randn(4, 5, dtype=torch.float64)
    got = (token_loss_weights(mask, loss_type, 8).double() * loss).sum().item()
    assert got == pytest.approx(naive_aggregate(loss.tolist(), lengths, loss_type, 8), rel=1e-6)


def test_token_loss_weights_hand_worked():
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    assert token_loss_weights(mask, "grpo").tolist() == [[0.25, 0.25], [0.5, 0.0]]
    assert token_loss_weights(mask, "dapo").flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])


def naive_gae(rewards, values, gamma, lam):
    """Textbook GAE over one sequence, by the definition A_t = sum_l (gamma lam)^l delta_{t+l}."""
    n = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < n else 0.0) - values[t] for t in range(n)]
    return [sum((gamma * lam) ** (l - t) * deltas[l] for l in range(t, n)) for t in range(n)]


def test_gae_hand_worked_example():
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[1, 1]]),
                              gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.5, 0.5]] and ret.tolist() == [[1.0, 1.0]]


def test_gae_matches_naive_definition_with_padding():
    lengths = [4, 2, 6]
    rewards = torch.zeros(3, 6, dtype=torch.float64)
    values = torch.randn(3, 6, dtype=torch.float64)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        rewards[i, n - 1] = float(i) - 0.5  # the verifier's reward sits on the last real token
        rewards[i, :n] -= 0.01  # a per-token penalty, as --kl-in-reward adds
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    for i, n in enumerate(lengths):
        expected = naive_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), 0.9, 0.8)
        assert adv[i, :n].tolist() == pytest.approx(expected, abs=1e-12)
        assert ret[i, :n].tolist() == pytest.approx([a + v for a, v in zip(expected, values[i, :n].tolist())])
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)


def test_clipped_value_loss_hand_worked_and_naive():
    assert clipped_value_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.2).item() == \
        pytest.approx(0.32)
    v, old, ret = torch.randn(50), torch.randn(50), torch.randn(50)
    got = clipped_value_loss(v, old, ret, 0.3)
    for i in range(50):
        vc = old[i].item() + min(max(v[i].item() - old[i].item(), -0.3), 0.3)
        assert got[i].item() == pytest.approx(0.5 * max((v[i].item() - ret[i].item()) ** 2,
                                                        (vc - ret[i].item()) ** 2), rel=1e-5)


def test_whiten_gives_zero_mean_unit_variance_on_real_tokens():
    values = torch.randn(4, 5, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 5) > 0.3
    out = whiten(values, mask)
    assert out[mask].mean().abs() < 1e-9
    assert (out[mask] ** 2).mean().item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(out[~mask] == 0)


def test_sequence_level_ratio_is_the_length_normalised_sequence_ratio():
    logp = torch.tensor([[0.2, 0.4, 9.0]])
    mask = torch.tensor([[True, True, False]])
    log_ratio = importance_log_ratio(logp, torch.zeros(1, 3), mask, "sequence")
    assert log_ratio[0, :2].tolist() == pytest.approx([0.3, 0.3])
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), 0.2, 0.2, mask, "sequence")
    assert loss[0, 0].item() == pytest.approx(-min(math.exp(0.3), 1.2))


def test_sequence_kl_sums_real_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0]])
    assert sequence_kl(logp, ref, torch.tensor([[1, 1, 0]]), "k1").item() == pytest.approx(0.5)


def test_clip_region_flags_both_sides_regardless_of_advantage_sign():
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))
    _, flags = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), 0.2, 0.2)
    assert flags["region"].tolist() == [[True, False, True]]
    assert flags["clipped_low"].tolist() == [[False, False, False]]  # A > 0: the low side is not clipped
    assert flags["clipped_high"].tolist() == [[False, False, True]]


def test_kl_penalised_advantages_match_naive_loop():
    advantages = torch.randn(8, dtype=torch.float64)
    kl = torch.rand(8, dtype=torch.float64)
    out = kl_penalised_advantages(advantages, kl, 0.1, 4)
    for i in range(8):
        others = [kl[j].item() for j in range(8) if j // 4 == i // 4 and j != i]
        assert out[i].item() == pytest.approx(advantages[i].item() - 0.1 * (kl[i].item() - sum(others) / 3))
    assert kl_penalised_advantages(torch.zeros(2), torch.tensor([.3, .1]), 0.1, 2).tolist() == pytest.approx(
        [-0.02, 0.02])


def test_kl_in_reward_keeps_beta_as_the_penalty_size():
    """A group whose verifier rewards are all equal gets a KL advantage proportional to beta, and an informative
    group keeps its verifier-reward normalisation, whatever beta."""
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    kl = torch.tensor([0.5, 0.1, 0.2, 0.9, 0.3, 0.3, 0.8, 0.0], dtype=torch.float64)
    reward_only = compute_advantages("grpo", rewards, 4)
    small, large = (kl_penalised_advantages(reward_only, kl, beta, 4) for beta in (0.001, 0.05))
    assert torch.all(reward_only[:4] == 0) and small[:4].abs().max() > 0
    assert torch.allclose(large[:4], 50 * small[:4], rtol=1e-12)  # size set by beta, not by a std of KL alone
    assert large[:4].abs().max() < 0.05  # beta x centred KL (KL spread < 1 here), not unit-scale z-scores
    assert torch.allclose(large[4:] + 0.05 * rloo_advantages(kl, 4)[4:], reward_only[4:], rtol=1e-12)


def test_kl_loss_term_values_and_bias_corrected_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.4]]))
    mask = torch.ones(1, 2, dtype=torch.bool)
    plain = kl_loss_term(logp, ref, logp.detach(), mask, "k3")
    corrected = kl_loss_term(logp, ref, logp.detach(), mask, "k3", bias_correction=True)
    assert torch.allclose(plain, corrected) and torch.allclose(plain, kl_penalty(logp, ref, "k3"))
    (grad_plain,) = torch.autograd.grad(plain.sum(), logp)
    (grad_corrected,) = torch.autograd.grad(corrected.sum(), logp)
    # d(rho k)/d logp at rho = 1: k + dk/dlogp, with dk3/dlogp = 1 - exp(d)
    d = (ref - logp).detach()
    assert torch.allclose(grad_plain, 1 - d.exp())
    assert torch.allclose(grad_corrected, (d.exp() - d - 1) + 1 - d.exp())


def test_policy_token_loss_adds_beta_times_the_kl_term():
    logp, old, ref = torch.randn(3, 4) * 0.1, torch.randn(3, 4) * 0.1, torch.randn(3, 4) * 0.1
    mask, adv = torch.ones(3, 4, dtype=torch.bool), torch.randn(3)
    surrogate, flags = clipped_surrogate(logp, old, adv, 0.2, 0.3, mask)
    loss, kl, same_flags = policy_token_loss(logp, old, adv, mask, 0.2, 0.3, ref_logp=ref, beta=0.1,
                                             kl_estimator="k2", kl_bias_correction=True)
    assert torch.allclose(kl, torch.exp(logp - old) * kl_penalty(logp, ref, "k2"))
    assert torch.allclose(loss, surrogate + 0.1 * kl) and all(torch.equal(flags[k], same_flags[k]) for k in flags)
    no_kl, none, _ = policy_token_loss(logp, old, adv, mask, 0.2, 0.3, beta=0.1)
    assert none is None and torch.equal(no_kl, surrogate)
