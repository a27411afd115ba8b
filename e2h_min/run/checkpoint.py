"""Atomic checkpoints: a kill at any moment leaves the previous checkpoint intact and loadable.

A checkpoint is a directory checkpoints/step_000040/ holding the policy (safetensors, via save_pretrained), the
tokenizer, optimizer + LR scheduler state, every RNG state and the curriculum sampler's state. It is written
into a hidden temporary directory, every file is fsynced, then the directory is renamed into place (rename is
atomic on POSIX filesystems) and the parent directory fsynced. Readers only ever look at step_* names, so a
half-written temporary directory is invisible and is swept away by the next save.
Non-weight state loads with torch.load(weights_only=True): no pickle code runs on load.

Damage after the fact (a truncated file, a torn trailing write, bytes changed in place, a disk that filled up under
another tool) is caught on resume: every checkpoint records each file's size and sha256 in manifest.json (hashed
right after the file is written, while it is still in the page cache), and `verify_checkpoint` checks them, parses
every file and checks the weights are finite before a run resumes from it; `resume_checkpoint` falls back to the
newest intact one and sets the damaged newer ones aside (renamed damaged_step_*, never deleted). Checkpoints of
earlier versions (a manifest of sizes only, or none) are verified by sizes and parsing, with a note.
A disk that fills up during a save is one line naming the folder and the checkpoint kept (the half-written one
is removed; the previous one is untouched).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from e2h_min.errors import UserError

CHECKPOINT_DIR = "checkpoints"
# {relative path: {"bytes": size, "sha256": hex digest}} of every other file of the checkpoint (earlier versions
# wrote {relative path: size})
MANIFEST = "manifest.json"
HASH_CHUNK = 16 << 20


def file_sha256(path: Path, sync: bool = False) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file, read in 16 MiB chunks; sync: fsync it too."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return digest.hexdigest(), size


def _hash_and_sync(path: Path) -> dict:
    """The manifest of every file under `path`, each hashed and fsynced: one read of bytes just written (still in
    the page cache), in place of hashing inside every writer (save_pretrained, safetensors and torch.save each
    write their own files)."""
    manifest = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest, size = file_sha256(file, sync=True)
        manifest[str(file.relative_to(path))] = {"bytes": size, "sha256": digest}
    return manifest


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC/EDQUOT anywhere in the exception chain, the words a
    writer that wraps the error uses (safetensors: "os error 28"), or (torch.save's zip writer says only "unexpected
    pos") under 1 MiB left on the device."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(seen) for words in ("No space left", "os error 28", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < 1 << 20


def _fsync_tree(path: Path) -> None:
    with open(path / MANIFEST, "rb") as handle:  # every other file was synced as it was hashed
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


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, optimizer_state: dict, scheduler, trainer_state: dict,
                    generator: torch.Generator | None, keep: int = 2, extra_modules: dict | None = None) -> Path:
    """Write checkpoints/step_{step:06d} atomically; keep the newest `keep` checkpoints. Returns its path.

    `step` is the number of optimizer steps completed; optimizer_state is the optimizer's state_dict() (under
    FSDP the gathered full state, engine/fsdp.py); trainer_state must be JSON-serialisable (config, sampler);
    extra_modules (name -> nn.Module, e.g. the PPO value head) are saved as NAME.safetensors.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    for stale in root.glob(".tmp_*"):  # leftovers of a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, module in (extra_modules or {}).items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        torch.save(rng_state(generator), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(_hash_and_sync(tmp), indent=1))
        _fsync_tree(tmp)
    except Exception as exc:
        full = _disk_full(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)  # the half-written checkpoint, so its space is free again
        if not full:
            raise
        kept = latest_checkpoint(run_dir)
        then = f"{kept.name} is kept intact: free some space, then --resume {run_dir}" if kept else \
            f"there is no earlier checkpoint: free some space and start again (--out-dir {run_dir} --overwrite)"
        raise UserError(f"no space left on the device while saving checkpoint {final.name} in {root}; {then}") from None
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
    try:
        optimizer.load_state_dict(states["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:  # the weights' shapes are not the optimizer state's
        raise UserError(f"--resume: checkpoint {path}: its optimizer state does not fit its weights "
                        f"({str(exc).splitlines()[0][:100]}); its config.json and weights come from another model? "
                        f"Move it aside (e.g. to {path.with_name('damaged_' + path.name).name}) to resume from the "
                        f"one before, or start a new run") from None
    scheduler.load_state_dict(states["scheduler"])
    set_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True), generator)
    return json.loads((path / "trainer_state.json").read_text())


def verify_checkpoint(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed from, or None when it is intact.

    Checks: trainer_state.json parses and names this step; every file of manifest.json is there with its recorded
    size and sha256 (a manifest of sizes only, from earlier versions: sizes; none: neither); every .json parses;
    every .safetensors file loads tensor by tensor and its floating-point tensors are finite (NaN/inf weights are
    damage); optimizer.pt and rng.pt load. This reads the whole checkpoint about twice (hash, then load).
    Example: a model.safetensors cut short -> "model.safetensors is 1000 bytes, expected 7340232"
    """
    from safetensors import safe_open

    from e2h_min.jsonl import parse_json

    path = Path(path)
    try:
        state = parse_json((path / "trainer_state.json").read_bytes())
        if not isinstance(state, dict) or state.get("step") != int(path.name.split("_")[-1]):
            return "trainer_state.json does not name this checkpoint's step"
        problem = manifest_problem(path) if (path / MANIFEST).is_file() else None
        if problem is not None:
            return problem
        for file in sorted(path.rglob("*.json")):
            parse_json(file.read_bytes())
        for file in sorted(path.rglob("*.safetensors")):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        return f"{file.name}: {key} holds NaN/inf"
        for name in ("optimizer.pt", "rng.pt"):
            torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any failure to read means: do not resume from here)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else 'unreadable'}"
    return None


def manifest_problem(path: Path, skip: tuple[str, ...] = ()) -> str | None:
    """Which file of path/manifest.json is not as it was saved (missing, another size, another sha256), or None;
    the files named in `skip` are not checked. Raises if the manifest cannot be read.
    Example: a checkpoint whose model.safetensors changed in place -> "model.safetensors does not match its sha256 ..."
    """
    from e2h_min.jsonl import parse_json

    for name, recorded in parse_json((path / MANIFEST).read_bytes()).items():
        if name in skip:
            continue
        size, digest = (recorded["bytes"], recorded["sha256"]) if isinstance(recorded, dict) else (recorded, None)
        actual = (path / name).stat().st_size if (path / name).is_file() else None
        if actual != size:
            return f"{name} is missing" if actual is None else f"{name} is {actual} bytes, expected {size}"
        if digest is not None and file_sha256(path / name)[0] != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (its bytes changed after the save)"
    return None


def manifest_names(path: Path) -> set[str] | None:
    """The relative file names the checkpoint's manifest.json lists; None if it has none or it cannot be read (a
    damaged checkpoint set aside, a save killed while writing it)."""
    try:
        recorded = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return set(recorded) if isinstance(recorded, dict) else None


def has_checksums(path: Path) -> bool:
    """Whether the checkpoint's manifest records a sha256 for its files (this version's format)."""
    try:
        recorded = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(isinstance(v, dict) and "sha256" in v for v in recorded.values())


def resume_checkpoint(run_dir: Path, log=print, set_aside: bool = True) -> Path | None:
    """The newest intact checkpoint of `run_dir` (None if there is none).

    With set_aside (the process that owns the run directory), each newer damaged one is renamed damaged_step_N
    (kept for inspection, invisible to loading and pruning) with a warning naming it and what is wrong, so the
    resumed run writes its own checkpoints in their place.
    """
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            if not has_checksums(path):
                log(f"note: checkpoint {path} predates checksums ({MANIFEST} without sha256): verified by its "
                    f"files' sizes and by loading them")
            return path
        if not set_aside:
            continue
        aside, n = path.with_name(f"damaged_{path.name}"), 1
        while aside.exists():  # set aside before, by an earlier resume: keep both
            aside, n = path.with_name(f"damaged_{path.name}.{n}"), n + 1
        os.rename(path, aside)
        log(f"warning: checkpoint {path} is damaged ({problem}); moved it to {aside.name} and resume from the "
            f"previous one")
    return None


PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def written_whole(directory: Path):
    """Yield a scratch folder DIRECTORY.partial to write into; it becomes DIRECTORY only once complete and synced,
    so a kill or a full disk part-way leaves no half-written final/ that looks finished (a resume writes it again).
    A full disk is one line; the run's last checkpoint is untouched."""
    directory = Path(directory)
    scratch = directory.with_name(directory.name + PARTIAL_SUFFIX)
    shutil.rmtree(scratch, ignore_errors=True)  # an earlier save's, killed part-way
    scratch.mkdir(parents=True)
    try:
        yield scratch
        for file in scratch.rglob("*"):  # on disk before the rename makes it final/
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_dir(scratch)
    except Exception as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if not _disk_full(exc, directory.parent):
            raise
        raise UserError(f"no space left on the device while saving {directory}; the run's checkpoints are kept: free "
                        f"some space, then --resume {directory.parent}") from None
    if directory.exists():
        shutil.rmtree(directory)
    os.rename(scratch, directory)
    _fsync_dir(directory.parent)


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
