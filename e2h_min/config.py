"""Every knob of a run in one dataclass, with the paper's defaults (spec section 5), and the CLI built from it.

Each field's `help` metadata becomes its `--flag` help text, so `python train.py --help` is the full catalogue.
Option names follow TRL's GRPOConfig where one exists (num_generations, epsilon, epsilon_high, beta,
num_iterations, loss_type, scale_rewards, max_grad_norm) so users can map concepts between the two.

The embedded tiny model cannot learn at the paper's lr of 1e-6 within a CPU demo, so when `--model tiny` (the
default) is used, DEMO_PRESET fills every field the user did not set on the command line; the run prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, Optional


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (see `exit_on_user_error`)."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


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
    # --- GRPO update (spec section 5) ---
    total_steps: int = _f(1600, "optimizer steps (the curriculum clock)")
    lr: float = _f(1e-6, "peak learning rate (AdamW)")
    lr_schedule: str = _f("cosine", "cosine or constant, after warmup")
    warmup_steps: int = _f(0, "linear LR warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    beta: float = _f(0.001, "KL coefficient to the frozen reference model (0 = no reference model loaded)")
    kl_estimator: str = _f("k3", "KL estimator: k1 (-d), k2 (d^2/2), k3 (exp(d)-d-1), d = logp_ref - logp")
    epsilon: float = _f(0.2, "PPO clip range (lower side, and upper unless --epsilon-high)")
    epsilon_high: Optional[float] = _f(None, "upper clip range (clip-higher, DAPO); default = epsilon")
    num_iterations: int = _f(1, "updates per rollout batch (pi_old = the first pass's log-probs, kept for all)")
    advantage: str = _f("grpo", f"advantage estimator: {', '.join(ADVANTAGES)}")
    scale_rewards: str = _f("group", "grpo advantage scale: group std, batch std, or none")
    loss_type: str = _f("grpo", f"loss aggregation: {', '.join(LOSS_TYPES)}")
    importance_sampling_level: str = _f("token", "importance ratio per token (PPO/GRPO) or per sequence (GSPO)")
    kl_in_reward: bool = _f(False, "subtract beta * KL from the reward instead of adding it to the loss")
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
    max_nonfinite_steps: int = _f(3, "abort after this many updates in a row with a non-finite gradient")
    # --- LoRA (needs peft; the paper: r 32, alpha 64, dropout 0.1 on q_proj,v_proj) ---
    lora_r: int = _f(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: float = _f(64.0, "LoRA alpha")
    lora_dropout: float = _f(0.1, "LoRA dropout")
    lora_targets: str = _f("q_proj,v_proj", "comma-separated module names that get adapters")
    save_merged: bool = _f(False, "LoRA: also save the merged model to <out>/final-merged")
    # --- evaluation, logging, checkpoints ---
    eval_every: int = _f(100, "greedy held-out evaluation every N steps (0 = only at start and end)")
    eval_problems: int = _f(100, "held-out problems per level in periodic evaluation")
    eval_max_new_tokens: Optional[int] = _f(None, "max tokens in evaluation (default = max_new_tokens)")
    log_completions_every: int = _f(50, "write a few sampled completions per level every N steps (0 = off)")
    save_every: int = _f(200, "checkpoint every N steps (0 = only at the end)")
    log_every: int = _f(0, "console line every N steps (0 = auto: max(5, total_steps // 100), ~100 lines per run)")
    report_to: str = _f("none", "live tracking: none, tensorboard, wandb, or both comma-separated (TRL's report_to)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    # --- system ---
    resume: Optional[str] = _f(None, "continue the run in this directory from its latest checkpoint")
    device: str = _f("auto", "auto, cpu, cuda, cuda:N or mps")
    threads: int = _f(0, "CPU threads for torch (0 = torch default)")


# Settings that make the embedded tiny model learn visibly in a few CPU minutes (applied only with --model tiny,
# only to flags the user did not give). Why each differs from the paper: a 1.8M-parameter model needs a far larger
# lr (5e-4 and 2e-4 made it forget level 0; 1e-4 learned); its completions are ~20-40 tokens; a short run needs
# a short clock. The schedule is E2H-C (cosine): gaussian(0.5, 0.5) moves its mass to levels 2-3 within a
# third of a 200-step run, where this model solves 1.5% / 0%, so most groups carry no signal (README results).
# One torch thread: the model is overhead-bound, and a second thread only waits on a loaded 2-core machine.
# Micro-batches of 128 rows under a 512-token budget: sorted by length, the update pads ~4% (bench/step.py).
DEMO_PRESET: dict[str, Any] = dict(
    schedule="cosine", lr=1e-4, total_steps=200, prompts_per_step=16, max_new_tokens=64, micro_batch_size=128,
    micro_batch_tokens=512,
    beta=0.0, eval_every=50, eval_problems=200, save_every=50, log_completions_every=20, warmup_steps=5,
    threads=1,
)


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
        help_text = f"{f.metadata['help']} (default: {f.default})"
        if kind is bool:  # --flag / --no-flag
            parser.add_argument(*spellings, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*spellings, dest=f.name, type=_parse_value(kind), metavar=kind.__name__.upper(),
                                help=help_text)
    return parser


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; every entry point prints the one line that matters
    (and exits with code 2)."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _base_type(f: dataclasses.Field) -> type:
    return {"int": int, "float": float, "str": str, "bool": bool}[str(f.type).removeprefix("Optional[").rstrip("]")]


def _parse_value(kind: type):
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
    parse.__name__ = kind.__name__  # argparse names the type in its error line
    return parse


def parse_config(argv: list[str] | None = None) -> Config:
    """Parse the command line into a validated Config (demo preset applied for the tiny model)."""
    given = vars(build_parser().parse_args(argv))
    cfg = Config(**given)
    if cfg.model == "tiny":
        for key, value in DEMO_PRESET.items():
            if key not in given:
                setattr(cfg, key, value)
        if "warmup_steps" not in given:  # a short run asked for on the command line keeps a valid warmup
            cfg.warmup_steps = min(cfg.warmup_steps, cfg.total_steps - 1)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject invalid values and combinations before anything heavy happens (raises UserError, one line)."""
    from e2h_min.tasks import TASKS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(message)

    need(cfg.task in TASKS, f"unknown --task {cfg.task!r}; choose one of {', '.join(sorted(TASKS))}")
    need(cfg.schedule in SCHEDULES, f"unknown --schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(cfg.advantage in ADVANTAGES, f"unknown --advantage {cfg.advantage!r}; choose one of {', '.join(ADVANTAGES)}")
    need(cfg.loss_type in LOSS_TYPES, f"unknown --loss-type {cfg.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    need(cfg.kl_estimator in KL_ESTIMATORS,
         f"unknown --kl-estimator {cfg.kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    need(cfg.scale_rewards in ("group", "batch", "none"), "--scale-rewards must be group, batch or none")
    need(cfg.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant")
    need(cfg.num_generations >= 2, f"--num-generations must be >= 2 for group-relative advantages "
                                   f"(got {cfg.num_generations})")
    need(cfg.prompts_per_step >= 1, "--prompts-per-step must be >= 1")
    need(cfg.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
    need(cfg.micro_batch_tokens >= 0, "--micro-batch-tokens must be >= 0 (0 = no token cap)")
    need(cfg.total_steps >= 1, "--total-steps must be >= 1")
    need(cfg.max_new_tokens >= 1, "--max-new-tokens must be >= 1")
    need(cfg.temperature > 0, "--temperature must be > 0 (training needs sampling; use eval.py for greedy)")
    need(cfg.lr > 0, "--lr must be > 0")
    need(0 <= cfg.warmup_steps < cfg.total_steps, "--warmup-steps must be in [0, total_steps)")
    need(cfg.beta >= 0, "--beta (KL coefficient) must be >= 0")
    need(cfg.epsilon > 0, "--epsilon must be > 0")
    need(cfg.epsilon_high is None or cfg.epsilon_high >= cfg.epsilon, "--epsilon-high must be >= --epsilon")
    need(cfg.num_iterations >= 1, "--num-iterations must be >= 1")
    need(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables clipping)")
    need(cfg.sigma > 0, "--sigma must be > 0")
    need(cfg.importance_sampling_level in ("token", "sequence"), "--importance-sampling-level must be token or sequence")
    need(cfg.max_resample_rounds >= 0, "--max-resample-rounds must be >= 0")
    need(0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma must be in (0, 1] and --lam in [0, 1]")
    need(cfg.vf_coef >= 0 and cfg.cliprange_value > 0, "--vf-coef must be >= 0 and --cliprange-value > 0")
    need(cfg.sec_temperature > 0, "--sec-temperature must be > 0")
    need(0 < cfg.sec_ema <= 1, "--sec-ema must be in (0, 1]")
    need(cfg.schedule_beta >= 0, "--schedule-beta must be >= 0")
    need(cfg.eval_problems >= 1, "--eval-problems must be >= 1")
    need(min(cfg.eval_every, cfg.save_every, cfg.log_completions_every) >= 0, "--*-every flags must be >= 0")
    need(cfg.log_every >= 0, "--log-every must be >= 0 (0 = auto)")
    from e2h_min.tracking import parse_report_to
    parse_report_to(cfg.report_to)  # raises UserError on an unknown tracker name
    need(cfg.lora_r >= 0 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1, "--lora-r must be >= 0, "
         "--lora-alpha > 0 and --lora-dropout in [0, 1)")
    need(cfg.max_nonfinite_steps >= 1, "--max-nonfinite-steps must be >= 1")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
    need(cfg.data is None or cfg.task in ("gsm8k", "math", "aqua"), f"--data is not used by task {cfg.task!r}")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
         f"unknown --device {cfg.device!r}; use auto, cpu, cuda, cuda:N or mps")


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
    return wrapper


def schedule_params(cfg: Config) -> dict[str, Any]:
    """The curriculum parameters that `cfg.schedule` takes (the sampler rejects any others, to catch typos)."""
    if cfg.schedule == "gaussian":
        return {"beta": cfg.schedule_beta, "sigma": cfg.sigma, "min_prob": cfg.min_prob}
    if cfg.schedule == "sec":
        return {"temperature": cfg.sec_temperature, "ema": cfg.sec_ema}
    return {}
