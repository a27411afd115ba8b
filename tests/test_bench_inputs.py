"""Bad input to the bench/ and scripts/ entry points: one line naming the problem, exit code 2, before any work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(path: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, fragment", [
    ("bench/rollout.py", ["--repeats", "-1"], "argument --repeats: must be >= 1, got -1"),
    ("bench/rollout.py", ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    ("bench/rollout.py", ["--a-group", "x"], "expected an integer, got 'x'"),
    ("bench/lora_rollout.py", ["--repeats", "-1"], "argument --repeats: must be >= 1"),
    ("bench/step.py", ["--steps", "0"], "argument --steps: must be >= 1, got 0"),
    ("bench/checkpoint_hash.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("scripts/kl_to_reference.py", ["{tmp}/no_run"], "no config.json, so not a train.py run directory"),
    ("bench/gpu_check.py", ["--smoke", "--out", "{tmp}/a_file"], "is a file, not a directory"),
    ("bench/rollout.py", ["--device", "bogus"], "not a device torch knows"),
    ("bench/rollout.py", ["--a-model-dir", "{tmp}/none"], "no model there"),
    ("bench/lora_rollout.py", ["--model", "{tmp}/none"], "no model folder there"),
    ("bench/checkpoint_hash.py", ["--params", "1e30"], "GB free"),  # it would fill the disk
    ("bench/checkpoint_hash.py", ["--params", "-5"], "GB free"),
    ("bench/checkpoint_hash.py", ["--dir", "{tmp}/a_file"], "is not a directory"),
    ("bench/memory.py", ["--rows", "-1"], "argument --rows: must be >= 1"),
    ("bench/memory.py", ["--modes", "bogus"], "invalid choice: 'bogus'"),
    ("bench/memory.py", ["--train-peak", "{tmp}/a_file"], "is a file"),
    ("scripts/mutation_check.py", ["--bogus"], "unrecognized arguments: --bogus"),
    ("scripts/build_tiny_model.py", ["--minutes", "nan"], "--minutes must be a positive number"),
    ("scripts/build_tiny_model.py", ["--out", "{tmp}/a_file"], "is a file, not a directory"),
    ("scripts/e2h_sweep.py", ["--out", "{tmp}/a_file"], "is a file, not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(script, argv, fragment, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("not a folder")
    module = load(script, monkeypatch)
    monkeypatch.setattr(sys, "argv", [script] + [a.replace("{tmp}", str(tmp_path)) for a in argv])
    with pytest.raises(SystemExit) as exc:
        sys.exit(module.main())  # some mains return their exit code
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err and err.count("\n") == 1, err
