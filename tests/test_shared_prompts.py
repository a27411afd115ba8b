"""The update's work savings leave the math unchanged: shared-prompt layout, zero-advantage skipping, token budgets.

Each saving is checked against the plain computation it replaces: whole prompt + completion rows, every sample
run, micro-batches cut by rows only.
"""

import functools

import numpy as np
import pytest
import torch

import train
from e2h_min.engine.distributed import Compute, DistInfo
from e2h_min.engine.models import Models
from e2h_min.run.config import Config
from e2h_min.engine.logprobs import (SharedPrompts, completion_logprobs, micro_batches, pack_micro_batches, pack_sequences,
                              pack_suffixes)
from e2h_min.rl.advantages import group_advantages, rloo_advantages
from e2h_min.engine.models import frozen_copy
from e2h_min.engine.batching import MicroBatchLimits
from tests.test_train import naive_logprobs, random_model

CPU = torch.device("cpu")
NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def grouped_batch(group=3, prompt_lengths=(1, 3, 6, 9), seed=2, vocab=97):
    """Prompts of different lengths (one of a single token), each repeated `group` times, random completions."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in prompt_lengths]
    rows = [p for p in prompts for _ in range(group)]
    completions = [torch.randint(4, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in rows]
    return rows, completions


def shared_logprobs(model, rows, completions, temperature, parts, weights=None):
    """Log-probs [N, T] through SharedPrompts in the micro-batches `parts`; with weights, also backward the
    weighted sum (per micro-batch, then once through the prompt forward, as train.policy_update does)."""
    shared = SharedPrompts.from_rows(rows)
    kv = shared.keys_values(model)
    width = max(len(c) for c in completions)
    out_logp = torch.zeros(len(rows), width)
    out_entropy = torch.zeros(len(rows), width)
    for part in parts:
        batch = pack_suffixes(shared, part, [completions[i] for i in part], pad_id=0)
        logp, entropy = completion_logprobs(model, batch, temperature, prompt_kv=kv)
        if weights is not None:
            (logp * weights[part, :logp.shape[1]]).sum().backward()
        out_logp[part, :logp.shape[1]] = logp.detach()
        out_entropy[part, :logp.shape[1]] = entropy
    if weights is not None:
        kv.backward()
    return out_logp, out_entropy


def test_shared_prompt_log_probs_equal_whole_sequences_and_a_naive_forward():
    model = random_model()
    rows, completions = grouped_batch()
    with torch.no_grad():
        whole_logp, whole_entropy = completion_logprobs(model, pack_sequences(rows, completions, 0), 0.7)
        logp, entropy = shared_logprobs(model, rows, completions, 0.7, parts=[[5, 0, 11, 3], [7, 1, 2, 4, 6, 8, 9, 10]])
    assert torch.allclose(logp, whole_logp, atol=1e-5)
    assert torch.allclose(entropy, whole_entropy, atol=1e-5)
    for i in (0, 4, 11):  # and against one plain model(...) call per sequence
        assert logp[i, :len(completions[i])].tolist() == pytest.approx(
            naive_logprobs(model, rows[i], completions[i], 0.7), abs=1e-5)


def test_shared_prompt_gradients_equal_whole_sequences():
    rows, completions = grouped_batch()
    weights = torch.linspace(-1.0, 1.0, len(rows) * 8).view(len(rows), 8)
    model = random_model()
    whole_logp, _ = completion_logprobs(model, pack_sequences(rows, completions, 0), 0.9)
    (whole_logp * weights[:, :whole_logp.shape[1]]).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    shared_logprobs(model, rows, completions, 0.9, parts=[[0, 5, 9], [1, 2, 3, 4], [6, 7, 8, 10, 11]],
                    weights=weights)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-6), name


def test_shared_prompts_serve_only_the_rows_asked_for():
    shared = SharedPrompts.from_rows([[1, 2], [1, 2], [3, 4, 5]], rows=[1, 2])
    assert shared.row_prompt == {1: 0, 2: 1} and shared.prompt_lengths == [2, 3] and shared.last_tokens == [2, 5]
    # prefixes (prompt minus last token) left-padded: [1] and [3, 4]
    assert shared.prefix_ids.tolist() == [[0, 1], [3, 4]] and shared.prefix_mask.tolist() == [[0, 1], [1, 1]]
    batch = pack_suffixes(shared, [2], [[8, 9]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 8]] and batch["position_ids"].tolist() == [[2, 3]]
    assert batch["targets"].tolist() == [[8, 9]] and batch["attention_mask"].tolist() == [[1, 1, 1, 1]]
    with pytest.raises(ValueError, match="empty prompt"):
        SharedPrompts.from_rows([[]])


def run_update(overrides, advantages, rows, completions, beta=0.0, adam=False):
    """One policy_update per advantage vector (a tensor: one step; a list: one step each) from the same start;
    returns the parameter change and the last stats.

    With SGD(lr=1) the change is exactly minus the gradient. AdamW (adam=True) turns float noise in near-zero
    gradients into lr-sized steps, so it is only compared where the computations are identical."""
    policy = random_model()
    reference = frozen_copy(random_model(seed=5)) if beta else None
    optimizer = (torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=0.1) if adam
                 else torch.optim.SGD(policy.parameters(), lr=1.0))
    before = [p.detach().clone() for p in policy.parameters()]
    cfg = Config(micro_batch_size=4, beta=beta, max_new_tokens=8, max_grad_norm=0.0, temperature=0.9,
                 num_generations=3, **overrides)
    for step_advantages in (advantages if isinstance(advantages, list) else [advantages]):
        stats = train.policy_update(policy, reference, optimizer, rows, completions, step_advantages,
                                    [[0.0] * len(c) for c in completions], cfg, CPU, NO_AUTOCAST)
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, policy.parameters())]), stats


PLAIN = {"share_prompt_forward": False, "skip_zero_advantage": False, "micro_batch_tokens": 0}


@pytest.mark.parametrize("overrides, beta", [
    ({}, 0.0),
    ({"loss_type": "dapo", "num_iterations": 2}, 0.0),
    ({"importance_sampling_level": "sequence"}, 0.0),
    ({}, 0.05),  # reference log-probs through the reference model's own prompt keys/values
    ({"kl_in_reward": True}, 0.05),
    ({"micro_batch_tokens": 9}, 0.0),
])
def test_update_with_every_saving_equals_the_plain_update(overrides, beta):
    rows, completions = grouped_batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0], dtype=torch.float64)
    # groups 2 and 4 are constant, and 0.5 is its group's mean: 7 advantages are exactly 0
    advantages = group_advantages(rewards, 3).float()
    assert (advantages == 0).sum() == 7
    plain, plain_stats = run_update({**overrides, **PLAIN}, advantages, rows, completions, beta)
    fast, fast_stats = run_update(overrides, advantages, rows, completions, beta)
    assert plain.abs().max() > 1e-4
    assert torch.allclose(fast, plain, atol=1e-6), (fast - plain).abs().max()
    assert fast_stats["loss"] == pytest.approx(plain_stats["loss"], abs=1e-6)
    skipping = not (beta and not overrides.get("kl_in_reward"))
    assert fast_stats["update_sample_share"] == pytest.approx(5 / 12 if skipping else 1.0)


def test_a_step_with_only_zero_advantages_still_moves_adam_moments_like_the_plain_update():
    rows, completions = grouped_batch()
    first = torch.randn(len(rows), generator=torch.Generator().manual_seed(4))
    steps = [first, torch.zeros(len(rows))]  # the second step has no signal, but Adam's momentum still moves
    plain, _ = run_update(PLAIN, steps, rows, completions, adam=True)
    one_step, _ = run_update(PLAIN, steps[:1], rows, completions, adam=True)
    skipping, stats = run_update({**PLAIN, "skip_zero_advantage": True}, steps, rows, completions, adam=True)
    assert stats["update_sample_share"] == 0.0
    assert not torch.equal(plain, one_step)  # the zero-signal step did move the weights
    assert torch.equal(skipping, plain)  # exactly as far as running every sample for a zero gradient


def test_constant_groups_get_exactly_zero_advantage_in_any_dtype():
    for value in (0.1, 0.3, 0.7, 1 / 3):
        for dtype in (torch.float32, torch.float64):
            rewards = torch.tensor([value] * 4 + [1.0, 0.0, 0.0, 0.0], dtype=dtype)
            for advantages in (group_advantages(rewards, 4), group_advantages(rewards, 4, "batch"),
                               rloo_advantages(rewards, 4)):
                assert (advantages[:4] == 0).all(), (value, dtype)
                assert (advantages[4:] != 0).all()


@pytest.mark.parametrize("max_rows, max_tokens", [(3, 0), (128, 12), (2, 20), (128, 1)])
def test_micro_batches_respect_row_and_token_budgets_and_cover_every_sample(max_rows, max_tokens):
    lengths = [5, 1, 9, 3, 7, 2, 2, 8, 4]
    batches = micro_batches(lengths, max_rows, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # sorted by length: neighbours share a batch
    for b in batches:
        assert len(b) <= max_rows
        if max_tokens and len(b) > 1:
            assert len(b) * max(lengths[i] for i in b) <= max_tokens
    assert micro_batches([5, 1, 9, 3], 3, 12) == [[1, 3], [0], [2]]


def test_pack_micro_batches_returns_sample_rows_of_the_subset():
    rows, completions = grouped_batch()
    subset = [1, 4, 7, 10]
    shared = SharedPrompts.from_rows(rows, subset)
    packed = pack_micro_batches(rows, completions, 2, 0, shared, CPU, subset)
    assert sorted(i for chosen, _ in packed for i in chosen) == subset
    for chosen, batch in packed:
        assert batch["completion_mask"].sum(-1).tolist() == [len(completions[i]) for i in chosen]


def test_out_of_memory_in_the_update_halves_the_budgets_and_retries_to_the_same_result(monkeypatch):
    from e2h_min.rl.samples import StepSamples

    rows, completions = grouped_batch()
    samples = StepSamples(3, [None] * len(rows), rows, completions, [[0.0] * len(c) for c in completions],
                          [""] * len(rows), np.zeros(len(rows)), np.ones(len(rows), dtype=bool))
    advantages = torch.randn(len(rows), generator=torch.Generator().manual_seed(7))

    def run(fail_first: bool):
        policy = random_model()
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        cfg = Config(micro_batch_size=8, micro_batch_tokens=40, beta=0.0, max_new_tokens=8, max_grad_norm=0.0,
                     num_generations=3)
        real_update, calls, logged = train.policy_update, [], []

        def flaky_update(*args, **kwargs):
            calls.append((kwargs["limits"].rows, kwargs["limits"].tokens))
            if fail_first and len(calls) == 1:
                raise torch.OutOfMemoryError("simulated")
            return real_update(*args, **kwargs)

        monkeypatch.setattr(train, "policy_update", flaky_update)
        before = [p.detach().clone() for p in policy.parameters()]
        limits = MicroBatchLimits(cfg.micro_batch_size, cfg.micro_batch_tokens)
        algorithm = train.choose_algorithm(cfg, Models(policy, policy, None, None), optimizer,
                                           Compute(CPU, DistInfo(), NO_AUTOCAST))
        _, limits = train.update_with_oom_retry(functools.partial(algorithm.update, samples, advantages), limits,
                                                optimizer, algorithm.may_retry, logged.append)
        assert (cfg.micro_batch_size, cfg.micro_batch_tokens) == (8, 40)  # the config is never changed
        calls.append(("after", limits.rows, limits.tokens))
        delta = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, policy.parameters())])
        return delta, calls, logged

    retried, calls, logged = run(fail_first=True)
    assert calls == [(8, 40), (4, 20), ("after", 4, 20)]  # the halved limits are kept for the rest of the run
    assert logged and "--micro-batch-size 4 --micro-batch-tokens 20" in logged[0]
    direct, _, _ = run(fail_first=False)
    assert torch.allclose(retried, direct, atol=1e-6)
