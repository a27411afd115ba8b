"""The update against an independent reference: which tokens train, with which sign, and what it logs.

train.policy_update is run with SGD(lr) and max_grad_norm 0, so the parameter change is exactly -lr times the
step's gradient. The references below are written out in the plainest form (one sample at a time, a full forward
over prompt + completion, log_softmax, a Python sum over tokens) and share no code with the trainer beyond the
model, so a mistake in the trainer's masks, weights, signs or bookkeeping changes the comparison.
The loop-level invariants (what the loop hands to the update and to the curriculum) are in test_loop_invariants.py.
"""

import pytest
import torch

import train
from e2h_min.run.setup import lr_multiplier
from e2h_min.run.config import Config
from e2h_min.engine.models import ValueHead, apply_lora, frozen_copy
from e2h_min.rl.ppo import ppo_update
from tests.test_train import random_model

CPU = torch.device("cpu")
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
EOS = 3  # random_model's eos (and, in these batches, also what a pad would be)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def batch_with_eos(seed=4, vocab=97):
    """Prompts sharing ids in groups of 2; completions ending in EOS, of lengths 1 (EOS alone) to 6."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (2, 5, 3, 4)]
    rows = [p for p in prompts for _ in range(2)]
    lengths = [1, 4, 6, 2, 3, 5, 1, 6]
    completions = [torch.randint(4, vocab, (n - 1,), generator=g).tolist() + [EOS] for n in lengths]
    return rows, completions


def plain_logprobs(model, prompt, completion, temperature):
    """log pi(o_t | q, o_<t) at `temperature` for every completion token [T], one full forward (autograd kept)."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float() / temperature
    predicting = logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]  # position j-1 predicts token j
    return torch.log_softmax(predicting, -1)[torch.arange(len(completion)), torch.tensor(completion)]


def plain_entropy(model, prompt, completion, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float() / temperature
        logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(completion)], -1)
        return -(logp.exp() * logp).sum(-1)


def plain_kl(logp, ref, estimator):
    """KL(pi || pi_ref) estimators from samples of pi, written from their definitions."""
    log_ratio = logp - ref  # log pi / pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    return torch.exp(-log_ratio) + log_ratio - 1.0  # k3: (pi_ref / pi) - 1 - log(pi_ref / pi)


def aggregate(per_token: list[torch.Tensor], loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The step's loss from per-sample per-token losses: grpo mean per sequence then over sequences, dapo mean
    over all tokens, dr_grpo sum / (N * max_new_tokens)."""
    n = len(per_token)
    if loss_type == "grpo":
        return sum(t.mean() for t in per_token) / n
    if loss_type == "dapo":
        return sum(t.sum() for t in per_token) / sum(len(t) for t in per_token)
    return sum(t.sum() for t in per_token) / (n * max_new_tokens)


def reference_grpo_loss(policy, reference, prompts, completions, advantages, cfg, old=None):
    """-min(rho A, clip(rho) A) per token (+ beta * KL in the loss), aggregated by cfg.loss_type.
    old: per-sample log pi_old (default: the current policy's, detached, so rho = 1)."""
    per_token = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logp = plain_logprobs(policy, p, c, cfg.temperature)
        old_i = logp.detach() if old is None else old[i]
        if cfg.importance_sampling_level == "sequence":
            ratio = torch.exp((logp - old_i).mean()).expand(len(c))
        else:
            ratio = torch.exp(logp - old_i)
        high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        a = float(advantages[i])
        loss = -torch.minimum(ratio * a, ratio.clamp(1 - cfg.epsilon, 1 + high) * a)
        if reference is not None and not cfg.kl_in_reward:
            with torch.no_grad():
                ref = plain_logprobs(reference, p, c, cfg.temperature)
            loss = loss + cfg.beta * plain_kl(logp, ref, cfg.kl_estimator)
        per_token.append(loss)
    return aggregate(per_token, cfg.loss_type, cfg.max_new_tokens)


def gradient(model, loss) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the parameters as they were before each step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.before_step = []

    def step(self, closure=None):
        self.before_step.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def run_policy_update(policy, reference, prompts, completions, advantages, cfg, lr=1.0, sampler_logprobs=None,
                      value_head=None):
    params = list(policy.parameters()) + (list(value_head.parameters()) if value_head else [])
    before = torch.cat([p.detach().flatten().clone() for p in policy.parameters()])
    optimizer = RecordingSGD(params, lr)
    sampler_logprobs = sampler_logprobs or [[0.0] * len(c) for c in completions]
    args = (policy, reference, optimizer, prompts, completions, advantages, sampler_logprobs, cfg, CPU, NO_AUTOCAST)
    stats = ppo_update(*args, value_head) if value_head else train.policy_update(*args)  # ppo: advantages = rewards
    after = torch.cat([p.detach().flatten() for p in policy.parameters()])
    return (before - after) / lr, stats, optimizer  # = the gradient when num_iterations == 1


def make_cfg(**overrides):
    settings = dict(micro_batch_size=3, max_new_tokens=8, max_grad_norm=0.0, temperature=0.8, beta=0.0)
    settings.update(overrides)
    return Config(**settings)


# ----------------------------------------------------------------------------- which tokens train
@pytest.mark.parametrize("overrides", [
    {"loss_type": "grpo"},
    {"loss_type": "dapo"},
    {"loss_type": "dr_grpo"},
    {"loss_type": "grpo", "share_prompt_forward": False, "skip_zero_advantage": False},
    {"loss_type": "dapo", "micro_batch_tokens": 12},
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    {"loss_type": "grpo", "beta": 0.3, "kl_estimator": "k3"},
    {"loss_type": "dapo", "beta": 0.3, "kl_estimator": "k1"},
    {"loss_type": "dr_grpo", "beta": 0.3, "kl_estimator": "k2", "share_prompt_forward": False},
    {"loss_type": "grpo", "beta": 0.3, "gradient_checkpointing": True},
])
def test_update_gradient_equals_a_plain_per_sample_reference(overrides):
    """EOS is trained, padding is not, a one-token completion gets its gradient, the KL in the loss pulls toward
    the reference: all through one comparison of the real update with the plain loss written above."""
    cfg = make_cfg(**overrides)
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, 0.0, 0.0, 2.0, -1.5, -0.7, 0.7])  # one group with A = 0 (skippable)
    reference = frozen_copy(random_model(seed=5)) if cfg.beta else None
    policy = random_model()
    if cfg.gradient_checkpointing:  # as train.build_models sets it up; the update then packs whole sequences
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    delta, _, _ = run_policy_update(policy, reference, prompts, completions, advantages, cfg)
    plain = random_model()
    expected = gradient(plain, reference_grpo_loss(plain, reference and reference.model, prompts, completions,
                                                   advantages, cfg))
    assert expected.abs().max() > 1e-3
    assert torch.allclose(delta, expected, atol=2e-6, rtol=1e-4), (delta - expected).abs().max()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_one_token_completion_that_is_only_eos_is_trained_to_stop(loss_type):
    """The sample [EOS] alone with A > 0: the update raises log pi(EOS | prompt), by the reference's amount."""
    cfg = make_cfg(loss_type=loss_type)
    prompt = [11, 12, 13]
    policy = random_model()
    before = plain_logprobs(policy, prompt, [EOS], cfg.temperature).item()
    delta, _, _ = run_policy_update(policy, None, [prompt], [[EOS]], torch.tensor([1.0]), cfg, lr=0.01)
    plain = random_model()
    expected = gradient(plain, reference_grpo_loss(plain, None, [prompt], [[EOS]], torch.tensor([1.0]), cfg))
    assert torch.allclose(delta, expected, atol=5e-5, rtol=1e-3)  # delta is a difference of weights / 0.01
    with torch.no_grad():
        assert plain_logprobs(policy, prompt, [EOS], cfg.temperature).item() > before + 1e-3


def test_padding_and_other_rows_do_not_leak_into_a_sample_s_gradient():
    """Appending a long sample with A = 0 (under dapo its tokens only change the normaliser) leaves the gradient of
    the others scaled by exactly old_tokens / new_tokens: padded positions of the short rows add nothing."""
    cfg = make_cfg(loss_type="dapo", skip_zero_advantage=False, micro_batch_size=16)
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.3, 2.0, -1.5, -0.7, 0.7])
    alone, _, _ = run_policy_update(random_model(), None, prompts, completions, advantages, cfg)
    long = list(range(20, 28))
    padded, _, _ = run_policy_update(random_model(), None, prompts + [[5, 6]], completions + [long],
                                     torch.cat([advantages, torch.zeros(1)]), cfg)
    tokens = sum(len(c) for c in completions)
    assert torch.allclose(padded, alone * tokens / (tokens + len(long)), atol=1e-7, rtol=1e-5)


def test_fsdp_filler_micro_batches_run_the_model_and_add_exactly_zero_gradient(monkeypatch):
    """Under FSDP every rank runs as many micro-batches as the busiest one (each forward all-gathers the shards),
    with one-token fillers where it has no samples left. A fake world on CPU: this rank packs 3 micro-batches and
    the busiest rank 3 more; the fillers must run (3 more forwards) and leave the gradient bit for bit as it was."""
    import e2h_min.engine.batching as update_batches

    cfg = make_cfg(loss_type="grpo", share_prompt_forward=False)  # the layout FSDP uses: whole rows
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, 0.3, -0.3, 2.0, -1.5, -0.7, 0.7])

    def update(sharded: bool) -> tuple[torch.Tensor, int]:
        monkeypatch.setattr(update_batches, "is_sharded", lambda model: sharded)
        monkeypatch.setattr(update_batches, "all_reduce_max", lambda value, info: value + 3)  # the busiest rank
        policy, forwards = random_model(), []
        policy.model.register_forward_hook(lambda *args: forwards.append(1))  # the trunk: once per forward
        delta, _, _ = run_policy_update(policy, None, prompts, completions, advantages, cfg)
        return delta, len(forwards)

    (alone, forwards_alone), (with_fillers, forwards_with_fillers) = update(False), update(True)
    assert forwards_with_fillers == forwards_alone + 3 and forwards_alone == 3
    assert alone.abs().sum() > 0 and torch.equal(with_fillers, alone)


def test_a_non_finite_gradient_skips_the_step_and_leaves_the_weights_unchanged():
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, float("nan"), 0.3, 2.0, -1.5, -0.7, 0.7])
    policy = random_model()
    delta, stats, _ = run_policy_update(policy, None, prompts, completions, advantages, make_cfg(num_iterations=2))
    assert stats["skipped_updates"] == 2 and torch.all(delta == 0)


def test_none_is_a_choice_of_scale_rewards_and_unsets_only_optional_flags():
    """--scale-rewards none (Dr. GRPO's unscaled advantages) was parsed as None and then refused."""
    from e2h_min.run.presets import parse_config

    cfg = parse_config(["--scale-rewards", "none", "--epsilon-high", "none", "--model", "x"])
    assert cfg.scale_rewards == "none" and cfg.epsilon_high is None


@pytest.mark.parametrize("schedule, expected", [("cosine", [0.25, 0.5, 1.0, 0.5, 0.0]),
                                                ("constant", [0.25, 0.5, 1.0, 1.0, 1.0])])
def test_lr_multiplier_warms_up_then_follows_the_schedule(schedule, expected):
    cfg = Config(total_steps=6, warmup_steps=4, lr_schedule=schedule)  # decay over steps 4..6
    steps = [0, 1, 3, 5, 6]
    assert [lr_multiplier(s, cfg) for s in steps] == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- signs of the reward-shaping terms
def test_kl_in_the_loss_moves_the_policy_toward_the_reference():
    """With every advantage 0 the only force is beta * KL: one small SGD step lowers the estimator's value on the
    same samples (for each estimator), and a larger beta lowers it more. (This is the sign; for k1 the expected
    gradient over fresh samples is 0, so "toward the reference" holds only for the samples trained on.)"""
    prompts, completions = batch_with_eos()
    reference = frozen_copy(random_model(seed=5))

    def kl_after(beta, estimator):
        policy = random_model()
        cfg = make_cfg(beta=beta, kl_estimator=estimator, loss_type="dapo")
        run_policy_update(policy, reference, prompts, completions, torch.zeros(8), cfg, lr=0.01)
        with torch.no_grad():
            return sum(plain_kl(plain_logprobs(policy, p, c, cfg.temperature),
                                plain_logprobs(reference.model, p, c, cfg.temperature), estimator).sum()
                       for p, c in zip(prompts, completions)).item()

    for estimator in ("k1", "k2", "k3"):
        start, small, large = kl_after(0.0, estimator), kl_after(0.5, estimator), kl_after(2.0, estimator)
        assert large < small < start, (estimator, start, small, large)


def reference_ppo_policy_gradient(policy, reference, prompts, completions, rewards, cfg, value=0.0):
    """PPO with per-token KL in the reward and a critic that outputs `value` at every real token (V = 0 past the
    last): r_t = -beta * (log pi_old - log pi_ref)_t, plus the verifier reward on the last token;
    delta_t = r_t + gamma V_{t+1} - V_t; A_t = sum_l (gamma lam)^l delta_{t+l}; A whitened over all real tokens
    of the step; loss -rho A at rho = 1."""
    old, token_adv = [], []
    for p, c, r in zip(prompts, completions, rewards):
        with torch.no_grad():
            logp = plain_logprobs(policy, p, c, cfg.temperature)
            ref = plain_logprobs(reference, p, c, cfg.temperature)
        token_rewards = [-cfg.beta * float(logp[t] - ref[t]) for t in range(len(c))]
        token_rewards[-1] += float(r)
        values = [value] * len(c) + [0.0]
        deltas = [token_rewards[t] + cfg.gamma * values[t + 1] - values[t] for t in range(len(c))]
        token_adv.append([sum((cfg.gamma * cfg.lam) ** (u - t) * deltas[u] for u in range(t, len(c)))
                          for t in range(len(c))])
    flat = torch.tensor([a for adv in token_adv for a in adv], dtype=torch.float64)
    mean, var = flat.mean(), flat.var(unbiased=False)
    per_token = []
    for (p, c), adv in zip(zip(prompts, completions), token_adv):
        a = ((torch.tensor(adv, dtype=torch.float64) - mean) / torch.sqrt(var + 1e-8)).float()
        logp = plain_logprobs(policy, p, c, cfg.temperature)
        per_token.append(-torch.exp(logp - logp.detach()) * a)
    return aggregate(per_token, cfg.loss_type, cfg.max_new_tokens)


@pytest.mark.parametrize("beta, value", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7)])
def test_ppo_update_with_per_token_kl_in_the_reward_equals_the_plain_reference(beta, value):
    """The PPO path: the KL enters each token's reward with a minus sign, GAE sums it backwards, whitening is over
    the step's real tokens. beta 0.5 makes the KL term dominate the advantages' ordering. value 0.7 (a critic
    that says 0.7 everywhere) makes delta_t depend on gamma alone and the trace on gamma * lambda, so gamma and
    lambda swapped (0.9 and 0.8 here) changes the gradient."""
    cfg = make_cfg(advantage="ppo", kl_in_reward=True, beta=beta, gamma=0.9, lam=0.8, loss_type="dapo")
    prompts, completions = batch_with_eos()
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    reference = frozen_copy(random_model(seed=5))
    policy = random_model()
    value_head = ValueHead(policy.config.hidden_size)  # weight 0: V = its bias, and no value gradient reaches the
    torch.nn.init.constant_(value_head.score.bias, value)  # policy's trunk
    delta, _, _ = run_policy_update(policy, reference, prompts, completions, rewards, cfg, value_head=value_head)
    plain = random_model()
    expected = gradient(plain, reference_ppo_policy_gradient(plain, reference.model, prompts, completions, rewards,
                                                             cfg, value))
    assert torch.allclose(delta, expected, atol=2e-6, rtol=1e-4), (delta - expected).abs().max()


# ----------------------------------------------------------------------------- diagnostics, by hand
def test_second_iteration_keeps_pi_old_and_logs_hand_computed_diagnostics():
    """num_iterations 2 with a large SGD step, so the second pass has rho != 1 and some tokens clipped on both
    sides. Its gradient is the reference's with pi_old = the first pass's log-probs, and every logged diagnostic
    (of the last pass) equals the value computed by hand from the parameters the second pass saw."""
    cfg = make_cfg(num_iterations=2, beta=0.2, kl_estimator="k3", epsilon=0.1, epsilon_high=0.15, loss_type="grpo")
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, 0.4, -0.4, 2.0, -1.5, -0.7, 0.7])
    reference = frozen_copy(random_model(seed=5))
    policy, plain = random_model(), random_model()
    with torch.no_grad():
        old = [plain_logprobs(plain, p, c, cfg.temperature) for p, c in zip(prompts, completions)]
    g = torch.Generator().manual_seed(9)
    sampler = [(o + 0.01 * torch.randn(len(o), generator=g)).tolist() for o in old]
    lr = 0.03
    _, stats, optimizer = run_policy_update(policy, reference, prompts, completions, advantages, cfg, lr=lr,
                                            sampler_logprobs=sampler)
    # the plain model at the parameters the second pass started from
    with torch.no_grad():
        for p, value in zip(plain.parameters(), optimizer.before_step[1]):
            p.copy_(value)
    expected_grad = gradient(plain, reference_grpo_loss(plain, reference.model, prompts, completions, advantages,
                                                        cfg, old=old))
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(optimizer.before_step[1], policy.parameters())])
    assert torch.allclose(step / lr, expected_grad, atol=5e-5, rtol=1e-3)  # a difference of weights / lr

    with torch.no_grad():
        new = [plain_logprobs(plain, p, c, cfg.temperature) for p, c in zip(prompts, completions)]
        ref = [plain_logprobs(reference.model, p, c, cfg.temperature) for p, c in zip(prompts, completions)]
        entropy = torch.cat([plain_entropy(plain, p, c, cfg.temperature) for p, c in zip(prompts, completions)])
        loss = reference_grpo_loss(plain, reference.model, prompts, completions, advantages, cfg, old=old)
    ratio = torch.exp(torch.cat(new) - torch.cat(old))
    adv = torch.cat([torch.full((len(c),), float(a)) for c, a in zip(completions, advantages)])
    tokens = len(ratio)
    low, high = (ratio < 1 - 0.1) & (adv < 0), (ratio > 1 + 0.15) & (adv > 0)
    assert 0 < low.sum() and 0 < high.sum() and (low | high).sum() < tokens  # the case is not degenerate
    by_hand = {
        "approx_kl_old": float((ratio - 1 - ratio.log()).mean()),  # KL(pi_old || pi) from samples of pi_old
        "clip_ratio/clipped_low": float(low.sum()) / tokens,
        "clip_ratio/clipped_high": float(high.sum()) / tokens,
        "clip_ratio/region": float(((ratio < 0.9) | (ratio > 1.15)).sum()) / tokens,
        "clip_ratio": float((low | high).sum()) / tokens,
        "entropy": float(entropy.mean()),
        "kl": float(torch.cat([plain_kl(n, r, "k3") for n, r in zip(new, ref)]).mean()),
        "logprob_mismatch": float((torch.tensor(sum(sampler, [])) - torch.cat(old)).abs().mean()),
        "loss": float(loss),
        "grad_norm": float(expected_grad.norm()),
        "update_sample_share": 1.0,
    }
    assert by_hand["approx_kl_old"] > 1e-3
    for name, value in by_hand.items():
        assert stats[name] == pytest.approx(value, rel=2e-4, abs=1e-7), name


def test_approx_kl_old_is_zero_on_policy_and_positive_after_a_step():
    """On the first pass pi = pi_old (approx_kl_old 0, nothing clipped), and the second pass after a real step
    reports a positive KL; with lr 0 the second pass still reports 0."""
    prompts, completions = batch_with_eos()
    advantages = torch.tensor([1.0, -0.5, 0.4, -0.4, 2.0, -1.5, -0.7, 0.7])
    stats = {}
    for lr in (0.0, 0.03):
        _, stats[lr], _ = run_policy_update(random_model(), None, prompts, completions, advantages,
                                            make_cfg(num_iterations=2), lr=lr)
    assert stats[0.0]["approx_kl_old"] == 0.0 and stats[0.0]["clip_ratio"] == 0.0
    assert stats[0.03]["approx_kl_old"] > 1e-3 and stats[0.03]["clip_ratio"] > 0


def test_ppo_on_a_fresh_rollout_starts_at_ratio_one_with_lora_dropout():
    """A LoRA policy with dropout, in train mode as train.py leaves it: PPO's first iteration is on-policy
    (approx_kl_old 0, nothing clipped). pi_old must be that pass's own log-probs: the pass that computes V_old for
    GAE draws other dropout masks, and as pi_old it gave a ratio != 1 before any step."""
    prompts, completions = batch_with_eos()
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 1])
    torch.manual_seed(0)
    policy = apply_lora(random_model(), r=8, alpha=16, dropout=0.1, targets="q_proj,v_proj")
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # a trained adapter (B = 0 at the start would make dropout irrelevant)
            torch.nn.init.normal_(p, std=2.0)
    policy.train()
    cfg = make_cfg(advantage="ppo", max_grad_norm=0.0, lora_r=8)
    value_head = ValueHead(policy.config.hidden_size)
    trained = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    stats = ppo_update(policy, None, torch.optim.SGD(trained, lr=0.0), prompts, completions, rewards,
                       [[0.0] * len(c) for c in completions], cfg, torch.device("cpu"),
                       lambda: torch.autocast("cpu", enabled=False), value_head)
    assert stats["approx_kl_old"] == 0.0 and stats["clip_ratio"] == 0.0


def naive_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = sum_{u >= t} (gamma lam)^(u - t) delta_u, delta_u = r_u + gamma V_{u+1} - V_u, V past the end 0."""
    v = values + [0.0]
    delta = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(len(rewards))]
    return [sum((gamma * lam) ** (u - t) * delta[u] for u in range(t, len(delta))) for t in range(len(delta))]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_ppo_update_with_a_critic_equals_the_plain_reference(loss_type):
    """The whole PPO gradient with a non-zero critic (trunk and value head, vf_coef applied) equals a reference
    written out per sample: one full forward each, V read at the position before each completion token, GAE by its
    definition, advantages whitened over all tokens, 0.5 * the clipped squared value error."""
    prompts, completions = batch_with_eos()
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    cfg = make_cfg(advantage="ppo", gamma=0.9, lam=0.8, vf_coef=0.5, loss_type=loss_type)

    def models():
        policy = random_model()
        torch.manual_seed(11)
        value_head = ValueHead(policy.config.hidden_size)
        torch.nn.init.normal_(value_head.score.weight, std=0.3)
        torch.nn.init.constant_(value_head.score.bias, 0.2)
        return policy, value_head, list(policy.parameters()) + list(value_head.parameters())

    policy, value_head, params = models()
    before = torch.cat([p.detach().flatten().clone() for p in params])
    ppo_update(policy, None, torch.optim.SGD(params, lr=1.0), prompts, completions, rewards,
               [[0.0] * len(c) for c in completions], cfg, torch.device("cpu"),
               lambda: torch.autocast("cpu", enabled=False), value_head)
    update = before - torch.cat([p.detach().flatten() for p in params])  # SGD, lr 1: the gradient

    policy, value_head, params = models()

    def values(prompt, completion):  # V(s_t) from the hidden state that predicts completion token t
        hidden = policy.model(input_ids=torch.tensor([prompt + completion])).last_hidden_state[0]
        return value_head(hidden[len(prompt) - 1: len(prompt) - 1 + len(completion)])

    with torch.no_grad():
        old_values = [values(p, c) for p, c in zip(prompts, completions)]
    gae = [naive_gae([0.0] * (len(c) - 1) + [float(r)], v.tolist(), cfg.gamma, cfg.lam)
           for c, r, v in zip(completions, rewards, old_values)]
    flat = torch.tensor(sum(gae, []))
    mean, var = flat.mean(), flat.var(unbiased=False)
    per_token = []
    for prompt, completion, a, old in zip(prompts, completions, gae, old_values):
        logp = plain_logprobs(policy, prompt, completion, cfg.temperature)
        returns = torch.tensor(a) + old
        v = values(prompt, completion)
        clipped = old + (v - old).clamp(-cfg.cliprange_value, cfg.cliprange_value)
        value_loss = 0.5 * torch.maximum((v - returns) ** 2, (clipped - returns) ** 2)
        advantage = (torch.tensor(a) - mean) / torch.sqrt(var + 1e-8)
        per_token.append(-torch.exp(logp - logp.detach()) * advantage + cfg.vf_coef * value_loss)
    loss = aggregate(per_token, loss_type, cfg.max_new_tokens)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    head = sum(p.numel() for p in value_head.parameters())
    assert expected[-head:].abs().max() > 1e-2  # the critic's own gradient is in the comparison
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=1e-5)

