"""What each KL option optimises, pinned exactly, and the trainer's KL wiring.

The expected gradients come from e2h_min/analysis/kl_gradients.py, which enumerates a categorical policy (V = 50) through
the trainer's own loss functions (losses.policy_token_loss, sequence_kl, compute_advantages,
kl_penalised_advantages); the targets are autograd gradients of the exact KL sums.
"""

import itertools

import pytest
import torch

import train
from e2h_min.rl import kl_reward
from e2h_min.run.config import combination_warnings
from e2h_min.run.presets import parse_config
from e2h_min.analysis.kl_gradients import (OPTIONS, categorical_setup, compare, expected_gradient, kl_table,
                                  target_gradient)
from e2h_min.rl.advantages import compute_advantages, kl_penalised_advantages, rloo_advantages
from e2h_min.rl.losses import policy_token_loss, sequence_kl
from e2h_min.engine.models import TINY_MODEL_DIR
from tests.test_train import random_model, run_update, sample_batch

requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="tiny model not built (python scripts/make_tiny_model.py)")

SETUPS = [(kl, seed) for kl in (0.001, 0.03, 0.3) for seed in (0, 1)]


def relative_error(gradient, target):
    return float((gradient - target).norm() / target.norm())


@pytest.fixture(scope="module", params=SETUPS, ids=[f"kl{kl}-seed{seed}" for kl, seed in SETUPS])
def setup(request):
    kl, seed = request.param
    theta, ref_logp, rewards = categorical_setup(50, kl, seed)
    forward = target_gradient(theta, ref_logp)                # grad KL(pi||ref)
    reverse = target_gradient(theta, ref_logp, reverse=True)  # grad KL(ref||pi)
    return theta, ref_logp, rewards, forward, reverse


def test_setup_has_the_requested_kl_and_both_kinds_of_groups(setup):
    theta, ref_logp, rewards, forward, reverse = setup
    assert 0 < rewards.sum() < len(rewards)  # constant and informative pairs both occur
    assert relative_error(reverse, forward) > 1e-4  # the two targets differ, so the pins below discriminate


@pytest.mark.parametrize("placement, estimator, bias_correction", [
    ("reward", "k1", False),  # InstructGPT; the default with --kl-in-reward
    ("loss", "k2", False),
    ("loss", "k1", True),
    ("loss", "k3", True),     # TRL's use_bias_correction_kl
])
def test_options_whose_expected_gradient_is_grad_kl_pi_ref(setup, placement, estimator, bias_correction):
    theta, ref_logp, rewards, forward, _ = setup
    gradient = expected_gradient(theta, ref_logp, placement, estimator, bias_correction, rewards)
    assert relative_error(gradient, forward) < 1e-6


def test_k3_in_the_loss_is_grad_kl_ref_pi(setup):
    theta, ref_logp, rewards, _, reverse = setup
    assert relative_error(expected_gradient(theta, ref_logp, "loss", "k3"), reverse) < 1e-6


def test_k1_in_the_loss_has_zero_expected_gradient(setup):
    theta, ref_logp, rewards, forward, _ = setup
    assert float(expected_gradient(theta, ref_logp, "loss", "k1").norm()) < 1e-9 * float(forward.norm())


def test_k3_in_the_reward_is_the_difference_of_the_two(setup):
    theta, ref_logp, rewards, forward, reverse = setup
    gradient = expected_gradient(theta, ref_logp, "reward", "k3", rewards=rewards)
    assert relative_error(gradient, forward - reverse) < 1e-6


def test_reward_placement_does_not_depend_on_the_verifier_rewards_or_beta(setup):
    """The KL penalty comes after the normalisation: the verifier rewards and beta do not rescale its push."""
    theta, ref_logp, rewards, forward, _ = setup
    for r, beta in ((torch.zeros_like(rewards), 1.0), (rewards, 0.01), (1 - rewards, 0.3)):
        gradient = expected_gradient(theta, ref_logp, "reward", "k1", rewards=r, beta=beta)
        assert relative_error(gradient, forward) < 1e-6


def test_compare_gives_ratio_and_cosine():
    t = torch.tensor([1.0, 0.0])
    assert compare(torch.tensor([2.0, 0.0]), t) == (2.0, 1.0)
    assert compare(torch.tensor([1.0, 1.0]), t) == pytest.approx((1.0, 2 ** -0.5))
    ratio, cos = compare(torch.zeros(2), t)
    assert ratio == 0.0 and cos != cos  # no direction


def test_kl_table_has_one_row_per_option_with_the_pinned_values():
    table = kl_table(kls=(0.03,)).splitlines()
    assert len(table) == 2 + len(OPTIONS)
    rows = {line.split("`")[1]: [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert rows["--kl-in-reward --kl-estimator k1"][:2] == ["1.000", "1.000"]
    assert rows["--kl-estimator k3"][2:] == ["1.000", "1.000"]
    assert rows["--kl-estimator k1"] == ["0", "-", "0", "-"]


# ----------------------------------------------------------------------------- defaults and warnings
@pytest.mark.parametrize("argv, estimator", [
    ([], "k3"),
    (["--kl-in-reward"], "k1"),
    (["--kl-in-reward", "--advantage", "ppo"], "k1"),
    (["--kl-in-reward", "--kl-estimator", "k3"], "k3"),  # an explicit choice is kept
    (["--kl-estimator", "k2"], "k2"),
])
def test_kl_estimator_default_follows_its_placement(argv, estimator):
    assert parse_config(["--beta", "0.05"] + argv).kl_estimator == estimator


@pytest.mark.parametrize("argv, fragment", [
    (["--kl-estimator", "k1"], "zero expected gradient"),
    (["--kl-in-reward", "--kl-estimator", "k3"], "does not push along grad KL(pi||ref)"),
    (["--kl-in-reward", "--kl-estimator", "k2", "--advantage", "ppo"], "does not push along grad KL(pi||ref)"),
    (["--importance-sampling-level", "sequence", "--loss-type", "dapo"], "long completions dominate"),
    (["--importance-sampling-level", "sequence", "--loss-type", "dr_grpo"], "long completions dominate"),
])
def test_combinations_that_do_not_push_as_named_warn(argv, fragment):
    warnings = combination_warnings(parse_config(["--beta", "0.05"] + argv))
    assert len(warnings) == 1 and fragment in warnings[0]


@pytest.mark.parametrize("argv", [
    [], ["--kl-in-reward"], ["--kl-estimator", "k2"], ["--kl-estimator", "k1", "--use-bias-correction-kl"],
    ["--kl-estimator", "k1", "--beta", "0"], ["--importance-sampling-level", "sequence"],
])
def test_combinations_that_push_as_named_do_not_warn(argv):
    assert combination_warnings(parse_config(["--beta", "0.05"] + argv)) == []


def test_bias_correction_with_kl_in_reward_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--beta", "0.05", "--kl-in-reward", "--use-bias-correction-kl"])
    assert exc.value.code == 2 and "--use-bias-correction-kl" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the trainer's wiring
def test_update_uses_the_chosen_estimator_and_bias_correction():
    k3, _ = run_update(8, "grpo")
    assert not torch.allclose(run_update(8, "grpo", kl_estimator="k1")[0], k3, atol=1e-6)
    corrected, _ = run_update(8, "grpo", use_bias_correction_kl=True)  # same values, other gradient
    assert not torch.allclose(corrected, k3, atol=1e-6)


def test_ppo_reward_penalty_uses_the_estimator_k1_by_default():
    ppo = {"advantage": "ppo", "kl_in_reward": True}
    default, _ = run_update(8, "grpo", **ppo)
    assert torch.equal(default, run_update(8, "grpo", kl_estimator="k1", **ppo)[0])
    assert not torch.allclose(default, run_update(8, "grpo", kl_estimator="k3", **ppo)[0], atol=1e-6)


@requires_tiny
def test_training_step_subtracts_the_kl_after_normalising_the_verifier_rewards(tmp_path, monkeypatch):
    """In train.main: the update receives A(verifier rewards) - beta * (KL_i - mean of the group's other KLs)."""
    seen = {}
    real_kl, real_update = kl_reward.reference_sequence_kl, train.update_with_oom_retry

    def record_kl(*args):
        seen["kl"] = real_kl(*args)
        return seen["kl"]

    def record_update(run_update, *rest):  # run_update: the step's update, partial(update, kept, advantages)
        kept, advantages = run_update.args
        seen["rewards"], seen["advantages"] = kept.rewards, advantages
        return real_update(run_update, *rest)

    monkeypatch.setattr(kl_reward, "reference_sequence_kl", record_kl)
    monkeypatch.setattr(train, "update_with_oom_retry", record_update)
    # step 2 samples from a policy that step 1 moved away from the reference (a large lr makes the KL visible)
    train.main(["--total-steps", "2", "--lr", "0.01", "--prompts-per-step", "2", "--num-generations", "4",
                "--max-new-tokens", "16",
                "--eval-problems", "1", "--eval-every", "0", "--save-every", "0", "--log-completions-every", "0",
                "--threads", "1", "--beta", "0.5", "--kl-in-reward", "--out-dir", str(tmp_path)])
    rewards = torch.tensor(seen["rewards"], dtype=torch.float64)
    expected = compute_advantages("grpo", rewards, 4) - 0.5 * rloo_advantages(seen["kl"], 4)
    assert (0.5 * rloo_advantages(seen["kl"], 4)).abs().max() > 1e-3  # the KL term is not negligible
    assert torch.allclose(seen["advantages"], expected.float(), atol=1e-6)



def test_kl_to_reference_script_sums_the_exact_per_position_kl():
    import importlib.util
    spec = importlib.util.spec_from_file_location("kl_to_reference", "scripts/kl_to_reference.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    policy, reference = random_model(seed=0).eval(), random_model(seed=5).eval()
    prompts, completions = sample_batch(n=3)
    assert script.token_kl(policy, policy, prompts, completions, 0.7, 0) == (0.0, sum(map(len, completions)))
    total, tokens = script.token_kl(policy, reference, prompts, completions, 0.7, 0)
    expected = 0.0
    with torch.no_grad():
        for p, c in zip(prompts, completions):  # one unpadded sequence at a time, position by position
            ids = torch.tensor([p + c])
            logp, ref = (torch.log_softmax(m(input_ids=ids).logits[0] / 0.7, -1) for m in (policy, reference))
            for t in range(len(p) - 1, len(p) - 1 + len(c)):
                expected += float((logp[t].exp() * (logp[t] - ref[t])).sum())
    assert tokens == sum(map(len, completions)) and total == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- two-token completions
def two_token_policy(seed=0, vocab=4):
    """A tabular policy over two-token completions: logits th1 [V] for token 1, th2 [V, V] for token 2 given
    token 1; the reference the same shape. Returns (params, log-prob fn, ref log-prob fn, the V^2 completions)."""
    torch.manual_seed(seed)
    th1 = torch.randn(vocab, dtype=torch.float64, requires_grad=True)
    th2 = torch.randn(vocab, vocab, dtype=torch.float64, requires_grad=True)
    r1, r2 = th1.detach() + torch.randn(vocab, dtype=torch.float64), th2.detach() + torch.randn(vocab, vocab,
                                                                                               dtype=torch.float64)

    def logp(seq, a, b):  # [2] log-probs of the completion's two tokens
        return torch.stack([torch.log_softmax(a, -1)[seq[0]], torch.log_softmax(b[seq[0]], -1)[seq[1]]])

    return [th1, th2], (lambda seq: logp(seq, th1, th2)), (lambda seq: logp(seq, r1, r2)), \
        list(itertools.product(range(vocab), repeat=2))


def flat_grad(value, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def test_over_two_tokens_k1_in_the_reward_is_the_gradient_of_the_completion_s_kl():
    """For whole completions (equal lengths, every token the same loss weight) k1 in the reward is exact: its
    expected gradient is beta * grad KL(pi||ref) of the completion distribution, through the trainer's functions."""
    params, logp, ref, seqs = two_token_policy()
    prob = {s: logp(s).sum().exp() for s in seqs}
    target = flat_grad(sum(prob[s] * (logp(s) - ref(s)).sum() for s in seqs), params)
    expected = 0
    for s, u in itertools.product(seqs, seqs):  # every group of G = 2 completions, weighted by its probability
        x, x_ref = torch.stack([logp(s), logp(u)]), torch.stack([ref(s), ref(u)])
        mask = torch.ones(2, 2, dtype=torch.bool)
        advantages = kl_penalised_advantages(torch.zeros(2, dtype=torch.float64),
                                             sequence_kl(x.detach(), x_ref, mask, "k1"), 1.0, 2)
        loss, _, _ = policy_token_loss(x, x.detach(), advantages, mask, 0.2, 0.2)
        expected = expected + (prob[s] * prob[u]).detach() * loss.sum() / 2  # one weight per token (1 / N)
    torch.testing.assert_close(flat_grad(expected, params), target, rtol=1e-9, atol=1e-12)


def test_over_two_tokens_a_kl_term_in_the_loss_is_per_position_not_the_completion_s():
    """A KL term in the loss gives, at each token, that position's KL gradient with the sampled prefix held fixed
    (k2: grad KL(pi(.|prefix)||ref(.|prefix)) summed over positions); it misses how theta moves the prefixes, so it
    is not the gradient of the completion's KL (docs/algorithms.md says so)."""
    params, logp, ref, seqs = two_token_policy()
    prob = {s: logp(s).sum().exp() for s in seqs}
    expected = 0
    for s in seqs:
        x = logp(s)[None]
        loss, _, _ = policy_token_loss(x, x.detach(), torch.zeros(1, dtype=torch.float64),
                                       torch.ones(1, 2, dtype=torch.bool), 0.2, 0.2, ref_logp=ref(s)[None], beta=1.0,
                                       kl_estimator="k2")
        expected = expected + prob[s].detach() * loss.sum()
    gradient = flat_grad(expected, params)
    th1, th2 = params
    prefix = torch.softmax(th1, -1).detach()  # P(first token), held fixed

    def kl(logits, ref_logits):  # KL(softmax(logits) || softmax(ref_logits)) over the last dimension
        lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        return (lp.exp() * (lp - lr)).sum(-1)

    ref1 = torch.stack([ref((a, 0))[0] for a in range(4)])  # the reference's log-probs of token 1
    ref2 = torch.stack([torch.stack([ref((a, b))[1] for b in range(4)]) for a in range(4)])
    per_position = kl(th1, ref1) + (prefix * kl(th2, ref2)).sum()
    torch.testing.assert_close(gradient, flat_grad(per_position, params), rtol=1e-9, atol=1e-12)
    completion_kl = flat_grad(sum(prob[s] * (logp(s) - ref(s)).sum() for s in seqs), params)
    assert torch.nn.functional.cosine_similarity(gradient, completion_kl, 0) < 0.999

