"""pass@k against brute force, eval.py's helpers and errors, and eval.py reproducing a run's final evaluation."""

import itertools
import json
import math
from fractions import Fraction
from types import SimpleNamespace

import pytest

import eval as evaluate_cli
import train
from e2h_min.analysis.evaluation import held_out_problems
from e2h_min.engine.models import TINY_MODEL_DIR
from e2h_min.analysis.passk import mean_pass_at_k, pass_at_k
from e2h_min.tasks import make_task

requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")


# ---------------------------------------------------------------------------------------------------------------
# pass@k


def brute_force_pass_at_k(n, c, k):
    """Share of all k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_of_all_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_exact_at_c_zero_and_c_n_and_stable_for_large_n():
    for n, k in [(1, 1), (16, 1), (16, 8), (512, 32), (10_000, 1000)]:
        assert pass_at_k(n, 0, k) == 0.0
        assert pass_at_k(n, n, k) == 1.0
    assert pass_at_k(4, 1, 2) == 0.5 and pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    # binomials of this size overflow floats; the product form stays exact to rounding
    exact = 1 - Fraction(math.comb(1000 - 7, 300), math.comb(1000, 300))
    assert pass_at_k(1000, 7, 300) == pytest.approx(float(exact), rel=1e-12)


def test_mean_pass_at_k_averages_over_problems_and_rejects_bad_input():
    assert mean_pass_at_k([0, 4], n=4, k=2) == 0.5
    assert mean_pass_at_k([1, 2, 3], n=4, k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=5"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        mean_pass_at_k([], n=4, k=1)


# ---------------------------------------------------------------------------------------------------------------
# eval.py helpers and errors (no model needed)


def test_select_levels_accepts_indices_and_names():
    task = make_task("countdown")
    assert evaluate_cli.select_levels(task, None) == [0, 1, 2, 3, 4]
    assert evaluate_cli.select_levels(task, ["0", "ood", "L3", "4"]) == [0, 4, 3]


def test_settings_come_from_flags_then_the_run_config_then_fallbacks():
    args = SimpleNamespace(task=None, data=None, seed=None, n=7, max_new_tokens=None, stop=None, chat_date=None)
    run = {"task": "blocksworld", "seed": 3, "eval_problems": 50, "max_new_tokens": 64, "eval_max_new_tokens": None,
           "stop": "</answer>", "chat_date": "2025-01-31"}
    assert evaluate_cli.resolve_settings(args, run) == {"task": "blocksworld", "data": None, "seed": 3, "n": 7,
                                                        "max_new_tokens": 64, "stop": "</answer>",
                                                        "chat_date": "2025-01-31"}
    assert evaluate_cli.resolve_settings(args, None)["chat_date"] is None  # a hub model: the template's own day
    assert evaluate_cli.resolve_settings(args, None)["max_new_tokens"] == 512
    assert evaluate_cli.resolve_settings(args, {**run, "eval_max_new_tokens": 32})["max_new_tokens"] == 32


def test_default_problems_are_train_py_s_eval_problems_in_its_order(tmp_path):
    task = make_task("countdown", seed=5)
    problems = evaluate_cli.select_problems(task, task.eval_levels, 3, explicit_levels=False)
    assert problems == [task.problem(level, i, "test") for level in task.eval_levels for i in range(3)]
    assert problems == held_out_problems(task, 3)  # what train.py evaluates
    assert evaluate_cli.select_problems(task, [4, 0], 2, explicit_levels=True) == [
        task.problem(4, 0, "test"), task.problem(4, 1, "test"), task.problem(0, 0, "test"), task.problem(0, 1, "test")]


def test_table_lists_every_level_with_pass_at_k_columns():
    row = {"accuracy": 0.5, "reward": 0.55, "format_rate": 1.0, "length": 20.0, "n": 2}
    report = {"greedy": {"L0": row, "OOD": row},
              "pass_at_k": {"by_level": {"L0": {"pass@1": 0.25, "pass@4": 0.75, "sample_accuracy": 0.25},
                                         "OOD": {"pass@1": 0.0, "pass@4": 0.0, "sample_accuracy": 0.0}}}}
    lines = evaluate_cli.format_table(report).splitlines()
    assert lines[0].split() == ["level", "n", "accuracy", "reward", "format", "length", "pass@1", "pass@4"]
    assert lines[1].split() == ["L0", "2", "50.0%", "0.550", "100.0%", "20.0", "25.0%", "75.0%"]


def write_gsm8k(path, split):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}", "split": split} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def damaged_model(tmp, name):
    """A copy of the tiny model with one file cut short."""
    import shutil
    from e2h_min.engine.models import TINY_MODEL_DIR
    shutil.copytree(TINY_MODEL_DIR, tmp / "model")
    (tmp / "model" / name).write_bytes((tmp / "model" / name).read_bytes()[:500])
    return tmp / "model"


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: ["--model", str(tmp / "no_such_run")], "no such directory"),
    (lambda tmp: ["--model", "tiny", "--task", "chess"], "unknown --task 'chess'"),
    (lambda tmp: ["--model", "tiny", "--task", "gsm8k", "--data", write_gsm8k(tmp / "d.jsonl", "train")],
     "no test problems"),
    (lambda tmp: ["--model", "tiny", "--task", "gsm8k", "--data", str(tmp / "missing.jsonl")], "no such file"),
    (lambda tmp: ["--model", "tiny", "--pass-k", "1", "8", "--samples", "4"], "k <= --samples (4)"),
    (lambda tmp: ["--model", "tiny", "--samples", "4"], "add --pass-k"),
    (lambda tmp: ["--model", "tiny", "--top-p", "2"], "--top-p is for pass@k sampling"),  # greedy would ignore it
    (lambda tmp: ["--model", "tiny", "--temperature", "1.0"], "--temperature is for pass@k sampling"),
    (lambda tmp: ["--model", "tiny", "--levels", "L9"], "unknown level 'L9'"),
    (lambda tmp: ["--model", "tiny", "--n", "0"], "--n must be in [1, 100,000], got 0"),
    (lambda tmp: ["--model", "tiny", "--n", "1000000000"], "--n must be in [1, 100,000]"),
    (lambda tmp: ["--model", "tiny", "--max-new-tokens", "100000"], "exceeds the model's context of 512"),
    (lambda tmp: ["--model", "tiny", "--threads", "-1"], "--threads must be in [0,"),
    (lambda tmp: ["--model", "tiny", "--pass-k", "1", "--temperature", "nan"], "must be finite"),
    (lambda tmp: ["--model", "tiny", "--n", "1", "--out", str(write_gsm8k(tmp / "f", "test"))], "is a file"),
    (lambda tmp: ["--model", str(damaged_model(tmp, "model.safetensors")), "--n", "1"], "missing or damaged"),
    (lambda tmp: ["--model", str(damaged_model(tmp, "config.json")), "--n", "1"], "config.json: not valid JSON"),
    (lambda tmp: ["--model", str(tmp), "--n", "1"], "cannot load model"),  # a directory with no model in it
    (lambda tmp: ["--task", "countdown"], "--model"),
    # results never overwrite what eval.py did not write: a training run's completions.jsonl, a user's report.json
    (lambda tmp: ["--model", "tiny", "--n", "1", "--out", str(holding(tmp / "run", "metrics.jsonl"))],
     "holds a run or a model"),
    (lambda tmp: ["--model", "tiny", "--n", "1", "--out", str(holding(tmp / "mine", "report.json"))],
     "holds report.json, which eval.py did not write"),
    (lambda tmp: ["--model", "tiny", "--n", "1", "--out", str(run_holding_config(tmp / "r").joinpath(
        "checkpoints", "x"))], "inside the run folder"),  # only RUN/eval/NAME is eval.py's inside a run
])
def test_bad_input_gives_one_line_and_exit_code_2(make_args, fragment, tmp_path, capsys, monkeypatch):
    argv = make_args(tmp_path)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # the default --out of "tiny" (./eval/...) would be created here
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err and err.count("\n") == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing overwritten
    assert not (tmp_path / "cwd" / "eval").exists()  # and no empty results folder left by a refusal


def run_holding_config(folder):
    """A train.py run folder (its config.json names a schedule and total_steps)."""
    folder.mkdir()
    (folder / "config.json").write_text('{"schedule": "cosine", "total_steps": 3}\n')
    return folder


def holding(folder, name):
    """A folder holding one file another tool wrote."""
    folder.mkdir()
    (folder / name).write_text('{"theirs": true}\n')
    return folder


@requires_tiny
def test_a_rerun_replaces_its_own_results(tmp_path):
    args = ["--model", "tiny", "--n", "1", "--levels", "0", "--max-new-tokens", "8", "--threads", "1", "--quiet",
            "--out", str(tmp_path)]
    first = evaluate_cli.main(args)
    second = evaluate_cli.main(args)
    assert json.loads((tmp_path / "report.json").read_text())["greedy"] == second["greedy"] == first["greedy"]


def test_a_run_directory_without_a_saved_model_is_an_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"schedule": "gaussian", "total_steps": 10}))
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--model", str(tmp_path)])
    assert exc.value.code == 2 and "no final/ and no checkpoints" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# End to end on a run written by train.py


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = train.main(["--model", "tiny", "--total-steps", "2", "--prompts-per-step", "2", "--num-generations", "2",
                         "--max-new-tokens", "24", "--eval-problems", "3", "--eval-every", "0", "--save-every", "0",
                         "--log-completions-every", "0", "--beta", "0", "--threads", "1", "--seed", "3",
                         "--out-dir", str(run_dir)])
    return run_dir, result


@requires_tiny
def test_eval_of_a_run_reproduces_its_final_in_training_evaluation(tiny_run, tmp_path):
    run_dir, result = tiny_run
    report = evaluate_cli.main(["--model", str(run_dir), "--threads", "1", "--quiet", "--out", str(tmp_path)])
    assert report["loaded_from"] == str(run_dir / "final") and report["step"] == 2
    assert report["seed"] == 3 and report["n"] == 3 and report["max_new_tokens"] == 24  # from config.json
    assert report["greedy"] == result["last_eval"]
    last_line = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])
    assert report["run_eval"] == last_line and last_line["step"] == 2
    for name, row in report["greedy"].items():
        for metric in ("accuracy", "reward", "format_rate"):
            assert row[metric] == last_line[f"{name}/{metric}"]
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 15 and {line["mode"] for line in lines} == {"greedy"}
    assert lines[0]["prompt"] == make_task("countdown", seed=3).problem(0, 0, "test").user_prompt
    assert json.loads((tmp_path / "report.json").read_text())["greedy"] == report["greedy"]


@requires_tiny
def test_without_final_the_newest_checkpoint_is_evaluated(tiny_run, tmp_path):
    run_dir, result = tiny_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "checkpoints"):
        (copy / name).symlink_to(run_dir / name)
    report = evaluate_cli.main(["--model", str(copy), "--threads", "1", "--quiet", "--out", str(tmp_path / "out")])
    assert report["loaded_from"].endswith("checkpoints/step_000002") and report["step"] == 2
    assert report["greedy"] == result["last_eval"]


@requires_tiny
@pytest.mark.parametrize("damage, fragment", [
    ("flip", "model.safetensors does not match its sha256"),  # same size, other bytes (NaN weights)
    ("config", "config.json"),  # another model's config.json beside these weights
])
def test_a_damaged_checkpoint_is_refused_before_it_is_scored(tiny_run, tmp_path, capsys, damage, fragment):
    import shutil
    run_dir, _ = tiny_run
    checkpoint = shutil.copytree(run_dir / "checkpoints" / "step_000002", tmp_path / "step_000002")
    if damage == "flip":
        weights = bytearray((checkpoint / "model.safetensors").read_bytes())
        weights[-4000:] = b"\xff" * 4000
        (checkpoint / "model.safetensors").write_bytes(bytes(weights))
    else:
        config = json.loads((checkpoint / "config.json").read_text())
        (checkpoint / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--model", str(checkpoint), "--threads", "1", "--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "is damaged" in err and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.json").exists()


@requires_tiny
def test_pass_at_k_on_the_tiny_model(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    report = evaluate_cli.main(["--model", str(run_dir), "--levels", "0", "1", "--n", "2", "--pass-k", "1", "2", "4",
                                "--samples", "4", "--threads", "1", "--quiet", "--out", str(tmp_path)])
    settings = report["pass_at_k"]
    assert (settings["samples"], settings["temperature"], settings["top_p"], settings["top_k"]) == (4, 0.7, 0.9, 50)
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    sampled = [line for line in lines if line["mode"] == "sample"]
    assert len(sampled) == 2 * 2 * 4 and sorted({line["sample"] for line in sampled}) == [0, 1, 2, 3]
    for name, row in settings["by_level"].items():
        counts = [sum(line["correct"] for line in sampled if (line["level"], line["index"]) == (name, i))
                  for i in range(2)]
        for k in (1, 2, 4):  # the per-level figure is the estimator averaged over this level's problems
            assert row[f"pass@{k}"] == pytest.approx(mean_pass_at_k(counts, 4, k))
        assert row["pass@1"] <= row["pass@2"] <= row["pass@4"]


@requires_tiny
def test_a_lora_run_is_evaluated_as_base_plus_adapter(tmp_path):
    run_dir = tmp_path / "lora"
    result = train.main(["--model", "tiny", "--lora-r", "4", "--total-steps", "1", "--prompts-per-step", "2",
                         "--num-generations", "2", "--max-new-tokens", "16", "--eval-problems", "2", "--eval-every",
                         "0", "--save-every", "0", "--log-completions-every", "0", "--beta", "0", "--threads", "1",
                         "--out-dir", str(run_dir)])
    assert (run_dir / "final" / "adapter_config.json").is_file()
    report = evaluate_cli.main(["--model", str(run_dir), "--threads", "1", "--quiet", "--out", str(tmp_path / "e")])
    assert report["greedy"] == result["last_eval"]


def test_pass_at_k_by_level_against_brute_force_over_subsets():
    import itertools

    from e2h_min.analysis.passk import pass_at_k_by_level

    samples = {"L0": [[1, 0, 0, 1], [0, 0, 0, 0]], "L1": [[1, 1, 1, 0]]}  # per problem: each sample correct or not
    got = pass_at_k_by_level({name: [sum(s) for s in rows] for name, rows in samples.items()}, 4, [1, 2, 3])
    for name, rows in samples.items():
        for k in (1, 2, 3):
            subsets = [[any(c) for c in itertools.combinations(row, k)] for row in rows]
            assert got[name][f"pass@{k}"] == pytest.approx(sum(sum(s) / len(s) for s in subsets) / len(rows))
        assert got[name]["sample_accuracy"] == pytest.approx(sum(map(sum, rows)) / (4 * len(rows)))
