"""Evaluate a checkpoint, a run or a hub model per difficulty level, the way the paper did (spec section 8).

    python eval.py --model runs/countdown-gaussian-s0                 # a run: its final policy, its own settings
    python eval.py --model runs/countdown-gaussian-s0/checkpoints/step_000040 --levels 3 OOD --n 200
    python eval.py --model Qwen2.5-1.5B --task countdown --n 1024 --max-new-tokens 512
    python eval.py --model tiny --pass-k 1 8 32 --samples 32         # + pass@k from 32 samples per problem

Design choices, in brief:
- Greedy decoding, stopped right after </answer>, on test problems 0..N-1 of each level: the very problems (and,
  for a run directory, the very settings and batching) of train.py's periodic evaluation, so evaluating a run's
  final policy reproduces the run's final eval line.
- Accuracy = share of completions whose reward exceeds the format reward; also mean reward, format rate, length.
- pass@k samples N completions per problem (temperature 0.7, top_p 0.9, top_k 50 by default) and reports the
  unbiased estimator 1 - C(n-c,k)/C(n,k) averaged over problems (e2h_min/analysis/passk.py), not a max over draws.
- Given a run directory (or one of its checkpoints), task, data, seed, max_new_tokens, stop string, N and the chat
  date (the date a Llama 3 template writes into the prompts) default to that run's config.json; flags override
  them. The scored text is cut right after the stop string, as in training (evaluation.completion_texts).
- Writes DIR/report.json (settings + per-level figures) and DIR/completions.jsonl (every prompt, completion, score);
  DIR is --out, else next to what is evaluated (RUN/eval/final, RUN/eval/step_N, ./eval/<hub name>-<task>), where
  `python -m e2h_min.analysis.report RUN` finds it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from e2h_min.run.checkpoint import MANIFEST, latest_checkpoint, manifest_problem
from e2h_min.errors import (MAX_EVAL_PROBLEMS, MAX_NEW_TOKENS, MAX_ROLLOUT_ROWS, MAX_SEED, MAX_THREADS,
                            OneLineErrorParser, UserError, check_context, check_output_dir, exit_on_user_error)
from e2h_min.errors import is_iso_date
from e2h_min.jsonl import parse_json
from e2h_min.analysis.evaluation import evaluate, held_out_problems
from e2h_min.rl.scoring import chat_date_variables, encode_prompts, eos_token_ids, score_rollout, today
from e2h_min.engine.models import (MODEL_ALIASES, context_length, load_model, load_tokenizer, peft_building, pick_device,
                            resolve_model_name)
from e2h_min.analysis.passk import pass_at_k_by_level
from e2h_min.run.prompt_fit import fit_prompts
from e2h_min.run.runlog import run_folder_around
from e2h_min.engine.sampler import StopChecker, generate
from e2h_min.tasks import TASKS, make_task

# Used when neither a flag nor a run's config.json gives a value.
FALLBACKS = {"task": "countdown", "data": None, "seed": 0, "n": 100, "max_new_tokens": 512, "stop": "</answer>",
             "chat_date": None}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python eval.py", description=__doc__.split("\n\n")[0])
    # --- what to evaluate (None = from the run's config.json, else FALLBACKS)
    p.add_argument("--model", required=True, help="run directory, checkpoint directory, local model, hub id or alias")
    p.add_argument("--task", help=f"task: {', '.join(sorted(TASKS))} (default: the run's, else countdown)")
    p.add_argument("--data", help="data file for file-backed tasks (default: the run's)")
    p.add_argument("--levels", nargs="+", help="levels by index or name, e.g. 0 1 4 or L3 OOD (default: all)")
    p.add_argument("--n", type=int, help="test problems per level, indices 0..N-1 (default: the run's eval_problems)")
    p.add_argument("--seed", type=int, help="task generator seed; also seeds pass@k sampling (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, help="completion budget (default: the run's eval budget, else 512, at most "
                                                      "half the model's context)")
    p.add_argument("--stop", help="stop string (default: the run's, else </answer>; empty = EOS only)")
    p.add_argument("--chat-date", help="YYYY-MM-DD date a date-bearing chat template (Llama 3) writes into the "
                                       "prompts (default: the run's, else today's)")
    # --- pass@k
    p.add_argument("--pass-k", type=int, nargs="+", metavar="K", help="report pass@K for each K (needs sampling)")
    p.add_argument("--samples", type=int, help="samples per problem for pass@k (default: the largest K)")
    p.add_argument("--temperature", type=float, default=0.7, help="pass@k sampling temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="pass@k nucleus mass")
    p.add_argument("--top-k", type=int, default=50, help="pass@k top-k (0 = off)")
    # --- system and output
    p.add_argument("--batch-size", type=int, default=256, help="sequences per generation call")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch default)")
    p.add_argument("--out", help="output directory (default: RUN/eval/<final or step_N> for a run or checkpoint, "
                                 "DIR/../eval/<DIR>-<task> for a model directory, ./eval/<name>-<task> for a hub id)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def find_model(name: str) -> tuple[str, dict | None, int | None]:
    """Where to load `name` from, plus the training config and step when it is (part of) a run.

    run directory        -> RUN/final, else its newest checkpoint; config from RUN/config.json
    RUN/final(-merged)   -> itself; config from RUN/config.json, step = its total_steps
    checkpoint directory -> itself; config and step from its trainer_state.json
    model directory, hub id or alias -> itself, no config.
    Example: find_model("runs/cd") == ("runs/cd/final", {...config.json...}, 120)
    """
    path = Path(name).expanduser()
    if not path.is_dir():
        if path.parent != Path(".") and path.parent.is_dir():  # "runs/typo": a local path, not a hub id
            raise UserError(f"--model {name}: no such directory (expected a run directory, a model directory, "
                            f"or a hub id such as Qwen/Qwen2.5-1.5B-Instruct)")
        return name, None, None
    if (path / "trainer_state.json").is_file():
        state = _read_json(path / "trainer_state.json")
        return str(path), state.get("config"), state.get("step")
    run_dir = owning_run(path)
    if run_dir is not None and path.name in ("final", "final-merged"):  # a run's saved policy: the run's settings
        run_config = _read_run_config(run_dir)
        return str(path), run_config, run_config.get("total_steps")
    run_config = _read_run_config(path)
    if run_config is None:
        return str(path), None, None
    if _holds_weights(path / "final"):
        return str(path / "final"), run_config, run_config.get("total_steps")
    checkpoint = latest_checkpoint(path)
    if checkpoint is not None:
        step = _read_json(checkpoint / "trainer_state.json").get("step")
        return str(checkpoint), run_config, step
    raise UserError(f"--model {name}: a run directory without a saved model (no final/ and no "
                    f"checkpoints/step_*); let the run finish or pass a checkpoint directory")


def _holds_weights(path: Path) -> bool:
    """A saved model (config.json) or a LoRA adapter (adapter_config.json) lives here."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def load_policy(path: str, run_config: dict | None, device: torch.device):
    """The model at `path` in eval mode; a LoRA adapter directory is loaded onto its base model.

    The base is the run's --model when known (what train.py trained from), else the adapter's recorded base.
    Base + adapter (not a merged copy) is exactly the policy train.py evaluated.
    """
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file() or (Path(path) / "config.json").is_file():
        return load_model(path, device, trainable=False)
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError(f"{path} holds a LoRA adapter; loading it needs peft: pip install peft") from None
    base = (run_config or {}).get("model") or _read_json(adapter).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{adapter}: base_model_name_or_path is {json.dumps(base)}, so the adapter's base model is unknown; "
                        f"write the base model's path or hub id there, or pass the run directory that trained it")
    with peft_building():
        model = PeftModel.from_pretrained(load_model(base, device, trainable=False), path).to(device)
    model.eval()
    return model


def _read_run_config(path: Path) -> dict | None:
    """train.py's config.json (it has a schedule and total_steps), or None for a Hugging Face model directory."""
    file = path / "config.json"
    if not file.is_file():
        return None
    config = _read_json(file)
    return config if "schedule" in config and "total_steps" in config else None


def _read_json(file: Path) -> dict:
    """A JSON object from `file`, or a one-line UserError naming the file (a damaged run or model directory)."""
    try:
        value = parse_json(file.read_bytes())
    except ValueError as exc:
        raise UserError(f"{file}: {exc}; the directory is damaged (restore the file or pass another --model)") from None
    if not isinstance(value, dict):
        raise UserError(f"{file}: a JSON {type(value).__name__}, not an object; the directory is damaged")
    return value


def resolve_settings(args: argparse.Namespace, run_config: dict | None) -> dict:
    """Flag if given, else the run's value, else FALLBACKS. Example: no --n, run eval_problems=50 -> n=50."""
    run = run_config or {}
    from_run = {"task": run.get("task"), "data": run.get("data"), "seed": run.get("seed"),
                "n": run.get("eval_problems"), "stop": run.get("stop"), "chat_date": run.get("chat_date"),
                "max_new_tokens": run.get("eval_max_new_tokens") or run.get("max_new_tokens")}
    settings = {}
    for key, fallback in FALLBACKS.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else from_run[key] if from_run[key] is not None else fallback
    return settings


def select_levels(task, requested: list[str] | None) -> list[int]:
    """Level indices from indices or names (case-insensitive). Example: ["0", "ood"] on Countdown -> [0, 4]."""
    names = task.level_names()
    if not requested:
        return list(task.eval_levels)
    chosen = []
    for token in requested:
        lowered = [n.lower() for n in names]
        if token.lower() in lowered:
            level = lowered.index(token.lower())
        elif token.isdigit() and int(token) in task.eval_levels:
            level = int(token)
        else:
            raise UserError(f"--levels: unknown level {token!r} for task {task.name}; choose from "
                            f"{', '.join(names)} or 0..{len(names) - 1}")
        if level not in chosen:
            chosen.append(level)
    return chosen


def select_problems(task, levels: list[int], n: int, explicit_levels: bool) -> list:
    """Test problems 0..n-1 of each level, level by level (train.py's evaluation order).

    File-backed levels with fewer rows give all they have; an empty level is an error if asked for by name,
    skipped (with a note) otherwise, and an error if nothing at all is left.
    """
    names = task.level_names()
    available = {level: task.num_problems(level, "test") for level in levels}  # None: generated, unlimited
    counts = {level: n if a is None else min(n, a) for level, a in available.items()}
    if not any(counts.values()):
        raise UserError(f"task {task.name}: the dataset has no test problems at any evaluated level; "
                        f"check --data (rows need a test split)")
    for level, count in counts.items():
        if count == 0 and explicit_levels:
            raise UserError(f"task {task.name} has no test problems at level {names[level]}; drop it from --levels")
        if count < n:
            print(f"note: level {names[level]} has {count} test problems; using "
                  f"{'all of them' if count else 'none (skipped)'}", file=sys.stderr)
    return held_out_problems(task, n, levels)


@torch.no_grad()
def sample_pass_at_k(model, tokenizer, task, problems, ks: list[int], samples: int, max_new_tokens: int,
                     stop_checker, temperature: float, top_k: int, top_p: float, batch_size: int, seed: int,
                     autocast, progress: bool = True, chat_date: str | None = None) -> tuple[dict, list[dict]]:
    """Draw `samples` completions per problem and report pass@k per level name; also returns one record per sample.

    Returns ({level name: {"pass@k": mean over problems, ..., "sample_accuracy": c/n averaged}}, records).
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    eos, pad = eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    per_call = max(1, batch_size // samples)  # prompts per call; each prompt brings `samples` rows
    counts, records, dated = defaultdict(list), [], chat_date_variables(chat_date)
    for start in tqdm(range(0, len(problems), per_call), desc="pass@k", disable=not progress):
        chunk = problems[start:start + per_call]
        with autocast():
            rollout = generate(model, encode_prompts(tokenizer, task, chunk, dated), samples, max_new_tokens,
                               eos, pad, stop_checker=stop_checker, temperature=temperature, top_k=top_k,
                               top_p=top_p, generator=generator)
        texts, rewards = score_rollout(task, chunk, tokenizer, rollout, stop_checker.stop_strings)
        lengths = rollout.lengths.tolist()
        for p, problem in enumerate(chunk):
            rows = range(p * samples, (p + 1) * samples)
            correct = [task.is_correct(rewards[i]) for i in rows]
            counts[problem.level].append(int(sum(correct)))
            records += [sample_record(task, problem, texts[i], rewards[i], lengths[i], mode="sample",
                                      sample=i - p * samples) for i in rows]
    names = task.level_names()
    return pass_at_k_by_level({names[level]: cs for level, cs in counts.items()}, samples, ks), records


def sample_record(task, problem, completion: str, reward: float, length: int, mode: str, **extra) -> dict:
    """One JSONL line: the problem, what the model wrote and how it scored."""
    return {"mode": mode, "level": task.level_names()[problem.level], "index": problem.index, **extra,
            "prompt": problem.user_prompt, "completion": completion, "reward": float(reward),
            "correct": bool(task.is_correct(float(reward))), "formatted": bool(reward >= task.format_reward - 1e-9),
            "length": int(length)}


def format_table(report: dict) -> str:
    """The per-level figures as an aligned text table (accuracy, reward, format rate, length, pass@k in %)."""
    greedy, passk = report["greedy"], (report.get("pass_at_k") or {}).get("by_level", {})
    ks = [key for key in next(iter(passk.values()), {}) if key.startswith("pass@")]
    header = ["level", "n", "accuracy", "reward", "format", "length"] + ks
    lines = [header]
    for name, row in greedy.items():
        lines.append([name, str(row["n"]), f"{row['accuracy']:.1%}", f"{row['reward']:.3f}",
                      f"{row['format_rate']:.1%}", f"{row['length']:.1f}"]
                     + [f"{passk[name][k]:.1%}" for k in ks])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def run_eval_line(loaded_from: str, run_config: dict | None, step: int | None) -> dict | None:
    """The line of the run's eval.jsonl logged at `step`, when a run's final policy or checkpoint is evaluated.
    Read before the evaluation: lines that are not a JSON object with an integer step (torn or damaged) are
    skipped with a count on stderr, so a damaged log never costs a finished evaluation."""
    run_dir = owning_run(Path(loaded_from))
    if run_config is None or step is None or run_dir is None or not (run_dir / "eval.jsonl").is_file():
        return None
    found, bad = None, 0
    for line in (run_dir / "eval.jsonl").read_bytes().splitlines():
        if not line.strip():
            continue
        try:
            row = parse_json(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            bad += 1
        elif row["step"] == step:
            found = row
    if bad:
        print(f"note: {run_dir / 'eval.jsonl'}: skipped {bad} line(s) that are not a JSON object with an integer "
              f"step (torn or damaged)", file=sys.stderr)
    return found


def owning_run(loaded: Path) -> Path | None:
    """The train.py run directory that holds `loaded` (RUN/final, RUN/final-merged, RUN/checkpoints/step_N)."""
    for run_dir in (loaded.parent, loaded.parent.parent if loaded.parent.name == "checkpoints" else None):
        if run_dir is not None and _read_run_config(run_dir) is not None:
            return run_dir
    return None


def run_config_file(loaded: Path) -> Path:
    """The file find_model read the run's settings from: a checkpoint's trainer_state.json, else RUN/config.json."""
    if (loaded / "trainer_state.json").is_file():
        return loaded / "trainer_state.json"
    return (owning_run(loaded) or loaded) / "config.json"


def check_saved_files(path: Path, model: str) -> None:
    """A checkpoint (it has a manifest.json) must hold the files eval.py reads as they were saved: a damaged or
    swapped one is an error naming the file, not a silently wrong score. optimizer.pt and rng.pt are not read here,
    so not hashed either."""
    if not ((path / MANIFEST).is_file() and (path / "trainer_state.json").is_file()):  # not one of our checkpoints
        return
    try:
        problem = manifest_problem(path, skip=("optimizer.pt", "rng.pt"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = f"its {MANIFEST} cannot be read ({type(exc).__name__})"
    if problem is not None:
        raise UserError(f"--model {model}: checkpoint {path} is damaged: {problem}; evaluate another checkpoint or "
                        f"the run's final/")


def check_results_dir(out: Path) -> None:
    """UserError unless eval.py may write report.json and completions.jsonl into `out`: not a train.py run's folder
    (its completions.jsonl is the run's log), and either file already there only if an earlier eval.py wrote it
    (a report.json with eval.py's fields). Results of a rerun replace the earlier ones; nothing else is overwritten."""
    inside = run_folder_around(out)
    if inside is not None and out.resolve().parent != inside / "eval":
        raise UserError(f"--out {out} is inside the run folder {inside}, where eval.py writes only to {inside}/eval/"
                        f"NAME (its --overwrite would otherwise refuse for foreign files): pass that or a folder "
                        f"outside the run")
    if (out / "metrics.jsonl").exists() or (out / "config.json").exists():
        raise UserError(f"--out {out} holds a run or a model (config.json / metrics.jsonl), whose files eval.py would "
                        f"overwrite; pass another --out (by default results go to RUN/eval/NAME)")
    ours = False
    try:
        report = json.loads((out / "report.json").read_text())
        ours = isinstance(report, dict) and {"loaded_from", "greedy", "levels"} <= report.keys()
    except (OSError, ValueError):
        pass
    theirs = [name for name in ("report.json", "completions.jsonl") if (out / name).exists() and not ours]
    if theirs:
        raise UserError(f"--out {out} holds {' and '.join(theirs)}, which eval.py did not write; nothing was "
                        f"changed: move it or pass another --out")


def default_out_dir(model: str, loaded_from: str, task_name: str) -> Path:
    """Where results go without --out: next to what is evaluated, in a folder named after it.

    part of a run (its final/, final-merged/ or a checkpoint) -> RUN/eval/<that folder> (+ -TASK on another task)
    another local model directory                           -> DIR/../eval/<DIR>-<task> (./eval/... if read-only)
    a hub id or alias                                       -> ./eval/<name after the last slash>-<task>
    Examples: runs/cd -> runs/cd/eval/final; runs/cd/checkpoints/step_000040 -> runs/cd/eval/step_000040;
              Qwen/Qwen2.5-1.5B-Instruct -> eval/Qwen2.5-1.5B-Instruct-countdown
    """
    loaded = Path(loaded_from)
    run_dir = owning_run(loaded) if loaded.is_dir() else None
    if run_dir is not None:
        run_task = _read_run_config(run_dir).get("task")
        return run_dir / "eval" / (loaded.name if task_name == run_task else f"{loaded.name}-{task_name}")
    if model not in MODEL_ALIASES and loaded.is_dir() and os.access(loaded.resolve().parent, os.W_OK):
        return loaded.resolve().parent / "eval" / f"{loaded.resolve().name}-{task_name}"
    name = Path(model.rstrip("/")).name or model
    return Path("eval") / (re.sub(r"[^A-Za-z0-9._-]+", "-", name) + f"-{task_name}")


def check_settings(args, settings: dict, loaded_from: str) -> int | None:
    """Reject bad flags and settings (UserError, one line) before any model loads; pins the chat date (today if
    none was given or recorded; a bad recorded one names the file it came from, under loaded_from). Returns the
    completions per problem for pass@k (None without --pass-k)."""
    if settings["task"] not in TASKS:
        raise UserError(f"unknown --task {settings['task']!r}; choose one of {', '.join(sorted(TASKS))}")
    for flag, value, low, high in (("--n", settings["n"], 1, MAX_EVAL_PROBLEMS),
                                   ("--max-new-tokens", settings["max_new_tokens"], 1, MAX_NEW_TOKENS),
                                   ("--batch-size", args.batch_size, 1, MAX_ROLLOUT_ROWS),
                                   ("--samples", args.samples, 1, MAX_ROLLOUT_ROWS),
                                   ("--seed", settings["seed"], 0, MAX_SEED),
                                   ("--threads", args.threads, 0, MAX_THREADS),
                                   ("--top-k", args.top_k, 0, None)):
        if value is not None and (value < low or high is not None and value > high):
            raise UserError(f"{flag} must be in [{low}, {high:,}], got {value}" if high is not None
                            else f"{flag} must be >= {low}, got {value}")
    if not (math.isfinite(args.temperature) and math.isfinite(args.top_p)):
        raise UserError("--temperature and --top-p must be finite numbers")
    if settings["chat_date"] is not None and not is_iso_date(settings["chat_date"]):
        if args.chat_date is None:  # the run's own value: name the file it came from, not a flag never given
            raise UserError(f"{run_config_file(Path(loaded_from))}: chat_date must be a date YYYY-MM-DD, got "
                            f"{settings['chat_date']!r}; fix it there, or pass --chat-date YYYY-MM-DD")
        raise UserError(f"--chat-date must be a date YYYY-MM-DD, got {settings['chat_date']!r}")
    settings["chat_date"] = settings["chat_date"] or today()  # one date for every prompt, recorded in report.json
    defaults = build_parser()
    changed = [flag for flag in ("--samples", "--temperature", "--top-p", "--top-k")
               if getattr(args, flag[2:].replace("-", "_")) != defaults.get_default(flag[2:].replace("-", "_"))]
    if changed and not args.pass_k:  # greedy evaluation would ignore them in silence
        raise UserError(f"{changed[0]} is for pass@k sampling: add --pass-k K [K ...] (e.g. --pass-k 1 8 --samples 8)"
                        f", or drop it")
    samples = args.samples or (max(args.pass_k) if args.pass_k else None)
    if args.pass_k:
        if len(args.pass_k) > 100:
            raise UserError(f"--pass-k takes at most 100 values, got {len(args.pass_k)}")
        if min(args.pass_k) < 1 or max(args.pass_k) > samples:
            raise UserError(f"--pass-k needs 1 <= k <= --samples ({samples}); got {' '.join(map(str, args.pass_k))}")
        if args.temperature <= 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
            raise UserError("pass@k sampling needs --temperature > 0, 0 < --top-p <= 1 and --top-k >= 0")
    return samples


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    loaded_from, run_config, step = find_model(args.model)
    check_saved_files(Path(loaded_from), args.model)
    settings = resolve_settings(args, run_config)
    samples = check_settings(args, settings, loaded_from)
    task = make_task(settings["task"], seed=settings["seed"], data=settings["data"])
    levels = select_levels(task, args.levels)
    out = Path(args.out) if args.out else default_out_dir(args.model, loaded_from, task.name)
    check_results_dir(out)
    context = context_length(loaded_from)
    run_budget = (run_config or {}).get("eval_max_new_tokens") or (run_config or {}).get("max_new_tokens")
    if context is not None and args.max_new_tokens is None and run_budget is None:  # FALLBACKS' 512 would fill a
        settings["max_new_tokens"] = min(settings["max_new_tokens"], context // 2)  # short context: keep half
    check_context(settings["max_new_tokens"], context)
    tokenizer = load_tokenizer(loaded_from)
    fit_prompts(task, tokenizer, context, None, settings["max_new_tokens"], settings["chat_date"],
                lambda line: print(line, file=sys.stderr))  # rows too long for the model: skipped, as train.py does
    problems = select_problems(task, levels, settings["n"], explicit_levels=bool(args.levels))
    check_output_dir(out, "--out")  # created after the other checks (no empty folder is left by a refusal), and an
    # unwritable place still fails now, not after the evaluation

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)

    def autocast():  # as in train.py: bf16 compute on CUDA, fp32 elsewhere
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if resolve_model_name(loaded_from) != loaded_from:
        print(f"model {loaded_from} -> {resolve_model_name(loaded_from)}")
    print(f"evaluating {loaded_from} on {task.name} | levels "
          f"{' '.join(task.level_names()[k] for k in levels)} | {len(problems)} problems | device {device}")
    print(f"results will be written to {out}/")
    run_eval = run_eval_line(loaded_from, run_config, step)  # the run's logs are read before the work
    model = load_policy(loaded_from, run_config, device)
    stop_checker = StopChecker(tokenizer, [settings["stop"]], device)
    t0 = time.perf_counter()
    greedy, records = evaluate(model, tokenizer, task, problems, settings["max_new_tokens"], stop_checker,
                               batch_size=args.batch_size, autocast=autocast, progress=not args.quiet,
                               chat_date=settings["chat_date"])
    lines = [sample_record(task, problem, r["completion"], r["reward"], r["length"], mode="greedy")
             for problem, r in zip(problems, records)]
    report = {"model": args.model, "loaded_from": loaded_from, "step": step, **settings,
              "levels": [task.level_names()[k] for k in levels], "batch_size": args.batch_size,
              "greedy": greedy, "pass_at_k": None}
    if args.pass_k:
        by_level, sampled = sample_pass_at_k(
            model, tokenizer, task, problems, sorted(set(args.pass_k)), samples, settings["max_new_tokens"],
            stop_checker, args.temperature, args.top_k, args.top_p, args.batch_size, settings["seed"], autocast,
            progress=not args.quiet, chat_date=settings["chat_date"])
        lines += sampled
        report["pass_at_k"] = {"samples": samples, "temperature": args.temperature, "top_p": args.top_p,
                               "top_k": args.top_k, "by_level": by_level}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["run_eval"] = run_eval

    (out / "report.json").write_text(json.dumps(report, indent=1))
    with open(out / "completions.jsonl", "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    print(format_table(report))
    if report["run_eval"]:
        print(f"the run's own evaluation at step {step} (its settings): " + "  ".join(
            f"{k[:-len('/accuracy')]} {v:.1%}" for k, v in report["run_eval"].items()
            if k.endswith("/accuracy") and isinstance(v, (int, float))))
    print(f"wrote {out / 'report.json'} and {out / 'completions.jsonl'} ({len(lines)} lines)")
    return report


if __name__ == "__main__":
    main()
