"""bench/gpu_check.py --smoke: the GPU check's code runs end to end on CPU, so it cannot rot between GPU loans."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ["decode-generate", "decode-continuous-batching", "decode-lean", "decode-static", "train-lora",
            "train-full", "oom-retry", "decode-compiled"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_section_is_recorded(smoke):
    data, table = smoke
    assert list(data["sections"]) == SECTIONS
    assert data["meta"]["mode"] == "smoke"
    for name in SECTIONS:
        assert f"| {name} |" in table
    assert data["sections"]["decode-compiled"]["status"] == "skipped"  # CUDA graphs: GPU only
    assert all(data["sections"][name]["status"] == "ok" for name in SECTIONS if name != "decode-compiled")


def test_decode_rows(smoke):
    data, _ = smoke
    rows = {name: data["sections"][name] for name in SECTIONS[:4]}
    for name, row in rows.items():
        assert row["rows"] == 4 and row["generated_tokens"] == 4 * 8, name  # 2 prompts x 2 samples x 8 tokens
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0 and row["prefill_ms"] > 0, name
        assert row["pct_assumed"] is None and row["pct_measured"] > 0, name  # no datasheet figure for a CPU
    # every decoder made the same tokens, so each must read the same bytes per step
    assert len({round(row["gb_per_step"], 12) for row in rows.values()}) == 1
    for name in ("decode-continuous-batching", "decode-lean", "decode-static"):
        assert rows[name]["greedy_equal"] is True, name  # fp32 greedy on CPU: token for token model.generate's


def test_the_table_names_the_fastest_token_equal_decoder():
    from bench.gpu_check import fastest_equal_decoder

    sections = {"decode-lean": {"status": "ok", "tokens_per_s": 900.0, "greedy_equal": True},
                "decode-static": {"status": "ok", "tokens_per_s": 800.0, "greedy_equal": True},
                "decode-compiled": {"status": "ok", "tokens_per_s": 5000.0, "greedy_equal": False}}
    assert "**lean**" in fastest_equal_decoder(sections)  # the fastest row's tokens differ: not a candidate
    sections["decode-compiled"]["greedy_equal"] = True
    assert "**compiled**" in fastest_equal_decoder(sections) and "compile_step" in fastest_equal_decoder(sections)
    sections["decode-compiled"]["status"] = sections["decode-lean"]["status"] = "error"
    assert "**static**" in fastest_equal_decoder(sections)
    assert "none compared" in fastest_equal_decoder({})


def test_with_no_token_equal_decoder_the_line_ranks_ours_by_agreement():
    from bench.gpu_check import fastest_equal_decoder

    row = dict(status="ok", greedy_equal=False, rows=64)
    sections = {"decode-lean": {**row, "tokens_per_s": 900.0, "equal_rows": 60, "first_difference": 97},
                "decode-static": {**row, "tokens_per_s": 800.0, "equal_rows": 60, "first_difference": 211},
                "decode-compiled": {**row, "tokens_per_s": 5000.0, "equal_rows": 12, "first_difference": 3}}
    line = fastest_equal_decoder(sections)
    assert "none on every row" in line and "**" not in line  # nothing is picked
    # more equal rows first, then the later first difference
    assert line.index("static 60/64") < line.index("lean 60/64") < line.index("compiled 12/64")


def test_train_rows(smoke):
    data, _ = smoke
    lora, full = data["sections"]["train-lora"], data["sections"]["train-full"]
    for row in (lora, full):
        assert len(row["steps"]) == 3
        for step in row["steps"]:
            assert step["rollout_s"] > 0 and step["reference_s"] > 0 and step["update_s"] > 0  # beta 0.001: a KL
            assert step["step_s"] == pytest.approx(step["rollout_s"] + step["reference_s"] + step["update_s"])
        assert row["peak_gib"] > 0 and row["estimate_gib"] > 0
    assert "--lora-r 0" in full["argv"] and "--lora-r" not in lora["argv"]
    # a separate reference copy and AdamW state of every weight: full fine-tuning's estimate is the larger
    assert full["estimate_parts_gib"]["reference"] > 0 == lora["estimate_parts_gib"]["reference"]
    assert full["estimate_gib"] > lora["estimate_gib"]


def test_oom_retry_recovers(smoke):
    data, _ = smoke
    row = data["sections"]["oom-retry"]
    assert row["oom_errors"] == 1
    assert row["micro_batch_after"] == 1  # --micro-batch-size 2, halved once
    assert row["finished"] is True


def test_bad_skip_is_one_line_exit_2():
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--out", "/nonexistent", "--skip",
                          "decode-nothing"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2
    assert "unknown section" in run.stderr


def test_versions_outside_requirements_are_named_before_any_gpu_work(tmp_path):
    from bench.gpu_check import version_problem

    assert version_problem() is None  # the README's install gives the tested versions
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch==2.13.0  # any\n\n# comment\ntransformers>=99  # a release that does not exist\n")
    problem = version_problem(requirements)
    assert problem.startswith("transformers ") and ">=99" in problem
    requirements.write_text("peft>=0.21\ntransformers>=5\n")
    assert version_problem(requirements) is None


def test_a_section_still_running_when_the_budget_is_up_is_stopped_and_recorded(tmp_path):
    import time

    from bench.gpu_check import Report

    meta = dict.fromkeys(["mode", "date", "command", "device_name", "torch", "transformers", "model", "decode",
                          "bandwidth_limits"], "-")
    report = Report(tmp_path, meta, budget_s=0.5)

    def hangs():  # stands in for a hung generate_batch or compile; gives up by itself after a minute
        end = time.perf_counter() + 60
        while time.perf_counter() < end:
            pass
        return {"finished": True}

    row = report.run("decode-generate", hangs, {})
    assert row["status"] == "error" and row["error"].startswith("OverBudget: stopped: --budget-s was up")
    later = report.run("decode-lean", lambda: {"finished": True}, {})
    assert later["status"] == "skipped" and "is up" in later["note"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["decode-generate"]["status"] == "error"
