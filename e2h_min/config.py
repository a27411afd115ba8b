"""Every knob of a run in one dataclass, with the paper's defaults (spec section 5), and the CLI built from it.

Each field's `help` metadata becomes its `--flag` help text, so `python train.py --help` is the full catalogue.
Option names follow TRL's GRPOConfig where one exists (num_generations, epsilon, epsilon_high, beta,
num_iterations, loss_type, scale_rewards, max_grad_norm) so users can map concepts between the two.

Presets fill the fields the user did not set on the command line, chosen by what the model is (models.
describe_model reads its config), never by how it was named; the run prints which applied and every value it set:
- demo: the embedded tiny model (or a copy of it: its build_info.json names scripts/build_tiny_model.py), which
  cannot learn at the paper's lr of 1e-6 within a CPU demo (DEMO_PRESET);
- paper: a Qwen2 or Llama architecture (the paper's model families): the paper's release recipe for the task
  (PAPER_RECIPE + PAPER_TASK_BUDGETS, spec section 5), LoRA included;
- none: any other model: the flags' defaults (the paper's GRPO settings, full fine-tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (see `exit_on_user_error`)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


# Limits that keep a typo from exhausting memory or hanging (each named in its error line). They are far above any
# real run: the paper uses 1,600 steps, 8 x 8 samples per step, 512 tokens, 100-1,000 eval problems per level.
MAX_STEPS = 10_000_000  # --total-steps (the curriculum clock); curriculum.py --steps
MAX_ROLLOUT_ROWS = 65_536  # --prompts-per-step x --num-generations sequences decoded in one batch
MAX_NEW_TOKENS = 131_072  # any completion budget; the model's own context is checked once its config is read
MAX_EVAL_PROBLEMS = 100_000  # test problems per level (generated tasks build each one)
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_THREADS = 1024


SCHEDULES = ("classic", "balanced", "cosine", "cosine_literal", "gaussian", "hard", "sec")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "ppo")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class Config:
    # --- model and task ---
    model: str = _f("tiny", "hub id, local directory, or alias (tiny, Qwen2.5-1.5B, Qwen2.5-3B-Instruct, ...)")
    task: str = _f("countdown", "task name: countdown, blocksworld, gsm8k, math, aqua")
    data: Optional[str] = _f(None, "data file (JSONL/Parquet) for file-backed tasks (gsm8k, math, aqua)")
    out_dir: Optional[str] = _f(None, "run directory (default runs/<task>-<schedule>-s<seed>)")
    seed: int = _f(0, "seed for the task generator, curriculum draws, sampling and init")
    # --- curriculum (spec section 3) ---
    schedule: str = _f("gaussian", f"level schedule: {', '.join(SCHEDULES)}")
    schedule_beta: float = _f(0.5, "gaussian schedule: speed exponent beta (the paper's beta, public code's mu_exp)")
    sigma: float = _f(0.5, "gaussian schedule: width sigma")
    min_prob: Optional[float] = _f(None, "gaussian schedule: per-level floor (default 2/(K(K+1)); 0 = paper Eq. 1)")
    sec_temperature: float = _f(0.2, "sec schedule: softmax temperature over the levels' mean |advantage| values")
    sec_ema: float = _f(0.5, "sec schedule: moving-average weight of each step's mean |advantage|")
    # --- rollout ---
    prompts_per_step: int = _f(8, "distinct prompts per optimizer step")
    num_generations: int = _f(8, "completions sampled per prompt (G)")
    temperature: float = _f(1.0, "sampling temperature of training rollouts (log-probs use the same)")
    max_new_tokens: int = _f(512, "max completion length in tokens")
    stop: str = _f("</answer>", "stop string: a row ends right after it (empty = EOS only)")
    chat_date: Optional[str] = _f(None, "YYYY-MM-DD date a date-bearing chat template (Llama 3) writes into the "
                                        "prompts (default: the run's start date in UTC, recorded in config.json; "
                                        "kept on --resume and by eval.py)")
    # --- GRPO update (spec section 5) ---
    total_steps: int = _f(1600, "optimizer steps (the curriculum clock)")
    lr: float = _f(1e-6, "peak learning rate (AdamW)")
    lr_schedule: str = _f("cosine", "cosine or constant, after warmup")
    warmup_steps: int = _f(0, "linear LR warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    beta: float = _f(0.001, "KL coefficient to the frozen reference model (0 = no reference model loaded)")
    kl_estimator: Optional[str] = _f(None, "KL estimator: k1 (-d), k2 (d^2/2), k3 (exp(d)-d-1), d = logp_ref - "
                                           "logp; default: k3 in the loss, k1 with --kl-in-reward (README: KL)")
    use_bias_correction_kl: bool = _f(False, "multiply the in-loss KL by the importance ratio pi/pi_old (TRL's "
                                             "name): k3 then pushes along grad KL(pi||ref), not grad KL(ref||pi)")
    epsilon: float = _f(0.2, "PPO clip range (lower side, and upper unless --epsilon-high)")
    epsilon_high: Optional[float] = _f(None, "upper clip range (clip-higher, DAPO); default = epsilon")
    num_iterations: int = _f(1, "updates per rollout batch (pi_old = the first pass's log-probs, kept for all)")
    advantage: str = _f("grpo", f"advantage estimator: {', '.join(ADVANTAGES)}")
    scale_rewards: str = _f("group", "grpo advantage scale: group std, batch std, or none")
    loss_type: str = _f("grpo", f"loss aggregation: {', '.join(LOSS_TYPES)}")
    importance_sampling_level: str = _f("token", "importance ratio per token (PPO/GRPO) or per sequence (GSPO)")
    kl_in_reward: bool = _f(False, "penalise beta * KL per sequence in the advantage (after the group "
                                   "normalisation, leave-one-out baseline; per token for ppo) instead of in the loss")
    drop_zero_std: bool = _f(False, "leave groups whose rewards are all equal out of the loss")
    dynamic_sampling: bool = _f(False, "draw extra prompts (same curriculum step) until every group is informative")
    max_resample_rounds: int = _f(4, "dynamic sampling: at most this many extra draws per step")
    mask_truncated: bool = _f(False, "leave completions that hit max_new_tokens out of the loss")
    # --- PPO with a value head (--advantage ppo) ---
    gamma: float = _f(1.0, "ppo: discount of GAE")
    lam: float = _f(0.95, "ppo: GAE lambda")
    vf_coef: float = _f(0.1, "ppo: weight of the value loss")
    cliprange_value: float = _f(0.2, "ppo: clip range of the value update around the old values")
    micro_batch_size: int = _f(16, "sequences per forward/backward pass (gradients do not depend on it)")
    micro_batch_tokens: int = _f(0, "also cap a micro-batch at this many padded tokens (0 = rows cap only)")
    share_prompt_forward: bool = _f(True, "run each distinct prompt once in the update, not once per sample")
    skip_zero_advantage: bool = _f(True, "leave samples whose advantage is exactly 0 out of the update's forward "
                                         "and backward where they cannot change the gradient (no KL in the loss, "
                                         "not ppo)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, ~30% slower)")
    plain_update: bool = _f(False, "train with the plain reference update (e2h_min/reference_update.py): the same "
                                   "parameter change as the fast one, none of its savings; the paper's loss only")
    max_nonfinite_steps: int = _f(3, "abort after this many updates in a row with a non-finite gradient")
    # --- LoRA (needs peft; the paper: r 32, alpha 64, dropout 0.1 on q_proj,v_proj) ---
    lora_r: int = _f(0, "LoRA rank (0 = full fine-tuning; the paper preset sets 32)")
    lora_alpha: float = _f(64.0, "LoRA alpha")
    lora_dropout: float = _f(0.1, "LoRA dropout")
    lora_targets: str = _f("q_proj,v_proj", "comma-separated module names that get adapters")
    save_merged: bool = _f(False, "LoRA: also save the merged model to <out>/final-merged")
    # --- precision (trained weights are always fp32 master weights) ---
    frozen_dtype: str = _f("auto", "dtype of frozen weights (reference model, LoRA base): auto (bfloat16 on CUDA, "
                                   "float32 elsewhere), float32 or bfloat16 (bf16 on CPU also computes in bf16)")
    save_dtype: str = _f("auto", "dtype of the weights in <out>/final: auto (the base model's own dtype, "
                                 "config.json), float32 or bfloat16 (checkpoints keep fp32 for exact resume)")
    # --- evaluation, logging, checkpoints ---
    eval_every: int = _f(100, "greedy held-out evaluation every N steps (0 = only at start and end)")
    eval_problems: int = _f(100, "held-out problems per level in periodic evaluation")
    eval_max_new_tokens: Optional[int] = _f(None, "max tokens in evaluation (default = max_new_tokens)")
    eval_pass_k: tuple[int, ...] = _f((), "also log the unbiased pass@k per level at each evaluation, for these k "
                                          "(e.g. 1 4 16), from --eval-samples completions per problem at "
                                          "temperature 1; costs samples x problems x levels completions per "
                                          "evaluation (16 x 200 x 5 = 16,000 for the long sweep)")
    eval_samples: int = _f(0, "completions per problem for --eval-pass-k (0 = the largest k)")
    eval_pass_k_levels: str = _f("", "comma-separated levels that get --eval-pass-k, e.g. L1,L2,L3 (empty = all)")
    log_completions_every: int = _f(50, "write a few sampled completions per level every N steps (0 = off)")
    save_every: int = _f(200, "checkpoint every N steps (0 = only at the end)")
    log_every: int = _f(0, "console line every N steps (0 = auto: max(5, total_steps // 100), ~100 lines per run)")
    report_to: str = _f("none", "live tracking: none, tensorboard, wandb, or both comma-separated (TRL's report_to)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    # --- system ---
    resume: Optional[str] = _f(None, "continue the run in this directory from its latest checkpoint")
    overwrite: bool = _f(False, "let --out-dir replace an earlier run there (its logs, checkpoints, saved policies, "
                                   "eval.py results and tracker files are deleted)")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    threads: int = _f(0, "CPU threads for torch (0 = torch default)")
    parallel: str = _f("ddp", "under torchrun: ddp (every rank holds the whole model; gradients summed) or fsdp "
                              "(FSDP2: weights, gradients and AdamW state sharded across ranks; full fine-tuning)")

    def __post_init__(self):
        self.eval_pass_k = tuple(self.eval_pass_k)  # argparse and config.json give a list


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


@dataclass(frozen=True)
class ModelFacts:
    """What a --model is, read before loading it (models.describe_model): its resolved path or hub id, its
    architectures and parameter count from config.json (None when no config is reachable offline), and whether
    scripts/build_tiny_model.py built it (its build_info.json says so)."""

    path: str
    architectures: tuple[str, ...] = ()
    num_parameters: Optional[int] = None
    tiny_build: bool = False


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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """One --flag per Config field (underscored spelling accepted too); Optionals accept 'none'.

    Defaults are suppressed in the namespace so that `parse_config` knows which flags the user actually gave.
    """
    parser = OneLineErrorParser(description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(Config):
        kind = _base_type(f)
        spellings = [_flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else [])
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(*spellings, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind is tuple:  # --eval-pass-k 1 4 16 (ints)
            parser.add_argument(*spellings, dest=f.name, type=_parse_value(int, False), nargs="+", metavar="INT",
                                help=help_text)
        else:
            optional = str(f.type).startswith("Optional[")  # only these take 'none' (--scale-rewards none is a str)
            parser.add_argument(*spellings, dest=f.name, type=_parse_value(kind, optional),
                                metavar=kind.__name__.upper(), help=help_text)
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; every entry point prints the one line that matters
    (and exits with code 2)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _base_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool, "tuple[int, ...]": tuple}[
        str(f.type).removeprefix("Optional[").rstrip("]") if "Optional" in str(f.type) else str(f.type)]


def _parse_value(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its error line
    return parse


def kl_estimator_for(cfg: Config) -> str:
    """The KL estimator a run uses: the one given, else the one whose expected gradient is grad KL(pi||ref) or
    the paper's where it sits: k1 in the reward (InstructGPT), k3 in the loss (DeepSeekMath). README: KL."""
    if cfg.kl_estimator is not None:
        return cfg.kl_estimator
    return "k1" if cfg.kl_in_reward else "k3"


def combination_warnings(cfg: Config) -> list[str]:
    """Accepted combinations whose expected gradient is zero or not what their names suggest, each with what it
    does instead (measured exactly by `python -m e2h_min.kl_gradients`; README: KL)."""
    out = []
    estimator = kl_estimator_for(cfg)
    if cfg.beta > 0 and not cfg.kl_in_reward and estimator == "k1" and not cfg.use_bias_correction_kl:
        out.append("--kl-estimator k1 in the loss has zero expected gradient (E_pi[grad log pi] = 0): the KL term "
                   "only adds noise; use k3 (pushes along grad KL(ref||pi)), k2 or --use-bias-correction-kl "
                   "(grad KL(pi||ref))")
    if cfg.beta > 0 and cfg.kl_in_reward and estimator != "k1":
        out.append(f"--kl-estimator {estimator} in the reward does not push along grad KL(pi||ref) (k3: grad "
                   f"KL(pi||ref) - grad KL(ref||pi), small and partly pointing away); k1, the default with "
                   f"--kl-in-reward, gives exactly grad KL(pi||ref)")
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type != "grpo":
        out.append(f"--importance-sampling-level sequence with --loss-type {cfg.loss_type} weighs each "
                   f"sequence's ratio term by its token count, so long completions dominate; GSPO weighs "
                   f"sequences equally (--loss-type grpo)")
    return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line into a validated Config (the model's preset under the user's flags)."""
    return resolve_config(argv)[0]


def resolve_config(argv: list[str] | None = None) -> tuple[Config, Preset, dict[str, Any]]:
    """The validated Config, the preset chosen for the model and the values it set (those the user's flags did
    not override). The Config is built once from preset + flags and not changed afterwards."""
    from e2h_min.models import describe_model

    given = vars(build_parser().parse_args(argv))
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
    import json
    from pathlib import Path

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
    kept = sorted(_flag(k) for k in set(preset.values) - set(applied))
    if preset.name == "resumed":  # every setting comes from the run; name only what the flags give again
        return f"resuming with {preset.reason}" + (f"; flags given again: {', '.join(kept)}" if kept else "")
    values = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in applied.items()) or "nothing"
    return (f"preset {preset.name} ({preset.reason}): sets {values}"
            + (f"; your flags win over its {', '.join(kept)}" if kept else ""))


def validate(cfg: Config) -> None:
    """Reject invalid values and combinations before anything heavy happens (raises UserError, one line)."""
    from e2h_min.tasks import TASKS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    for f in dataclasses.fields(cfg):  # every float knob: NaN or inf is never meant (and poisons the math silently)
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(f.name)} must be a finite number, got {value}")
    need(0 <= cfg.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    need(0 <= cfg.threads <= MAX_THREADS, f"--threads must be in [0, {MAX_THREADS}] (0 = torch default), "
                                          f"got {cfg.threads}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.total_steps <= MAX_STEPS, f"--total-steps must be <= {MAX_STEPS:,} (the limit), got {cfg.total_steps}")
    need(cfg.prompts_per_step * cfg.num_generations <= MAX_ROLLOUT_ROWS,
         f"--prompts-per-step x --num-generations = {cfg.prompts_per_step * cfg.num_generations:,} sequences per "
         f"step exceeds the limit of {MAX_ROLLOUT_ROWS:,}; lower one of them")
    need(cfg.max_new_tokens <= MAX_NEW_TOKENS, f"--max-new-tokens must be <= {MAX_NEW_TOKENS:,} (the limit), "
                                               f"got {cfg.max_new_tokens}")
    need(cfg.eval_max_new_tokens is None or 1 <= cfg.eval_max_new_tokens <= MAX_NEW_TOKENS,
         f"--eval-max-new-tokens must be in [1, {MAX_NEW_TOKENS:,}], got {cfg.eval_max_new_tokens}")
    need(cfg.eval_problems <= MAX_EVAL_PROBLEMS, f"--eval-problems must be <= {MAX_EVAL_PROBLEMS:,} per level (the "
                                                 f"limit), got {cfg.eval_problems}")
    need(cfg.max_resample_rounds <= 100, f"--max-resample-rounds must be <= 100, got {cfg.max_resample_rounds}")
    need(cfg.num_iterations <= 100, f"--num-iterations must be <= 100, got {cfg.num_iterations}")
    need(cfg.sigma >= 1e-3, f"--sigma must be >= 0.001 (a narrower bump is the same single level), got {cfg.sigma}")
    need(cfg.min_prob is None or 0 <= cfg.min_prob <= 1, f"--min-prob must be in [0, 1/K] (K levels), "
                                                         f"got {cfg.min_prob}")
    need(not (cfg.resume and cfg.overwrite), "--overwrite replaces a run and --resume continues one; pass one")
    need(not (cfg.resume and cfg.out_dir and cfg.out_dir != cfg.resume),
         "--resume DIR continues the run in DIR; drop --out-dir (or give the same directory)")
    need(cfg.task in TASKS, f"unknown --task {cfg.task!r}; choose one of {', '.join(sorted(TASKS))}")
    need(cfg.schedule in SCHEDULES, f"unknown --schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(cfg.advantage in ADVANTAGES, f"unknown --advantage {cfg.advantage!r}; choose one of {', '.join(ADVANTAGES)}")
    need(cfg.loss_type in LOSS_TYPES, f"unknown --loss-type {cfg.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    need(cfg.kl_estimator is None or cfg.kl_estimator in KL_ESTIMATORS,
         f"unknown --kl-estimator {cfg.kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    need(cfg.scale_rewards in ("group", "batch", "none"), "--scale-rewards must be group, batch or none")
    need(cfg.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant")
    need(cfg.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp (got {cfg.parallel})")
    need(cfg.parallel != "fsdp" or not cfg.lora_r, f"--parallel fsdp shards full fine-tuning, but LoRA is on "
                                                   f"(--lora-r {cfg.lora_r}; the paper preset turns it on): pass "
                                                   f"--lora-r 0, or use --parallel ddp for LoRA")
    need(cfg.parallel != "fsdp" or cfg.advantage != "ppo", "--parallel fsdp does not support --advantage ppo yet "
                                                           "(its value head); use --parallel ddp")
    need(cfg.num_generations >= 2, f"--num-generations must be >= 2 for group-relative advantages "
                                   f"(got {cfg.num_generations})")
    need(cfg.prompts_per_step >= 1, "--prompts-per-step must be >= 1")
    need(cfg.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    need(cfg.micro_batch_tokens >= 0, "--micro-batch-tokens must be >= 0 (0 = no token cap)")
    need(cfg.total_steps >= 1, "--total-steps must be >= 1")
    need(cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
    need(cfg.chat_date is None or is_iso_date(cfg.chat_date),
         f"--chat-date must be a date YYYY-MM-DD, got {cfg.chat_date!r}")
    need(cfg.temperature > 0, "--temperature must be > 0 (training needs sampling; use eval.py for greedy)")
    need(cfg.lr > 0, "--lr must be > 0")
    need(0 <= cfg.warmup_steps < cfg.total_steps, "--warmup-steps must be in [0, total_steps)")
    need(cfg.beta >= 0, "--beta (KL coefficient) must be >= 0")
    need(not cfg.plain_update or (cfg.advantage != "ppo" and cfg.loss_type == "grpo" and not cfg.kl_in_reward
                                  and cfg.importance_sampling_level == "token" and not cfg.use_bias_correction_kl
                                  and cfg.kl_estimator in (None, "k3")),
         "--plain-update writes out the paper's loss only: drop --advantage ppo, --loss-type, --kl-in-reward, "
         "--importance-sampling-level sequence, --use-bias-correction-kl and --kl-estimator other than k3")
    need(not (cfg.use_bias_correction_kl and cfg.kl_in_reward), "--use-bias-correction-kl weights the KL in the "
         "loss; with --kl-in-reward it has no effect: drop one of the two")
    need(cfg.epsilon > 0, "--epsilon must be > 0")
    need(cfg.epsilon_high is None or cfg.epsilon_high >= cfg.epsilon, "--epsilon-high must be >= --epsilon")
    need(cfg.num_iterations >= 1, "--num-iterations must be >= 1")
    need(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables clipping)")
    need(cfg.sigma > 0, "--sigma must be > 0")
    need(cfg.importance_sampling_level in ("token", "sequence"), "--importance-sampling-level must be token or sequence")
    need(cfg.max_resample_rounds >= 0, "--max-resample-rounds must be >= 0")
    need(0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma must be in (0, 1] and --lam in [0, 1]")
    need(cfg.vf_coef >= 0 and cfg.cliprange_value > 0, "--vf-coef must be >= 0 and --cliprange-value > 0")
    need(cfg.sec_temperature >= 1e-3, f"--sec-temperature must be >= 0.001, got {cfg.sec_temperature}")
    need(0 < cfg.sec_ema <= 1, "--sec-ema must be in (0, 1]")
    need(cfg.schedule_beta >= 0, "--schedule-beta must be >= 0")
    need(cfg.eval_problems >= 1, "--eval-problems must be >= 1")
    need(not cfg.eval_samples or cfg.eval_pass_k, f"--eval-samples {cfg.eval_samples} needs --eval-pass-k (which k "
                                                  f"to report, e.g. --eval-pass-k 1 4 16)")
    samples = cfg.eval_samples or max(cfg.eval_pass_k, default=0)
    need(0 <= samples <= MAX_ROLLOUT_ROWS, f"--eval-samples must be in [0, {MAX_ROLLOUT_ROWS:,}], got {samples}")
    need(all(1 <= k <= samples for k in cfg.eval_pass_k), f"--eval-pass-k needs 1 <= k <= --eval-samples "
                                                          f"({samples}); got {' '.join(map(str, cfg.eval_pass_k))}")
    need(min(cfg.eval_every, cfg.save_every, cfg.log_completions_every) >= 0, "--*-every flags must be >= 0")
    need(cfg.log_every >= 0, "--log-every must be >= 0 (0 = auto)")
    from e2h_min.tracking import parse_report_to
    parse_report_to(cfg.report_to)  # raises UserError on an unknown tracker name
    need(cfg.lora_r >= 0 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1, "--lora-r must be >= 0, "
         "--lora-alpha > 0 and --lora-dropout in [0, 1)")
    need(cfg.max_nonfinite_steps >= 1, "--max-nonfinite-steps must be >= 1")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
    need(cfg.data is None or cfg.task in ("gsm8k", "math", "aqua"), f"--data is not used by task {cfg.task!r}")
    if cfg.data is not None:  # the model card and config.json record it
        check_path_name(cfg.data, "--data")
    need(cfg.frozen_dtype in ("auto", "float32", "bfloat16"), "--frozen-dtype must be auto, float32 or bfloat16")
    need(cfg.save_dtype in ("auto", "float32", "bfloat16"), "--save-dtype must be auto, float32 or bfloat16")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
         f"unknown --device {cfg.device!r}; use auto, cpu, cuda, cuda:N or mps")


def check_context(max_new_tokens: int, context: int | None, flag: str = "--max-new-tokens") -> None:
    """A completion budget must leave room in the model's context (max_position_embeddings; None = unknown), or
    decoding would index past the position table or allocate for a length the model cannot use."""
    if context is not None and max_new_tokens > context:
        raise UserError(f"{flag} {max_new_tokens} exceeds the model's context of {context} tokens "
                        f"(max_position_embeddings); use less, leaving room for the prompt")


def check_path_name(path, flag: str) -> None:
    """A path the run will write under or record must be UTF-8 (safetensors, JSON and the model card need text) and
    short enough for the filesystem, with room for the run's own names below it (checkpoints/.tmp_step_..._PID/
    tokenizer_config.json); else a UserError, before anything is written.
    Example: check_path_name("runs/\udcffx", "--out-dir") raises "... is not valid UTF-8 ..." """
    from pathlib import Path

    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {text.encode('utf-8', 'backslashreplace').decode()}: the path is not valid UTF-8; "
                        f"rename it (or pass another path)") from None
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest > 255:
        raise UserError(f"{flag}: a path component of {longest} bytes is longer than filesystems allow (255); "
                        f"pass a shorter name")
    full = len(os.fsencode(os.path.abspath(text)))
    if full + 100 > 4096:
        raise UserError(f"{flag}: the path is {full} bytes long; with the run's own names below it that passes the "
                        f"4096-byte limit of a path: pass a shorter one")


def check_output_dir(path, flag: str) -> None:
    """Create `path` (a directory the entry point will write into) now and write a scratch file there, or raise a
    UserError saying why not: an unwritable place should fail before the work, not after it."""
    import tempfile
    from pathlib import Path

    check_path_name(path, flag)
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror}); pass a writable directory") from None


def check_output_file(path, flag: str) -> None:
    """`path` can be written: not a directory, and its directory can be created and written (a scratch file is
    written and removed there). Checked before the work."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: a directory; pass a file path")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag + " (its directory)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable; pass a writable path")


def exit_on_user_error(fn):
    """Decorator for entry points: a UserError (or a task data error) becomes one stderr line and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from e2h_min.tasks.base import TaskDataError
        try:
            return fn(*args, **kwargs)
        except (UserError, TaskDataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:  # a full disk or quota is the user's to fix, not a bug: one line too
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: no space left on the device (writing {exc.filename or 'a file'}); free some space and "
                  f"run again (train.py: --resume RUN_DIR continues from the last intact checkpoint)", file=sys.stderr)
            sys.exit(2)
    return wrapper


def schedule_params(cfg: Config) -> dict[str, Any]:
    """The curriculum parameters that `cfg.schedule` takes (the sampler rejects any others, to catch typos)."""
    if cfg.schedule == "gaussian":
        return {"beta": cfg.schedule_beta, "sigma": cfg.sigma, "min_prob": cfg.min_prob}
    if cfg.schedule == "sec":
        return {"temperature": cfg.sec_temperature, "ema": cfg.sec_ema}
    return {}


def is_iso_date(text: str) -> bool:
    """True for a calendar date written YYYY-MM-DD (the form config.json records). Example: "2024-07-26"."""
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10
