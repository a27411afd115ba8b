"""Where a run's numbers go while it trains: a short console line, TensorBoard and/or Weights & Biases.

    python train.py --report-to tensorboard          # -> RUN/tensorboard/; view with: tensorboard --logdir runs
    python train.py --report-to wandb                # run named after RUN, its id kept in RUN/wandb_run_id
    python train.py --report-to tensorboard,wandb    # both (TRL's --report_to, comma-separated)

Design choices, in brief:
- metrics.jsonl and eval.jsonl stay the source of truth; a tracker receives exactly their rows, every field under
  the same name (`tracker_scalars`): per-level lists become NAME/LEVEL (level_probs/L0), eval.jsonl fields get an
  `eval/` prefix (eval/L0/accuracy), and a row's `step` is the tracker's step. The config is logged once.
- The optional packages are imported by `require_trackers` before any model loads, so a missing one costs one
  line and exit code 2, not a model load.
- Only rank 0 logs under torchrun (train.py passes no tracker names to the other ranks).
- Resume: TensorBoard drops the events after the checkpoint step (purge_step), W&B continues the run whose id is
  stored in the run directory.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import uuid
from pathlib import Path

from e2h_min.errors import UserError

# tracker name -> (the module it needs, the pip package that brings it)
TRACKER_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
WANDB_ID_FILE = "wandb_run_id"


def parse_report_to(value: str) -> list[str]:
    """--report-to as a list of tracker names. Example: "none" -> [], "wandb,tensorboard" -> ["wandb", "tensorboard"].

    Raises UserError on an unknown name or on "none" mixed with a tracker.
    """
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRACKER_MODULES and n != "none"]
    if unknown:
        raise UserError(f"unknown --report-to {unknown[0]!r}; choose none, tensorboard, wandb, or a comma-separated "
                        f"list such as tensorboard,wandb")
    if "none" in names and len(names) > 1:
        raise UserError("--report-to none cannot be combined with a tracker; drop 'none'")
    return list(dict.fromkeys(n for n in names if n != "none"))


def require_trackers(names: list[str]) -> None:
    """Import each tracker's package now (cheap, before any model loads); one line naming what to install if not."""
    missing = []
    for name in names:
        module, _ = TRACKER_MODULES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        packages = " ".join(TRACKER_MODULES[n][1] for n in missing)
        raise UserError(f"--report-to {','.join(missing)} needs {packages}, which is not installed: "
                        f"pip install {packages} (or run without --report-to {','.join(missing)})")
    if "wandb" in names and not wandb_can_log():
        raise UserError("--report-to wandb: no W&B API key (WANDB_API_KEY is unset and `wandb login` stored none "
                        "in ~/.netrc); run `wandb login`, set WANDB_API_KEY, or set WANDB_MODE=offline to log locally")


def wandb_can_log() -> bool:
    """Whether wandb.init will find what it needs without a prompt: an offline/disabled mode, an API key or identity
    token in the environment, or a key stored by `wandb login` (~/.netrc, or the settings file). Checked before the
    model loads; wandb itself would stop only at wandb.init, after it."""
    import netrc
    from urllib.parse import urlparse

    env = os.environ
    if env.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or env.get("WANDB_DISABLED", "").lower() in (
            "1", "true") or env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if netrc.netrc(env.get("NETRC") or None).authenticators(host):
            return True
    except (OSError, netrc.NetrcParseError):
        pass
    settings = Path(env.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    try:
        return "api_key" in settings.read_text()
    except OSError:
        return False


def tracker_scalars(row: dict, level_names: list[str], prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl / eval.jsonl row as {name: float} for a tracker; `step` is left out (it is the x axis).

    Numbers keep their name; a per-level list becomes NAME/LEVEL; None (not measured) is left out.
    Example: ({"step": 3, "loss": 0.5, "level_probs": [0.9, 0.1]}, ["L0", "L1"])
             -> {"loss": 0.5, "level_probs/L0": 0.9, "level_probs/L1": 0.1}
    """
    out = {}
    for key, value in row.items():
        if key == "step" or value is None:
            continue
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                out[f"{prefix}{key}/{level_names[i] if i < len(level_names) else i}"] = float(item)
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


class _TensorBoard:
    """Scalars into RUN/tensorboard/ (torch's SummaryWriter; needs the tensorboard package)."""

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / "tensorboard"
        if not start_step:  # a fresh start replaces the folder's logs, as it does metrics.jsonl
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        # On resume, events logged after the checkpoint (redone now) are hidden by TensorBoard from here on.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None, flush_secs=10)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """One W&B run per run directory: named after it, its id stored in RUN/wandb_run_id so --resume continues it.
    W&B ignores a step lower than one it has: steps redone after a resume keep the interrupted run's values there.

    Files go to RUN/wandb/ unless WANDB_DIR is set; WANDB_PROJECT (default e2h-min), WANDB_ENTITY and WANDB_MODE
    (offline, for no network) are read by wandb itself.
    """

    def __init__(self, run_dir: Path, config: dict, start_step: int):
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        resumed = start_step > 0 and id_file.is_file()  # a fresh start in the same folder is a new W&B run
        run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "e2h-min"), name=run_dir.resolve().name,
                              id=run_id, resume="allow" if resumed else None, config=config,
                              dir=None if os.environ.get("WANDB_DIR") else str(run_dir))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker named in --report-to, fed the rows train.py writes to metrics.jsonl and eval.jsonl.

    With no names (--report-to none, or a rank other than 0) every method does nothing.
    """

    def __init__(self, names: list[str], run_dir: Path, config: dict, level_names: list[str], start_step: int = 0):
        makers = {"tensorboard": _TensorBoard, "wandb": _WandB}
        self.level_names = level_names
        self.trackers = [makers[name](Path(run_dir), config, start_step) for name in names]
        if self.trackers:
            atexit.register(self.close)  # a run that dies still flushes what it logged

    def log_metrics(self, row: dict) -> None:
        """One metrics.jsonl row (its `step` is the x axis)."""
        self._log(tracker_scalars(row, self.level_names), row["step"])

    def log_eval(self, row: dict) -> None:
        """One eval.jsonl row, each field under eval/ (eval/L0/accuracy)."""
        self._log(tracker_scalars(row, self.level_names, prefix="eval/"), row["step"])

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


# ---------------------------------------------------------------------------------------------------------------
# Console


def resolve_log_every(log_every: int, total_steps: int) -> int:
    """--log-every, where 0 means auto: max(5, total_steps // 100).

    A 1,600-step run then prints a line every 16 steps (~100 lines, one every few minutes on a GPU); a 200-step
    CPU demo one every 5 steps (40 lines, a few seconds apart). The progress bar shows every step's reward.
    Example: resolve_log_every(0, 1600) -> 16, resolve_log_every(0, 200) -> 5, resolve_log_every(1, 200) -> 1.
    """
    return log_every or max(5, total_steps // 100)


def should_log(step: int, total_steps: int, every: int) -> bool:
    """Print a console line after step `step` (1-based): the first step, every `every` steps, and the last."""
    return step == 1 or step % every == 0 or step == total_steps


def console_line(row: dict, level_names: list[str], total_steps: int, kl_computed: bool,
                 clipping_possible: bool) -> str:
    """A metrics.jsonl row as one short line holding only what this run computed.

    The KL shows only when a reference model exists (beta > 0); entropy only when the update ran at least one
    sample (all-equal rewards leave nothing to run); the clip ratio only when it can be nonzero, that is with
    --num-iterations > 1 (the first pass's ratio is exactly 1); value loss only with --advantage ppo.
    Example: 'step  50/200 | reward 0.412 | acc L0 0.81 L1 0.20 | prompts L0 12 L1 4 | ent 0.85 | len 23.1 |
              5123 tok/s'
    """
    drawn = [k for k, count in enumerate(row["level_counts"]) if count]
    width = len(str(total_steps))
    parts = [f"step {row['step']:{width}d}/{total_steps}", f"reward {row['reward_mean']:.3f}",
             "acc " + " ".join(f"{level_names[k]} {row[f'accuracy/{level_names[k]}']:.2f}" for k in drawn),
             "prompts " + " ".join(f"{level_names[k]} {row['level_counts'][k]}" for k in drawn)]
    if kl_computed and "kl" in row:
        parts.append(f"kl {row['kl']:.4f}")
    if "entropy" in row:
        parts += [f"clip {row['clip_ratio']:.3f}"] * clipping_possible + [f"ent {row['entropy']:.2f}"]
    if "value_loss" in row:
        parts.append(f"vloss {row['value_loss']:.4f}")
    parts += [f"len {row['completion_length_mean']:.1f}", f"{row['tokens_per_second']:.0f} tok/s"]
    return " | ".join(parts)
