"""Plant realistic bugs in a copy of the repository, one at a time, and check that the tests catch each one.

    python scripts/mutation_check.py                 # every mutant, 2 at a time; prints a caught / survived table
    python scripts/mutation_check.py --jobs 1        # one at a time (a loaded machine)
    python scripts/mutation_check.py --only kl,eos   # the mutants whose id contains any of these words
    python scripts/mutation_check.py --list          # the mutants and the tests each one runs, nothing else

Not part of CI (it runs pytest once per mutant). Use it after changing the math: a mutant that survives is a bug
class no test would notice.

How it works:
- Each mutant is (id, file, exact original snippet, replacement, description, tests). Every snippet must occur
  exactly once in its file; if one is missing or ambiguous (the code changed), the script stops before running
  anything and lists each mutant to re-anchor (exit code 2).
- Each mutant is applied to its own temporary copy of the repository (the files git tracks plus untracked,
  non-ignored ones, read from the working tree as it is now); the working tree is never written.
- In that copy, `python -m pytest -x -q <tests>` runs only the tests that matter for the mutant (chosen by hand
  below: the module's own tests plus the end-to-end invariants that pin its effect), and stops at the first
  failure. Exit code 1 (a test failed) is "caught", 0 is "survived"; anything else (a collection error, no test
  selected, a timeout) is reported as "error" so a broken mutant is never counted as caught.
- First, unless --no-baseline, the union of the selected test files runs once on an unmutated copy: a mutant
  caught by a test that fails anyway would prove nothing.
Exit code: 0 when every mutant was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Test selections: files, optionally narrowed with -k (pytest syntax).
INVARIANTS = ["tests/test_invariants.py"]
LOOP = ["tests/test_loop_invariants.py"]
LOSSES = ["tests/test_losses.py"]
ROLLOUT = ["tests/test_rollout.py"]


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]


def m(id, file, original, replacement, description, tests) -> Mutant:
    return Mutant(id, file, original, replacement, description, tuple(tests))


MUTANTS = [
    # ------------------------------------------------------------------ train.py: the update's wiring
    m("train-eos-out-of-loss", "e2h_min/engine/batching.py",
      "mask[i, :len(c)] = True", "mask[i, :len(c) - 1] = True",
      "the last completion token (EOS / stop) gets no loss weight in the update", INVARIANTS),
    m("train-temperature-update", "e2h_min/engine/batching.py",
      "return completion_logprobs(owner.policy, self.batch, owner.temperature, return_hidden=return_hidden,",
      "return completion_logprobs(owner.policy, self.batch, 1.0, return_hidden=return_hidden,",
      "training log-probs at T=1 while sampling at T", INVARIANTS),
    m("train-reference-temperature", "e2h_min/engine/batching.py",
      "self._reference_logprobs[b], _ = completion_logprobs(self.reference.model, batch, self.temperature,",
      "self._reference_logprobs[b], _ = completion_logprobs(self.reference.model, batch, 1.0,",
      "the reference's log-probs (in-loss KL) at T=1 while the policy's are at the sampling T", INVARIANTS),
    m("train-kl-loss-sign", "e2h_min/rl/losses.py",
      "loss = loss + beta * kl", "loss = loss - beta * kl",
      "KL penalty subtracted from the loss (pushes away from the reference)", INVARIANTS),
    m("train-kl-reward-sign-grpo", "e2h_min/rl/advantages.py",
      "return advantages - beta * rloo_advantages(", "return advantages + beta * rloo_advantages(",
      "--kl-in-reward (GRPO path): KL added to the reward", LOOP + ["-k", "kl_in_the_reward"]),
    m("train-kl-reward-args-swapped", "e2h_min/rl/kl_reward.py",
      "out[rows] = sequence_kl(logp, ref, batch[\"completion_mask\"], kl_estimator_for(cfg))",
      "out[rows] = sequence_kl(ref, logp, batch[\"completion_mask\"], kl_estimator_for(cfg))",
      "--kl-in-reward (GRPO path): KL(pi_ref || pi) estimator instead of KL(pi || pi_ref)",
      LOOP + ["-k", "kl_in_the_reward"]),
    m("train-kl-reward-sign-ppo", "e2h_min/rl/ppo.py",
      "token_rewards[mb.rows, :logp.shape[1]] -= cfg.beta * kl", "token_rewards[mb.rows, :logp.shape[1]] += cfg.beta * kl",
      "--kl-in-reward (PPO per-token path): KL added to each token's reward", INVARIANTS + ["-k", "ppo"]),
    m("train-ppo-reward-position", "e2h_min/rl/ppo.py",
      "token_rewards[torch.arange(n, device=device), lengths - 1] += rewards.to(device)",
      "token_rewards[torch.arange(n, device=device), lengths - 2] += rewards.to(device)",
      "PPO: the verifier reward placed one token before the last", INVARIANTS + ["-k", "ppo"]),
    m("train-ppo-no-whiten", "e2h_min/rl/ppo.py",
      "token_advantages = whiten(gae, valid, reduce=reduce)", "token_advantages = gae",
      "PPO: GAE advantages not whitened", INVARIANTS + ["-k", "ppo"]),
    m("train-sec-mean-not-abs", "train.py",
      "float(group_adv[torch.from_numpy(step_levels == k)].abs().mean())",
      "float(group_adv[torch.from_numpy(step_levels == k)].mean())",
      "sec schedule fed the mean advantage (~0) instead of the mean |advantage|", LOOP + ["-k", "sec"]),
    m("train-drop-zero-std-index", "train.py",
      "np.isin(np.arange(len(samples.rewards)) // cfg.num_generations, samples.informative_groups())",
      "np.isin(np.arange(len(samples.rewards)) % cfg.num_generations, samples.informative_groups())",
      "--drop-zero-std: a sample's group computed with the wrong index arithmetic", LOOP + ["-k", "filters"]),
    m("train-dynamic-sampling-order", "e2h_min/rl/samples.py",
      "ranked = [s for s, useful in step_groups if useful] + [s for s, useful in step_groups if not useful]",
      "ranked = [s for s, useful in step_groups if not useful] + [s for s, useful in step_groups if useful]",
      "--dynamic-sampling tops up with uninformative groups first", LOOP + ["-k", "filters"]),
    m("train-advantages-misaligned", "train.py",
      "functools.partial(algorithm.update, kept, advantages[trained].float())",
      "functools.partial(algorithm.update, kept, advantages[:len(trained)].float())",
      "the filtered samples get the advantages of the first rows, not their own", LOOP + ["-k", "filters"]),
    m("train-mask-truncated-inverted", "train.py",
      "keep &= samples.finished", "keep &= ~samples.finished",
      "--mask-truncated trains the truncated samples and drops the finished ones", LOOP + ["-k", "mask_truncated"]),
    m("train-approx-kl-old-sign", "e2h_min/rl/diagnostics.py",
      "(torch.exp(-d) + d - 1.0)", "(torch.exp(d) - d - 1.0)",
      "approx_kl_old logged with the wrong sign of the log-ratio", INVARIANTS + ["-k", "diagnostics"]),
    m("train-pi-old-refreshed", "e2h_min/rl/update.py",
      "old = old_logprobs.setdefault(mb.index, logp.detach())", "old = logp.detach()",
      "pi_old recomputed at every iteration (the ratio is always 1, nothing is ever clipped)",
      INVARIANTS + ["-k", "diagnostics or approx_kl_old"]),
    m("train-clip-bounds-swapped", "e2h_min/rl/update.py",
      "logp, old, advantages[mb.rows].to(device), mb.mask, cfg.epsilon, eps_high,",
      "logp, old, advantages[mb.rows].to(device), mb.mask, eps_high, cfg.epsilon,",
      "--epsilon and --epsilon-high passed in the wrong order", INVARIANTS + ["-k", "diagnostics"]),
    m("train-skip-with-kl", "e2h_min/engine/batching.py",
      "skip = skip_zero_advantage and not kl_in_loss", "skip = skip_zero_advantage",
      "zero-advantage samples skipped although their KL term has a gradient", INVARIANTS),
    m("train-logged-kl-per-sample", "e2h_min/run/bookkeeping.py",
      "row[\"kl\"] = sum(kl_sums) / max(1, int(lengths.sum()))", "row[\"kl\"] = sum(kl_sums) / max(1, len(lengths))",
      "--kl-in-reward: logged kl averaged per sample instead of per token", LOOP + ["-k", "kl_in_the_reward"]),
    m("train-sampler-state-not-restored", "e2h_min/run/setup.py",
      "sampler.load_state_dict(state[\"sampler\"])", "pass",
      "the curriculum sampler's state is not restored on resume", ["tests/test_train.py", "-k", "resumes"]),
    # ------------------------------------------------------------------ losses.py
    m("losses-std-biased", "e2h_min/rl/advantages.py",
      "centered = centered / (grouped.std(dim=1, keepdim=True) + eps)",
      "centered = centered / (grouped.std(dim=1, keepdim=True, unbiased=False) + eps)",
      "group std without Bessel's correction", LOSSES),
    m("losses-k3-formula", "e2h_min/rl/losses.py",
      "return torch.exp(d) - d - 1.0", "return torch.exp(-d) + d - 1.0",
      "k3 estimator of KL(pi_ref || pi) instead of KL(pi || pi_ref)", LOSSES),
    m("losses-max-not-min", "e2h_min/rl/losses.py",
      "loss = -torch.minimum(unclipped, clipped)", "loss = -torch.maximum(unclipped, clipped)",
      "clipped surrogate takes the optimistic branch", LOSSES),
    m("losses-clamp-swapped", "e2h_min/rl/losses.py",
      "torch.clamp(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)",
      "torch.clamp(ratio, 1.0 - epsilon_high, 1.0 + epsilon_low)",
      "clip bounds swapped", LOSSES),
    m("losses-grpo-no-length-norm", "e2h_min/rl/losses.py",
      "return mask / (mask.sum(dim=1, keepdim=True).clamp(min=1.0) * max(n_seq, 1))", "return mask / max(n_seq, 1)",
      "grpo loss weights without the per-sequence token mean", LOSSES),
    m("losses-gae-lambda-ignored", "e2h_min/rl/advantages.py",
      "advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]",
      "advantages[:, t] = (delta + gamma * next_advantage) * m[:, t]",
      "GAE without lambda", LOSSES),
    m("losses-rloo-denominator", "e2h_min/rl/advantages.py",
      "others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)",
      "others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / group_size",
      "RLOO baseline divided by G instead of G - 1", LOSSES),
    m("losses-whiten-not-centred", "e2h_min/rl/advantages.py",
      "return (values - mean) * torch.rsqrt(var + eps) * m", "return values * torch.rsqrt(var + eps) * m",
      "whitening scales but does not centre", LOSSES),
    m("losses-gspo-not-length-normalised", "e2h_min/rl/losses.py",
      "per_seq = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)",
      "per_seq = (log_ratio * m).sum(-1, keepdim=True)",
      "sequence-level importance ratio without the length normalisation", LOSSES),
    # ------------------------------------------------------------------ logprobs.py
    m("logprobs-no-temperature", "e2h_min/engine/logprobs.py",
      "logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature",
      "logits = torch.nn.functional.linear(hidden, weight, bias).float()",
      "training log-probs ignore the temperature", ["tests/test_train.py", "-k", "logprobs"]),
    m("logprobs-logit-index-off-by-one", "e2h_min/engine/logprobs.py",
      "logit_index[r, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))",
      "logit_index[r, :len(c)] = torch.arange(len(p), len(p) + len(c))",
      "each completion token scored by the logits of its own position (off by one)",
      ["tests/test_train.py", "-k", "logprobs"]),
    m("logprobs-suffix-positions", "e2h_min/engine/logprobs.py",
      "positions[r, :] = torch.arange(p_len - 1, p_len - 1 + t_max)",
      "positions[r, :] = torch.arange(p_len, p_len + t_max)",
      "shared-prompt layout: RoPE positions of the suffix shifted by one", ["tests/test_shared_prompts.py"]),
    m("logprobs-token-budget", "e2h_min/engine/logprobs.py",
      "(len(current) + 1) * lengths[i] > max_tokens", "len(current) * lengths[i] > max_tokens",
      "micro-batch token budget checked without the row being added", ["tests/test_shared_prompts.py"]),
    # ------------------------------------------------------------------ rollout.py and decoders.py
    m("rollout-temperature-ignored", "e2h_min/engine/sampler.py",
      "scaled = logits / temperature if temperature != 1.0 else logits", "scaled = logits",
      "sampling ignores the temperature", ROLLOUT),
    m("rollout-eos-dropped", "e2h_min/engine/sampler.py",
      "end = torch.where(hit_eos, step + 1, end)", "end = torch.where(hit_eos, step, end)",
      "the EOS that ended a row is cut from its completion", ROLLOUT),
    m("rollout-top-p-drops-crossing-token", "e2h_min/engine/sampler.py",
      "drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p",
      "drop_sorted = sorted_probs.cumsum(-1) >= top_p",
      "top-p drops the token whose mass crosses p (the nucleus can be empty)", ROLLOUT),
    m("rollout-compaction-order", "e2h_min/engine/sampler.py",
      "keep[holes] = alive[k:].nonzero().flatten() + k", "keep[holes] = alive[k:].nonzero().flatten()",
      "compaction fills holes with the wrong rows", ROLLOUT),
    m("decoders-prefill-positions", "e2h_min/engine/decoders.py",
      "return (attention.cumsum(-1) - 1).clamp(min=0)", "return attention.cumsum(-1).clamp(min=0)",
      "left-padded prompts start at RoPE position 1", ROLLOUT),
    m("decoders-rope-sign", "e2h_min/engine/decoders.py",
      "key = key * cos + rotate_half(key) * sin", "key = key * cos - rotate_half(key) * sin",
      "lean decoder rotates keys the wrong way", ROLLOUT),
    # ------------------------------------------------------------------ curriculum.py
    m("curriculum-cosine-profile", "e2h_min/rl/curriculum.py",
      "return [(a * (num_levels - k) + (1 - a) * (k + 1)) / s for k in range(num_levels)]",
      "return [(a * (num_levels - k) + (1 - a) * k) / s for k in range(num_levels)]",
      "E2H-C rising profile off by one (not a distribution)", ["tests/test_curriculum.py"]),
    m("curriculum-gaussian-floor", "e2h_min/rl/curriculum.py",
      "p_min = 2.0 / (num_levels * (num_levels + 1)) if min_prob is None else min_prob",
      "p_min = 1.0 / (num_levels * (num_levels + 1)) if min_prob is None else min_prob",
      "E2H-G default floor halved", ["tests/test_curriculum.py"]),
    m("curriculum-sec-temperature", "e2h_min/rl/curriculum.py",
      "weights = [math.exp((v - top) / temperature) for v in values]",
      "weights = [math.exp((v - top) * temperature) for v in values]",
      "sec softmax multiplies by the temperature", ["tests/test_curriculum.py"]),
    m("curriculum-empty-levels", "e2h_min/rl/curriculum.py",
      "p = [0.0 if n == 0 else pk for pk, n in zip(p, self.rows)]", "p = list(p)",
      "levels without problems keep their probability", ["tests/test_curriculum.py"]),
    # ------------------------------------------------------------------ rewards and graders
    m("rewards-numbers-not-all-used", "e2h_min/tasks/countdown.py",
      "if sorted(literals) != sorted(numbers) or", "if not set(literals) <= set(numbers) or",
      "Countdown accepts an answer that skips or reuses numbers", ["tests/test_rewards.py"]),
    m("rewards-duplicate-tags", "e2h_min/tasks/rewards.py",
      "if any(text.count(tag) != 1 for tag in", "if any(text.count(tag) < 1 for tag in",
      "format check accepts repeated tags", ["tests/test_rewards.py"]),
    m("rewards-empty-think", "e2h_min/tasks/rewards.py",
      "if not think.strip() or between.strip() or not answer.strip():", "if not answer.strip():",
      "format check accepts an empty think and text between the blocks", ["tests/test_rewards.py"]),
    m("rewards-division-by-zero", "e2h_min/tasks/countdown.py",
      "if op == \"/\" and right == 0:", "if False:",
      "the arithmetic grader crashes on division by zero", ["tests/test_rewards.py"]),
    m("grader-math-first-box", "e2h_min/tasks/math_grader.py",
      "start, command = max((text.rfind(c), c) for c in (\"\\\\boxed\", \"\\\\fbox\"))",
      "start, command = max((text.find(c), c) for c in (\"\\\\boxed\", \"\\\\fbox\"))",
      "MATH grader reads the first box instead of the last", ["tests/test_math_tasks.py"]),
    m("grader-aqua-any-letter", "e2h_min/tasks/math_tasks.py",
      "return letter if letter in letters else None", "return letter",
      "AQuA accepts a letter that is not an option", ["tests/test_math_tasks.py"]),
    m("grader-blocksworld-goal-mode", "e2h_min/tasks/blocksworld.py",
      "success = reached == final if reward_mode == \"exact\" else satisfies(reached, goal)",
      "success = satisfies(reached, goal)",
      "Blocksworld exact mode accepts any state that satisfies the goal", ["tests/test_blocksworld.py"]),
    # ------------------------------------------------------------------ pass@k and checkpoints
    m("passk-boundary", "e2h_min/analysis/passk.py",
      "if n - c < k:", "if n - c <= k:",
      "pass@k is 1 one correct sample too early", ["tests/test_eval.py", "-k", "pass_at_k and not tiny"]),
    m("passk-product-range", "e2h_min/analysis/passk.py",
      "range(n - c + 1, n + 1)", "range(n - c, n + 1)",
      "pass@k product over one factor too many", ["tests/test_eval.py", "-k", "pass_at_k and not tiny"]),
    m("checkpoint-sampling-rng", "e2h_min/run/checkpoint.py",
      "\"sampling\": generator.get_state() if generator is not None else None,", "\"sampling\": None,",
      "the rollout generator's state is not checkpointed", ["tests/test_checkpoint.py"]),
    m("checkpoint-keeps-oldest", "e2h_min/run/checkpoint.py",
      "for old in list_checkpoints(run_dir)[:-keep]:", "for old in list_checkpoints(run_dir)[keep:]:",
      "keep=N deletes the newest checkpoints instead of the oldest", ["tests/test_checkpoint.py"]),
    # ------------------------------------------------------------------ issue 25: five bug classes no test noticed
    m("grader-blocksworld-stack-onto-covered", "e2h_min/tasks/blocksworld_strips.py",
      "legal = positions[block] == HAND and is_clear(positions, target)", "legal = positions[block] == HAND",
      "Blocksworld plan checker allows a stack onto a block that is not clear", ["tests/test_blocksworld.py"]),
    m("grader-math-undefined-equal", "e2h_min/tasks/math_grader.py",
      "return True in verdicts", "return False not in verdicts",
      "MATH grader counts two expressions undefined at every test point (1/0, 2/0) as equal",
      ["tests/test_math_tasks.py"]),
    m("grader-math-mixed-number-product", "e2h_min/tasks/math_grader.py",
      "return _MIXED_NUMBER.sub(_mixed_number, s)", "return s",
      "MATH grader reads the mixed number 137\\frac{1}{2} as a product (68.5 scores)", ["tests/test_math_tasks.py"]),
    m("grader-math-words-as-products", "e2h_min/tasks/math_grader.py",
      "    if _is_word(a) and _is_word(b):\n        return False", "    if False:\n        return False",
      "MATH grader compares words as products of letters (\\text{on} equals \\text{no})",
      ["tests/test_math_tasks.py"]),
    m("grader-math-root-in-exponent", "e2h_min/tasks/math_grader.py",
      "if _raises_to_a_power(exponent) or", "if _contains(exponent, _is(\"pow\")) or",
      "MATH grader refuses only powers in an exponent, not roots with an index (2^{\\sqrt[10^{-10}]{10}})",
      ["tests/test_math_tasks.py", "-k", "parser"]),
    m("grader-math-root-index-tower", "e2h_min/tasks/math_grader.py",
      "if _raises_to_a_power(index):", "if False:",
      "MATH grader lets a root's index hold an indexed root (\\sqrt[1/\\sqrt[10^{-10}]{10}]{2}: a tower)",
      ["tests/test_math_tasks.py", "-k", "parser"]),
    m("grader-math-rounded-exponent", "e2h_min/tasks/math_grader.py",
      "exact.denominator.bit_length()) > ctx.prec - 8:", "exact.denominator.bit_length()) > 10**9:",
      "MATH grader rounds a long rational exponent to 40 digits ((-1)^{1/N^2} equals 1)", ["tests/test_math_tasks.py"]),
    m("update-fsdp-filler-gradient", "e2h_min/engine/batching.py",
      "(completion_logprobs(self.policy, batch, self.temperature)[0].sum() * 0.0).backward()",
      "completion_logprobs(self.policy, batch, self.temperature)[0].sum().backward()",
      "an FSDP filler micro-batch contributes gradient", INVARIANTS),
    m("ppo-gae-gamma-lambda-swapped", "e2h_min/rl/ppo.py",
      "gae_advantages(token_rewards, old_values, valid, cfg.gamma, cfg.lam)",
      "gae_advantages(token_rewards, old_values, valid, cfg.lam, cfg.gamma)",
      "PPO's GAE called with gamma and lambda swapped", INVARIANTS),
    m("curriculum-sec-sampling-temperature", "e2h_min/run/config.py",
      "return {\"temperature\": cfg.sec_temperature, \"ema\": cfg.sec_ema}",
      "return {\"temperature\": cfg.temperature, \"ema\": cfg.sec_ema}",
      "the sec schedule's softmax takes the sampling temperature instead of --sec-temperature", LOOP),
    # ------------------------------------------------------------------ the adversarial review of 2026-12-02
    m("rewards-countdown-tolerance", "e2h_min/tasks/countdown.py",
      "or value != target:", "or abs(value - target) >= Fraction(1, 10**5):",
      "Countdown accepts a value within the paper's float tolerance of the target (40/(47*48*81*88) for 0)",
      ["tests/test_rewards.py"]),
    m("ppo-pi-old-other-dropout", "e2h_min/rl/ppo.py",
      "old = old_logprobs.setdefault(mb.index, logp.detach())",
      "old = old_logprobs.setdefault(mb.index, mb.logprobs()[0].detach())",
      "PPO's pi_old from another pass (other dropout masks): the ratio of a fresh rollout is not 1",
      INVARIANTS + ["-k", "fresh_rollout"]),
    m("ppo-vf-coef-ignored", "e2h_min/rl/ppo.py",
      "loss_tok = loss_tok + cfg.vf_coef * value_loss", "loss_tok = loss_tok + value_loss",
      "PPO's value loss enters the loss without --vf-coef", INVARIANTS + ["-k", "critic"]),
    m("grader-math-text-words-as-algebra", "e2h_min/tasks/math_grader.py",
      "if any(_TEXT_ANSWER.fullmatch(_strip_markup(a.strip())) for a in (prediction, gold)):",
      "if False:",
      "MATH grader compares a \\text{} word with algebra (od^2 equals \\text{odd})", ["tests/test_math_tasks.py"]),
    m("grader-math-spaced-list-as-thousands", "e2h_min/tasks/math_grader.py",
      "s = _drop_spaces(s).rstrip(\".\")",
      "s = _drop_spaces(s).rstrip(\".\")\n    s = re.sub(r\"^(\\d{1,3}),(\\d{3})$\", r\"\\1\\2\", s)",
      "MATH grader reads the list \"1, 100\" as the number 1100", ["tests/test_math_tasks.py"]),
    m("grader-math-phase-lost", "e2h_min/tasks/math_grader.py",
      "abs(exponent) >= ctx.mpf(2) ** (ctx.prec - 8):", "abs(exponent) >= ctx.mpf(2) ** 10**6:",
      "MATH grader rounds a huge irrational exponent of -1 ((-1)^{sqrt2 N N} equals 1)", ["tests/test_math_tasks.py"]),
    m("grader-math-branches-as-mismatch", "e2h_min/tasks/math_grader.py",
      "if verdict is False and names and (ctx.im(value_a) != 0 or ctx.im(value_b) != 0):", "if False:",
      "MATH grader rejects \\sqrt{8x^3} = 2x\\sqrt{2x} for the other branch at a negative test point",
      ["tests/test_math_tasks.py"]),
]


def check_anchors(mutants: list[Mutant]) -> list[str]:
    """Each mutant whose original snippet is not found exactly once in its file, with why."""
    problems = []
    for mutant in mutants:
        path = REPO / mutant.file
        if not path.exists():
            problems.append(f"{mutant.id}: {mutant.file} does not exist")
            continue
        count = path.read_text().count(mutant.original)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{mutant.id}: snippet {where} in {mutant.file}: {mutant.original!r}")
    return problems


def repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore, as they are in the working tree now."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (REPO / f).is_file()]


def make_copy(files: list[str], mutant: Mutant | None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="e2h-mutant-"))
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, root / f)
    if mutant is not None:
        path = root / mutant.file
        path.write_text(path.read_text().replace(mutant.original, mutant.replacement, 1))
    return root


def run_pytest(root: Path, tests: tuple[str, ...] | list[str], timeout: float) -> tuple[int | None, str, float]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        code, output = None, f"timed out after {timeout:.0f} s"
    return code, output, time.perf_counter() - started


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("FAILED") or line.startswith("ERROR"):
            return line.split(" - ")[0].removeprefix("FAILED ").removeprefix("ERROR ")[:90]
    return output.strip().splitlines()[-1][:90] if output.strip() else ""


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO))
    from e2h_min.errors import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    parser.add_argument("--only", default="", help="comma-separated words: run the mutants whose id contains one")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)

    words = [w for w in args.only.split(",") if w]
    mutants = [mu for mu in MUTANTS if not words or any(w in mu.id for w in words)]
    if not mutants:
        print(f"error: --only {args.only!r} matches no mutant id; see --list", file=sys.stderr)
        return 2
    problems = check_anchors(mutants)
    if problems:
        print("error: these mutants no longer match the code; re-anchor them in scripts/mutation_check.py:",
              file=sys.stderr)
        for problem in problems:
            print("  " + problem, file=sys.stderr)
        return 2
    if args.list:
        for mu in mutants:
            print(f"{mu.id:36s} {mu.file:28s} {' '.join(mu.tests)}\n{'':36s} {mu.description}")
        return 0

    started = time.perf_counter()
    files = repo_files()
    if not args.no_baseline:
        test_files = sorted({t for mu in mutants for t in mu.tests if t.startswith("tests/")})
        root = make_copy(files, None)
        code, output, seconds = run_pytest(root, test_files, args.timeout)
        shutil.rmtree(root, ignore_errors=True)
        print(f"baseline: {' '.join(test_files)} -> {'pass' if code == 0 else 'FAIL'} ({seconds:.0f} s)")
        if code != 0:
            print(output[-3000:], file=sys.stderr)
            print("error: the tests fail without any mutation; fix that first", file=sys.stderr)
            return 2

    def one(mutant: Mutant):
        root = make_copy(files, mutant)
        try:
            return mutant, *run_pytest(root, mutant.tests, args.timeout)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    results = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for mutant, code, output, seconds in pool.map(one, mutants):
            status = {1: "caught", 0: "SURVIVED"}.get(code, "ERROR")
            detail = first_failure(output) if code != 0 else ""
            results.append((mutant, status, seconds, detail))
            print(f"{status:8s} {seconds:5.0f} s  {mutant.id:36s} {detail}", flush=True)

    print()
    print(f"{'mutant':36s} {'file':28s} {'result':8s} {'seconds':>7s}  bug planted")
    for mutant, status, seconds, _ in results:
        print(f"{mutant.id:36s} {mutant.file:28s} {status:8s} {seconds:7.0f}  {mutant.description}")
    caught = sum(status == "caught" for _, status, _, _ in results)
    print(f"\n{caught} of {len(results)} mutants caught, "
          f"{sum(s == 'SURVIVED' for _, s, _, _ in results)} survived, "
          f"{sum(s == 'ERROR' for _, s, _, _ in results)} errors; wall time {time.perf_counter() - started:.0f} s "
          f"with --jobs {args.jobs}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
