"""Where eval.py writes by default, and `python -m e2h_min.analysis.report` showing those results (pass@k per level)."""

import json
from pathlib import Path

import pytest

import eval as evaluate_cli
import train
from e2h_min.analysis import report
from e2h_min.engine.models import TINY_MODEL_DIR

requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")


def fake_run(root: Path) -> Path:
    """A run directory as train.py leaves it, without weights: config.json, final/, one checkpoint."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"schedule": "cosine", "total_steps": 4, "task": "countdown"}))
    for sub in ("final", "final-merged", "checkpoints/step_000002"):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return root


def test_eval_writes_next_to_what_it_evaluates(tmp_path):
    run = fake_run(tmp_path / "runs" / "cd")
    assert evaluate_cli.default_out_dir(str(run), str(run / "final"), "countdown") == run / "eval" / "final"
    assert evaluate_cli.default_out_dir("x", str(run / "final-merged"), "countdown") == run / "eval" / "final-merged"
    step = run / "checkpoints" / "step_000002"
    assert evaluate_cli.default_out_dir(str(step), str(step), "countdown") == run / "eval" / "step_000002"
    assert evaluate_cli.default_out_dir(str(run), str(run / "final"), "blocksworld") == \
        run / "eval" / "final-blocksworld"
    plain = tmp_path / "models" / "my-model"
    plain.mkdir(parents=True)
    assert evaluate_cli.default_out_dir(str(plain), str(plain), "countdown") == \
        (tmp_path / "models" / "eval" / "my-model-countdown").resolve()
    assert evaluate_cli.default_out_dir("Qwen/Qwen2.5-1.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct", "countdown") == \
        Path("eval") / "Qwen2.5-1.5B-Instruct-countdown"
    # an alias of an embedded model is a name, not a folder to write beside: never into the package's assets
    from e2h_min.engine.models import TESTBED_MODEL_DIR
    assert evaluate_cli.default_out_dir("tiny-testbed", str(TESTBED_MODEL_DIR), "countdown") == \
        Path("eval") / "tiny-testbed-countdown"


def test_a_runs_final_policy_is_evaluated_with_the_runs_settings(tmp_path):
    run = fake_run(tmp_path / "runs" / "cd")
    for saved in ("final", "final-merged"):  # named directly: still the run's policy, config and step
        path, config, step = evaluate_cli.find_model(str(run / saved))
        assert (path, config["schedule"], step) == (str(run / saved), "cosine", 4)
    (run / "eval.jsonl").write_text(json.dumps({"step": 4, "L0/accuracy": 0.5}) + "\n")
    assert evaluate_cli.run_eval_line(str(run / "final-merged"), {"total_steps": 4}, 4)["L0/accuracy"] == 0.5


def test_report_table_shows_greedy_accuracy_and_pass_at_k_per_level():
    found = {"step": 200, "task": "countdown", "n": 100,
             "greedy": {"L0": {"accuracy": 0.5}, "OOD": {"accuracy": 0.0}},
             "pass_at_k": {"samples": 8, "by_level": {"L0": {"pass@1": 0.5, "pass@8": 0.9, "sample_accuracy": 0.5},
                                                      "OOD": {"pass@1": 0.0, "pass@8": 0.125}}}}
    table = report.eval_results_table([("cosine s0", "final", found)])
    assert "| run | evaluated | step | task | problems | metric | L0 | OOD |" in table
    assert "| cosine s0 | final | 200 | countdown | 100 | greedy accuracy | 50.0 | 0.0 |" in table
    assert "| cosine s0 | final | 200 | countdown | 100 | pass@1 (8 samples) | 50.0 | 0.0 |" in table
    assert "| cosine s0 | final | 200 | countdown | 100 | pass@8 (8 samples) | 90.0 | 12.5 |" in table
    assert report.eval_results_table([]) == ""


@requires_tiny
def test_eval_of_a_run_lands_in_the_run_and_the_report_shows_it(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train.main(["--total-steps", "2", "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "16",
                "--eval-problems", "2", "--eval-every", "0", "--save-every", "0", "--log-completions-every", "0",
                "--threads", "1", "--out-dir", str(run)])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # the user stands somewhere else: results still go to the run
    result = evaluate_cli.main(["--model", str(run), "--n", "2", "--pass-k", "1", "2", "--quiet", "--threads", "1"])
    out = capsys.readouterr().out
    assert f"results will be written to {run / 'eval' / 'final'}/" in out
    saved = json.loads((run / "eval" / "final" / "report.json").read_text())
    assert saved["greedy"] == result["greedy"] and not (tmp_path / "elsewhere" / "eval").exists()

    table = report.main([str(run), "--no-plots"])["table"]
    assert "## eval.py results" in table and table == (run / "report" / "table.md").read_text()
    for k in ("pass@1", "pass@2"):
        row = next(line for line in table.splitlines() if f"| {k} (2 samples) |" in line)
        values = [cell.strip() for cell in row.strip("|").split("|")][6:]
        assert values == [f"{100 * result['pass_at_k']['by_level'][name][k]:.1f}" for name in result["greedy"]]
