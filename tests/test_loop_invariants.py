"""What train.py's loop hands on, run for real on the embedded tiny model: which samples reach the update (after
dynamic sampling reorders groups and the filters drop some), with which advantages, what the sec curriculum is
fed, where the KL-in-reward penalty enters, and the logged figures that summarise them.

The loop is observed, not replaced: the update and the sampler are wrapped to record their inputs and then run
as usual; where a test needs chosen rewards, the scorer's rewards are replaced by a script (the rollout, the
texts and everything downstream are real). Expected values are computed here from the recorded samples.
"""

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch

import train
from e2h_min.engine.models import load_tokenizer
from e2h_min.run import setup as run_setup
from e2h_min.engine.models import TINY_MODEL_DIR, frozen_copy
from tests.test_invariants import plain_kl, plain_logprobs

pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                reason="embedded tiny model not built (python scripts/build_tiny_model.py)")

ONE_STEP = ["--total-steps", "1", "--max-new-tokens", "16", "--eval-problems", "1", "--eval-every", "0",
            "--save-every", "0", "--log-completions-every", "0", "--threads", "1", "--beta", "0"]


class Recorder:
    """Wraps the loop's update and scorer; `rewards` (a list of per-call reward lists) replaces scored rewards."""

    def __init__(self, monkeypatch, rewards=None):
        self.updates, self.rollouts, self.sec_signals = [], [], []
        self.script = [list(r) for r in rewards] if rewards is not None else None
        real_update, real_score = train.update_with_oom_retry, train.score_rollout

        def update(run_update, *rest):  # run_update: the step's update, partial(update, kept, advantages)
            kept, advantages = run_update.args
            self.updates.append((copy.deepcopy(kept), advantages.detach().clone()))
            return real_update(run_update, *rest)

        def score(task, problems, tokenizer, rollout, stop_strings=()):
            texts, rewards = real_score(task, problems, tokenizer, rollout, stop_strings)
            if self.script is not None:
                rewards = np.array(self.script.pop(0), dtype=np.float64)
                assert len(rewards) == len(texts), "the reward script does not match the rollout"
            self.rollouts.append((rollout.completion_token_lists(), rollout.finished.tolist(), rewards.tolist()))
            return texts, rewards

        recorder = self

        class RecordingSampler(run_setup.LevelSampler):
            def update(self, level_to_signal):
                recorder.sec_signals.append(dict(level_to_signal))
                return super().update(level_to_signal)

        monkeypatch.setattr(train, "update_with_oom_retry", update)
        monkeypatch.setattr(train, "score_rollout", score)
        monkeypatch.setattr(run_setup, "LevelSampler", RecordingSampler)

    def sampled(self):
        """Every sample drawn in the step (all rounds, in order): completions, finished flags, rewards."""
        return [x for call in self.rollouts for x in zip(*call)]


def run(tmp_path, *flags):
    train.main(ONE_STEP + ["--out-dir", str(tmp_path), *flags])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((tmp_path / "config.json").read_text())


def plain_group_advantages(rewards, group_size, eps=1e-4):
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / group_size
        std = (sum((r - mean) ** 2 for r in group) / (group_size - 1)) ** 0.5
        out += [0.0 if std == 0 else (r - mean) / (std + eps) for r in group]
    return out


# ----------------------------------------------------------------------------- which groups each filter keeps
# G = 2, 4 prompts. First draw: groups 0 and 2 constant, 1 and 3 informative; dynamic sampling then draws 2 groups
# (one informative) and 1 group (constant), and gives up after --max-resample-rounds 2.
FIRST = [0.2, 0.2, 0.0, 1.0, 0.3, 0.3, 1.0, 0.5]
SCRIPT = [FIRST, [0.5, 0.0, 0.4, 0.4], [0.6, 0.6]]


@pytest.mark.parametrize("flags, rounds, kept_groups", [
    (["--drop-zero-std"], 1, [1, 3]),
    (["--dynamic-sampling"], 3, [0, 1, 3, 4]),  # informative 1, 3, 4 first, topped up with 0; in draw order
    (["--dynamic-sampling", "--drop-zero-std"], 3, [1, 3, 4]),
])
def test_filters_keep_exactly_the_informative_groups_with_their_own_advantages(tmp_path, monkeypatch, flags,
                                                                               rounds, kept_groups):
    recorder = Recorder(monkeypatch, rewards=SCRIPT[:rounds])
    (row,), _ = run(tmp_path, "--prompts-per-step", "4", "--num-generations", "2", "--max-resample-rounds", "2",
                    *flags)
    drawn = recorder.sampled()
    assert len(recorder.rollouts) == rounds
    (kept, advantages), = recorder.updates
    expected_rows = [2 * g + j for g in kept_groups for j in range(2)]
    assert kept.completions == [drawn[i][0] for i in expected_rows]
    assert kept.rewards.tolist() == [drawn[i][2] for i in expected_rows]
    assert all(kept.problems[2 * k] is kept.problems[2 * k + 1] for k in range(len(kept_groups)))
    assert advantages.tolist() == pytest.approx(plain_group_advantages(kept.rewards.tolist(), 2), abs=1e-6)
    informative = sum(drawn[2 * g][2] != drawn[2 * g + 1][2] for g in range(len(drawn) // 2))
    assert row["frac_reward_zero_std"] == pytest.approx(1 - informative / (len(drawn) // 2))
    assert row["trained_fraction"] == pytest.approx(len(kept_groups) / 4)  # of the 4 groups of the step
    assert row["resample_rounds"] == rounds - 1
    assert recorder.sec_signals == []  # only --schedule sec feeds the bandit


def test_mask_truncated_trains_exactly_the_finished_samples_and_each_ends_in_eos_or_the_stop(tmp_path, monkeypatch):
    recorder = Recorder(monkeypatch)
    (row,), cfg = run(tmp_path, "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "18",
                      "--mask-truncated", "--no-skip-zero-advantage")
    drawn = recorder.sampled()
    finished = [c for c, done, _ in drawn if done]
    assert 0 < len(finished) < len(drawn)  # both kinds occur in this step
    (kept, _), = recorder.updates
    assert kept.completions == finished
    assert row["trained_fraction"] == pytest.approx(len(finished) / len(drawn))
    tokenizer = load_tokenizer(cfg["model"])
    for completion in kept.completions:  # the token that ended the row (EOS or the stop string's) is kept
        text = tokenizer.decode(completion, skip_special_tokens=False)
        assert completion[-1] == tokenizer.eos_token_id or text.rstrip().endswith(cfg["stop"]), text


def plain_advantages(rewards, group_size, estimator, scale):
    """GRPO / Dr. GRPO / RLOO advantages written out group by group (std: Bessel-corrected, eps 1e-4)."""
    def std(values):
        mean = sum(values) / len(values)
        return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5

    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        mean = sum(group) / group_size
        for r in group:
            if estimator == "rloo":
                out.append(r - (sum(group) - r) / (group_size - 1))
            elif estimator == "dr_grpo" or scale == "none":
                out.append(r - mean)
            else:
                out.append((r - mean) / ((std(group) if scale == "group" else std(rewards)) + 1e-4))
    return out


@pytest.mark.parametrize("estimator, scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                              ("dr_grpo", "group"), ("rloo", "group")])
def test_the_update_receives_the_advantages_of_its_estimator(tmp_path, monkeypatch, estimator, scale):
    rewards = [0.0, 1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0]
    recorder = Recorder(monkeypatch, rewards=[rewards])
    run(tmp_path, "--prompts-per-step", "3", "--num-generations", "4", "--advantage", estimator,
        "--scale-rewards", scale)
    (kept, advantages), = recorder.updates
    assert kept.rewards.tolist() == rewards
    assert advantages.tolist() == pytest.approx(plain_advantages(rewards, 4, estimator, scale), abs=1e-5)


def test_non_finite_gradients_skip_updates_and_stop_the_run_after_max_nonfinite_steps(tmp_path, monkeypatch,
                                                                                      capsys):
    real = train.update_with_oom_retry

    def poisoned(run_update, *rest):  # NaN advantages -> NaN grads
        kept, advantages = run_update.args
        return real(functools.partial(run_update.func, kept, advantages * float("nan")), *rest)

    monkeypatch.setattr(train, "update_with_oom_retry", poisoned)
    with pytest.raises(SystemExit) as exc:
        run(tmp_path, "--prompts-per-step", "2", "--num-generations", "2", "--total-steps", "3",
            "--max-nonfinite-steps", "2")
    assert exc.value.code == 2  # one line, like every other stop the user has to act on
    assert "error: non-finite gradients in 2 updates in a row (step 2)" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_updates"]) for r in rows] == [(1, 1)]


# ----------------------------------------------------------------------------- the adaptive schedule's signal
def test_sec_schedule_is_fed_the_mean_absolute_advantage_of_each_level(tmp_path, monkeypatch):
    g = np.random.default_rng(0)
    script = [g.choice([0.0, 0.5, 1.0], size=16).tolist() for _ in range(2)]
    recorder = Recorder(monkeypatch, rewards=script)
    run(tmp_path, "--prompts-per-step", "4", "--num-generations", "4", "--schedule", "sec", "--total-steps", "2")
    assert len(recorder.sec_signals) == 2
    for signal, (kept, advantages) in zip(recorder.sec_signals, recorder.updates):
        levels = kept.levels
        expected = {int(k): float(advantages[torch.from_numpy(levels == k)].abs().mean()) for k in set(levels)}
        assert signal.keys() == expected.keys()
        assert list(signal.values()) == pytest.approx([expected[k] for k in signal], rel=1e-6)
        assert max(expected.values()) > 0.1  # the case is not degenerate: some level has informative groups


def test_sec_schedule_draws_by_its_own_temperature_not_the_sampling_one(tmp_path, monkeypatch):
    """--sec-temperature 0.2 and --temperature 0.7 (the sampler's): with ema 1 the values after step 1 are that
    step's signals, and step 2's p_t is their softmax at 0.2 (a softmax at 0.7 would be far flatter)."""
    g = np.random.default_rng(3)
    script = [g.choice([0.0, 0.5, 1.0], size=16).tolist() for _ in range(2)]
    recorder = Recorder(monkeypatch, rewards=script)
    rows, _ = run(tmp_path, "--prompts-per-step", "4", "--num-generations", "4", "--schedule", "sec",
                  "--total-steps", "2", "--sec-temperature", "0.2", "--sec-ema", "1.0", "--temperature", "0.7")
    values = [recorder.sec_signals[0].get(k, 0.0) for k in range(4)]
    assert max(values) - min(values) > 0.1  # unequal values: the temperature shows in p_t
    weights = [math.exp(v / 0.2) for v in values]
    assert rows[1]["level_probs"] == pytest.approx([w / sum(weights) for w in weights], abs=2e-6)


# ----------------------------------------------------------------------------- KL in the reward (GRPO path)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_in_the_reward_lowers_the_advantage_of_samples_far_from_the_reference(tmp_path, monkeypatch, estimator):
    """Every task reward is 0, so the advantages come from the KL penalty alone: within each group the sample with
    the larger KL to the reference must get the smaller advantage (whatever the estimator, and wherever the penalty
    enters the advantage computation), and the logged kl is the per-token mean of the
    sequence KLs computed here (sampler log-probs vs a plain forward of the reference)."""
    references = []

    def perturbed_copy(model, *args):  # the reference differs from the initial policy: the KL is not ~0 at step 1
        reference = frozen_copy(model, *args)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in reference.model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g) * p.std())
        references.append(reference)
        return reference

    monkeypatch.setattr(run_setup, "frozen_copy", perturbed_copy)
    recorder = Recorder(monkeypatch, rewards=[[0.0] * 8])
    (row,), cfg = run(tmp_path, "--prompts-per-step", "2", "--num-generations", "4", "--beta", "0.1",
                      "--kl-in-reward", "--kl-estimator", estimator, "--temperature", "3")
    (kept, advantages), = recorder.updates
    (reference,) = references
    with torch.no_grad():
        kl = torch.stack([plain_kl(torch.tensor(lp), plain_logprobs(reference.model, p, c, cfg["temperature"]),
                                   estimator).sum()
                          for p, c, lp in zip(kept.prompt_ids, kept.completions, kept.sampler_logprobs)])
    pairs = [(i, j) for i in range(8) for j in range(8) if i // 4 == j // 4 and kl[i] > kl[j] + 1e-3]
    assert len(pairs) >= 3, kl  # the case is not degenerate: samples of a group differ in KL
    for i, j in pairs:
        assert advantages[i] < advantages[j], (i, j, kl, advantages)
    tokens = sum(len(c) for c in kept.completions)
    assert row["kl"] == pytest.approx(float(kl.sum()) / tokens, rel=1e-3)
