"""GRPO with the E2H easy-to-hard curriculum, in one loop you can read top to bottom.

    python train.py                                   # CPU demo: the embedded tiny model on Countdown
    python train.py --model Qwen2.5-1.5B              # the paper's recipe on one GPU (spec section 5)
    python train.py --schedule balanced --seed 1      # plain GRPO on all levels, for comparison

Design choices, in brief:
- The curriculum clock is the optimizer step t (not a data-loader index): p_t over difficulty levels is computed
  at every step and each prompt slot's level is drawn from it (e2h_min/curriculum.py).
- One batched, KV-cached generation call per step for all prompts x G samples; each prompt is prefilled once.
- Rewards are float64; advantages are group-relative, (r - mean_group) / (std_group + 1e-4).
- The loss weights of every token are fixed for the whole step before micro-batching (losses.token_loss_weights),
  so gradients do not depend on the micro-batch size. EOS is inside the loss, padding outside.
- Old log-probs come from the first pass over the batch (which the gradient needs anyway): the ratio is exactly 1
  on the first on-policy iteration and no extra forward pass is spent. The sampler's own log-probs are compared
  with them as a numerics check (logprob_mismatch).
- Training log-probs use the sampling temperature, computed in chunks only at completion positions.
- The update (e2h_min/update.py; read e2h_min/reference_update.py, the same update written plainly, first) runs
  only what the gradient needs: samples with advantage exactly 0 are not run (they add exactly 0 when the loss
  has no KL term), each distinct prompt runs once per iteration for all its samples, and micro-batches are cut
  by rows and padded tokens after sorting by length (all behind e2h_min/update_batches.py). --advantage ppo
  trains a value head with GAE instead (e2h_min/ppo.py).
- fp32 master weights under AdamW; frozen weights (reference model, LoRA base) in bf16 on CUDA; bf16 autocast on
  CUDA, fp32 on CPU; one code path for both. final/ is saved in the base model's own dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from e2h_min.checkpoint import load_training_state, resume_checkpoint, save_checkpoint, save_final
from e2h_min.config import (Config, UserError, check_context, combination_warnings, describe_preset,
                            exit_on_user_error, kl_estimator_for, resolve_config, schedule_params)
from e2h_min.curriculum import LevelSampler
from e2h_min.distributed import DistInfo, all_reduce_sum, barrier, gather_lists, init_distributed
from e2h_min.divergence import (DivergedError, divergence_message, first_nonfinite_parameter,
                                probe_logits_finite)
from e2h_min.evaluation import (chat_date_variables, encode_prompts, eos_token_ids, evaluate_sharded,
                                held_out_problems, sampled_pass_at_k, score_rollout, today)
from e2h_min.fsdp import FullOptimizerState, is_sharded, log_sharded_memory, refresh_full_copy, shard_policy
from e2h_min.logprobs import completion_logprobs, pack_micro_batches
from e2h_min.losses import compute_advantages, kl_penalised_advantages, sequence_kl
from e2h_min.memory import format_memory, loading_peak, resident_bytes, training_memory, with_process
from e2h_min.model_card import write_model_card
from e2h_min.prompt_fit import fit_prompts
from e2h_min.ppo import ppo_update
from e2h_min.reference_update import grpo_update_plain
from e2h_min.models import (Reference, ValueHead, apply_lora, checkpoint_dtype, checkpoint_file_bytes, context_length,
                            frozen_copy, frozen_dtype, load_lora_checkpoint, load_model, load_tokenizer,
                            lora_reference, pick_device, require_peft, resolve_model_name)
from e2h_min.rollout import StopChecker, generate
from e2h_min.runlog import (append_jsonl, check_logs, check_resume_config, check_sampler_state, claim_run_dir,
                            default_run_dir, eval_logged, finished_run, log_completions, remove_if_unused,
                            truncate_logs)
from e2h_min.samples import StepSamples
from e2h_min.tasks import make_task
from e2h_min.tasks.base import Task
from e2h_min.tracking import Trackers, console_line, parse_report_to, require_trackers, resolve_log_every, should_log
from e2h_min.update import policy_update
from e2h_min.update_batches import MicroBatchLimits, shared_prompts_for


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to 0 at total_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def seed_step(seed: int, rank: int, step: int, generator: torch.Generator) -> None:
    """Seed every RNG from (seed, rank, step): a resumed or multi-rank run draws exactly what it would have.
    The rollout generator is seeded from (seed, step) alone, the same on every rank: the ranks draw the random
    numbers of the whole step's samples and each keeps its own rows' (see collect), so a sample is the
    same whichever rank rolls it out and however many ranks there are."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(1)
    random.seed(int(state[0])), np.random.seed(int(state[0])), torch.manual_seed(int(state[0]))
    generator.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def load_task(cfg: Config) -> tuple:
    """The task, its prompts fitted to the model's context (prompt_fit.py), and its curriculum sampler; UserError
    if the prompts do not fit, if the schedule's parameters do not fit the task's levels, or if at some step of the
    run the schedule would draw only from levels with no training rows."""
    task = make_task(cfg.task, seed=cfg.seed, data=cfg.data)
    fit_prompts(task, load_tokenizer(cfg.model), context_length(cfg.model), cfg.max_new_tokens,
                cfg.eval_max_new_tokens or cfg.max_new_tokens, cfg.chat_date or today(),
                tqdm.write if int(os.environ.get("RANK", "0")) == 0 else no_log)
    try:
        sampler = LevelSampler(task, cfg.schedule, cfg.total_steps, seed=cfg.seed, **schedule_params(cfg))
        sampler.check_every_step_drawable()
    except ValueError as exc:
        raise UserError(f"--schedule {cfg.schedule} on task {task.name}: {exc}") from None
    unknown = set(filter(None, cfg.eval_pass_k_levels.split(","))) - set(task.level_names())
    if unknown:
        raise UserError(f"--eval-pass-k-levels: task {task.name} has no level {', '.join(sorted(unknown))} (its "
                        f"levels: {','.join(task.level_names())})")
    return task, sampler


def build_models(cfg: Config, device, resume_from: Path | None):
    """Policy (full or LoRA), reference (None when beta = 0) and PPO value head (None unless --advantage ppo).

    Trained weights are fp32 master weights; frozen ones (the LoRA base, the reference copy) are in the frozen
    dtype (--frozen-dtype; bf16 on CUDA). peft keeps the adapters of a bf16 base in fp32.
    """
    frozen = frozen_dtype(cfg.frozen_dtype, device)
    if cfg.lora_r:
        base = load_model(cfg.model, device, dtype=frozen)
        policy = (load_lora_checkpoint(base, resume_from) if resume_from
                  else apply_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
        reference = lora_reference(policy) if cfg.beta > 0 else None  # the adapter switched off: no copy
    else:
        policy = load_model(str(resume_from) if resume_from else cfg.model, device)
        reference = None
        if cfg.beta > 0:  # the initial policy; on resume it is reloaded from --model
            reference = frozen_copy(load_model(cfg.model, device, trainable=False, dtype=frozen) if resume_from
                                    else policy, frozen)
    if cfg.gradient_checkpointing:
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    value_head = None
    if cfg.advantage == "ppo":  # the critic reads the policy trunk's hidden states (see models.ValueHead)
        value_head = ValueHead(policy.config.hidden_size).to(device)
        if resume_from:
            value_head.load_state_dict(load_file(resume_from / "value_head.safetensors", device=str(device)))
    return policy, reference, value_head


@dataclass
class Run:
    """What the setup builds for one run and the step's helpers below use."""

    cfg: Config
    task: Task
    sampler: LevelSampler
    run_dir: Path
    device: torch.device
    dist_info: DistInfo
    autocast: Callable  # autocast() -> a context: bf16 compute on CUDA, fp32 elsewhere
    log: Callable[[str], None]  # console lines, from rank 0 only
    tokenizer: object
    policy: torch.nn.Module  # the trained model (under FSDP: sharded)
    sampling_model: torch.nn.Module  # the model that rolls out, evaluates and is saved: the policy or its full copy
    reference: Reference | None  # None when beta = 0
    value_head: ValueHead | None  # None unless --advantage ppo
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator  # the rollout's sampling noise
    stop_checker: StopChecker
    eos: list[int]
    pad: int
    eval_problems: list
    trackers: Trackers
    start_step: int
    template_vars: dict  # chat-template variables that pin the prompts' date (evaluation.chat_date_variables)


def no_log(*_) -> None:
    """The log of every rank but rank 0."""


def resume_point(cfg: Config, run_dir: Path, sampler: LevelSampler, preset: tuple | None = None
                 ) -> tuple[Config, Path | None, bool]:
    """(cfg, the checkpoint to resume from or None for a new run, whether that run already finished).

    --resume takes the newest checkpoint that verifies (damaged newer ones are set aside, with a warning), pins
    the run's prompt date (resumed prompts tokenize as before) and refuses a config that changed the run or task
    data that changed under it (before any model loads)."""
    if not cfg.resume:
        return cfg, None, False
    check_logs(run_dir)  # a damaged log refuses the resume before anything is set aside or rewritten
    resume_from = resume_checkpoint(run_dir, tqdm.write, set_aside=int(os.environ.get("RANK", "0")) == 0)
    if resume_from is None:
        raise UserError(f"--resume {run_dir}: no intact checkpoint found there (expected "
                        f"{run_dir}/checkpoints/step_*); start it again with --out-dir {run_dir} --overwrite")
    saved = json.loads((resume_from / "trainer_state.json").read_text())
    if cfg.chat_date is None:  # the run's pinned prompt date: resumed prompts tokenize as before
        cfg = dataclasses.replace(cfg, chat_date=saved["config"].get("chat_date"))
    check_resume_config(saved["config"], cfg, resume_from, from_config_json=preset[1] if preset else {})
    check_sampler_state(sampler, saved["sampler"], resume_from)
    return cfg, resume_from, saved["step"] >= cfg.total_steps and finished_run(run_dir, cfg.total_steps)


def setup(cfg: Config, task: Task, sampler: LevelSampler, run_dir: Path, preset: tuple | None,
          resume_from: Path | None) -> Run:
    """Device and ranks, models, optimizer, the held-out problems, the run directory's config and trackers; on
    resume the optimizer, scheduler, sampler and RNG state of the checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled:
        device = torch.device(f"cuda:{dist_info.local_rank}") if device.type == "cuda" else device
        if cfg.plain_update:
            raise UserError("--plain-update runs in one process (its loss is normalised over this process's "
                            "samples); drop it under torchrun")
        if cfg.prompts_per_step % dist_info.world_size:
            raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the "
                            f"{dist_info.world_size} ranks (each rank rolls out an equal share)")
    run_dir = Path(gather_lists([str(run_dir)], dist_info)[0])  # rank 0's claimed folder (maybe a fresh "-2")
    if cfg.chat_date is None:  # a new run's prompts are dated today (UTC), rank 0's date on every rank
        cfg = dataclasses.replace(cfg, chat_date=gather_lists([today()], dist_info)[0])
    main_rank = dist_info.is_main
    log = tqdm.write if main_rank else no_log
    for warning in combination_warnings(cfg):
        log(f"warning: {warning}")
    generator = torch.Generator(device=device)
    seed_step(cfg.seed, dist_info.rank, 0, generator)
    # bf16 compute on CUDA; fp32 elsewhere (CPU autocast would only slow this down), unless the frozen weights
    # were asked for in bf16 (their matmuls then need autocast to meet the fp32 activations)
    bf16_compute = device.type == "cuda" or frozen_dtype(cfg.frozen_dtype, device) == torch.bfloat16
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16_compute)
    if preset is not None:
        log(describe_preset(*preset))
    if preset is not None and preset[0].name == "paper" and device.type == "cpu" and cfg.device == "auto":
        precision = "bf16 frozen weights" if bf16_compute else "in fp32"
        log(f"note: no GPU found: the paper's recipe will run on the CPU ({precision}, far too slowly for its "
            f"budgets); on a GPU machine install a CUDA build of torch")
    if cfg.parallel == "fsdp" and not dist_info.enabled:
        log("note: --parallel fsdp takes effect under torchrun; this single process trains the whole model")
    if resolve_model_name(cfg.model) != cfg.model:
        log(f"model {cfg.model} -> {resolve_model_name(cfg.model)}")

    tokenizer = load_tokenizer(cfg.model)
    process_bytes = resident_bytes() if device.type == "cpu" else 0  # RAM held before any weights (CPU runs)
    policy, reference, value_head = build_models(cfg, device, resume_from)
    sampling_model = policy
    if cfg.parallel == "fsdp" and dist_info.enabled:
        sampling_model = shard_policy(policy)  # full weights on every rank, refreshed after each update
    trainable = [p for p in policy.parameters() if p.requires_grad]
    trainable += list(value_head.parameters()) if value_head else []
    separate_reference = reference.model if reference is not None and reference.model is not policy else None
    value_params = sum(p.numel() for p in value_head.parameters()) if value_head else 0
    memory = with_process(training_memory(policy, separate_reference, value_params), process_bytes)
    loaded_from = resume_from if resume_from and not cfg.lora_r else cfg.model
    if is_sharded(policy):  # the estimate is one process's; the shards' real sizes are logged after step 1
        log("memory: per-rank figures of the FSDP2 shards follow the first step (the fsdp: line)")
    else:
        log(format_memory(memory, loading_peak(memory, checkpoint_file_bytes(str(loaded_from)))
                          if device.type == "cpu" else None))
    # fused: one kernel for all parameters on CPU and CUDA (4.7x faster than the per-tensor loop on the tiny model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    stop_checker = StopChecker(tokenizer, [cfg.stop], device)
    eos, pad = eos_token_ids(tokenizer, policy), tokenizer.pad_token_id
    eval_problems = held_out_problems(task, cfg.eval_problems)
    empty = [names for names, level in zip(task.level_names(), task.eval_levels)
             if not any(p.level == level for p in eval_problems)]
    if empty:
        tqdm.write(f"note: no held-out test problems at level(s) {', '.join(empty)}; their accuracy is not evaluated")

    start_step = 0
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from:
        state = load_training_state(resume_from, FullOptimizerState(policy, optimizer) if is_sharded(policy)
                                    else optimizer, scheduler, generator)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        if main_rank:
            truncate_logs(run_dir, start_step, log)  # drop lines after the checkpoint
        log(f"resumed from {resume_from} at step {start_step}")
    if main_rank:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"run {run_dir} | device {device} x{dist_info.world_size} | task {task.name} | schedule {cfg.schedule} "
        f"| {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained")
    trackers = Trackers(parse_report_to(cfg.report_to) if main_rank else [], run_dir, dataclasses.asdict(cfg),
                        task.level_names(), start_step)
    return Run(cfg, task, sampler, run_dir, device, dist_info, autocast, log, tokenizer, policy, sampling_model,
               reference, value_head, optimizer, scheduler, generator, stop_checker, eos, pad, eval_problems,
               trackers, start_step, chat_date_variables(cfg.chat_date))


def run_eval(run: Run, step: int) -> dict:
    """Greedy held-out evaluation, each rank on its contiguous share of the problems (the weights are the same
    everywhere); the records are gathered in problem order, so the summary is one process's."""
    cfg = run.cfg
    summary, _ = evaluate_sharded(run.sampling_model, run.tokenizer, run.task, run.eval_problems,
                                  cfg.eval_max_new_tokens or cfg.max_new_tokens, run.stop_checker, run.dist_info,
                                  autocast=run.autocast, chat_date=cfg.chat_date)
    pass_k = sampled_eval(run, step) if cfg.eval_pass_k else {}
    if run.dist_info.is_main:
        row = {"step": step, **{f"{k}/{m}": v[m] for k, v in summary.items()
                                for m in ("accuracy", "reward", "format_rate")},
               **{f"{k}/{m}": v for k, by_k in pass_k.items() for m, v in by_k.items()}}
        append_jsonl(run.run_dir / "eval.jsonl", row)
        run.trackers.log_eval(row)
        run.log(f"eval step {step}: " + "  ".join(f"{k} {v['accuracy']:.1%}" for k, v in summary.items()))
        if pass_k:
            top = f"pass@{max(cfg.eval_pass_k)}"
            run.log(f"eval step {step} {top}: " + "  ".join(f"{k} {v[top]:.1%}" for k, v in pass_k.items()))
    return summary


def sampled_eval(run: Run, step: int) -> dict:
    """--eval-pass-k: pass@k per level on the held-out problems (temperature 1, its own noise per step)."""
    cfg, names = run.cfg, run.task.level_names()
    wanted = set(filter(None, cfg.eval_pass_k_levels.split(","))) or set(names)
    problems = [p for p in run.eval_problems if names[p.level] in wanted]
    return sampled_pass_at_k(run.sampling_model, run.tokenizer, run.task, problems, list(cfg.eval_pass_k),
                             cfg.eval_samples or max(cfg.eval_pass_k), cfg.eval_max_new_tokens or cfg.max_new_tokens,
                             run.stop_checker, run.dist_info, cfg.prompts_per_step * cfg.num_generations,
                             seed=int(np.random.SeedSequence([cfg.seed, step, 1]).generate_state(1)[0]),
                             autocast=run.autocast, chat_date=cfg.chat_date)


def checkpoint(run: Run, step: int) -> None:
    """Save run_dir/checkpoints/step_N (rank 0 writes; under FSDP every rank first gathers the AdamW state)."""
    saved_optimizer = run.optimizer
    if is_sharded(run.policy):  # gathering the AdamW state is a collective: every rank gathers, rank 0 writes
        full_state = FullOptimizerState(run.policy, run.optimizer).state_dict()
        saved_optimizer = SimpleNamespace(state_dict=lambda: full_state)
    if run.dist_info.is_main:
        save_checkpoint(run.run_dir, step, run.sampling_model, run.tokenizer, saved_optimizer, run.scheduler,
                        {"config": dataclasses.asdict(run.cfg), "sampler": run.sampler.state_dict()}, run.generator,
                        keep=run.cfg.keep_checkpoints,
                        extra_modules={"value_head": run.value_head} if run.value_head else None)
    barrier(run.dist_info)


def collect(run: Run, draw: list) -> StepSamples:
    """G scored samples (float64 rewards) per problem of this rank's share of `draw`, in one batched decode; the
    noise is drawn for the whole draw and sliced per rank, so a torchrun run rolls out what one process would."""
    cfg, G = run.cfg, run.cfg.num_generations
    problems = run.dist_info.shard(draw)
    start = run.dist_info.shard_start(len(draw)) * G  # this rank's rows of the step's noise
    uniforms = torch.rand((len(draw) * G, cfg.max_new_tokens), generator=run.generator, dtype=torch.float64,
                          device=run.device)[start:start + len(problems) * G]
    if not problems:  # an uneven --dynamic-sampling redraw can leave a rank nothing to roll out
        return StepSamples(G, [], [], [], [], [], np.zeros(0), np.zeros(0, dtype=bool))
    prompt_ids = encode_prompts(run.tokenizer, run.task, problems, run.template_vars)
    run.sampling_model.eval()
    with run.autocast():
        rollout = generate(run.sampling_model, prompt_ids, G, cfg.max_new_tokens, run.eos, run.pad,
                           stop_checker=run.stop_checker, temperature=cfg.temperature, uniforms=uniforms)
    run.policy.train()
    texts, rewards = score_rollout(run.task, problems, run.tokenizer, rollout, run.stop_checker.stop_strings)
    completions = rollout.completion_token_lists()
    return StepSamples(G, [p for p in problems for _ in range(G)], [p for p in prompt_ids for _ in range(G)],
                       completions, [lp[:len(c)].tolist() for lp, c in zip(rollout.logprobs, completions)],
                       texts, rewards, rollout.finished.numpy())


class StepRollout(NamedTuple):
    samples: StepSamples  # this rank's samples of the step (whole groups)
    resample_rounds: int  # --dynamic-sampling redraws
    informative_groups: list[int]  # of all groups this rank rolled out: those whose rewards are not all equal
    sampled_groups: int  # how many groups this rank rolled out, redraws included


def roll_out(run: Run, step: int, draw: list) -> StepRollout:
    """The step's samples: `draw` rolled out and scored (with --dynamic-sampling: resample_until_informative)."""
    samples = collect(run, draw)
    if run.cfg.dynamic_sampling:
        return resample_until_informative(run, step, draw, samples)
    return StepRollout(samples, 0, samples.informative_groups(), samples.num_groups)


def resample_until_informative(run: Run, step: int, draw: list, samples: StepSamples) -> StepRollout:
    """--dynamic-sampling (DAPO): redraw prompts (same p_t) until every group of the step is informative or the
    rounds run out, then keep the informative groups first, topped up with the others. Each of this rank's groups
    keeps its place in the step's draws, (round, slot): the choice of groups is taken on every rank's groups in
    that order, so it is the same on every rank and the same as one process holding the whole batch."""
    cfg, dist_info = run.cfg, run.dist_info
    slots = [(0, dist_info.shard_start(len(draw)) + j) for j in range(samples.num_groups)]
    rounds = 0
    while rounds < cfg.max_resample_rounds:
        missing = cfg.prompts_per_step - sum(gather_lists([len(samples.informative_groups())], dist_info))
        if missing <= 0:
            break
        rounds += 1
        extra = collect(run, run.sampler.sample(step, missing))  # every rank draws, each rolls out its share
        samples = samples.concat(extra)
        slots += [(rounds, dist_info.shard_start(missing) + j) for j in range(extra.num_groups)]
    informative = samples.informative_groups()
    sampled_groups = samples.num_groups
    step_groups = sorted(gather_lists([(slot, g in set(informative)) for g, slot in enumerate(slots)], dist_info))
    ranked = [s for s, useful in step_groups if useful] + [s for s, useful in step_groups if not useful]
    chosen = set(ranked[:cfg.prompts_per_step])
    samples = samples.select(samples.group_rows([g for g, slot in enumerate(slots) if slot in chosen]))
    return StepRollout(samples, rounds, informative, sampled_groups)


@torch.no_grad()
def reference_sequence_kl(reference, samples: StepSamples, cfg: Config, device, autocast,
                          limits: MicroBatchLimits) -> torch.Tensor:
    """sum_t KL_t(pi || pi_ref) per sample [N] (float64), from the sampler's log-probs, for --kl-in-reward."""
    out = torch.zeros(len(samples.completions), dtype=torch.float64)
    shared = shared_prompts_for(reference.model, samples.prompt_ids, cfg)
    kv = None
    for rows, batch in pack_micro_batches(samples.prompt_ids, samples.completions, limits.rows, limits.tokens,
                                          shared, device):
        with autocast(), reference.context():
            if shared is not None and kv is None:
                kv = shared.keys_values(reference.model)
            ref, _ = completion_logprobs(reference.model, batch, cfg.temperature, prompt_kv=kv)
        logp = torch.zeros_like(ref)
        for j, i in enumerate(rows):
            logp[j, :len(samples.sampler_logprobs[i])] = torch.tensor(samples.sampler_logprobs[i], device=device)
        out[rows] = sequence_kl(logp, ref, batch["completion_mask"], kl_estimator_for(cfg)).double().cpu()
    return out


def step_advantages(run: Run, samples: StepSamples, rewards: torch.Tensor, limits: MicroBatchLimits
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages [N] of this rank's samples, float32; the per-sample KL [N] with --kl-in-reward, else None),
    group-relative over every rank's samples in float64 (under ppo the grpo form: only sec reads it)."""
    cfg, dist_info = run.cfg, run.dist_info
    step_rewards = torch.tensor(gather_lists(rewards.tolist(), dist_info), dtype=torch.float64)
    group_adv = compute_advantages("grpo" if cfg.advantage == "ppo" else cfg.advantage, step_rewards,
                                   cfg.num_generations, cfg.scale_rewards)
    if cfg.schedule == "sec":
        feed_sec_curriculum(run, samples, group_adv)
    start = sum(gather_lists([len(rewards)], dist_info)[:dist_info.rank])  # ranks may hold unequal shares
    advantages = group_adv[start:start + len(rewards)]
    if cfg.kl_in_reward and run.reference is not None and cfg.advantage != "ppo":
        return kl_penalised(run, samples, advantages, limits)
    return advantages.float(), None


def feed_sec_curriculum(run: Run, samples: StepSamples, group_adv: torch.Tensor) -> None:
    """--schedule sec: the curriculum learns each level's mean |advantage| over the step's samples."""
    step_levels = np.array(gather_lists(samples.levels.tolist(), run.dist_info), dtype=np.int64)
    run.sampler.update({int(k): float(group_adv[torch.from_numpy(step_levels == k)].abs().mean())
                        for k in set(step_levels.tolist())})


def kl_penalised(run: Run, samples: StepSamples, advantages: torch.Tensor, limits: MicroBatchLimits
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """--kl-in-reward: (advantages less the KL penalty, subtracted after the normalisation (see
    losses.kl_penalised_advantages), float32; the per-sample KL [N]). Groups are rank-local: each rank
    penalises its own samples."""
    sequence_kl_values = reference_sequence_kl(run.reference, samples, run.cfg, run.device, run.autocast, limits)
    penalised = kl_penalised_advantages(advantages, sequence_kl_values, run.cfg.beta, run.cfg.num_generations)
    return penalised.float(), sequence_kl_values


def rows_to_train(samples: StepSamples, cfg: Config) -> list[int]:
    """The samples that train: all, less equal-reward groups (--drop-zero-std) and truncated ones (--mask-truncated)."""
    keep = np.ones(len(samples.rewards), dtype=bool)
    if cfg.drop_zero_std:  # group indices of the samples kept (dynamic sampling may have reordered them)
        keep &= np.isin(np.arange(len(samples.rewards)) // cfg.num_generations, samples.informative_groups())
    if cfg.mask_truncated:
        keep &= samples.finished
    return np.flatnonzero(keep).tolist()


def optimizer_steps(optimizer) -> int:
    """How many steps the optimizer has taken (Adam keeps a per-parameter step count; none before its first)."""
    return int(next(iter(optimizer.state.values()), {}).get("step", 0))


def plain_update(run: Run, kept: StepSamples, advantages: torch.Tensor) -> dict:
    """--plain-update: the plain reference update (e2h_min/reference_update.py) instead of the fast one; the same
    parameter change (tests/test_reference_update.py), none of the savings, and only its loss is logged."""
    if not kept.completions:  # --drop-zero-std or --mask-truncated left nothing to train on
        return {"loss": 0.0, "skipped_updates": 0}
    loss = grpo_update_plain(run.policy, run.reference, run.optimizer, kept.prompt_ids, kept.completions, advantages,
                             run.cfg)
    return {"loss": loss, "skipped_updates": 0}


def ppo_step(run: Run, kept: StepSamples, rewards: torch.Tensor, limits: MicroBatchLimits) -> dict:
    """--advantage ppo: ppo.ppo_update, which makes per-token GAE advantages from the rewards with its value head."""
    return ppo_update(run.policy, run.reference, run.optimizer, kept.prompt_ids, kept.completions, rewards,
                      kept.sampler_logprobs, run.cfg, run.device, run.autocast, run.value_head, run.dist_info,
                      limits=limits)


def update_with_oom_retry(run: Run, kept: StepSamples, learn_from: torch.Tensor, limits: MicroBatchLimits
                          ) -> tuple[dict, MicroBatchLimits]:
    """(update.policy_update's diagnostics, the micro-batch limits from now on). A CUDA out-of-memory error halves
    the limits and retries: exact (the loss weights do not depend on the micro-batch size) while no optimizer step
    was taken, in one process (under torchrun the other ranks already wait in the update's next collective)."""
    cfg, optimizer = run.cfg, run.optimizer
    if cfg.plain_update:  # one whole batch: smaller limits would not help it
        return plain_update(run, kept, learn_from), limits
    while True:
        steps_before = optimizer_steps(optimizer)
        try:
            if cfg.advantage == "ppo":
                return ppo_step(run, kept, learn_from, limits), limits
            return policy_update(run.policy, run.reference, optimizer, kept.prompt_ids, kept.completions, learn_from,
                                 kept.sampler_logprobs, cfg, run.device, run.autocast, run.dist_info,
                                 limits=limits), limits
        except torch.OutOfMemoryError:
            if limits.rows == 1 or optimizer_steps(optimizer) != steps_before or run.dist_info.enabled:
                raise
            limits = smaller_limits(optimizer, limits, run.log)


def smaller_limits(optimizer, limits: MicroBatchLimits, log) -> MicroBatchLimits:
    """After an out-of-memory error: the gradients dropped, the CUDA cache emptied, the limits halved."""
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    limits = limits.halved()
    log(f"warning: out of memory in the update; retrying with --micro-batch-size {limits.rows}"
        + (f" --micro-batch-tokens {limits.tokens}" if limits.tokens else ""))
    return limits


def refresh_sampling_copy(run: Run, step: int) -> None:
    """FSDP: the full-weight copy that rolls out takes the updated shards (after step 1: their memory is logged)."""
    refresh_full_copy(run.policy, run.sampling_model)
    if step == run.start_step:
        log_sharded_memory(run.policy, run.sampling_model, run.optimizer, run.dist_info, run.log)


def skipped_update(run: Run, step: int, in_a_row: int) -> None:
    """A non-finite gradient skipped this step's update: warn, or stop after --max-nonfinite-steps in a row."""
    if in_a_row >= run.cfg.max_nonfinite_steps:
        raise DivergedError(f"non-finite gradients in {in_a_row} updates in a row (step {step + 1}); lower --lr "
                            f"or check the model's dtype. Checkpoints are in {run.run_dir}")
    run.log(f"warning: step {step + 1}: non-finite gradient, update skipped")


def check_not_diverged(run: Run, probe_prompt: list[list[int]], step: int) -> None:
    """Stop with DivergedError (one line, exit 2) if the step just taken left a NaN/inf parameter or a model
    whose logits on one of this step's prompts are NaN/inf (see e2h_min/divergence.py). Every rank decides
    together, so no rank is left waiting in a collective. The check reads sampling_model (the policy itself, or
    under FSDP its refreshed full copy), so it never runs a forward of the sharded model outside the update."""
    sampling_model, value_head, device, dist_info = run.sampling_model, run.value_head, run.device, run.dist_info
    trained = {n for n, p in run.policy.named_parameters() if p.requires_grad}
    named = [(n, p) for n, p in sampling_model.named_parameters() if n in trained]
    named += [(f"value_head.{n}", p) for n, p in value_head.named_parameters()] if value_head else []
    bad_parameter = first_nonfinite_parameter(named)
    finite_logits = bad_parameter is None and probe_logits_finite(sampling_model, (probe_prompt or [[]])[0],
                                                                  device, run.autocast)
    votes = all_reduce_sum(torch.tensor([float(bad_parameter is None and finite_logits)], device=device), dist_info)
    if int(votes.item()) != dist_info.world_size:
        what = (f"parameter {bad_parameter} is NaN/inf" if bad_parameter else
                "the weights are finite but the model's logits are NaN/inf" if not finite_logits else
                "another rank saw NaN/inf")
        raise DivergedError(divergence_message(step, run.cfg.lr, what, run.run_dir))


def step_metrics(run: Run, step: int, level_p: list[float], lr: float, update: dict, rolled: StepRollout,
                 samples: StepSamples, trained: int, sequence_kl_values, rollout_seconds: float,
                 update_seconds: float) -> dict:
    """The step's metrics.jsonl row, over every rank's samples (TRL's names where they exist)."""
    dist_info, G, names = run.dist_info, run.cfg.num_generations, run.task.level_names()
    per_sample = gather_lists([(float(r), int(k), len(c), bool(f)) for r, k, c, f in zip(
        samples.rewards, samples.levels, samples.completions, samples.finished)], dist_info)
    all_rewards, levels, lengths, finished = (np.array(column) for column in zip(*per_sample))
    group_counts = gather_lists([len(rolled.informative_groups), rolled.sampled_groups, trained,
                                 len(samples.rewards)], dist_info)  # per rank: 4 counts
    correct = np.array([run.task.is_correct(r) for r in all_rewards])
    rollout_seconds = max(gather_lists([rollout_seconds], dist_info))
    row = {"step": step + 1, "lr": lr, **update,
           "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
           "accuracy": float(correct.mean()), "level_probs": [round(p, 6) for p in level_p],
           "level_counts": [int((levels == k).sum() // G) for k in range(run.task.num_levels)],
           "completion_length_mean": float(lengths.mean()), "clipped_ratio": float((~finished).mean()),
           "frac_reward_zero_std": 1.0 - sum(group_counts[0::4]) / sum(group_counts[1::4]),
           "resample_rounds": rolled.resample_rounds,
           "trained_fraction": sum(group_counts[2::4]) / sum(group_counts[3::4]),
           "rollout_seconds": rollout_seconds, "update_seconds": update_seconds,
           "tokens_per_second": float(lengths.sum() / rollout_seconds)}
    if sequence_kl_values is not None:  # per-token mean, comparable with the in-loss KL metric
        kl_sums = gather_lists([float(sequence_kl_values.sum())], dist_info)
        row["kl"] = sum(kl_sums) / max(1, int(lengths.sum()))
    for k in sorted(set(levels.tolist())):
        row[f"reward/{names[k]}"] = float(all_rewards[levels == k].mean())
        row[f"accuracy/{names[k]}"] = float(correct[levels == k].mean())
    return row


def log_step(run: Run, row: dict, samples: StepSamples, log_every: int) -> None:
    """metrics.jsonl, the trackers and (every --log-completions-every steps) completions.jsonl on rank 0; the
    console line every log_every steps."""
    cfg, step = run.cfg, row["step"]
    if run.dist_info.is_main:
        append_jsonl(run.run_dir / "metrics.jsonl", row)
        run.trackers.log_metrics(row)
        if cfg.log_completions_every and step % cfg.log_completions_every == 0:
            log_completions(run.run_dir, step, samples)
    if should_log(step, cfg.total_steps, log_every):
        run.log(console_line(row, run.task.level_names(), cfg.total_steps, kl_computed=run.reference is not None,
                             clipping_possible=cfg.num_iterations > 1))


def evaluate_and_save_every(run: Run, done: int) -> None:
    """The held-out evaluation every --eval-every steps and the checkpoint every --save-every steps (the last step's
    are finish's)."""
    cfg = run.cfg
    if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.total_steps:
        run_eval(run, done)
    if cfg.save_every and done % cfg.save_every == 0 and done < cfg.total_steps:
        checkpoint(run, done)


def nothing_to_do(cfg: Config, run_dir: Path) -> dict:
    """The result of a --resume whose run already finished every step, said once (not once per rank)."""
    say = tqdm.write if int(os.environ.get("RANK", "0")) == 0 else no_log
    say(f"{run_dir} already finished all {cfg.total_steps} steps; nothing to do (start a new run, or a longer "
        f"one with --out-dir, to train further)")
    return {"first_eval": None, "last_eval": None, "run_dir": str(run_dir), "already_finished": True}


def finish(run: Run, first_eval: dict | None) -> dict:
    """The last evaluation and checkpoint, then final/: the policy (with LoRA its adapter; --save-merged adds
    final-merged/) in the base model's dtype, the tokenizer and a model card."""
    cfg, run_dir = run.cfg, run.run_dir
    logged = run.start_step == cfg.total_steps and eval_logged(run_dir, cfg.total_steps)
    last_eval = None if logged else run_eval(run, cfg.total_steps)  # a resume that only has final/ left to write
    checkpoint(run, cfg.total_steps)
    final_dir = run_dir / "final"
    if run.dist_info.is_main:
        save_dtype = checkpoint_dtype(cfg.model) if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
        save_final(run.sampling_model, final_dir, save_dtype)  # with LoRA: the adapter, as peft saves it
        run.tokenizer.save_pretrained(final_dir)
        card = dict(config=dataclasses.asdict(cfg), last_eval=last_eval, first_eval=first_eval,
                    step=cfg.total_steps, run_name=run_dir.resolve().name)
        write_model_card(final_dir, adapter=bool(cfg.lora_r), **card)
        if cfg.lora_r and cfg.save_merged:
            merged = copy.deepcopy(run.policy).merge_and_unload()
            save_final(merged, run_dir / "final-merged", save_dtype)
            run.tokenizer.save_pretrained(run_dir / "final-merged")
            write_model_card(run_dir / "final-merged", adapter=False, **card)
        if first_eval and last_eval:
            print("held-out greedy accuracy, start -> end: " + "  ".join(
                f"{k} {first_eval[k]['accuracy']:.1%} -> {last_eval[k]['accuracy']:.1%}" for k in last_eval))
        print(f"saved final policy and its model card to {final_dir}")
    run.trackers.close()
    barrier(run.dist_info)
    return {"first_eval": first_eval, "last_eval": last_eval, "run_dir": str(run_dir)}


def train(cfg: Config, task: Task, sampler: LevelSampler, run_dir: Path, preset: tuple | None = None) -> dict:
    """The run, in run_dir (claimed by main); preset: (config.Preset, the values it set) for the start-up line."""
    # ---------------------------------------------------------------- setup
    cfg, resume_from, already_finished = resume_point(cfg, run_dir, sampler, preset)
    if already_finished:
        return nothing_to_do(cfg, run_dir)
    run = setup(cfg, task, sampler, run_dir, preset, resume_from)
    cfg, dist_info, policy = run.cfg, run.dist_info, run.policy
    log_every = resolve_log_every(cfg.log_every, cfg.total_steps)
    limits = MicroBatchLimits(cfg.micro_batch_size, cfg.micro_batch_tokens)  # an OOM retry halves them for good
    first_eval = run_eval(run, run.start_step) if run.start_step == 0 else None
    nonfinite_in_a_row = 0
    # ---------------------------------------------------------------- the loop
    bar = tqdm(range(run.start_step, cfg.total_steps), initial=run.start_step, total=cfg.total_steps,
               desc="train", disable=not dist_info.is_main)
    for step in bar:
        seed_step(cfg.seed, dist_info.rank, step, run.generator)

        # 1. curriculum: p_t over levels, then each prompt slot's level and problem (the same on every rank)
        level_p = sampler.probs(step)
        draw = sampler.sample(step, cfg.prompts_per_step)

        # 2. rollout and rewards: G samples per prompt, float64 (--dynamic-sampling redraws until groups differ)
        t0 = time.perf_counter()
        rolled = roll_out(run, step, draw)
        samples = rolled.samples
        rollout_seconds = time.perf_counter() - t0

        # 3. advantages: group-relative over the whole step; the curriculum learns each level's mean |A|
        rewards = torch.tensor(samples.rewards, dtype=torch.float64)
        advantages, sequence_kl_values = step_advantages(run, samples, rewards, limits)

        # 4. update on the samples that train (--drop-zero-std, --mask-truncated drop some; PPO takes the rewards)
        t1 = time.perf_counter()
        trained = rows_to_train(samples, cfg)
        kept = samples.select(trained)
        learn_from = (rewards if cfg.advantage == "ppo" else advantages)[trained].float()
        update, limits = update_with_oom_retry(run, kept, learn_from, limits)
        lr_used = run.scheduler.get_last_lr()[0]
        run.scheduler.step()
        if is_sharded(policy):
            refresh_sampling_copy(run, step)
        update_seconds = time.perf_counter() - t1
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if update["skipped_updates"] else 0
        if nonfinite_in_a_row:
            skipped_update(run, step, nonfinite_in_a_row)
        check_not_diverged(run, kept.prompt_ids[:1] or samples.prompt_ids[:1], step + 1)

        # 5. log: one JSON line per step (rank 0, over every rank's samples), one console line
        row = step_metrics(run, step, level_p, lr_used, update, rolled, samples, len(trained), sequence_kl_values,
                           rollout_seconds, update_seconds)
        log_step(run, row, samples, log_every)
        bar.set_postfix({"reward": f"{row['reward_mean']:.3f}", "acc": f"{row['accuracy']:.2f}"})  # + tqdm's ETA

        # 6. periodic evaluation and checkpoint
        evaluate_and_save_every(run, step + 1)

    # ---------------------------------------------------------------- finish
    return finish(run, first_eval)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    cfg, preset, preset_values = resolve_config(argv)
    require_peft(cfg.lora_r)  # before anything heavy: the paper preset turns LoRA on
    require_trackers(parse_report_to(cfg.report_to))  # a missing optional package fails here, before any model loads
    check_context(max(cfg.max_new_tokens, cfg.eval_max_new_tokens or 0), context_length(cfg.model))
    task, sampler = load_task(cfg)  # the data, its prompts' lengths and the schedule, before anything is written
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes (and owns) the run directory
        return train(cfg, task, sampler, Path(cfg.resume or cfg.out_dir or default_run_dir(cfg)),
                     (preset, preset_values))
    run_dir, lock = claim_run_dir(cfg, tqdm.write)  # created, writable and locked for this run, or a UserError
    try:
        with lock:
            return train(cfg, task, sampler, run_dir, (preset, preset_values))
    except BaseException:
        remove_if_unused(run_dir)  # a run stopped before it wrote anything (e.g. a model that does not load)
        raise


if __name__ == "__main__":
    main()
