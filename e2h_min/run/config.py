"""Every knob of a run in one dataclass, with the paper's defaults (spec section 5), and the CLI built from it.

Each field's `help` metadata becomes its `--flag` help text, so `python train.py --help` is the full catalogue.
Option names follow TRL's GRPOConfig where one exists (num_generations, epsilon, epsilon_high, beta,
num_iterations, loss_type, scale_rewards, max_grad_norm) so users can map concepts between the two.
Presets (which fill the fields the user did not set) are in run/presets.py; the limits and UserError in
e2h_min/errors.py. This module imports no model code.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from e2h_min.rl.losses import kl_estimator_for
from e2h_min.errors import (MAX_EVAL_PROBLEMS, MAX_NEW_TOKENS, MAX_ROLLOUT_ROWS, MAX_SEED, MAX_STEPS, MAX_THREADS,
                            OneLineErrorParser, UserError, check_path_name, is_iso_date)


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


SCHEDULES = ("classic", "balanced", "cosine", "cosine_literal", "gaussian", "hard", "sec")
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "ppo")
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass(frozen=True)
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
    plain_update: bool = _f(False, "train with the plain update (e2h_min/rl/plain_update.py): the same "
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
        object.__setattr__(self, "eval_pass_k", tuple(self.eval_pass_k))  # argparse and config.json give a list


# --help shows the flags in these groups, in this order (tests/test_train.py: every field in exactly one).
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model and task": ("model", "task", "data", "seed", "chat_date", "device"),
    "curriculum (the clock is the optimizer step)": ("schedule", "total_steps", "schedule_beta", "sigma", "min_prob",
                                                     "sec_temperature", "sec_ema"),
    "GRPO: rollout and update": ("prompts_per_step", "num_generations", "temperature", "max_new_tokens", "stop", "lr",
                                 "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "epsilon",
                                 "epsilon_high", "num_iterations", "advantage", "scale_rewards", "loss_type",
                                 "importance_sampling_level", "drop_zero_std", "dynamic_sampling",
                                 "max_resample_rounds", "mask_truncated", "plain_update", "max_nonfinite_steps"),
    "KL to the reference model": ("beta", "kl_estimator", "use_bias_correction_kl", "kl_in_reward"),
    "PPO (--advantage ppo)": ("gamma", "lam", "vf_coef", "cliprange_value"),
    "batching and speed": ("micro_batch_size", "micro_batch_tokens", "share_prompt_forward", "skip_zero_advantage",
                           "gradient_checkpointing", "threads", "parallel"),
    "LoRA and precision": ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "save_merged", "frozen_dtype",
                           "save_dtype"),
    "evaluation and logging": ("eval_every", "eval_problems", "eval_max_new_tokens", "eval_pass_k", "eval_samples",
                               "eval_pass_k_levels", "log_completions_every", "log_every", "report_to"),
    "the run folder": ("out_dir", "resume", "overwrite", "save_every", "keep_checkpoints"),
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """One --flag per Config field, shown once in its HELP_GROUPS group (the underscored spelling, --x_y, is
    accepted but hidden); Optionals accept 'none'; no abbreviations (--total-step is an error, not --total-steps).

    Defaults are suppressed in the namespace so that `resolve_config` knows which flags the user actually gave.
    """
    parser = OneLineErrorParser(description=description, argument_default=argparse.SUPPRESS,
                                usage="%(prog)s [--flag VALUE ...]  (--help: every flag, by group)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            add_flag(group, fields[name], [flag_name(name)], fields[name].metadata["help"])
            if "_" in name:
                add_flag(group, fields[name], [f"--{name}"], argparse.SUPPRESS)
    return parser


def add_flag(group, f: dataclasses.Field, spellings: list[str], help_text: str) -> None:
    """One spelling of field f's flag: --x / --no-x for a bool, ints for a tuple, else one typed value."""
    if help_text is not argparse.SUPPRESS:
        help_text = f"{help_text} (default: {f.default})".replace("%", "%%")  # argparse formats help
    kind = _base_type(f)
    if kind is bool:
        group.add_argument(*spellings, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
    elif kind is tuple:  # --eval-pass-k 1 4 16 (ints)
        group.add_argument(*spellings, dest=f.name, type=_parse_value(int, False), nargs="+", metavar="INT",
                           help=help_text)
    else:
        optional = str(f.type).startswith("Optional[")  # only these take 'none' (--scale-rewards none is a str)
        group.add_argument(*spellings, dest=f.name, type=_parse_value(kind, optional),
                           metavar=kind.__name__.upper(), help=help_text)


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


def combination_warnings(cfg: Config) -> list[str]:
    """Accepted combinations whose expected gradient is zero or not what their names suggest, each with what it
    does instead (measured exactly by `python -m e2h_min.analysis.kl_gradients`; README: KL)."""
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


def validate(cfg: Config) -> None:
    """Reject invalid values and combinations before anything heavy happens (raises UserError, one line)."""
    check_limits(cfg)
    check_names(cfg)
    check_ranges(cfg)
    check_combinations(cfg)
    check_settings_apply(cfg)


def need(ok: bool, message: str) -> None:
    """UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


def check_limits(cfg: Config) -> None:
    """Sizes under the limits of e2h_min/errors.py, and no NaN/inf float (it would poison the math silently)."""
    for f in dataclasses.fields(cfg):  # every float knob: NaN or inf is never meant (and poisons the math silently)
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag_name(f.name)} must be a finite number, got {value}")
    need(0 <= cfg.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    need(0 <= cfg.threads <= MAX_THREADS, f"--threads must be in [0, {MAX_THREADS}] (0 = torch default), "
                                          f"got {cfg.threads}")
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


def check_names(cfg: Config) -> None:
    """Every name-valued flag names something that exists."""
    from e2h_min.tasks import TASKS

    need(cfg.task in TASKS, f"unknown --task {cfg.task!r}; choose one of {', '.join(sorted(TASKS))}")
    need(cfg.schedule in SCHEDULES, f"unknown --schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    need(cfg.advantage in ADVANTAGES, f"unknown --advantage {cfg.advantage!r}; choose one of {', '.join(ADVANTAGES)}")
    need(cfg.loss_type in LOSS_TYPES, f"unknown --loss-type {cfg.loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    need(cfg.kl_estimator is None or cfg.kl_estimator in KL_ESTIMATORS,
         f"unknown --kl-estimator {cfg.kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    need(cfg.scale_rewards in ("group", "batch", "none"), "--scale-rewards must be group, batch or none")
    need(cfg.lr_schedule in ("cosine", "constant"), "--lr-schedule must be cosine or constant")
    need(cfg.parallel in ("ddp", "fsdp"), f"--parallel must be ddp or fsdp (got {cfg.parallel})")
    need(cfg.importance_sampling_level in ("token", "sequence"), "--importance-sampling-level must be token or sequence")
    need(cfg.frozen_dtype in ("auto", "float32", "bfloat16"), "--frozen-dtype must be auto, float32 or bfloat16")
    need(cfg.save_dtype in ("auto", "float32", "bfloat16"), "--save-dtype must be auto, float32 or bfloat16")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
         f"unknown --device {cfg.device!r}; use auto, cpu, cuda, cuda:N or mps")
    from e2h_min.run.tracking import parse_report_to
    parse_report_to(cfg.report_to)  # raises UserError on an unknown tracker name


def check_ranges(cfg: Config) -> None:
    """Every number in its range."""
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.sigma >= 1e-3, f"--sigma must be >= 0.001 (a narrower bump is the same single level), got {cfg.sigma}")
    need(cfg.min_prob is None or 0 <= cfg.min_prob <= 1, f"--min-prob must be in [0, 1/K] (K levels), "
                                                         f"got {cfg.min_prob}")
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
    need(cfg.epsilon > 0, "--epsilon must be > 0")
    need(cfg.epsilon_high is None or cfg.epsilon_high >= cfg.epsilon, "--epsilon-high must be >= --epsilon")
    need(cfg.num_iterations >= 1, "--num-iterations must be >= 1")
    need(cfg.max_grad_norm >= 0, "--max-grad-norm must be >= 0 (0 disables clipping)")
    need(cfg.sigma > 0, "--sigma must be > 0")
    need(cfg.max_resample_rounds >= 0, "--max-resample-rounds must be >= 0")
    need(0 < cfg.gamma <= 1 and 0 <= cfg.lam <= 1, "--gamma must be in (0, 1] and --lam in [0, 1]")
    need(cfg.vf_coef >= 0 and cfg.cliprange_value > 0, "--vf-coef must be >= 0 and --cliprange-value > 0")
    need(cfg.sec_temperature >= 1e-3, f"--sec-temperature must be >= 0.001, got {cfg.sec_temperature}")
    need(0 < cfg.sec_ema <= 1, "--sec-ema must be in (0, 1]")
    need(cfg.schedule_beta >= 0, "--schedule-beta must be >= 0")
    need(cfg.eval_problems >= 1, "--eval-problems must be >= 1")
    need(min(cfg.eval_every, cfg.save_every, cfg.log_completions_every) >= 0, "--*-every flags must be >= 0")
    need(cfg.log_every >= 0, "--log-every must be >= 0 (0 = auto)")
    need(cfg.lora_r >= 0 and cfg.lora_alpha > 0 and 0 <= cfg.lora_dropout < 1, "--lora-r must be >= 0, "
         "--lora-alpha > 0 and --lora-dropout in [0, 1)")
    need(cfg.max_nonfinite_steps >= 1, "--max-nonfinite-steps must be >= 1")
    need(cfg.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")


def check_combinations(cfg: Config) -> None:
    """Flags that contradict each other, or one that needs another."""
    need(not (cfg.resume and cfg.overwrite), "--overwrite replaces a run and --resume continues one; pass one")
    for flag, value in (("--out-dir", cfg.out_dir), ("--resume", cfg.resume)):
        need(value is None or value.strip() != "", f"{flag} is empty; pass a directory")  # '' is not "not given"
    need(not (cfg.resume and cfg.out_dir and cfg.out_dir != cfg.resume),
         "--resume DIR continues the run in DIR; drop --out-dir (or give the same directory)")
    need(cfg.parallel != "fsdp" or not cfg.lora_r, f"--parallel fsdp shards full fine-tuning, but LoRA is on "
                                                   f"(--lora-r {cfg.lora_r}; the paper preset turns it on): pass "
                                                   f"--lora-r 0, or use --parallel ddp for LoRA")
    need(cfg.parallel != "fsdp" or cfg.advantage != "ppo", "--parallel fsdp does not support --advantage ppo yet "
                                                           "(its value head); use --parallel ddp")
    need(not cfg.plain_update or (cfg.advantage != "ppo" and cfg.loss_type == "grpo" and not cfg.kl_in_reward
                                  and cfg.importance_sampling_level == "token" and not cfg.use_bias_correction_kl
                                  and cfg.kl_estimator in (None, "k3")),
         "--plain-update writes out the paper's loss only: drop --advantage ppo, --loss-type, --kl-in-reward, "
         "--importance-sampling-level sequence, --use-bias-correction-kl and --kl-estimator other than k3")
    need(not (cfg.use_bias_correction_kl and cfg.kl_in_reward), "--use-bias-correction-kl weights the KL in the "
         "loss; with --kl-in-reward it has no effect: drop one of the two")
    need(cfg.data is None or cfg.task in ("gsm8k", "math", "aqua"), f"--data is not used by task {cfg.task!r}")
    if cfg.data is not None:  # the model card and config.json record it
        check_path_name(cfg.data, "--data")
    need(not cfg.eval_samples or cfg.eval_pass_k, f"--eval-samples {cfg.eval_samples} needs --eval-pass-k (which k "
                                                  f"to report, e.g. --eval-pass-k 1 4 16)")
    samples = cfg.eval_samples or max(cfg.eval_pass_k, default=0)
    need(0 <= samples <= MAX_ROLLOUT_ROWS, f"--eval-samples must be in [0, {MAX_ROLLOUT_ROWS:,}], got {samples}")
    need(all(1 <= k <= samples for k in cfg.eval_pass_k), f"--eval-pass-k needs 1 <= k <= --eval-samples "
                                                          f"({samples}); got {' '.join(map(str, cfg.eval_pass_k))}")


# Settings that only some runs use: (the fields, whether this run uses them, what makes them apply)
_APPLIES_ONLY = [
    (("schedule_beta", "sigma", "min_prob"), lambda c: c.schedule == "gaussian", "--schedule gaussian"),
    (("sec_temperature", "sec_ema"), lambda c: c.schedule == "sec", "--schedule sec"),
    (("gamma", "lam"), lambda c: c.advantage == "ppo", "--advantage ppo"),
    (("save_merged",), lambda c: c.lora_r > 0, "LoRA (--lora-r > 0)"),
    (("eval_pass_k_levels",), lambda c: bool(c.eval_pass_k), "--eval-pass-k"),
]


def check_settings_apply(cfg: Config) -> None:
    """A setting changed from its default where it cannot apply is refused: --sigma with --schedule cosine would
    otherwise be ignored in silence, and the run would not be the one the command line describes. Not on --resume:
    an earlier version accepted such settings, and its run must still continue."""
    if cfg.resume:
        return
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for names, applies, needs in _APPLIES_ONLY:
        changed = [name for name in names if getattr(cfg, name) != defaults[name]]
        if changed and not applies(cfg):
            flag = "--" + changed[0].replace("_", "-")
            raise UserError(f"{flag} applies only with {needs}; this run does not use it: drop it or add {needs}")


def schedule_params(cfg: Config) -> dict[str, Any]:
    """The curriculum parameters that `cfg.schedule` takes (the sampler rejects any others, to catch typos)."""
    if cfg.schedule == "gaussian":
        return {"beta": cfg.schedule_beta, "sigma": cfg.sigma, "min_prob": cfg.min_prob}
    if cfg.schedule == "sec":
        return {"temperature": cfg.sec_temperature, "ema": cfg.sec_ema}
    return {}
