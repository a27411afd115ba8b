"""--eval-pass-k: the pass@k that train.py logs in eval.jsonl, against a brute-force count over the same samples."""

import itertools
import json

import numpy as np
import pytest

import train
from e2h_min.analysis import evaluation
from e2h_min.engine.models import TINY_MODEL_DIR

pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                reason="embedded tiny model not built (python scripts/build_tiny_model.py)")

RUN = ["--total-steps", "2", "--eval-every", "1", "--eval-problems", "3", "--save-every", "0",
       "--prompts-per-step", "4", "--num-generations", "4", "--max-new-tokens", "24", "--log-completions-every", "0"]


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """The share of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(correct, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_logged_pass_at_k_equals_brute_force_over_the_samples(tmp_path, monkeypatch):
    drawn = []  # (step of the evaluation, the problems, their correctness per sample) of every pass@k chunk
    score = evaluation.score_rollout

    def recording(task, problems, tokenizer, rollout, stop_strings):
        texts, rewards = score(task, problems, tokenizer, rollout, stop_strings)
        if rollout.num_samples == 6:  # the pass@k draws (training draws 4, greedy evaluation 1)
            drawn.append((list(problems), [task.is_correct(r) for r in rewards]))
        return texts, rewards

    monkeypatch.setattr(evaluation, "score_rollout", recording)
    train.main(RUN + ["--eval-pass-k", "1", "2", "5", "--eval-samples", "6", "--out-dir", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "eval.jsonl").open()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    per_eval = len(drawn) // len(rows)
    names = ["L0", "L1", "L2", "L3", "OOD"]
    for row, chunks in zip(rows, [drawn[i * per_eval:(i + 1) * per_eval] for i in range(len(rows))]):
        by_level = {}
        for problems, correct in chunks:
            for p, problem in enumerate(problems):
                by_level.setdefault(names[problem.level], []).append(correct[p * 6:(p + 1) * 6])
        assert sorted(by_level) == sorted(names) and all(len(v) == 3 for v in by_level.values())
        for name, samples in by_level.items():
            for k in (1, 2, 5):
                expected = np.mean([brute_force_pass_at_k(s, k) for s in samples])
                assert row[f"{name}/pass@{k}"] == pytest.approx(expected, abs=1e-12)
            assert row[f"{name}/sample_accuracy"] == pytest.approx(np.mean(samples), abs=1e-12)


def test_pass_at_k_levels_limit_the_sampled_evaluation(tmp_path):
    train.main(RUN + ["--eval-pass-k", "2", "--eval-pass-k-levels", "L1,OOD", "--out-dir", str(tmp_path / "run")])
    row = json.loads((tmp_path / "run" / "eval.jsonl").open().readline())
    assert sorted(k for k in row if "pass@" in k) == ["L1/pass@2", "OOD/pass@2"] and "L0/accuracy" in row


def test_pass_at_k_evaluation_leaves_training_unchanged(tmp_path):
    """The pass@k draws use their own generators: the run trains exactly as without them."""
    train.main(RUN + ["--out-dir", str(tmp_path / "plain")])
    train.main(RUN + ["--eval-pass-k", "1", "4", "--out-dir", str(tmp_path / "with")])
    timing = {"rollout_seconds", "update_seconds", "tokens_per_second"}
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing} for line in (tmp_path / d /
             "metrics.jsonl").open()] for d in ("plain", "with")]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    greedy = [[{k: v for k, v in json.loads(line).items() if "pass@" not in k and "sample_acc" not in k}
               for line in (tmp_path / d / "eval.jsonl").open()] for d in ("plain", "with")]
    assert greedy[0] == greedy[1]


@pytest.mark.parametrize("flags, message", [
    (["--eval-samples", "8"], "needs --eval-pass-k"),
    (["--eval-pass-k", "1", "16", "--eval-samples", "8"], "1 <= k <= --eval-samples (8)"),
    (["--eval-pass-k", "0"], "1 <= k <= --eval-samples"),
    (["--eval-pass-k", "4", "--eval-pass-k-levels", "L1,L9"], "task countdown has no level L9"),
])
def test_bad_pass_at_k_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags + ["--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
