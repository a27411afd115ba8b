"""The README.md model card train.py writes into final/ (and final-merged/), in the Hugging Face format.

YAML front matter (base_model, library_name, tags, pipeline_tag) that the Hub and huggingface_hub.ModelCard read,
then: what was trained on which task, the curriculum schedule and its parameters, the update's settings, a command
that reproduces the run, the final greedy per-level table and the library versions.
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
from importlib import metadata
from pathlib import Path

from e2h_min.run.config import Config, schedule_params
from e2h_min.engine.models import resolve_model_name

# Config fields a reproducing command leaves out: where a resumed run came from, not what it computed.
NOT_IN_COMMAND = {"resume"}


def base_model_name(model: str) -> str:
    """The base model as the Hub names it; the embedded tiny model by its path in this project."""
    if model in ("tiny", "tiny-testbed"):
        return "e2h_min/assets/" + Path(resolve_model_name(model)).name
    return resolve_model_name(model)


def reproducing_command(config: dict) -> str:
    """`python train.py` with every field that differs from Config's defaults (a resumed run included).

    Example: {"model": "Qwen2.5-1.5B", "schedule": "cosine", ...defaults} -> 'python train.py --model Qwen2.5-1.5B
    --schedule cosine'. Flags given explicitly also win over the tiny model's demo preset, so the command is exact.
    """
    parts = ["python", "train.py"]
    for f in dataclasses.fields(Config):
        if f.name in NOT_IN_COMMAND or f.name not in config or config[f.name] == f.default:
            continue
        flag, value = "--" + f.name.replace("_", "-"), config[f.name]
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + flag[2:])
        else:
            parts += [flag, "none" if value is None else str(value)]
    return shlex.join(parts)


def library_versions(names=("torch", "transformers", "safetensors")) -> dict[str, str]:
    """Installed versions of the libraries a loaded model depends on (absent ones left out), plus Python."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def results_table(last_eval: dict | None, first_eval: dict | None = None) -> str:
    """Markdown table of the greedy held-out evaluation per level, with the step-0 accuracy when known (None: a
    resumed run whose final evaluation was logged before the restart, whose figures are in eval.jsonl)."""
    if not last_eval:
        return "The final evaluation was logged before the run was resumed: see `eval.jsonl` in the run directory."
    header = "| level | problems | accuracy | " + ("accuracy at step 0 | " if first_eval else "") + \
             "mean reward | format rate |"
    lines = [header, "|---|---:|---:|" + ("---:|" if first_eval else "") + "---:|---:|"]
    for name, row in last_eval.items():
        start = f" {first_eval[name]['accuracy']:.1%} |" if first_eval and name in first_eval else \
            (" – |" if first_eval else "")
        lines.append(f"| {name} | {row['n']} | {row['accuracy']:.1%} |{start} {row['reward']:.3f} | "
                     f"{row['format_rate']:.1%} |")
    return "\n".join(lines)


def model_card(config: dict, last_eval: dict, first_eval: dict | None, adapter: bool, step: int,
               run_name: str) -> str:
    """The README.md text: YAML front matter and a short body (see the module docstring)."""
    base = base_model_name(config["model"])
    task, schedule = config["task"], config["schedule"]
    params = schedule_params(Config(**{k: v for k, v in config.items()
                                       if k in {f.name for f in dataclasses.fields(Config)}}))
    schedule_text = schedule + (" (" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")" if params else "")
    tags = ["e2h-min", "grpo", "reinforcement-learning", "curriculum-learning", "e2h-reasoner", task]
    front = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}", "tags:"]
    front += [f"- {tag}" for tag in tags] + ["pipeline_tag: text-generation", "---"]
    what = "A LoRA adapter for" if adapter else "A fine-tune of"
    lora = (f"; LoRA r={config['lora_r']}, alpha={config['lora_alpha']}, dropout={config['lora_dropout']} on "
            f"{config['lora_targets']}" if config.get("lora_r") else "")
    body = f"""
# {run_name}

{what} `{base}` trained with reinforcement learning from verifiable rewards on **{task}**, using e2h-min's GRPO
trainer with the E2H Reasoner easy-to-hard curriculum (Parashar et al., *Curriculum Reinforcement Learning from
Easy to Hard Tasks Improves LLM Reasoning*, ICLR 2026): each optimizer step draws its prompts from the task's
difficulty levels with the probabilities the schedule gives at that step.

## Training

- task: {task}; reward: format + verified answer
- curriculum schedule: {schedule_text}, over {config['total_steps']} optimizer steps
- update: advantage {config['advantage']}, loss_type {config['loss_type']}, {config['prompts_per_step']} prompts x \
{config['num_generations']} samples per step, lr {config['lr']} ({config['lr_schedule']}, warmup \
{config['warmup_steps']}), beta (KL) {config['beta']}, epsilon {config['epsilon']}, temperature \
{config['temperature']}, max_new_tokens {config['max_new_tokens']}, seed {config['seed']}{lora}

The command that reproduces it (every setting that differs from train.py's defaults):

```bash
{reproducing_command(config)}
```

## Results

Greedy decoding on held-out test problems per level, at step {step}:

{results_table(last_eval, first_eval)}

## Framework versions

""" + "\n".join(f"- {name} {version}" for name, version in library_versions(
        ("torch", "transformers", "safetensors") + (("peft",) if config.get("lora_r") else ())).items()) + "\n"
    return "\n".join(front) + "\n" + body


def write_model_card(directory: Path, config: dict, last_eval: dict, first_eval: dict | None, adapter: bool,
                     step: int, run_name: str) -> Path:
    """Write DIRECTORY/README.md (replacing the generic card PEFT writes for an adapter); returns its path."""
    path = Path(directory) / "README.md"
    path.write_text(model_card(config, last_eval, first_eval, adapter, step, run_name))
    return path
