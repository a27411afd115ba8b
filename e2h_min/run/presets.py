"""Presets: the settings a run gets where the user gave no flag, chosen by what the model is.

Presets fill the fields the user did not set on the command line, chosen by what the model is (models.
describe_model reads its config), never by how it was named; the run prints which applied and every value it set:
- demo: the embedded tiny model (or a copy of it: its build_info.json names scripts/build_tiny_model.py), which
  cannot learn at the paper's lr of 1e-6 within a CPU demo (DEMO_PRESET);
- paper: a Qwen2 or Llama architecture (the paper's model families): the paper's release recipe for the task
  (PAPER_RECIPE + PAPER_TASK_BUDGETS, spec section 5), LoRA included;
- none: any other model: the flags' defaults (the paper's GRPO settings, full fine-tuning).
"""

from __future__ import annotations

import dataclasses
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e2h_min.engine.models import ModelFacts, describe_model
from e2h_min.errors import UserError
from e2h_min.rl.losses import kl_estimator_for
from e2h_min.run.config import Config, build_parser, flag_name, validate


# Settings that make the embedded tiny model learn visibly in a few CPU minutes (the demo preset: applied to the
# model scripts/build_tiny_model.py built, whatever path names it, only to flags the user did not give). Why each
# differs from the paper: a 1.8M-parameter model needs a far larger lr (5e-4 and 2e-4 made it forget level 0; 1e-4
# learned); its completions are ~20-40 tokens; a short run needs a short clock. The schedule is E2H-C (cosine),
# which visits every level equally, easy first; at 200 steps and 3 seeds it is not reliably better or worse than
# balanced or gaussian on L1 (README results: the order changed between two sweeps). One torch thread: the model is
# overhead-bound, and a second thread only waits on a loaded 2-core machine. Micro-batches of 128 rows under a
# 512-token budget: sorted by length, the update pads ~4% (bench/step.py).
DEMO_PRESET: dict[str, Any] = dict(
    schedule="cosine", lr=1e-4, total_steps=200, prompts_per_step=16, max_new_tokens=64, micro_batch_size=128,
    micro_batch_tokens=512,
    beta=0.0, eval_every=50, eval_problems=200, save_every=50, log_completions_every=20, warmup_steps=5,
    threads=1,
)


# The paper's release recipe (spec section 5) for Qwen2.5 / Llama-3.2 models, every value written out so the
# start-up line shows the whole recipe; PAPER_TASK_BUDGETS overrides it per task.
PAPER_RECIPE: dict[str, Any] = dict(
    lora_r=32, lora_alpha=64.0, lora_dropout=0.1, lora_targets="q_proj,v_proj", lr=1e-6, lr_schedule="cosine",
    num_generations=8, prompts_per_step=8, temperature=1.0, beta=0.001, epsilon=0.2, max_grad_norm=1.0,
    total_steps=1600, max_new_tokens=512,
)  # the KL estimator is left to its placement (kl_estimator_for): k3 in the loss as the paper, k1 with --kl-in-reward
PAPER_TASK_BUDGETS: dict[str, dict[str, Any]] = {
    "math": dict(total_steps=1200, max_new_tokens=1600),
    "blocksworld": dict(total_steps=1200),
}
PAPER_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def _flags(values: dict[str, Any]) -> str:
    return " ".join(f"{flag_name(k)} {v}" for k, v in values.items())


HELP_INTRO = "\n".join(textwrap.fill(line, 110, subsequent_indent="  ") for line in [
    "GRPO with the E2H easy-to-hard curriculum. Presets fill every flag you do not give, overriding the defaults "
    "listed below (your flags override the preset; the start-up line prints what it set):",
    f"- a bare `python train.py` (the embedded tiny model) applies the demo preset: {_flags(DEMO_PRESET)}",
    f"- `--model Qwen2.5-1.5B` (any Qwen2 / Llama architecture) applies the paper preset: {_flags(PAPER_RECIPE)}; "
    f"per task: " + "; ".join(f"{task} {_flags(v)}" for task, v in PAPER_TASK_BUDGETS.items()),
    "- any other model: the defaults listed below."])


@dataclass(frozen=True)
class Preset:
    name: str  # demo, paper or none
    reason: str  # what the model is, in words
    values: dict[str, Any]  # every field the preset sets where the user gave no flag


def choose_preset(facts: ModelFacts, task: str) -> Preset:
    """The preset for a model, by what it is: the tiny demo build, a paper architecture, or anything else.

    Without a reachable config (a hub id not in the local cache) the hub id's family name decides.
    """
    size = f", {facts.num_parameters / 1e6:.1f}M parameters" if facts.num_parameters else ""
    if facts.tiny_build:
        return Preset("demo", f"{facts.path} was built by scripts/build_tiny_model.py{size}", dict(DEMO_PRESET))
    paper_arch = next((a for a in facts.architectures if a in PAPER_ARCHITECTURES), None)
    by_name = not facts.architectures and any(family in facts.path for family in ("Qwen2.5", "Llama-3"))
    if paper_arch or by_name:
        what = paper_arch or "a Qwen2.5 / Llama-3 hub id"
        return Preset("paper", f"{what}{size}: the paper's release recipe for task {task}",
                      {**PAPER_RECIPE, **PAPER_TASK_BUDGETS.get(task, {})})
    what = "/".join(facts.architectures) or "no config.json reachable"
    return Preset("none", f"{what}{size}: neither the tiny demo model nor a paper architecture "
                          f"({', '.join(PAPER_ARCHITECTURES)}); the flags' defaults apply", {})


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line into a validated Config (the model's preset under the user's flags)."""
    return resolve_config(argv)[0]


def resolve_config(argv: list[str] | None = None) -> tuple[Config, Preset, dict[str, Any]]:
    """The validated Config, the preset chosen for the model and the values it set (those the user's flags did
    not override). The Config is built once from preset + flags and not changed afterwards."""
    given = vars(build_parser(HELP_INTRO).parse_args(argv))
    saved = _resumed_run_settings(given.get("resume"))
    if saved is not None:  # --resume RUN: the run's own settings under the flags given now (checked on resume)
        preset = Preset("resumed", f"the settings of {given['resume']}/config.json", saved)
    else:
        preset = choose_preset(describe_model(given.get("model", Config.model)), given.get("task", Config.task))
    if given.get("lora_r") == 0:  # full fine-tuning asked for: the preset's LoRA shape is neither set nor shown
        preset = dataclasses.replace(preset, values={k: v for k, v in preset.values.items()
                                                     if k not in ("lora_alpha", "lora_dropout", "lora_targets")})
    applied = {k: v for k, v in preset.values.items() if k not in given}
    if "warmup_steps" in applied:  # a short run asked for on the command line keeps a valid warmup
        total = given.get("total_steps", applied.get("total_steps", Config.total_steps))
        applied["warmup_steps"] = min(applied["warmup_steps"], total - 1)
    cfg = Config(**{**applied, **given})
    validate(cfg)
    # config.json records the estimator used (a new Config: the one built above is not changed)
    cfg = dataclasses.replace(cfg, kl_estimator=kl_estimator_for(cfg))
    return cfg, preset, applied


def _resumed_run_settings(run_dir: str | None) -> dict[str, Any] | None:
    """The settings a train.py run recorded in RUN/config.json (None if run_dir is None or holds no run), without
    the bookkeeping of how it was started (resume, out_dir, overwrite). A run (it has checkpoints/) whose
    config.json is missing, unreadable or not a run's is a UserError naming the file: its settings are unknown."""
    if run_dir is None:
        return None
    file = Path(run_dir) / "config.json"
    try:
        saved = json.loads(file.read_text())
        problem = None if isinstance(saved, dict) and "schedule" in saved and "total_steps" in saved else \
            "not a train.py config (no schedule and total_steps)"
    except FileNotFoundError:
        problem = "missing"
    except (OSError, ValueError) as exc:
        problem = f"unreadable ({getattr(exc, 'strerror', None) or str(exc).splitlines()[0][:80]})"
    if problem is None:
        fields = {f.name for f in dataclasses.fields(Config)} - {"resume", "out_dir", "overwrite"}
        return {k: v for k, v in saved.items() if k in fields}
    if (Path(run_dir) / "checkpoints").is_dir():
        raise UserError(f"--resume {run_dir}: {file} is {problem}, so the run's settings are unknown; restore it "
                        f"(each checkpoint's trainer_state.json holds a copy under \"config\") or start a new run")
    return None  # not a run: claim_run_dir says so


def describe_preset(preset: Preset, applied: dict[str, Any]) -> str:
    """The start-up line: which preset, why, every value it set and which of its values the user's flags won."""
    kept = sorted(flag_name(k) for k in set(preset.values) - set(applied))
    if preset.name == "resumed":  # every setting comes from the run; name only what the flags give again
        return f"resuming with {preset.reason}" + (f"; flags given again: {', '.join(kept)}" if kept else "")
    values = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items()) or "nothing"
    return (f"preset {preset.name} ({preset.reason}): sets {values}"
            + (f"; your flags win over its {', '.join(kept)}" if kept else ""))
