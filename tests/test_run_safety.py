"""Runs that cannot lose data: run-folder ownership, resume over crash damage, divergence caught after the step."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from e2h_min.run import bookkeeping
from e2h_min.run.checkpoint import list_checkpoints, resume_checkpoint, save_checkpoint, verify_checkpoint
from e2h_min.jsonl import parse_json, read_log
from tests.test_checkpoint import make_state
from tests.test_train import TIMING_FIELDS, read_jsonl, requires_tiny

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--total-steps", "3", "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "24",
         "--eval-problems", "2", "--eval-every", "0", "--save-every", "1", "--log-completions-every", "1",
         "--threads", "1"]


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def run_killed_after_checkpoint(run_dir: Path, step: int, monkeypatch, args=QUICK) -> None:
    """train.main dies (as if killed) right after writing checkpoint `step`."""
    real_save = bookkeeping.save_checkpoint

    def save_then_die(directory, at, *a, **kw):
        path = real_save(directory, at, *a, **kw)
        if at == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(bookkeeping, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(args + ["--out-dir", str(run_dir)])
    monkeypatch.setattr(bookkeeping, "save_checkpoint", real_save)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the QUICK run, never interrupted."""
    run_dir = tmp_path_factory.mktemp("full")
    train.main(QUICK + ["--out-dir", str(run_dir)])
    return run_dir


# ----------------------------------------------------------------------------- resume over crash damage
def test_a_gap_in_metrics_before_the_checkpoint_is_said_on_resume(tmp_path):
    """Lines lost before the checkpoint (a power loss before logs were synced) leave a gap the resume names."""
    from e2h_min.run.runlog import truncate_logs
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {t}}}\n' for t in (1, 2, 5, 6, 7)))
    said = []
    truncate_logs(tmp_path, 6, said.append)
    assert len(said) == 1 and "no line for 2 step(s) before the checkpoint (steps 3-4" in said[0]
    assert read_log(tmp_path / "metrics.jsonl")[0] == [{"step": t} for t in (1, 2, 5, 6)]


def test_read_log_drops_only_torn_trailing_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(path) == ([{"step": 1}, {"step": 2}], 1)
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: .*valid lines follow"):
        read_log(path)


@pytest.mark.parametrize("text, reason", [("[" * 200_000, "nested too deeply"), ("1" * 5000, "not valid JSON"),
                                          ('{"a": ', "not valid JSON")])
def test_parse_json_turns_every_bad_input_into_value_error(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_json(text)


@requires_tiny
def test_torn_metrics_line_then_resume_continues_exactly(tmp_path, monkeypatch, uninterrupted, capsys):
    broken = tmp_path / "broken"
    run_killed_after_checkpoint(broken, 2, monkeypatch)
    with open(broken / "metrics.jsonl", "a") as handle:  # killed half-way through step 3's line
        handle.write('{"step": 3, "lr": 0.0001, "lo')
    train.main(QUICK + ["--resume", str(broken)])
    assert "dropped 1 torn line(s)" in capsys.readouterr().out
    assert strip(read_jsonl(broken / "metrics.jsonl")) == strip(read_jsonl(uninterrupted / "metrics.jsonl"))
    a, b = final_weights(uninterrupted), final_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


@requires_tiny
def test_damaged_latest_checkpoint_is_skipped_and_the_run_ends_with_the_same_weights(tmp_path, monkeypatch,
                                                                                     uninterrupted, capsys):
    broken = tmp_path / "broken"
    run_killed_after_checkpoint(broken, 2, monkeypatch)
    weights = broken / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as on a full disk
    train.main(QUICK + ["--resume", str(broken)])
    out = capsys.readouterr().out
    assert "checkpoint" in out and "step_000002 is damaged" in out and "resumed from" in out
    assert "step_000001" in out.split("resumed from")[1].splitlines()[0]
    assert (broken / "checkpoints" / "damaged_step_000002").is_dir()  # set aside, not deleted
    a, b = final_weights(uninterrupted), final_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert strip(read_jsonl(broken / "metrics.jsonl")) == strip(read_jsonl(uninterrupted / "metrics.jsonl"))


@pytest.mark.parametrize("name, damage", [
    ("model.safetensors", lambda b: b[:len(b) // 2]),
    ("optimizer.pt", lambda b: b[:len(b) - 100]),
    ("rng.pt", lambda b: b[:10]),
    ("trainer_state.json", lambda b: b[:len(b) // 2]),
    ("config.json", lambda b: b"not json"),
])
def test_verify_checkpoint_names_each_kind_of_damage(tmp_path, name, damage):
    model, tok, opt, sched = make_state()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    first, latest = list_checkpoints(tmp_path)
    assert verify_checkpoint(latest) is None
    (latest / name).write_bytes(damage((latest / name).read_bytes()))
    assert verify_checkpoint(latest) is not None
    logged = []
    assert resume_checkpoint(tmp_path, logged.append) == first
    assert len(logged) == 1 and "step_000002 is damaged" in logged[0]


def test_damaged_file_of_equal_size_is_caught_by_loading(tmp_path):
    """A checkpoint without manifest (older versions) is still verified by parsing every file."""
    model, tok, opt, sched = make_state()
    path = save_checkpoint(tmp_path, 1, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    (path / "manifest.json").unlink()
    raw = bytearray((path / "rng.pt").read_bytes())
    raw[-30:] = b"\0" * 30  # the zip's central directory
    (path / "rng.pt").write_bytes(bytes(raw))
    assert verify_checkpoint(path) is not None


@requires_tiny
def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, uninterrupted, capsys):
    import shutil
    run_dir = tmp_path / "done"
    shutil.copytree(uninterrupted, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    result = train.main(QUICK + ["--resume", str(run_dir)])
    assert result["already_finished"] and "nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before


# ----------------------------------------------------------------------------- run-folder ownership
@requires_tiny
def test_same_command_twice_keeps_both_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(QUICK)
    first = Path("runs/countdown-cosine-s0")
    snapshot = {p: p.read_bytes() for p in first.rglob("*") if p.is_file()}
    train.main(QUICK)
    assert "this run writes to runs/countdown-cosine-s0-2" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == snapshot  # byte-identical
    assert [r["step"] for r in read_jsonl(Path("runs/countdown-cosine-s0-2/metrics.jsonl"))] == [1, 2, 3]
    # with an explicit --out-dir the second run is refused, and the first is untouched
    with pytest.raises(SystemExit) as exc:
        train.main(QUICK + ["--out-dir", str(first)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "holds an earlier run" in err
    assert {p: p.read_bytes() for p in first.rglob("*") if p.is_file()} == snapshot
    (first / "eval" / "final").mkdir(parents=True)  # what eval.py wrote about the old run's policy
    (first / "eval" / "final" / "report.json").write_text("{}")
    (first / "wandb_run_id").write_text("oldrun01")
    train.main(QUICK + ["--out-dir", str(first), "--overwrite"])  # asked for: replaced
    assert [r["step"] for r in read_jsonl(first / "metrics.jsonl")] == [1, 2, 3]
    assert not (first / "eval").exists() and not (first / "wandb_run_id").exists()  # nothing of the old run left


@requires_tiny
def test_second_run_on_a_busy_folder_exits_2_and_the_first_finishes_intact(tmp_path, monkeypatch, capsys,
                                                                            uninterrupted):
    run_dir = tmp_path / "busy"
    real_save, seen = bookkeeping.save_checkpoint, []

    def save_and_start_a_rival(directory, step, *a, **kw):
        if step == 1:  # a second run on the same folder while the first is mid-run
            for argv in (QUICK + ["--out-dir", str(run_dir)], QUICK + ["--resume", str(run_dir)]):
                capsys.readouterr()  # the first run's own progress output
                with pytest.raises(SystemExit) as exc:
                    train.main(argv)
                seen.append((exc.value.code, capsys.readouterr().err.strip()))
        return real_save(directory, step, *a, **kw)

    monkeypatch.setattr(bookkeeping, "save_checkpoint", save_and_start_a_rival)
    train.main(QUICK + ["--out-dir", str(run_dir)])
    for code, err in seen:
        assert code == 2 and len(err.splitlines()) == 1 and f"in use by another run (PID {os.getpid()})" in err
    assert len(seen) == 2
    assert strip(read_jsonl(run_dir / "metrics.jsonl")) == strip(read_jsonl(uninterrupted / "metrics.jsonl"))
    a, b = final_weights(uninterrupted), final_weights(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lock_names_another_process_and_is_released_when_it_is_killed(tmp_path, capsys):
    from e2h_min.run.presets import parse_config
    from e2h_min.run.runlog import claim_run_dir
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from e2h_min.run.runlog import RunLock\n"
        f"lock = RunLock(Path({str(tmp_path)!r})); assert lock.try_acquire() is None\n"
        "print('locked', flush=True); sys.stdin.read()")],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = parse_config(["--out-dir", str(tmp_path)])
        with pytest.raises(Exception, match=f"in use by another run \\(PID {holder.pid}\\)"):
            claim_run_dir(cfg)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run_dir, lock = claim_run_dir(cfg)  # the kernel dropped the dead holder's lock
    lock.release()
    assert run_dir == tmp_path


@requires_tiny
def test_resume_needs_only_the_run_directory_and_names_every_changed_setting(tmp_path, capsys):
    train.main(QUICK + ["--out-dir", str(tmp_path), "--seed", "3"])
    (tmp_path / "final" / "config.json").unlink()  # as if killed before final/: only that is left to write
    capsys.readouterr()
    result = train.main(["--resume", str(tmp_path)])  # no flags: the run's own settings (seed 3, 3 steps, ...)
    assert "resuming with the settings of" in capsys.readouterr().out
    assert result["run_dir"] == str(tmp_path) and (tmp_path / "final" / "config.json").is_file()
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(tmp_path), "--seed", "4", "--lr", "0.5"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "--seed was 3, now 4" in err and "--lr was 0.0001, now 0.5" in err


def test_a_run_stopped_before_writing_anything_leaves_no_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--model", "nonexistent-model-xyz", "--out-dir", str(tmp_path / "run"), "--total-steps", "1"])
    assert exc.value.code == 2 and "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_model_directory_is_never_taken_for_a_run_nor_written_into(tmp_path, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 10}))
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for extra in ([], ["--overwrite"]):
        with pytest.raises(SystemExit) as exc:
            train.main(["--out-dir", str(model), "--total-steps", "1"] + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and "not a train.py run's" in err, err
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(model)])
    assert exc.value.code == 2 and "not a run directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # no file changed, no .lock left


@pytest.mark.parametrize("make_path, fragment", [
    (lambda tmp: tmp / "file", "is a file"),
    (lambda tmp: tmp / "file" / "run", "is a file"),
])
def test_out_dir_that_cannot_be_a_run_directory_is_one_line(tmp_path, capsys, make_path, fragment):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        train.main(["--out-dir", str(make_path(tmp_path)), "--total-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and fragment in err


# ----------------------------------------------------------------------------- divergence
@requires_tiny
def test_huge_lr_stops_with_one_line_naming_the_step(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(QUICK + ["--lr", "1e30", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()  # progress bars, then the one error line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and errors == [err.splitlines()[-1]] and "Traceback" not in err, err
    assert "the run diverged after the optimizer step" in errors[0] and "lower --lr (it is 1e+30" in errors[0]
    assert re.match(r"error: step [1-3]: ", errors[0])  # the first step whose update had a nonzero advantage


def test_nonfinite_parameter_is_named():
    from e2h_min.run.divergence import first_nonfinite_parameter
    ok, bad = torch.ones(3), torch.tensor([1.0, float("nan")])
    assert first_nonfinite_parameter([("a", ok), ("b", torch.tensor([1e30]))]) is None
    assert first_nonfinite_parameter([("a", ok), ("b", bad), ("c", torch.tensor([float("inf")]))]) == "b"


# ----------------------------------------------------------------------------- every entry point: one line, exit 2
def one_line_exit_2(capsys, call, fragment, after_progress=False):
    """call() exits 2 with one error line (after_progress: the last line, after the run's progress output)."""
    with pytest.raises(SystemExit) as exc:
        call()
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    lines = errors if after_progress else err.splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0] and err.splitlines()[-1] == lines[0], err


@pytest.mark.parametrize("argv, fragment", [
    # ranges and finiteness of every kind of knob
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--threads", "-1"], "--threads must be in [0, 1024]"),
    (["--seed", "-1"], "--seed must be in [0, 4294967295]"),
    (["--sigma", "1e-200"], "--sigma must be >= 0.001"),
    (["--sigma", "inf"], "--sigma must be a finite number"),
    (["--schedule-beta", "inf"], "--schedule-beta must be a finite number"),
    (["--schedule", "gaussian", "--min-prob", "0.9"], "min_prob must be in [0, 1/K] = [0, 0.25]"),
    # limits that would exhaust memory or hang, each named
    (["--max-new-tokens", "1000000000"], "--max-new-tokens must be <= 131,072 (the limit)"),
    (["--max-new-tokens", "5000"], "exceeds the model's context of 512 tokens"),
    (["--eval-problems", "1000000000"], "--eval-problems must be <= 100,000 per level (the limit)"),
    (["--total-steps", "10000000000"], "--total-steps must be <= 10,000,000 (the limit)"),
    (["--prompts-per-step", "100000", "--num-generations", "8"], "exceeds the limit of 65,536"),
    # environment and flag combinations
    (["--device", "mps"], "no usable MPS"),
    (["--device", "cuda:0"], "torch sees no CUDA GPU"),
    (["--resume", "x", "--overwrite"], "pass one"),
    (["--lora-r", "2", "--lora-targets", "qproj"], "'qproj' matches no module"),  # before the weights load
    (["--lora-r", "2", "--lora-targets", ","], "names no module"),
    # a setting that cannot apply is refused, not ignored in silence
    (["--schedule", "cosine", "--sigma", "0.3"], "--sigma applies only with --schedule gaussian"),
    (["--schedule", "gaussian", "--sec-ema", "0.9"], "--sec-ema applies only with --schedule sec"),
    (["--gamma", "0.5"], "--gamma applies only with --advantage ppo"),
    (["--lora-r", "0", "--save-merged"], "--save-merged applies only with LoRA"),
    (["--eval-pass-k-levels", "L1"], "--eval-pass-k-levels applies only with --eval-pass-k"),
])
def test_train_rejects_bad_values_up_front(argv, fragment, capsys, tmp_path):
    if "cuda" in argv[-1] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    one_line_exit_2(capsys, lambda: train.main(argv + ["--out-dir", str(tmp_path / "run")]), fragment)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flag", ["--out-dir", "--resume"])
def test_an_empty_directory_flag_is_refused_not_taken_as_the_default(flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were '' read as "not given", the run would go to ./runs/...
    one_line_exit_2(capsys, lambda: train.main([flag, "", "--total-steps", "1"]), f"{flag} is empty")
    assert list(tmp_path.iterdir()) == []


def test_help_prints_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "~30% slower" in out and "--overwrite" in out


def write_rows(path, rows, extra_lines=()):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(extra_lines))
    return str(path)


GSM8K_ROWS = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}", "split": "train" if i else "test"}
              for i in range(6)]


@pytest.mark.parametrize("extra, fragment", [
    ([b'{"question": "q", "answer": "\xff#### 1"}\n'], "d.jsonl:7: not UTF-8"),  # reported at its own line
    ([b"[" * 200_000 + b"\n"], "d.jsonl:7: not valid JSON (nested too deeply)"),
    ([b'{"question": "q", "answer": ' + b"1" * 5000 + b"}\n"], "d.jsonl:7: not valid JSON"),
])
def test_damaged_data_lines_are_one_line_naming_the_line(tmp_path, capsys, extra, fragment):
    data = write_rows(tmp_path / "d.jsonl", GSM8K_ROWS, extra)
    one_line_exit_2(capsys, lambda: train.main(["--task", "gsm8k", "--data", data, "--out-dir", str(tmp_path / "r")]),
                    fragment)


def test_rows_that_can_never_be_scored_are_skipped_with_a_count(tmp_path, capsys):
    from e2h_min.tasks import make_task
    rows = GSM8K_ROWS + [{"question": "nan?", "answer": float("nan"), "split": "train"},
                         {"question": "inf?", "answer": "#### inf", "split": "train"},
                         {"question": "x" * 200_000, "answer": "#### 1", "split": "train"}]
    task = make_task("gsm8k", data=write_rows(tmp_path / "d.jsonl", rows))
    err = capsys.readouterr().err
    assert task.skipped_rows == 3 and sum(task.num_problems(0, s) for s in ("train", "test")) == 6
    assert "skipped 3 row(s) that can never be scored (2 with a NaN or infinite answer, 1 with a field over " \
           "100,000 characters)" in err


@pytest.mark.parametrize("rows, fragment", [
    ([dict(r, split="test") for r in GSM8K_ROWS], "no 'train' problems at any level"),
    ([dict(r, level=3) for r in GSM8K_ROWS[1:]] + [dict(GSM8K_ROWS[1], level=0, question="other")],
     "puts all mass at step"),
])
def test_data_the_schedule_cannot_draw_from_is_refused_before_anything_is_written(tmp_path, capsys, rows, fragment):
    data = write_rows(tmp_path / "d.jsonl", rows)
    argv = ["--task", "gsm8k", "--data", data, "--schedule", "classic", "--out-dir", str(tmp_path / "r")]
    one_line_exit_2(capsys, lambda: train.main(argv), fragment)
    assert not (tmp_path / "r").exists()


def test_report_names_malformed_log_lines(tmp_path, capsys):
    from e2h_min.analysis import report
    from tests.test_report import write_run
    run = write_run(tmp_path / "r", steps=4)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ['{"step": 3, "reward_mean": "high"}'] + lines[3:]))
    one_line_exit_2(capsys, lambda: report.main([str(run), "--no-plots"]), "step 3: reward_mean is 'high'")
    (run / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[3:]))
    one_line_exit_2(capsys, lambda: report.main([str(run), "--no-plots"]), "metrics.jsonl:3: not valid JSON")
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "rew')  # torn last line: dropped
    report.main([str(run), "--no-plots", "--out", str(tmp_path / "out")])
    assert "skipped 1 torn line(s)" in capsys.readouterr().err  # dropped with a count
    one_line_exit_2(capsys, lambda: report.main([str(run), "--no-plots", "--out", str(run / "config.json")]),
                    "is a file")


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "10000000000"], "--steps must be <= 1,000,000 (the limit)"),
    (["--levels", "1000000000"], "--levels must be <= 100 (the limit)"),
    (["--sigma", "1e-200"], "sigma must be >= 0.001"),
    (["--beta", "inf"], "beta must be a finite number"),
])
def test_curriculum_cli_rejects_values_that_would_hang_or_divide_by_zero(argv, fragment, capsys):
    from e2h_min.rl import curriculum
    assert curriculum.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err, err


def test_label_difficulty_checks_its_output_before_sampling(tmp_path, capsys):
    from e2h_min.analysis import label_difficulty
    (tmp_path / "file").write_text("x")
    data = write_rows(tmp_path / "d.jsonl", GSM8K_ROWS)
    base = ["--model", "tiny", "--task", "gsm8k", "--data", data]
    one_line_exit_2(capsys, lambda: label_difficulty.main(base + ["--out", str(tmp_path / "file" / "o.jsonl")]),
                    "is a file")
    one_line_exit_2(capsys, lambda: label_difficulty.main(base + ["--out", str(tmp_path)]), "a directory")
    one_line_exit_2(capsys, lambda: label_difficulty.main(base + ["--out", "o.jsonl", "--samples", "10000000"]),
                    "--samples must be <= 65,536 (the limit)")
    one_line_exit_2(capsys, lambda: label_difficulty.main(base + ["--out", "o.jsonl", "--chat-date", "2025-13-40"]),
                    "--chat-date must be a date YYYY-MM-DD")


@requires_tiny
def test_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys, uninterrupted):
    import errno
    real_append = bookkeeping.append_jsonl

    def append_until_full(path, row):
        if row.get("step") == 3 and path.name == "metrics.jsonl":
            with open(path, "a") as handle:
                handle.write(json.dumps(row)[:20])  # the part that fitted
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_append(path, row)

    monkeypatch.setattr(bookkeeping, "append_jsonl", append_until_full)
    one_line_exit_2(capsys, lambda: train.main(QUICK + ["--out-dir", str(tmp_path)]), "no space left on the device",
                    after_progress=True)
    monkeypatch.setattr(bookkeeping, "append_jsonl", real_append)
    train.main(QUICK + ["--resume", str(tmp_path)])
    assert strip(read_jsonl(tmp_path / "metrics.jsonl")) == strip(read_jsonl(uninterrupted / "metrics.jsonl"))


# ----------------------------------------------------------------------------- issue 25: nothing lost
def copy_run(source: Path, target: Path, without_final: bool = False) -> Path:
    import shutil
    shutil.copytree(source, target)
    if without_final:  # as if killed before final/: a resume has work left (only final/ to write)
        shutil.rmtree(target / "final")
    return target


@requires_tiny
def test_a_kill_while_final_is_written_leaves_no_final_and_the_resume_writes_it(tmp_path, monkeypatch, uninterrupted):
    """final/ appears whole or not at all: killed part-way (after the weights, before the model card), the run is
    not taken for finished, and --resume writes the same final/ as the uninterrupted run."""
    run = copy_run(uninterrupted, tmp_path / "run", without_final=True)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # a kill: no cleanup runs
    monkeypatch.setattr(bookkeeping, "write_model_card", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(QUICK + ["--resume", str(run)])
    assert not (run / "final").exists() and (run / "final.partial" / "model.safetensors").exists()
    monkeypatch.undo()
    train.main(QUICK + ["--resume", str(run)])
    assert not (run / "final.partial").exists()
    names = lambda folder: sorted(p.name for p in folder.iterdir())  # noqa: E731
    assert names(run / "final") == names(uninterrupted / "final")
    # the model card of a resumed run is the uninterrupted run's: its start-up command, its step-0 accuracy
    card = (run / "final" / "README.md").read_text().replace(str(run), str(uninterrupted)).replace(
        f"# {run.name}", f"# {uninterrupted.name}")  # the run's name is its folder's
    assert card == (uninterrupted / "final" / "README.md").read_text()
    assert load_file(run / "final" / "model.safetensors").keys() == load_file(uninterrupted / "final" /
                                                                                  "model.safetensors").keys()


@requires_tiny
def test_a_full_disk_while_final_is_written_is_one_line(tmp_path, monkeypatch, capsys, uninterrupted):
    import errno

    from e2h_min.run import checkpoint
    run = copy_run(uninterrupted, tmp_path / "run", without_final=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(bookkeeping, "save_final", full)
    capsys.readouterr()
    one_line_exit_2(capsys, lambda: train.main(QUICK + ["--resume", str(run)]), "no space left on the device while "
                    "saving", after_progress=True)
    assert not (run / "final").exists() and not (run / f"final{checkpoint.PARTIAL_SUFFIX}").exists()


def snapshot(folder: Path) -> dict:
    """Every file under `folder` (the lock file included) with its bytes, and every folder."""
    return {p: (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@requires_tiny
@pytest.mark.parametrize("argv", [
    lambda run: ["--model", str(run / "final")],  # the headline: the model to train is inside the run
    lambda run: ["--model", str(run / "final"), "--lora-r", "0"],
    lambda run: ["--task", "gsm8k", "--data", str(run / "d.jsonl")],  # the data lives in the run folder
])
def test_overwrite_never_deletes_what_the_run_reads(tmp_path, uninterrupted, capsys, argv):
    run = copy_run(uninterrupted, tmp_path / "run")
    write_rows(run / "d.jsonl", [dict(r, level=i % 4) for i, r in enumerate(GSM8K_ROWS * 4)])
    before = snapshot(run)
    one_line_exit_2(capsys, lambda: train.main(argv(run) + ["--out-dir", str(run), "--overwrite", "--total-steps", "1",
                                                            "--max-new-tokens", "64"]),  # prompts fit the context
                    "which deleting")
    assert snapshot(run) == before


@pytest.mark.parametrize("extra, fragment", [
    ({"checkpoints/checkpoint-500/model.safetensors": "x"}, "checkpoints/checkpoint-500"),  # another trainer's
    ({"model.safetensors": "x"}, "model.safetensors"),
    ({"adapter_config.json": "{}"}, "inside the model folder"),
    ({"notes.txt": "mine"}, "notes.txt"),
    # inside the run's own folders: a user's file there is no more the run's than beside them
    ({"report/notes.md": "mine"}, "report/notes.md"),
    ({"eval/mine/results.txt": "mine"}, "eval/mine/results.txt"),
    ({"checkpoints/step_000001/user.txt": "mine"}, "checkpoints/step_000001/user.txt"),  # not in its manifest
    ({"final": "symlink"}, "final"),  # deleting through a link would reach outside the run
    # another run inside this one's folders, finished or still running: not this run's to delete
    ({"tensorboard/config.json": json.dumps({"schedule": "cosine", "total_steps": 3})}, "tensorboard (another run)"),
    ({"checkpoints/step_000099/config.json": json.dumps({"schedule": "cosine", "total_steps": 3})},
     "checkpoints/step_000099 (another run)"),
    ({"wandb/run/.lock": "123"}, "wandb/run (another run)"),
])
def test_overwrite_refuses_a_run_folder_holding_anything_else(tmp_path, capsys, extra, fragment):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "manifest.json").write_text(json.dumps({"model.safetensors": 1}))
    (run / "checkpoints" / "step_000001" / "model.safetensors").write_text("x")
    (run / "config.json").write_text(json.dumps({"schedule": "cosine", "total_steps": 3}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "report").mkdir()
    (run / "report" / "table.md").write_text("the report's own")
    (run / "eval" / "final").mkdir(parents=True)
    (run / "eval" / "final" / "report.json").write_text("{}")
    for name, text in extra.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        if text == "symlink":
            (tmp_path / "elsewhere").mkdir()
            (run / name).symlink_to(tmp_path / "elsewhere")
        else:
            (run / name).write_text(text)
    before = snapshot(run)
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", str(run), "--overwrite", "--total-steps", "1"]), fragment)
    assert snapshot(run) == before  # nothing deleted, no .lock added


@pytest.mark.parametrize("folder", ["/", str(Path.home())])
def test_the_filesystem_root_and_the_home_folder_are_no_run_folders(folder, capsys):
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", folder, "--total-steps", "1"]), "pass a folder of its own")


def test_a_new_run_inside_a_run_folder_is_refused(tmp_path, capsys):
    """RUN/tensorboard as the --out-dir of another run: that run would be deleted by RUN's --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"schedule": "cosine", "total_steps": 3}))
    before = snapshot(run)
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", str(run / "tensorboard" / "x"), "--total-steps", "1"]),
                    "is inside the run folder")
    assert snapshot(run) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    """Another tool's checkpoints/, eval/ and report/, no train.py config.json: not known to be a run."""
    folder = tmp_path / "other"
    for name in ("checkpoints/checkpoint-500/w.bin", "eval/r.json", "report/t.md"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("theirs")
    before = snapshot(folder)
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", str(folder), "--overwrite", "--total-steps", "1"]),
                    "has no train.py config.json")
    assert snapshot(folder) == before


@requires_tiny
def test_a_run_folder_holds_only_its_own_files(tmp_path, uninterrupted):
    """OWN_FILES is what train.py and the tools that write into a run folder (eval.py, the report, the trackers)
    write there; a finished run with all of them is foreign-free, and anything else is named."""
    from e2h_min.run.runlog import OWN_FILES, foreign_files
    run = copy_run(uninterrupted, tmp_path / "run")
    assert {p.name for p in run.iterdir()} <= OWN_FILES and foreign_files(run) == []
    for name in ("eval/final/report.json", "report/table.md", "tensorboard/events", "wandb_run_id",
                 "checkpoints/damaged_step_000001/x", "checkpoints/.tmp_step_000004_123/x"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("x")
    assert foreign_files(run) == []
    # links inside the run's folders are the trackers' own (wandb's latest-run) and are removed, not followed
    (run / "wandb" / "offline-run-1").mkdir(parents=True)
    (run / "wandb" / "latest-run").symlink_to(run / "wandb" / "offline-run-1")
    # a checkpoint set aside because its manifest was torn: its files are the run's
    (run / "checkpoints" / "damaged_step_000003").mkdir()
    (run / "checkpoints" / "damaged_step_000003" / "manifest.json").write_text('{"model.safe')
    (run / "checkpoints" / "damaged_step_000003" / "model.safetensors").write_text("x")
    assert foreign_files(run) == []
    (run / "checkpoints" / "best").mkdir()
    (run / "weights.bin").write_text("x")
    (run / "report" / "summary.md").write_text("x")  # no name the report writes
    assert foreign_files(run) == ["checkpoints/best", "report/summary.md", "weights.bin"]


@pytest.mark.parametrize("inside", ["final", "final/sub"])
@pytest.mark.parametrize("marker", ["adapter_config.json", "model"])
def test_out_dir_inside_a_model_or_adapter_is_refused(tmp_path, capsys, inside, marker):
    final = tmp_path / "lora_run" / "final"
    final.mkdir(parents=True)
    if marker == "model":
        (final / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
        (final / "model.safetensors").write_text("x")
    else:
        (final / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    before = snapshot(tmp_path)
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", str(tmp_path / "lora_run" / inside),
                                                "--total-steps", "1"]), "")
    assert snapshot(tmp_path) == before


def rewrite_weights_in_place(path: Path) -> None:
    """Every weight nudged, the file rewritten with the same header: the same size, other (finite) bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    size = path.stat().st_size
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, str(path), metadata)
    assert path.stat().st_size == size


def test_checksum_catches_same_size_bytes_and_nan_weights(tmp_path):
    import hashlib
    model, tok, opt, sched = make_state()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    first, latest = list_checkpoints(tmp_path)
    rewrite_weights_in_place(latest / "model.safetensors")
    assert verify_checkpoint(latest) == ("model.safetensors does not match its sha256 in manifest.json (its bytes "
                                         "changed after the save)")
    # NaN weights with a manifest that agrees (written so): damaged all the same
    from safetensors.torch import load_file as load, save_file
    weights = load(first / "model.safetensors")
    next(iter(weights.values()))[0] = float("nan")
    save_file(weights, str(first / "model.safetensors"), {"format": "pt"})
    manifest = json.loads((first / "manifest.json").read_text())
    raw = (first / "model.safetensors").read_bytes()
    manifest["model.safetensors"] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (first / "manifest.json").write_text(json.dumps(manifest))
    assert "holds NaN/inf" in verify_checkpoint(first)


def test_a_checkpoint_of_the_earlier_manifest_format_still_loads_with_a_note(tmp_path):
    model, tok, opt, sched = make_state()
    path = save_checkpoint(tmp_path, 1, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    manifest = json.loads((path / "manifest.json").read_text())
    assert all(set(v) == {"bytes", "sha256"} for v in manifest.values())
    (path / "manifest.json").write_text(json.dumps({k: v["bytes"] for k, v in manifest.items()}))  # sizes only
    logged = []
    assert resume_checkpoint(tmp_path, logged.append) == path
    assert len(logged) == 1 and "predates checksums" in logged[0]
    (path / "rng.pt").write_bytes((path / "rng.pt").read_bytes()[:10])
    assert "rng.pt is 10 bytes" in verify_checkpoint(path)


@requires_tiny
def test_checkpoint_changed_in_place_is_set_aside_and_the_run_ends_equal(tmp_path, monkeypatch, uninterrupted,
                                                                         capsys):
    broken = tmp_path / "broken"
    run_killed_after_checkpoint(broken, 2, monkeypatch)
    rewrite_weights_in_place(broken / "checkpoints" / "step_000002" / "model.safetensors")
    train.main(QUICK + ["--resume", str(broken)])
    out = capsys.readouterr().out
    assert "step_000002 is damaged (model.safetensors does not match its sha256" in out
    assert "step_000001" in out.split("resumed from")[1].splitlines()[0]
    assert (broken / "checkpoints" / "damaged_step_000002").is_dir()
    a, b = final_weights(uninterrupted), final_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for log in ("metrics.jsonl", "eval.jsonl", "completions.jsonl"):
        assert strip(read_jsonl(broken / log)) == strip(read_jsonl(uninterrupted / log)), log


@requires_tiny
@pytest.mark.parametrize("log", ["eval.jsonl", "completions.jsonl"])
def test_a_damaged_log_refuses_the_resume_before_any_log_is_rewritten(tmp_path, uninterrupted, capsys, log):
    run = copy_run(uninterrupted, tmp_path / "run", without_final=True)
    with open(run / "metrics.jsonl", "a") as handle:  # a torn last line: truncation would rewrite this file
        handle.write('{"step": 4, "lo')
    lines = (run / log).read_text().splitlines(keepends=True)
    (run / log).write_text("".join(lines[:1] + ["garbage{\n"] + lines[1:]))
    before = snapshot(run)
    one_line_exit_2(capsys, lambda: train.main(["--resume", str(run)]), f"{log}:2: not valid JSON")
    assert snapshot(run) == before


def test_full_disk_during_a_checkpoint_names_the_folder_and_the_checkpoint_kept(tmp_path, monkeypatch):
    import errno

    from e2h_min.run import checkpoint
    from e2h_min.errors import UserError
    model, tok, opt, sched = make_state()
    first = save_checkpoint(tmp_path, 1, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    real_save = torch.save

    def save_until_full(obj, path, *a, **kw):
        if Path(path).name == "optimizer.pt":
            Path(path).write_bytes(b"PK\x03\x04 part")  # what fitted
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    with pytest.raises(UserError) as exc:
        save_checkpoint(tmp_path, 2, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    assert str(exc.value) == (f"no space left on the device while saving checkpoint step_000002 in "
                              f"{tmp_path / 'checkpoints'}; step_000001 is kept intact: free some space, then "
                              f"--resume {tmp_path}")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]  # the partial one removed
    assert verify_checkpoint(first) is None
    monkeypatch.setattr(checkpoint.torch, "save", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not a full disk: the error itself, not a disk-full line
        save_checkpoint(tmp_path, 2, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())


def test_optimizer_state_of_another_model_is_one_line_naming_the_checkpoint(tmp_path):
    from e2h_min.run.checkpoint import load_training_state
    from e2h_min.errors import UserError
    model, tok, opt, sched = make_state()
    path = save_checkpoint(tmp_path, 1, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    other = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    with pytest.raises(UserError, match=f"checkpoint {path}: its optimizer state does not fit its weights"):
        load_training_state(path, other, torch.optim.lr_scheduler.LambdaLR(other, lambda s: 1.0), None)


def test_task_data_changed_under_the_run_is_one_line_naming_the_checkpoint(tmp_path):
    from e2h_min.errors import UserError
    from e2h_min.rl.curriculum import LevelSampler
    from e2h_min.run.runlog import check_sampler_state
    from tests.test_curriculum import FileTask
    state = LevelSampler(FileTask([5, 3]), "balanced", 10, seed=1).state_dict()
    check_sampler_state(LevelSampler(FileTask([5, 3]), "balanced", 10, seed=1), state, tmp_path)
    with pytest.raises(UserError, match=r"checkpoint .* does not fit this run's task data .*rows=\[5, 3\]"):
        check_sampler_state(LevelSampler(FileTask([5, 4]), "balanced", 10, seed=1), state, tmp_path)


def test_task_file_whose_answers_changed_under_the_run_is_refused_on_resume(tmp_path):
    """Same rows per level, other golds: the counts cannot tell, the rows' fingerprint does (and names the file)."""
    from e2h_min.errors import UserError
    from e2h_min.rl.curriculum import LevelSampler
    from e2h_min.run.runlog import check_sampler_state
    from e2h_min.tasks.math_tasks import GSM8KTask
    from tests.test_math_tasks import FIXTURES
    lines = (FIXTURES / "gsm8k.jsonl").read_text().splitlines()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    state = LevelSampler(GSM8KTask(str(data)), "balanced", 10, seed=1).state_dict()
    data.write_text("\n".join(lines) + "\n\n")  # formatting only: the same problems
    check_sampler_state(LevelSampler(GSM8KTask(str(data)), "balanced", 10, seed=1), state, tmp_path)
    changed = [json.dumps({**json.loads(line), "answer": json.loads(line)["answer"] + "1"}) for line in lines]
    data.write_text("\n".join(changed) + "\n")
    with pytest.raises(UserError, match=rf"does not fit this run's task data .*{data} holds other problems"):
        check_sampler_state(LevelSampler(GSM8KTask(str(data)), "balanced", 10, seed=1), state, tmp_path)


@requires_tiny
def test_resume_refuses_a_model_folder_whose_weights_changed(tmp_path, capsys):
    """The reference (and a LoRA base) is reloaded from --model on resume: the same path with other weights would
    resume a different run in silence. Checkpoints record the model's fingerprint; a change is one line."""
    import shutil

    from safetensors.torch import save_file

    from e2h_min.engine.models import TINY_MODEL_DIR, model_fingerprint
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    run = tmp_path / "run"
    train.main(["--model", str(model), "--out-dir", str(run), "--total-steps", "2", "--save-every", "1",
                "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8", "--eval-every", "0",
                "--eval-problems", "2", "--beta", "0.01", "--threads", "1"])
    state = json.loads((run / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["model"] == model_fingerprint(str(model))
    shutil.rmtree(run / "final")  # not finished: the resume would train step 2 again
    weights = load_file(model / "model.safetensors")
    save_file({k: v * 1.05 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    model_fingerprint.cache_clear()
    capsys.readouterr()  # the first run's output
    one_line_exit_2(capsys, lambda: train.main(["--resume", str(run)]), "is not the model checkpoint")


def test_a_hub_model_is_recorded_by_the_commit_it_loaded_and_another_commit_is_refused(tmp_path):
    from types import SimpleNamespace

    from e2h_min.engine.models import loaded_model_record
    from e2h_min.errors import UserError
    from e2h_min.run.setup import check_model_unchanged
    loaded = SimpleNamespace(config=SimpleNamespace(_commit_hash="a" * 40))
    record = loaded_model_record("org/not-a-local-folder", loaded)
    assert record == "hub commit " + "a" * 40
    check_model_unchanged("org/m", record, record, tmp_path)  # the same commit: fine
    check_model_unchanged("org/m", None, record, tmp_path)  # a checkpoint of an earlier version: not compared
    with pytest.raises(UserError, match="loaded commit bbbbbbbbbbbb, but checkpoint .* commit aaaaaaaaaaaa"):
        check_model_unchanged("org/m", record, "hub commit " + "b" * 40, tmp_path)


def test_wandb_without_credentials_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_CONFIG_DIR",
                 "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no wandb settings
    monkeypatch.setattr("e2h_min.run.setup.load_model", lambda *a, **kw: pytest.fail("the model was loaded"))
    one_line_exit_2(capsys, lambda: train.main(["--report-to", "wandb", "--out-dir", str(tmp_path / "run")]),
                    "set WANDB_MODE=offline")
    assert not (tmp_path / "run").exists()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    (tmp_path / ".netrc").chmod(0o600)
    from e2h_min.run.tracking import wandb_can_log
    assert wandb_can_log()


@requires_tiny
def test_eval_on_an_adapter_with_no_base_is_one_line(tmp_path, uninterrupted, capsys):
    import eval as evaluate
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for file in (uninterrupted / "final").glob("*"):
        if file.name.startswith(("tokenizer", "chat_template")):
            (adapter / file.name).write_bytes(file.read_bytes())
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": None, "peft_type": "LORA"}))
    one_line_exit_2(capsys, lambda: evaluate.main(["--model", str(adapter), "--n", "1", "--quiet"]),
                    "adapter_config.json: base_model_name_or_path is null")


@pytest.mark.parametrize("name, fragment", [
    ("a" * 300, "a path component of 300 bytes"),
    ("/".join(["b" * 99] * 50), "the path is"),
    (os.fsdecode(b"run-\xff"), "not valid UTF-8"),
])
def test_paths_the_filesystem_or_a_checkpoint_cannot_take_are_refused_when_claimed(tmp_path, capsys, name, fragment):
    one_line_exit_2(capsys, lambda: train.main(["--out-dir", str(tmp_path / name), "--total-steps", "1"]), fragment)
    assert list(tmp_path.iterdir()) == []
    data = write_rows(tmp_path / os.fsdecode(b"d\xff.jsonl"), GSM8K_ROWS)
    one_line_exit_2(capsys, lambda: train.main(["--task", "gsm8k", "--data", data, "--out-dir", str(tmp_path / "r")]),
                    "--data")


@requires_tiny
@pytest.mark.parametrize("damage, fragment", [
    (lambda f: f.write_text(f.read_text().replace('"lr": 0.0001', '"lr": 0.5')), "disagree (lr 0.5 vs 0.0001)"),
    (lambda f: f.write_text("{not json"), "config.json is unreadable"),
    (lambda f: f.unlink(), "config.json is missing"),
    (lambda f: (f.unlink(), f.mkdir()), "config.json is unreadable (Is a directory)"),
])
def test_resume_with_a_damaged_config_json_names_it(tmp_path, uninterrupted, capsys, damage, fragment):
    run = copy_run(uninterrupted, tmp_path / "run", without_final=True)
    damage(run / "config.json")
    before = snapshot(run)
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and fragment in err and str(run / "config.json") in err
    assert "drop those flags" not in err
    assert snapshot(run) == before


@requires_tiny
def test_resume_with_a_checkpoint_of_another_run_names_its_trainer_state(tmp_path, uninterrupted, capsys):
    import shutil
    other = tmp_path / "other"
    train.main(QUICK + ["--out-dir", str(other), "--seed", "5", "--total-steps", "1"])
    run = copy_run(uninterrupted, tmp_path / "run", without_final=True)
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(other / "checkpoints", run / "checkpoints")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "drop those flags" not in err, err
    assert str(run / "checkpoints" / "step_000001" / "trainer_state.json") in err and "seed 0 vs 5" in err


@requires_tiny
def test_eval_blames_the_run_config_not_a_flag_for_a_bad_chat_date(tmp_path, uninterrupted, capsys):
    import eval as evaluate
    run = copy_run(uninterrupted, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "chat_date": "2025-13-40"}))
    one_line_exit_2(capsys, lambda: evaluate.main(["--model", str(run), "--n", "1", "--quiet"]),
                    f"{run / 'config.json'}: chat_date must be a date YYYY-MM-DD, got '2025-13-40'")


def test_resume_on_a_plain_folder_leaves_no_lock(tmp_path, capsys):
    import tempfile
    (tmp_path / "notes.txt").write_text("mine")
    system_tmp = Path(tempfile.gettempdir())
    had_lock = (system_tmp / ".lock").exists()
    for folder in (tmp_path, system_tmp):
        one_line_exit_2(capsys, lambda: train.main(["--resume", str(folder)]), "not a run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (system_tmp / ".lock").exists() == had_lock
