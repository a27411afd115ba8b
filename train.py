"""GRPO with the E2H easy-to-hard curriculum, in one loop you can read top to bottom.

    python train.py                                   # CPU demo: the embedded tiny model on Countdown
    python train.py --model Qwen2.5-1.5B              # the paper's recipe on one GPU (spec section 5)
    python train.py --schedule balanced --seed 1      # plain GRPO on all levels, for comparison

`train` is the loop; the step helpers it calls follow it. The RL math is in e2h_min/rl/ (advantages.py, losses.py,
the update: update.py, read plain_update.py first), the machinery it runs on in e2h_min/engine/ (the sampler, the
log-probs, the update's micro-batches), and everything a run needs but a learner may skip (set-up, resume,
checkpoints, logs, trackers, the finish) in e2h_min/run/, each called from the loop in one line.
- The curriculum clock is the optimizer step t: p_t over difficulty levels at every step, each prompt slot's level
  drawn from it (e2h_min/rl/curriculum.py).
- One batched, KV-cached generation call per step for all prompts x G samples; rewards are float64; advantages are
  group-relative, (r - mean_group) / (std_group + 1e-4), over every rank's samples.
- The loss weights of every token are fixed for the whole step before micro-batching, so gradients do not depend
  on the micro-batch size; pi_old is the first pass's log-probs (the ratio is exactly 1 at first, no extra pass).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from e2h_min.engine.batching import MicroBatchLimits
from e2h_min.engine.distributed import Compute, gather_lists, seed_step
from e2h_min.engine.models import Models, context_length, require_peft
from e2h_min.engine.sampler import generate
from e2h_min.errors import check_context, exit_on_user_error
from e2h_min.rl.advantages import compute_advantages
from e2h_min.rl.curriculum import LevelSampler
from e2h_min.rl.kl_reward import kl_penalised
from e2h_min.rl.plain_update import grpo_update_plain
from e2h_min.rl.ppo import ppo_update
from e2h_min.rl.samples import SamplingStats, StepSamples, resample_until_informative
from e2h_min.rl.scoring import Chat, encode_prompts, score_rollout
from e2h_min.rl.update import policy_update
from e2h_min.run.oom import update_with_oom_retry
from e2h_min.run.presets import resolve_config
from e2h_min.run.runlog import claim_run_dir, default_run_dir, remove_if_unused
from e2h_min.run.setup import load_task, nothing_to_do, resume_point, setup
from e2h_min.run.tracking import parse_report_to, require_trackers
from e2h_min.tasks.base import Task


def train(cfg, task: Task, sampler: LevelSampler, run_dir: Path, preset: tuple | None = None) -> dict:
    """The run, in run_dir (claimed by main); preset: (presets.Preset, the values it set) for the start-up line."""
    # ---------------------------------------------------------------- setup (e2h_min/run/setup.py)
    cfg, resume_from, already_finished = resume_point(cfg, run_dir, sampler, preset)
    if already_finished:
        return nothing_to_do(cfg, run_dir)
    cfg, models, chat, compute, optimizer, scheduler, generator, book = setup(cfg, task, sampler, run_dir, preset,
                                                                              resume_from)
    algorithm = choose_algorithm(cfg, models, optimizer, compute)
    collect = functools.partial(collect_samples, models, chat, task, cfg, generator, compute)
    limits = MicroBatchLimits(cfg.micro_batch_size, cfg.micro_batch_tokens)  # an OOM retry halves them for good
    first_eval = book.evaluate(0) if book.start_step == 0 else book.logged_eval(0)
    # ---------------------------------------------------------------- the loop
    for step in book.steps():
        seed_step(cfg.seed, compute.dist.rank, step, generator)

        # 1. curriculum: p_t over levels, then each prompt slot's level and problem (the same on every rank)
        level_p = sampler.probs(step)
        draw = sampler.sample(step, cfg.prompts_per_step)

        # 2. rollout and rewards: G samples per prompt, float64 (--dynamic-sampling redraws until groups differ)
        t0 = time.perf_counter()
        samples, sampling = roll_out(collect, draw, step, sampler, cfg, compute)
        rollout_seconds = time.perf_counter() - t0

        # 3. advantages: group-relative over the whole step; the sec curriculum learns each level's mean |A|
        advantages = step_advantages(samples, algorithm.advantage, cfg, sampler, compute)
        sequence_kl_values = None
        if algorithm.kl_in_reward:  # --kl-in-reward: beta * the sequence KL subtracted after the normalisation
            advantages, sequence_kl_values = kl_penalised(models.reference, samples, advantages, cfg,
                                                          compute.device, compute.autocast, limits)

        # 4. update on the samples that train (--drop-zero-std, --mask-truncated drop some), then the LR step
        t1 = time.perf_counter()
        trained = rows_to_train(samples, cfg)
        kept = samples.select(trained)
        update, limits = update_with_oom_retry(functools.partial(algorithm.update, kept, advantages[trained].float()),
                                               limits, optimizer, algorithm.may_retry, book.log)
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        book.refresh_sampling_copy(step)  # FSDP: the full-weight copy that rolls out takes the new shards
        update_seconds = time.perf_counter() - t1
        book.check_update(step, update, kept.prompt_ids[:1] or samples.prompt_ids[:1])  # NaN/inf: stop

        # 5. log: one JSON line per step (rank 0, over every rank's samples), one console line
        book.log_step(step, level_p, lr_used, update, samples, sampling, len(trained), sequence_kl_values,
                      rollout_seconds, update_seconds)

        # 6. periodic evaluation and checkpoint
        book.evaluate_and_save_every(step + 1)

    # ---------------------------------------------------------------- finish
    return book.finish(first_eval)


# -------------------------------------------------------------------- step 2: rollout and rewards
def collect_samples(models: Models, chat: Chat, task: Task, cfg, generator: torch.Generator, compute: Compute,
                    draw: list) -> StepSamples:
    """G scored samples (float64 rewards) per problem of this rank's share of `draw`, in one batched decode; the
    noise is drawn for the whole draw and sliced per rank, so a torchrun run rolls out what one process would."""
    G, dist_info = cfg.num_generations, compute.dist
    problems = dist_info.shard(draw)
    start = dist_info.shard_start(len(draw)) * G  # this rank's rows of the step's noise
    uniforms = torch.rand((len(draw) * G, cfg.max_new_tokens), generator=generator, dtype=torch.float64,
                          device=compute.device)[start:start + len(problems) * G]
    if not problems:  # an uneven --dynamic-sampling redraw can leave a rank nothing to roll out
        return StepSamples(G, [], [], [], [], [], np.zeros(0), np.zeros(0, dtype=bool))
    prompt_ids = encode_prompts(chat.tokenizer, task, problems, chat.template_vars)
    models.sampling_model.eval()
    with compute.autocast():
        generation = generate(models.sampling_model, prompt_ids, G, cfg.max_new_tokens, chat.eos, chat.pad,
                              stop_checker=chat.stop_checker, temperature=cfg.temperature, uniforms=uniforms)
    models.policy.train()
    texts, rewards = score_rollout(task, problems, chat.tokenizer, generation, chat.stop_checker.stop_strings)
    completions = generation.completion_token_lists()
    return StepSamples(G, [p for p in problems for _ in range(G)], [p for p in prompt_ids for _ in range(G)],
                       completions, [lp[:len(c)].tolist() for lp, c in zip(generation.logprobs, completions)],
                       texts, rewards, generation.finished.numpy())


def roll_out(collect: Callable[[list], StepSamples], draw: list, step: int, sampler: LevelSampler, cfg,
             compute: Compute) -> tuple[StepSamples, SamplingStats]:
    """The step's samples, `draw` collected (with --dynamic-sampling: resample_until_informative), and how they
    were drawn."""
    samples = collect(draw)
    if cfg.dynamic_sampling:
        return resample_until_informative(samples, draw, collect, sampler, step, cfg.prompts_per_step,
                                          cfg.max_resample_rounds, compute.dist)
    return samples, SamplingStats(0, samples.informative_groups(), samples.num_groups)


# -------------------------------------------------------------------- step 3: advantages
def step_advantages(samples: StepSamples, advantage: str, cfg, sampler: LevelSampler, compute: Compute
                    ) -> torch.Tensor:
    """Advantages [N] of this rank's samples (float64), group-relative over every rank's samples; --schedule sec
    learns from them."""
    dist_info = compute.dist
    rewards = torch.tensor(samples.rewards, dtype=torch.float64)
    step_rewards = torch.tensor(gather_lists(rewards.tolist(), dist_info), dtype=torch.float64)
    group_adv = compute_advantages(advantage, step_rewards, cfg.num_generations, cfg.scale_rewards)
    if cfg.schedule == "sec":  # the curriculum learns each level's mean |advantage| over the step's samples
        step_levels = np.array(gather_lists(samples.levels.tolist(), dist_info), dtype=np.int64)
        sampler.update({int(k): float(group_adv[torch.from_numpy(step_levels == k)].abs().mean())
                        for k in set(step_levels.tolist())})
    start = sum(gather_lists([len(rewards)], dist_info)[:dist_info.rank])  # ranks may hold unequal shares
    return group_adv[start:start + len(rewards)]


# -------------------------------------------------------------------- step 4: the update
def rows_to_train(samples: StepSamples, cfg) -> list[int]:
    """The samples that train: all, less equal-reward groups (--drop-zero-std) and truncated ones (--mask-truncated)."""
    keep = np.ones(len(samples.rewards), dtype=bool)
    if cfg.drop_zero_std:  # group indices of the samples kept (dynamic sampling may have reordered them)
        keep &= np.isin(np.arange(len(samples.rewards)) // cfg.num_generations, samples.informative_groups())
    if cfg.mask_truncated:
        keep &= samples.finished
    return np.flatnonzero(keep).tolist()


class Algorithm(NamedTuple):
    advantage: str  # step 3's group-relative estimator (grpo, dr_grpo or rloo)
    kl_in_reward: bool  # step 3 subtracts beta * the sequence KL to the reference from the advantages
    update: Callable  # step 4: (kept samples, their advantages [N], micro-batch limits) -> the logged diagnostics
    may_retry: bool  # whether a CUDA out-of-memory error may retry the update with smaller micro-batches


def choose_algorithm(cfg, models: Models, optimizer, compute: Compute) -> Algorithm:
    """The fast GRPO update (rl/update.py), --plain-update's plain one (rl/plain_update.py: the same parameter
    change, only its loss logged), or --advantage ppo's room (rl/ppo.py: per-token GAE advantages from the kept
    samples' rewards and a value head; its KL penalty is per token, and the group-relative advantages of step 3
    only feed --schedule sec)."""
    policy, _, reference, value_head = models
    device, dist_info, autocast = compute

    def fast(kept: StepSamples, advantages: torch.Tensor, limits: MicroBatchLimits) -> dict:
        return policy_update(policy, reference, optimizer, kept.prompt_ids, kept.completions, advantages,
                             kept.sampler_logprobs, cfg, device, autocast, dist_info, limits=limits)

    def plain(kept: StepSamples, advantages: torch.Tensor, limits: MicroBatchLimits) -> dict:
        if not kept.completions:  # --drop-zero-std or --mask-truncated left nothing to train on
            return {"loss": 0.0, "skipped_updates": 0}
        loss = grpo_update_plain(policy, reference, optimizer, kept.prompt_ids, kept.completions, advantages, cfg)
        return {"loss": loss, "skipped_updates": 0}

    def ppo(kept: StepSamples, advantages: torch.Tensor, limits: MicroBatchLimits) -> dict:
        rewards = torch.tensor(kept.rewards, dtype=torch.float64).float()  # PPO learns from the rewards
        return ppo_update(policy, reference, optimizer, kept.prompt_ids, kept.completions, rewards,
                          kept.sampler_logprobs, cfg, device, autocast, value_head, dist_info, limits=limits)

    if cfg.advantage == "ppo":
        return Algorithm("grpo", False, ppo, not dist_info.enabled)
    kl_in_reward = cfg.kl_in_reward and reference is not None
    if cfg.plain_update:  # one whole batch: smaller micro-batch limits would not help it
        return Algorithm(cfg.advantage, kl_in_reward, plain, False)
    return Algorithm(cfg.advantage, kl_in_reward, fast, not dist_info.enabled)


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
