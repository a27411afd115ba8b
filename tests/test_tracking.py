"""Live tracking (TensorBoard, W&B offline), the console line, the missing-package path and the model card.

Every metrics.jsonl and eval.jsonl field must reach the tracker at its step; both trackers are read back with
their own formats (tensorboard's event reader; wandb's protobuf records in the offline run's .wandb file). W&B runs
with WANDB_MODE=offline, its files under the test's tmp directory, and proxies pointing at a closed port so any
network attempt would fail rather than leave the machine.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train
from e2h_min.run import setup as run_setup
from e2h_min.run import tracking
from e2h_min.errors import UserError
from e2h_min.run.model_card import reproducing_command
from e2h_min.engine.models import TINY_MODEL_DIR
from tests.optional import needs

requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")
REPO = Path(__file__).resolve().parent.parent
LEVELS = ["L0", "L1", "L2", "L3", "OOD"]
RUN_ARGS = ["--total-steps", "4", "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "24",
            "--eval-problems", "2", "--eval-every", "2", "--save-every", "0", "--log-completions-every", "0",
            "--beta", "0.01", "--threads", "1"]
WANDB_OFFLINE_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
                     "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
                     "WANDB_PROJECT": "e2h-min-tests", "HTTP_PROXY": "http://127.0.0.1:9",
                     "HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- pure pieces


def test_report_to_parses_lists_and_rejects_unknown_names():
    assert tracking.parse_report_to("none") == []
    assert tracking.parse_report_to("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    for bad, fragment in (("tensorbord", "unknown --report-to 'tensorbord'"), ("none,wandb", "cannot be combined")):
        with pytest.raises(UserError, match=fragment):
            tracking.parse_report_to(bad)


def test_tracker_scalars_keep_every_field_under_its_name():
    row = {"step": 3, "loss": 0.5, "skipped_updates": 0, "level_probs": [0.9, 0.1], "accuracy/L0": 1.0}
    assert tracking.tracker_scalars(row, ["L0", "L1"]) == {
        "loss": 0.5, "skipped_updates": 0.0, "level_probs/L0": 0.9, "level_probs/L1": 0.1, "accuracy/L0": 1.0}
    assert tracking.tracker_scalars({"step": 0, "L0/accuracy": 0.25}, ["L0"], prefix="eval/") == {
        "eval/L0/accuracy": 0.25}


@pytest.mark.parametrize("total, every, lines", [(1600, 0, 101), (200, 0, 41), (200, 1, 200), (7, 0, 3), (1, 0, 1)])
def test_console_prints_about_a_hundred_lines_for_a_long_run(total, every, lines):
    every = tracking.resolve_log_every(every, total)
    assert sum(tracking.should_log(step, total, every) for step in range(1, total + 1)) == lines


def test_console_line_shows_only_what_was_computed():
    row = {"step": 5, "reward_mean": 0.25, "level_counts": [3, 0, 1], "accuracy/L0": 0.5, "accuracy/L2": 0.0,
           "kl": 0.0, "clip_ratio": 0.0, "completion_length_mean": 20.0, "tokens_per_second": 900.0}
    line = tracking.console_line(row, ["L0", "L1", "L2"], 200, kl_computed=False, clipping_possible=True)
    assert line == "step   5/200 | reward 0.250 | acc L0 0.50 L2 0.00 | prompts L0 3 L2 1 | len 20.0 | 900 tok/s"
    row.update(kl=0.0123, entropy=0.8, clip_ratio=0.05, value_loss=0.2)
    line = tracking.console_line(row, ["L0", "L1", "L2"], 200, kl_computed=True, clipping_possible=True)
    assert "kl 0.0123 | clip 0.050 | ent 0.80 | vloss 0.2000" in line
    line = tracking.console_line(row, ["L0", "L1", "L2"], 200, kl_computed=True, clipping_possible=False)
    assert "kl 0.0123 | ent 0.80 | vloss 0.2000" in line


def test_reproducing_command_lists_the_settings_that_differ_from_the_defaults():
    config = {"model": "Qwen2.5-1.5B", "schedule": "gaussian", "share_prompt_forward": False, "min_prob": None,
              "resume": "runs/x", "lr": 1e-6}
    assert reproducing_command(config) == "python train.py --model Qwen2.5-1.5B --no-share-prompt-forward"


# ----------------------------------------------------------------------------- a missing package


def test_missing_tracker_package_is_one_line_and_exit_2_before_any_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker check")

    monkeypatch.setattr(run_setup, "load_tokenizer", no_model)
    monkeypatch.setattr(run_setup, "load_model", no_model)
    with pytest.raises(SystemExit) as exc:
        train.main(["--report-to", "wandb", "--out-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_neither_tracker_installed_fails_in_one_line_from_the_command_line(tmp_path):
    """A real `python train.py` whose imports of tensorboard and wandb fail (a sitecustomize shim blocks them)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    # None in sys.modules is how Python marks a module as absent: `import` raises ModuleNotFoundError and
    # importlib.util.find_spec returns None (libraries such as accelerate probe availability that way)
    (shim / "sitecustomize.py").write_text("import sys\nsys.modules.update(tensorboard=None, wandb=None)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)])}
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--report-to", "tensorboard,wandb",
                             "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --report-to tensorboard,wandb needs tensorboard wandb, which is not "
                                     "installed: pip install tensorboard wandb (or run without --report-to "
                                     "tensorboard,wandb)")
    assert result.stdout == "" and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- both trackers, one real run


def read_wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log format: 32 KiB blocks of CRC/length/type-framed chunks,
    after a 7-byte ':W&B' header), parsed with wandb's own Record message."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 4-step run logging to TensorBoard and W&B (offline) at once."""
    root = tmp_path_factory.mktemp("tracked")
    saved = {key: os.environ.get(key) for key in [*WANDB_OFFLINE_ENV, "WANDB_DIR"]}
    os.environ.update(WANDB_OFFLINE_ENV, WANDB_DIR=str(root / "wandb-dir"))
    (root / "wandb-dir").mkdir()
    try:
        train.main(RUN_ARGS + ["--report-to", "tensorboard,wandb", "--out-dir", str(root / "run")])
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return root


def expected_scalars(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> every field of metrics.jsonl and eval.jsonl at that step, as the trackers name them."""
    expected: dict[int, dict[str, float]] = {}
    for row in read_jsonl(run_dir / "metrics.jsonl"):
        expected.setdefault(row["step"], {}).update(tracking.tracker_scalars(row, LEVELS))
    for row in read_jsonl(run_dir / "eval.jsonl"):
        expected.setdefault(row["step"], {}).update(tracking.tracker_scalars(row, LEVELS, prefix="eval/"))
    return expected


def assert_logged_every_step(logged: dict, expected: dict, rel_tol: float, abs_tol: float) -> None:
    """The tracker holds exactly the expected names at every step (0 = the first eval, 1-4 = the steps), each
    value equal to metrics.jsonl / eval.jsonl within the tolerances."""
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, values in expected.items():
        assert set(logged[step]) == set(values), step
        for name, value in values.items():
            assert math.isclose(logged[step][name], value, rel_tol=rel_tol, abs_tol=abs_tol), (step, name)


@requires_tiny
@needs("tensorboard", "wandb")  # the tracked run logs to both
def test_tensorboard_event_file_holds_every_metric_at_every_step(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tracked_run / "run"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged: dict[int, dict[str, float]] = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            logged.setdefault(event.step, {})[tag] = event.value
    # TensorBoard stores float32: a looser tolerance than W&B's JSON
    assert_logged_every_step(logged, expected_scalars(run_dir), rel_tol=1e-6, abs_tol=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]  # the config, once


@requires_tiny
@needs("tensorboard", "wandb")
def test_wandb_offline_run_holds_every_metric_at_every_step_and_the_config(tracked_run):
    run_dir = tracked_run / "run"
    run_id = (run_dir / tracking.WANDB_ID_FILE).read_text().strip()
    files = list((tracked_run / "wandb-dir").glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    logged, configs, names = {}, [], []
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            logged.setdefault(int(items.pop("_step")), {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif kind == "config":
            configs.append({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "run":  # the run record carries the config given to wandb.init
            names.append(record.run.display_name)
            configs.append({item.key: json.loads(item.value_json) for item in record.run.config.update})
    assert_logged_every_step(logged, expected_scalars(run_dir), rel_tol=1e-9, abs_tol=1e-12)
    saved_config = json.loads((run_dir / "config.json").read_text())
    assert any({k: c.get(k) for k in saved_config} == saved_config for c in configs)
    assert names and set(names) == {"run"}  # named after the run folder
    logs = " ".join(p.read_text() for p in files[0].parent.glob("logs/*.log"))
    assert "127.0.0.1:9" not in logs  # any network attempt would have gone through the dead proxy and be logged


@requires_tiny
@needs("tensorboard", "wandb")
def test_model_card_loads_and_names_the_base_model_and_the_final_results(tracked_run):
    from huggingface_hub import ModelCard

    run_dir = tracked_run / "run"
    card = ModelCard.load(run_dir / "final" / "README.md")
    assert card.data.base_model == "e2h_min/assets/tiny-countdown" and card.data.library_name == "transformers"
    assert "grpo" in card.data.tags and "countdown" in card.data.tags
    last = read_jsonl(run_dir / "eval.jsonl")[-1]
    assert last["step"] == 4 and "at step 4" in card.text
    for level in LEVELS:
        assert f"| {level} | 2 | {last[f'{level}/accuracy']:.1%} |" in card.text
    assert "python train.py --out-dir" in card.text and "--report-to tensorboard,wandb" in card.text
    assert "- torch " in card.text and "- transformers " in card.text


@requires_tiny
def test_console_prints_a_line_every_log_every_steps(tmp_path, capsys):
    train.main(RUN_ARGS + ["--total-steps", "7", "--eval-every", "0", "--beta", "0", "--log-every", "3",
                           "--out-dir", str(tmp_path)])
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).replace("\r", "\n").splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].strip() for line in lines] == ["step 1/7", "step 3/7", "step 6/7", "step 7/7"]
    assert not any("kl " in line or "clip " in line for line in lines)  # beta 0, one iteration: neither is computed


def test_wandb_run_is_named_after_the_run_folder_and_resumed_by_the_id_stored_there(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, scalars, step):
            calls[-1]["logged"].append((step, scalars))

        def finish(self):
            calls[-1]["finished"] = True

    def init(**kwargs):
        calls.append({**kwargs, "logged": []})
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    monkeypatch.setattr(sys.modules["wandb"], "init", init, raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    run_dir = tmp_path / "countdown-cosine-s0"
    run_dir.mkdir()
    first = tracking.Trackers(["wandb"], run_dir, {"lr": 0.1}, ["L0"])
    first.log_metrics({"step": 1, "loss": 0.5, "level_probs": [1.0]})
    first.close()
    resumed = tracking.Trackers(["wandb"], run_dir, {"lr": 0.1}, ["L0"], start_step=2)
    resumed.close()
    fresh = tracking.Trackers(["wandb"], run_dir, {"lr": 0.1}, ["L0"])
    fresh.close()
    assert [c["name"] for c in calls] == ["countdown-cosine-s0"] * 3 and calls[0]["config"] == {"lr": 0.1}
    assert calls[0]["dir"] == str(run_dir) and calls[0]["logged"] == [(1, {"loss": 0.5, "level_probs/L0": 1.0})]
    assert calls[1]["id"] == calls[0]["id"] and calls[1]["resume"] == "allow"
    assert calls[2]["id"] != calls[0]["id"] and calls[2]["resume"] is None
    assert (run_dir / tracking.WANDB_ID_FILE).read_text().strip() == calls[2]["id"]
    assert all(c.get("finished") for c in calls)


@needs("tensorboard")
def test_tensorboard_after_resume_shows_the_redone_steps_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = tracking.Trackers(["tensorboard"], tmp_path, {"lr": 0.1}, ["L0"])
    for step in (1, 2, 3, 4):  # the run died after step 4; its checkpoint is at step 2
        first.log_metrics({"step": step, "loss": float(step)})
    first.close()
    resumed = tracking.Trackers(["tensorboard"], tmp_path, {"lr": 0.1}, ["L0"], start_step=2)
    for step in (3, 4):
        resumed.log_metrics({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    fresh = tracking.Trackers(["tensorboard"], tmp_path, {"lr": 0.1}, ["L0"])  # a new run in the same folder
    fresh.log_metrics({"step": 1, "loss": -1.0})
    fresh.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, -1.0)]


@pytest.mark.parametrize("argv, fragment", [(["--report-to", "tensorbord"], "unknown --report-to 'tensorbord'"),
                                            (["--log-every", "-1"], "--log-every must be >= 0")])
def test_bad_tracking_flags_give_one_line_and_exit_code_2(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(argv + ["--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and fragment in err and len(err.splitlines()) == 1
