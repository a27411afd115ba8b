"""Everything a run needs before its first step and a learner may skip: the task and its schedule checked, the
resume point, the device and ranks, the models, the optimizer and its LR schedule, the run folder's config and
trackers, and on resume the checkpoint's optimizer, scheduler, sampler and RNG state. train.train calls `setup`
once and gets back what its loop uses."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from e2h_min.analysis.evaluation import held_out_problems
from e2h_min.engine.distributed import Compute, gather_lists, init_distributed, seed_step
from e2h_min.engine.fsdp import FullOptimizerState, is_sharded, shard_policy
from e2h_min.engine.models import (Models, ValueHead, apply_lora, check_lora_targets, checkpoint_file_bytes,
                                   context_length, frozen_copy, frozen_dtype, load_lora_checkpoint, load_model,
                                   load_tokenizer, loaded_model_record, lora_reference, model_fingerprint,
                                   pick_device, resolve_model_name)
from e2h_min.engine.sampler import StopChecker
from e2h_min.errors import UserError
from e2h_min.rl.curriculum import LevelSampler
from e2h_min.rl.scoring import Chat, chat_date_variables, eos_token_ids, today
from e2h_min.run.bookkeeping import RunBook, no_log
from e2h_min.run.checkpoint import load_training_state, resume_checkpoint
from e2h_min.run.config import Config, combination_warnings, schedule_params
from e2h_min.run.memory import format_memory, loading_peak, resident_bytes, training_memory, with_process
from e2h_min.run.presets import describe_preset
from e2h_min.run.prompt_fit import fit_prompts
from e2h_min.run.runlog import check_logs, check_resume_config, check_sampler_state, finished_run, truncate_logs
from e2h_min.run.tracking import Trackers, parse_report_to
from e2h_min.tasks import make_task
from e2h_min.tasks.base import Task


class Training(NamedTuple):
    """What setup hands the loop: the config (its chat date pinned), the models, the chat/scoring pieces, where it
    computes, the optimizer and LR scheduler, the rollout's noise generator, and the run's bookkeeping."""

    cfg: Config
    models: Models
    chat: Chat
    compute: Compute
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    book: RunBook


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to 0 at total_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
        if not resume_from:
            check_lora_targets(cfg.model, cfg.lora_targets)  # a typo fails now, not after the weights load
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
    check_model_unchanged(cfg.model, saved.get("model"), model_fingerprint(cfg.model), resume_from)
    return cfg, resume_from, saved["step"] >= cfg.total_steps and finished_run(run_dir, cfg.total_steps)


def check_model_unchanged(model: str, saved: str | None, now: str | None, checkpoint: Path) -> None:
    """The --model the run reloads (the LoRA base, the reference) is the one it trained from, else a UserError: a
    folder rewritten or a hub id updated since would resume a different run in silence. A local folder is checked
    before the weights load; a hub id's commit only once they have (the commit transformers loaded)."""
    if saved is None or now is None or now == saved:
        return
    if saved.startswith("hub commit"):
        raise UserError(f"--resume: --model {model} loaded commit {now[-12:]}, but checkpoint {checkpoint} was "
                        f"trained from commit {saved[-12:]}; download that revision into a folder and resume "
                        f"with --model FOLDER, or start a new run")
    raise UserError(f"--resume: --model {model} is not the model checkpoint {checkpoint} was trained from (its files "
                    f"changed: {saved[-12:]} then, {now[-12:]} now); put the original back at that path, or start a "
                    f"new run")


def nothing_to_do(cfg: Config, run_dir: Path) -> dict:
    """The result of a --resume whose run already finished every step, said once (not once per rank)."""
    say = tqdm.write if int(os.environ.get("RANK", "0")) == 0 else no_log
    say(f"{run_dir} already finished all {cfg.total_steps} steps; nothing to do (start a new run, or a longer "
        f"one with --out-dir, to train further)")
    return {"first_eval": None, "last_eval": None, "run_dir": str(run_dir), "already_finished": True}


def setup(cfg: Config, task: Task, sampler: LevelSampler, run_dir: Path, preset: tuple | None,
          resume_from: Path | None) -> Training:
    """Device and ranks, models, optimizer, the held-out problems, the run directory's config and trackers; on
    resume the optimizer, scheduler, sampler and RNG state of the checkpoint."""
    cfg, compute, run_dir, log = start_processes(cfg, run_dir)
    generator = torch.Generator(device=compute.device)
    seed_step(cfg.seed, compute.dist.rank, 0, generator)
    startup_notes(cfg, compute, preset, log)
    tokenizer = load_tokenizer(cfg.model)
    models, trainable = load_models(cfg, compute, resume_from, log)
    # the weights read from --model: the reference, else the LoRA base or a new run's policy (a resumed full
    # fine-tuning policy comes from its checkpoint)
    reloaded = models.reference.model if models.reference is not None else \
        models.policy if cfg.lora_r or not resume_from else None
    model_record = loaded_model_record(cfg.model, reloaded)
    if resume_from:  # a hub id's commit is known only now that it has loaded
        saved = json.loads((resume_from / "trainer_state.json").read_text()).get("model")
        check_model_unchanged(cfg.model, saved, model_record, resume_from)
    # fused: one kernel for all parameters on CPU and CUDA (4.7x faster than the per-tensor loop on the tiny model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=compute.device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    chat = Chat(tokenizer, chat_date_variables(cfg.chat_date), StopChecker(tokenizer, [cfg.stop], compute.device),
                eos_token_ids(tokenizer, models.policy), tokenizer.pad_token_id)
    eval_problems = held_out_problems(task, cfg.eval_problems)
    empty = [names for names, level in zip(task.level_names(), task.eval_levels)
             if not any(p.level == level for p in eval_problems)]
    if empty:
        tqdm.write(f"note: no held-out test problems at level(s) {', '.join(empty)}; their accuracy is not evaluated")
    start_step = open_run_dir(cfg, run_dir, resume_from, models.policy, optimizer, scheduler, sampler, generator,
                              compute.dist.is_main, log)
    log(f"run {run_dir} | device {compute.device} x{compute.dist.world_size} | task {task.name} | schedule "
        f"{cfg.schedule} | {sum(p.numel() for p in models.policy.parameters()) / 1e6:.1f}M params, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained")
    trackers = Trackers(parse_report_to(cfg.report_to) if compute.dist.is_main else [], run_dir,
                        dataclasses.asdict(cfg), task.level_names(), start_step)
    book = RunBook(cfg, task, sampler, run_dir, compute, log, chat, models, optimizer, scheduler, generator,
                   eval_problems, trackers, start_step, model_record)
    return Training(cfg, models, chat, compute, optimizer, scheduler, generator, book)


def start_processes(cfg: Config, run_dir: Path) -> tuple[Config, Compute, Path, callable]:
    """(cfg with the run's chat date, where it computes, rank 0's run folder, the console log of this rank):
    threads, device, the torchrun ranks and what they refuse."""
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
    log = tqdm.write if dist_info.is_main else no_log
    for warning in combination_warnings(cfg):
        log(f"warning: {warning}")
    # bf16 compute on CUDA; fp32 elsewhere (CPU autocast would only slow this down), unless the frozen weights
    # were asked for in bf16 (their matmuls then need autocast to meet the fp32 activations)
    bf16_compute = device.type == "cuda" or frozen_dtype(cfg.frozen_dtype, device) == torch.bfloat16
    autocast = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16_compute)
    return cfg, Compute(device, dist_info, autocast), run_dir, log


def startup_notes(cfg: Config, compute: Compute, preset: tuple | None, log) -> None:
    """The start-up lines: the preset and what it set, and notes on what will not run as the flags may suggest."""
    device, dist_info = compute.device, compute.dist
    if preset is not None:
        log(describe_preset(*preset))
    if preset is not None and preset[0].name == "paper" and device.type == "cpu" and cfg.device == "auto":
        bf16_compute = frozen_dtype(cfg.frozen_dtype, device) == torch.bfloat16
        precision = "bf16 frozen weights" if bf16_compute else "in fp32"
        log(f"note: no GPU found: the paper's recipe will run on the CPU ({precision}, far too slowly for its "
            f"budgets); on a GPU machine install a CUDA build of torch")
    if cfg.parallel == "fsdp" and not dist_info.enabled:
        log("note: --parallel fsdp takes effect under torchrun; this single process trains the whole model")
    if resolve_model_name(cfg.model) != cfg.model:
        log(f"model {cfg.model} -> {resolve_model_name(cfg.model)}")


def load_models(cfg: Config, compute: Compute, resume_from: Path | None, log) -> tuple[Models, list]:
    """(the run's models, the trained parameters); logs the memory estimate (per rank under FSDP: after step 1)."""
    device = compute.device
    process_bytes = resident_bytes() if device.type == "cpu" else 0  # RAM held before any weights (CPU runs)
    policy, reference, value_head = build_models(cfg, device, resume_from)
    sampling_model = policy
    if cfg.parallel == "fsdp" and compute.dist.enabled:
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
    return Models(policy, sampling_model, reference, value_head), trainable


def open_run_dir(cfg: Config, run_dir: Path, resume_from: Path | None, policy, optimizer, scheduler,
                 sampler: LevelSampler, generator: torch.Generator, main_rank: bool, log) -> int:
    """The step the loop starts at: 0, or on resume the checkpoint's (whose optimizer, scheduler, sampler and RNG
    state are loaded, and whose logs lose the lines after it). Rank 0 writes config.json for a new run."""
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
    if main_rank and not resume_from:  # a resumed run keeps the record of how it was started
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    return start_step
