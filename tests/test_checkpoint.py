"""Checkpoints are atomic: a kill -9 during a write leaves the previous one complete and loadable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from e2h_min.run.checkpoint import latest_checkpoint, list_checkpoints, load_training_state, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class FakeTokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer_config.json").write_text("{}")


def make_state(seed=0):
    from tests.test_train import random_model
    model = random_model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, FakeTokenizer(), optimizer, scheduler


def test_save_load_round_trip_and_keep_last(tmp_path):
    model, tok, opt, sched = make_state()
    gen = torch.Generator().manual_seed(7)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, tok, opt.state_dict(), sched, {"sampler": {"cursor": step}}, gen, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    path = latest_checkpoint(tmp_path)
    _, _, opt2, sched2 = make_state(seed=1)
    gen2 = torch.Generator()
    state = load_training_state(path, opt2, sched2, gen2)
    assert state["step"] == 3 and state["sampler"] == {"cursor": 3}
    assert torch.equal(gen2.get_state(), gen.get_state())
    first = next(iter(opt.state.values()))
    assert torch.equal(next(iter(opt2.state.values()))["exp_avg"], first["exp_avg"])
    reloaded = AutoModelForCausalLM.from_pretrained(path)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    model, tok, opt, sched = make_state()
    save_checkpoint(tmp_path, 1, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, str(ROOT / "tests" / "checkpoint_writer.py"), str(tmp_path),
                              str(marker)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not marker.exists():  # wait for the child to be mid-write (a condition, not a fixed delay)
        assert child.poll() is None, "writer exited before reaching the write"
        assert time.monotonic() < deadline, "writer never reached the write"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert any(p.name.startswith(".tmp_step_000002") for p in (tmp_path / "checkpoints").iterdir())
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_000001"  # the half-written step 2 is invisible
    _, _, opt2, sched2 = make_state(seed=3)
    assert load_training_state(latest, opt2, sched2, torch.Generator())["step"] == 1
    AutoModelForCausalLM.from_pretrained(latest)
    # the next save sweeps the debris away
    save_checkpoint(tmp_path, 2, model, tok, opt.state_dict(), sched, {"sampler": {}}, torch.Generator())
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
    assert latest_checkpoint(tmp_path).name == "step_000002"
