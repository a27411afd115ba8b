"""Atomic checkpoints: a kill at any moment leaves the previous checkpoint intact and loadable.

A checkpoint is a directory checkpoints/step_000040/ holding the policy (safetensors, via save_pretrained), the
tokenizer, optimizer + LR scheduler state, every RNG state and the curriculum sampler's state. It is written
into a hidden temporary directory, every file is fsynced, then the directory is renamed into place (rename is
atomic on POSIX filesystems) and the parent directory fsynced. Readers only ever look at step_* names, so a
half-written temporary directory is invisible and is swept away by the next save.
Non-weight state loads with torch.load(weights_only=True): no pickle code runs on load.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CHECKPOINT_DIR = "checkpoints"


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator | None) -> dict:
    """Python, numpy, torch (CPU and every CUDA device) and the sampling generator's states."""
    legacy = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [legacy[0], legacy[1].tolist(), *legacy[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampling": generator.get_state() if generator is not None else None,
    }
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state["sampling"] is not None:
        generator.set_state(state["sampling"])


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    generator: torch.Generator | None, keep: int = 2, extra_modules: dict | None = None) -> Path:
    """Write checkpoints/step_{step:06d} atomically; keep the newest `keep` checkpoints. Returns its path.

    `step` is the number of optimizer steps completed; trainer_state must be JSON-serialisable (config, sampler);
    extra_modules (name -> nn.Module, e.g. the PPO value head) are saved as NAME.safetensors.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    for stale in root.glob(".tmp_*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, module in (extra_modules or {}).items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(rng_state(generator), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. end of run right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a checkpoint is complete when its trainer_state.json exists)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_training_state(path: Path, optimizer, scheduler, generator: torch.Generator | None) -> dict:
    """Restore optimizer, scheduler and RNG states from a checkpoint; returns its trainer_state dict.

    The policy weights are loaded separately, through from_pretrained on the checkpoint directory.
    """
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True), generator)
    return json.loads((path / "trainer_state.json").read_text())


def save_final(model, directory: Path, dtype: torch.dtype) -> None:
    """The trained policy for use elsewhere (eval.py, transformers, vLLM): a peft model saves its adapter as peft
    does; a full model saves its weights cast to `dtype` (the base model's own, e.g. bf16: half the size of the
    fp32 master weights). Checkpoints stay fp32 so that a resume continues exactly."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(directory, safe_serialization=True)
        return
    cast: dict[int, torch.Tensor] = {}  # by storage: tied weights (embeddings = LM head) stay one tensor
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in cast:
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            cast[tensor.data_ptr()] = tensor.detach().to(device="cpu", dtype=kind)
        state[name] = cast[tensor.data_ptr()]
    model.save_pretrained(directory, state_dict=state, safe_serialization=True)
    # save_pretrained writes the in-memory parameters' dtype into config.json; record the one saved.
    config_path = Path(directory) / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
