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
- The update runs only what the gradient needs: samples with advantage exactly 0 are not run (they add exactly 0
  when the loss has no KL or value term), each distinct prompt runs once per iteration for all its samples
  (logprobs.SharedPrompts), and micro-batches are cut by rows and padded tokens after sorting by length.
- fp32 master weights under AdamW; bf16 autocast on CUDA, fp32 on CPU; one code path for both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from e2h_min.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from e2h_min.config import Config, UserError, exit_on_user_error, parse_config, schedule_params
from e2h_min.curriculum import LevelSampler
from e2h_min.distributed import DistInfo, all_reduce_sum, barrier, gather_lists, init_distributed, sum_gradients
from e2h_min.evaluation import encode_prompts, eos_token_ids, evaluate, held_out_problems, score_rollout
from e2h_min.logprobs import (SharedPrompts, completion_logprobs, pack_micro_batches,
                              shared_prompts_unsupported_reason)
from e2h_min.losses import (clipped_surrogate, clipped_value_loss, compute_advantages, gae_advantages, kl_penalty,
                            sequence_kl, token_loss_weights, whiten)
from e2h_min.model_card import write_model_card
from e2h_min.models import (ValueHead, apply_lora, frozen_copy, load_lora_checkpoint, load_model, load_tokenizer,
                            lora_reference, pick_device, resolve_model_name)
from e2h_min.rollout import StopChecker, generate
from e2h_min.runlog import append_jsonl, check_resume_config, log_completions, truncate_jsonl
from e2h_min.samples import StepSamples
from e2h_min.tasks import make_task
from e2h_min.tracking import Trackers, console_line, parse_report_to, require_trackers, resolve_log_every, should_log


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to 0 at total_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shared_prompts_for(model, prompt_ids: list[list[int]], cfg: Config, rows: list[int] | None = None
                       ) -> SharedPrompts | None:
    """The distinct prompts of the samples `rows` (default all), for the shared-prompt layout; None where the
    whole-sequence layout is used."""
    if not cfg.share_prompt_forward or not prompt_ids or (rows is not None and not rows):
        return None
    if shared_prompts_unsupported_reason(model, cfg.gradient_checkpointing) is not None:
        return None
    return SharedPrompts.from_rows(prompt_ids, rows)


def samples_to_run(advantages: torch.Tensor, cfg: Config, kl_in_loss: bool) -> list[int]:
    """Indices of the samples the update must run: all, or with --skip-zero-advantage (when the loss has no KL
    term and no value loss) those whose advantage is not exactly 0; the others add exactly 0 to the gradient."""
    skip = cfg.skip_zero_advantage and cfg.advantage != "ppo" and not kl_in_loss
    return [i for i, a in enumerate(advantages.tolist()) if not skip or a != 0]


def policy_update(policy, reference, optimizer, prompt_ids, completions, advantages, sampler_logprobs, cfg,
                  device, autocast, value_head=None, dist_info: DistInfo = DistInfo()) -> dict:
    """num_iterations clipped-surrogate steps on one rollout batch.

    prompt_ids / completions: N token lists (this rank's samples); sampler_logprobs: N lists of per-token
    log-probs from the sampler. advantages [N]: one per sequence (grpo, dr_grpo, rloo), or, with --advantage ppo,
    the sequence rewards [N], turned here into per-token GAE advantages with the value head.
    reference: a models.Reference or None (beta = 0).
    Loss per token: -min(rho A, clip(rho) A) [+ beta * KL_k(pi || pi_ref)] [+ vf_coef * value loss], weighted by
    token_loss_weights, which are fixed for the whole step (global counts across ranks), so neither the
    micro-batch size nor the number of ranks changes the gradient.
    Two savings that leave the gradient unchanged:
    - samples whose advantage is exactly 0 (every sample of a group with equal rewards) add exactly 0 to the loss
      and its gradient when the loss has no KL term and no value loss, so they are not run at all
      (--no-skip-zero-advantage runs them); their tokens still count in the loss weights. The diagnostics
      (entropy, clip ratios, approx_kl_old, logprob_mismatch) then cover the samples that were run.
    - each distinct prompt runs through the model once per iteration, not once per sample
      (logprobs.SharedPrompts), unless --no-share-prompt-forward or gradient checkpointing is on.
    """
    n = len(completions)
    width = max([1] + [len(c) for c in completions])
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, :len(c)] = True
    reduce = lambda t: all_reduce_sum(t, dist_info)  # noqa: E731  (identity in a single process)
    counts = reduce(torch.tensor([float(n), float(mask.sum())], device=device)).tolist()
    weights = token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens, int(counts[0]), counts[1])  # [N, T]
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    kl_in_loss = reference is not None and not cfg.kl_in_reward
    active = samples_to_run(advantages, cfg, kl_in_loss)
    shared = shared_prompts_for(policy, prompt_ids, cfg, active)
    # Packed once, reused by every iteration.
    batches, packed = zip(*pack_micro_batches(prompt_ids, completions, cfg.micro_batch_size, cfg.micro_batch_tokens,
                                              shared, device, active)) if active else ((), ())
    old_logprobs: dict[int, torch.Tensor] = {}  # micro-batch -> log pi_old (before any update of this step)
    ref_logprobs: dict[int, torch.Tensor] = {}  # the reference is frozen: computed once, reused by iterations
    ref_kv = None  # the reference model's prompt keys/values (shared layout), computed on first use
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats = defaultdict(float)

    def prompt_kv(model):  # the prompts' keys/values for the shared layout (graph kept under autograd)
        if shared is None:
            return None
        with autocast():
            return shared.keys_values(model)

    def reference_logprobs(b: int, batch) -> torch.Tensor:
        nonlocal ref_kv
        if b not in ref_logprobs:
            with torch.no_grad(), autocast(), reference.context():
                if ref_kv is None:
                    ref_kv = prompt_kv(reference.model)
                ref_logprobs[b], _ = completion_logprobs(reference.model, batch, cfg.temperature, prompt_kv=ref_kv)
        return ref_logprobs[b]

    if cfg.advantage == "ppo":  # GAE needs V_old at every token before the first gradient step
        old_values = torch.zeros((n, width), device=device)
        token_rewards = torch.zeros((n, width), device=device)
        with torch.no_grad():
            kv = prompt_kv(policy)
            for b, (rows, batch) in enumerate(zip(batches, packed)):
                with autocast():
                    logp, _, hidden = completion_logprobs(policy, batch, cfg.temperature, return_hidden=True,
                                                          prompt_kv=kv)
                    old_values[rows, :logp.shape[1]] = value_head(hidden) * batch["completion_mask"]
                old_logprobs[b] = logp
                if cfg.kl_in_reward and reference is not None:  # per-token reward penalty -beta * k1
                    k1 = kl_penalty(logp, reference_logprobs(b, batch), "k1") * batch["completion_mask"]
                    token_rewards[rows, :logp.shape[1]] -= cfg.beta * k1
        valid = mask.to(device)
        if n:
            lengths = mask.sum(-1).to(device)
            token_rewards[torch.arange(n, device=device), lengths - 1] += advantages.to(device)  # verifier reward
        gae, returns = gae_advantages(token_rewards, old_values, valid, cfg.gamma, cfg.lam)
        token_advantages = whiten(gae, valid, reduce=reduce)
        residual = (returns - old_values) * valid
        moments = reduce(torch.stack([residual.sum(), (residual ** 2).sum(), (returns * valid).sum(),
                                      (returns ** 2 * valid).sum(), valid.sum()]))
        count = moments[4].clamp(min=1)
        var_residual = moments[1] / count - (moments[0] / count) ** 2
        var_returns = moments[3] / count - (moments[2] / count) ** 2
        explained_variance = float(1 - var_residual / var_returns.clamp(min=1e-8))  # already global

    skipped = 0
    stats["active_samples"] = float(len(active))
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        last = iteration == cfg.num_iterations - 1
        kv = prompt_kv(policy)  # the prompts' forward, once per iteration; micro-batches attend to it
        for b, (rows, batch) in enumerate(zip(batches, packed)):
            tokens = batch["completion_mask"]
            t_mb = tokens.shape[1]
            with autocast():
                logp, entropy, hidden = completion_logprobs(policy, batch, cfg.temperature, return_hidden=True,
                                                            prompt_kv=kv)
            old = old_logprobs.setdefault(b, logp.detach())  # first pass: ratio exactly 1
            adv = token_advantages[rows, :t_mb] if cfg.advantage == "ppo" else advantages[rows].to(device)
            loss_tok, flags = clipped_surrogate(logp, old, adv, cfg.epsilon, eps_high, tokens,
                                                cfg.importance_sampling_level)
            if kl_in_loss:
                kl = kl_penalty(logp, reference_logprobs(b, batch), cfg.kl_estimator)
                loss_tok = loss_tok + cfg.beta * kl
                if last:
                    stats["kl"] += float((kl.detach() * tokens).sum())
            if cfg.advantage == "ppo":
                with autocast():
                    values = value_head(hidden)
                value_loss = clipped_value_loss(values, old_values[rows, :t_mb], returns[rows, :t_mb],
                                                cfg.cliprange_value)
                loss_tok = loss_tok + cfg.vf_coef * value_loss
                if last:
                    stats["value_loss"] += float((value_loss.detach() * tokens).sum())
            loss = (loss_tok * weights[rows, :t_mb].to(device)).sum()
            loss.backward()
            if last:  # diagnostics of the last pass, accumulated as token sums
                stats["loss"] += float(loss.detach())
                stats["tokens"] += float(tokens.sum())
                stats["entropy"] += float((entropy * tokens).sum())
                for name, flag in flags.items():
                    stats[f"clip_ratio/{name}"] += float((flag & tokens).sum())
                d = old - logp.detach()  # approx KL(pi_old || pi) = E[(rho - 1) - log rho]
                stats["approx_kl_old"] += float(((torch.exp(-d) + d - 1.0) * tokens).sum())
                if reference is not None and b in ref_logprobs:
                    stats["kl_reference"] += float((kl_penalty(logp.detach(), ref_logprobs[b], "k3") * tokens).sum())
                sampled = torch.zeros_like(old)
                for j, i in enumerate(rows):
                    sampled[j, :len(sampler_logprobs[i])] = torch.tensor(sampler_logprobs[i], device=device)
                stats["logprob_mismatch"] += float(((sampled - old).abs() * tokens).sum())
        if kv is not None:
            kv.backward()  # the micro-batches' gradient on the prompts' keys/values, through the prompt forward
        for p in params:  # a parameter no sample reached has gradient 0, not None: AdamW still steps its moments
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sum_gradients(params, dist_info)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN/inf gradient would poison the weights and Adam's moments: skip this step
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
    keys = sorted(stats)
    totals = dict(zip(keys, reduce(torch.tensor([stats[k] for k in keys], device=device,
                                                dtype=torch.float64)).tolist())) if keys else {}
    tokens = max(totals.pop("tokens", 0.0), 1.0)
    out = {"loss": totals.pop("loss", 0.0), "grad_norm": float(grad_norm), "skipped_updates": skipped,
           "update_sample_share": totals.pop("active_samples", 0.0) / max(counts[0], 1.0)}
    if cfg.advantage == "ppo":
        out["explained_variance"] = explained_variance
    out.update({k: v / tokens for k, v in totals.items()})
    out["clip_ratio"] = out.get("clip_ratio/clipped_low", 0.0) + out.get("clip_ratio/clipped_high", 0.0)
    out.setdefault("kl", out.get("kl_reference", 0.0))
    return out


def build_models(cfg: Config, device, resume_from: Path | None):
    """Policy (full or LoRA), reference (None when beta = 0) and PPO value head (None unless --advantage ppo)."""
    if cfg.lora_r:
        base = load_model(cfg.model, device)
        policy = (load_lora_checkpoint(base, resume_from) if resume_from
                  else apply_lora(base, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
        reference = lora_reference(policy) if cfg.beta > 0 else None  # the adapter switched off: no copy
    else:
        policy = load_model(str(resume_from) if resume_from else cfg.model, device)
        reference = None
        if cfg.beta > 0:  # the initial policy; on resume it is reloaded from --model
            reference = frozen_copy(load_model(cfg.model, device, trainable=False) if resume_from else policy)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    value_head = None
    if cfg.advantage == "ppo":  # the critic reads the policy trunk's hidden states (see models.ValueHead)
        value_head = ValueHead(policy.config.hidden_size).to(device)
        if resume_from:
            value_head.load_state_dict(load_file(resume_from / "value_head.safetensors", device=str(device)))
    return policy, reference, value_head


def seed_step(seed: int, rank: int, step: int, generator: torch.Generator) -> None:
    """Seed every RNG from (seed, rank, step): a resumed or multi-rank run draws exactly what it would have."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    random.seed(int(state[0])), np.random.seed(int(state[0])), torch.manual_seed(int(state[0]))
    generator.manual_seed(int(state[1]))


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- setup
    cfg = parse_config(argv)
    report_to = parse_report_to(cfg.report_to)
    require_trackers(report_to)  # a missing optional package fails here, before any model loads
    run_dir = Path(cfg.resume or cfg.out_dir or f"runs/{cfg.task}-{cfg.schedule}-s{cfg.seed}")
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise UserError(f"--resume {run_dir}: no checkpoint found there (expected {run_dir}/checkpoints/step_*)")
        check_resume_config(json.loads((resume_from / "trainer_state.json").read_text())["config"], cfg)
    task = make_task(cfg.task, seed=cfg.seed, data=cfg.data)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dist_info = init_distributed(device.type)
    if dist_info.enabled:
        device = torch.device(f"cuda:{dist_info.local_rank}") if device.type == "cuda" else device
        if cfg.prompts_per_step % dist_info.world_size:
            raise UserError(f"--prompts-per-step {cfg.prompts_per_step} must be divisible by the "
                            f"{dist_info.world_size} ranks (each rank rolls out an equal share)")
        if cfg.dynamic_sampling:
            raise UserError("--dynamic-sampling is single-process only for now (ranks would draw different "
                            "numbers of extra prompts); run without torchrun or without it")
    main_rank = dist_info.is_main
    log = tqdm.write if main_rank else (lambda *_: None)
    generator = torch.Generator(device=device)
    seed_step(cfg.seed, dist_info.rank, 0, generator)

    def autocast():  # bf16 compute on CUDA; fp32 elsewhere (CPU autocast would only slow this down)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if resolve_model_name(cfg.model) != cfg.model:
        log(f"model {cfg.model} -> {resolve_model_name(cfg.model)}")
    tokenizer = load_tokenizer(cfg.model)
    policy, reference, value_head = build_models(cfg, device, resume_from)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    trainable += list(value_head.parameters()) if value_head else []
    # fused: one kernel for all parameters on CPU and CUDA (4.7x faster than the per-tensor loop on the tiny model)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type in ("cpu", "cuda") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    sampler = LevelSampler(task, cfg.schedule, cfg.total_steps, seed=cfg.seed, **schedule_params(cfg))
    stop_checker = StopChecker(tokenizer, [cfg.stop], device)
    eos, pad = eos_token_ids(tokenizer, policy), tokenizer.pad_token_id
    eval_problems = held_out_problems(task, cfg.eval_problems)
    empty = [names for names, level in zip(task.level_names(), task.eval_levels)
             if not any(p.level == level for p in eval_problems)]
    if empty:
        tqdm.write(f"note: no held-out test problems at level(s) {', '.join(empty)}; their accuracy is not evaluated")
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    G, names = cfg.num_generations, task.level_names()

    start_step = 0
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from:
        state = load_training_state(resume_from, optimizer, scheduler, generator)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        if main_rank:
            for name in ("metrics.jsonl", "eval.jsonl", "completions.jsonl"):  # drop lines after the checkpoint
                truncate_jsonl(run_dir / name, start_step)
        log(f"resumed from {resume_from} at step {start_step}")
    elif main_rank:
        for name in ("metrics.jsonl", "eval.jsonl", "completions.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    if main_rank:
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log(f"run {run_dir} | device {device} x{dist_info.world_size} | task {task.name} | schedule {cfg.schedule} "
        f"| {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trained")
    trackers = Trackers(report_to if main_rank else [], run_dir, dataclasses.asdict(cfg), names, start_step)
    log_every = resolve_log_every(cfg.log_every, cfg.total_steps)

    def run_eval(step: int) -> dict | None:
        """Greedy held-out evaluation on rank 0 (the others wait: the weights are the same everywhere)."""
        summary = None
        if main_rank:
            summary, _ = evaluate(policy, tokenizer, task, eval_problems, eval_tokens, stop_checker,
                                  autocast=autocast)
            row = {"step": step, **{f"{k}/{m}": v[m] for k, v in summary.items()
                                    for m in ("accuracy", "reward", "format_rate")}}
            append_jsonl(run_dir / "eval.jsonl", row)
            trackers.log_eval(row)
            log(f"eval step {step}: " + "  ".join(f"{k} {v['accuracy']:.1%}" for k, v in summary.items()))
        barrier(dist_info)
        return summary

    def checkpoint(step: int) -> None:
        if main_rank:
            save_checkpoint(run_dir, step, policy, tokenizer, optimizer, scheduler,
                            {"config": dataclasses.asdict(cfg), "sampler": sampler.state_dict()}, generator,
                            keep=cfg.keep_checkpoints,
                            extra_modules={"value_head": value_head} if value_head else None)
        barrier(dist_info)

    def collect(problems) -> StepSamples:
        """Roll out G samples for each problem in one batched decode and score them (rewards in float64)."""
        prompt_ids = encode_prompts(tokenizer, task, problems)
        policy.eval()
        with autocast():
            rollout = generate(policy, prompt_ids, G, cfg.max_new_tokens, eos, pad, stop_checker=stop_checker,
                               temperature=cfg.temperature, generator=generator)
        policy.train()
        texts, rewards = score_rollout(task, problems, tokenizer, rollout)
        completions = rollout.completion_token_lists()
        return StepSamples(G, [p for p in problems for _ in range(G)], [p for p in prompt_ids for _ in range(G)],
                           completions, [lp[:len(c)].tolist() for lp, c in zip(rollout.logprobs, completions)],
                           texts, rewards, rollout.finished.numpy())

    first_eval = run_eval(start_step) if start_step == 0 else None
    nonfinite_in_a_row = 0
    # ---------------------------------------------------------------- the loop
    bar = tqdm(range(start_step, cfg.total_steps), initial=start_step, total=cfg.total_steps, desc="train",
               disable=not main_rank)
    for step in bar:
        seed_step(cfg.seed, dist_info.rank, step, generator)

        # 1. curriculum: p_t over levels, then each prompt slot's level and problem (this rank's share)
        level_p = sampler.probs(step)
        problems = dist_info.shard(sampler.sample(step, cfg.prompts_per_step))

        # 2. rollout and rewards; --dynamic-sampling redraws prompts (same p_t) until every group is informative
        t0 = time.perf_counter()
        samples = collect(problems)
        rounds = 0
        while (cfg.dynamic_sampling and len(samples.informative_groups()) < cfg.prompts_per_step
               and rounds < cfg.max_resample_rounds):
            missing = cfg.prompts_per_step - len(samples.informative_groups())
            samples, rounds = samples.concat(collect(sampler.sample(step, missing))), rounds + 1
        informative = samples.informative_groups()
        sampled_groups = samples.num_groups
        if cfg.dynamic_sampling:  # informative groups first, topped up with the others if retries ran out
            rest = [g for g in range(samples.num_groups) if g not in set(informative)]
            samples = samples.select(samples.group_rows(sorted((informative + rest)[:cfg.prompts_per_step])))
        rollout_seconds = time.perf_counter() - t0

        # 3. advantages over the whole step (every rank's samples): group-relative, in float64;
        #    ppo gets the raw rewards and builds per-token GAE advantages in the update
        rewards = torch.tensor(samples.rewards, dtype=torch.float64)
        sequence_kl_values = None
        if cfg.kl_in_reward and reference is not None and cfg.advantage != "ppo":
            sequence_kl_values = reference_sequence_kl(reference, samples, cfg, device, autocast)
            rewards = rewards - cfg.beta * sequence_kl_values
        step_rewards = torch.tensor(gather_lists(rewards.tolist(), dist_info), dtype=torch.float64)
        step_levels = np.array(gather_lists(samples.levels.tolist(), dist_info), dtype=np.int64)
        group_adv = compute_advantages("grpo" if cfg.advantage == "ppo" else cfg.advantage, step_rewards, G,
                                       cfg.scale_rewards)
        sampler.update({int(k): float(group_adv[torch.from_numpy(step_levels == k)].abs().mean())
                        for k in set(step_levels.tolist())})
        mine = slice(dist_info.rank * len(rewards), (dist_info.rank + 1) * len(rewards))
        advantages = (rewards if cfg.advantage == "ppo" else group_adv[mine]).float()

        # 4. policy update, on the samples that train (--drop-zero-std, --mask-truncated leave some out)
        t1 = time.perf_counter()
        train_rows = np.ones(len(rewards), dtype=bool)
        if cfg.drop_zero_std:  # group indices of the samples kept (dynamic sampling may have reordered them)
            train_rows &= np.isin(np.arange(len(rewards)) // G, samples.informative_groups())
        if cfg.mask_truncated:
            train_rows &= samples.finished
        rows = np.flatnonzero(train_rows).tolist()
        kept = samples.select(rows)
        update = update_with_oom_retry(policy, reference, optimizer, kept, advantages[rows], cfg, device,
                                       autocast, value_head, dist_info, log)
        lr_used = scheduler.get_last_lr()[0]
        scheduler.step()
        update_seconds = time.perf_counter() - t1
        nonfinite_in_a_row = nonfinite_in_a_row + 1 if update["skipped_updates"] else 0
        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            raise SystemExit(f"error: non-finite gradients in {nonfinite_in_a_row} updates in a row (step "
                             f"{step + 1}); lower --lr or check the model's dtype. Checkpoints are in {run_dir}")
        if update["skipped_updates"]:
            log(f"warning: step {step + 1}: non-finite gradient, update skipped")

        # 5. log: one JSON line per step (rank 0, over every rank's samples), one console line
        per_sample = gather_lists([(float(r), int(k), len(c), bool(f)) for r, k, c, f in zip(
            samples.rewards, samples.levels, samples.completions, samples.finished)], dist_info)
        all_rewards, levels, lengths, finished = (np.array(column) for column in zip(*per_sample))
        counts = gather_lists([len(informative), sampled_groups, len(rows), len(rewards)], dist_info)
        correct = np.array([task.is_correct(r) for r in all_rewards])
        rollout_seconds = max(gather_lists([rollout_seconds], dist_info))
        row = {"step": step + 1, "lr": lr_used, **update,
               "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
               "accuracy": float(correct.mean()), "level_probs": [round(p, 6) for p in level_p],
               "level_counts": [int((levels == k).sum() // G) for k in range(task.num_levels)],
               "completion_length_mean": float(lengths.mean()), "clipped_ratio": float((~finished).mean()),
               "frac_reward_zero_std": 1.0 - sum(counts[0::4]) / sum(counts[1::4]), "resample_rounds": rounds,
               "trained_fraction": sum(counts[2::4]) / sum(counts[3::4]),
               "rollout_seconds": rollout_seconds, "update_seconds": update_seconds,
               "tokens_per_second": float(lengths.sum() / rollout_seconds)}
        if sequence_kl_values is not None:  # per-token mean, comparable with the in-loss KL metric
            kl_sums = gather_lists([float(sequence_kl_values.sum())], dist_info)
            row["kl"] = sum(kl_sums) / max(1, int(lengths.sum()))
        for k in sorted(set(levels.tolist())):
            row[f"reward/{names[k]}"] = float(all_rewards[levels == k].mean())
            row[f"accuracy/{names[k]}"] = float(correct[levels == k].mean())
        if main_rank:
            append_jsonl(run_dir / "metrics.jsonl", row)
            trackers.log_metrics(row)
            if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
                log_completions(run_dir, step + 1, samples)
        if should_log(step + 1, cfg.total_steps, log_every):
            log(console_line(row, names, cfg.total_steps, kl_computed=reference is not None,
                             clipping_possible=cfg.num_iterations > 1))
        bar.set_postfix({"reward": f"{row['reward_mean']:.3f}", "acc": f"{row['accuracy']:.2f}"})  # + tqdm's ETA

        # 6. periodic evaluation and checkpoint
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.total_steps:
            run_eval(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.total_steps:
            checkpoint(done)

    # ---------------------------------------------------------------- finish
    last_eval = run_eval(cfg.total_steps)
    checkpoint(cfg.total_steps)
    final_dir = run_dir / "final"
    if main_rank:
        policy.save_pretrained(final_dir, safe_serialization=True)  # with LoRA: the adapter
        tokenizer.save_pretrained(final_dir)
        card = dict(config=dataclasses.asdict(cfg), last_eval=last_eval, first_eval=first_eval,
                    step=cfg.total_steps, run_name=run_dir.resolve().name)
        write_model_card(final_dir, adapter=bool(cfg.lora_r), **card)
        if cfg.lora_r and cfg.save_merged:
            merged = copy.deepcopy(policy).merge_and_unload()
            merged.save_pretrained(run_dir / "final-merged", safe_serialization=True)
            tokenizer.save_pretrained(run_dir / "final-merged")
            write_model_card(run_dir / "final-merged", adapter=False, **card)
        if first_eval:
            print("held-out greedy accuracy, start -> end: " + "  ".join(
                f"{k} {first_eval[k]['accuracy']:.1%} -> {last_eval[k]['accuracy']:.1%}" for k in last_eval))
        print(f"saved final policy and its model card to {final_dir}")
    trackers.close()
    barrier(dist_info)
    return {"first_eval": first_eval, "last_eval": last_eval, "run_dir": str(run_dir)}


def update_with_oom_retry(policy, reference, optimizer, kept: StepSamples, advantages, cfg: Config, device,
                          autocast, value_head, dist_info: DistInfo, log) -> dict:
    """policy_update; on a CUDA out-of-memory error, halve --micro-batch-size (and --micro-batch-tokens, if set)
    for the rest of the run and retry.

    The retry is exact (the loss weights do not depend on the micro-batch size) as long as no optimizer step was
    taken yet; an OOM in a later iteration of --num-iterations > 1 is re-raised.
    """
    while True:
        steps_before = optimizer_steps(optimizer)
        try:
            return policy_update(policy, reference, optimizer, kept.prompt_ids, kept.completions, advantages,
                                 kept.sampler_logprobs, cfg, device, autocast, value_head, dist_info)
        except torch.OutOfMemoryError:
            if cfg.micro_batch_size == 1 or optimizer_steps(optimizer) != steps_before:
                raise
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cfg.micro_batch_size = max(1, cfg.micro_batch_size // 2)
            if cfg.micro_batch_tokens:  # 0 means no cap; a set budget halves but stays a cap
                cfg.micro_batch_tokens = max(1, cfg.micro_batch_tokens // 2)
            log(f"warning: out of memory in the update; retrying with --micro-batch-size {cfg.micro_batch_size}"
                + (f" --micro-batch-tokens {cfg.micro_batch_tokens}" if cfg.micro_batch_tokens else ""))


def optimizer_steps(optimizer) -> int:
    """How many steps the optimizer has taken (Adam keeps a per-parameter step count)."""
    for state in optimizer.state.values():
        return int(state.get("step", 0))
    return 0


@torch.no_grad()
def reference_sequence_kl(reference, samples: StepSamples, cfg: Config, device, autocast) -> torch.Tensor:
    """sum_t KL_t(pi || pi_ref) per sample [N] (float64), from the sampler's log-probs, for --kl-in-reward."""
    out = torch.zeros(len(samples.completions), dtype=torch.float64)
    shared = shared_prompts_for(reference.model, samples.prompt_ids, cfg)
    kv = None
    for rows, batch in pack_micro_batches(samples.prompt_ids, samples.completions, cfg.micro_batch_size,
                                          cfg.micro_batch_tokens, shared, device):
        with autocast(), reference.context():
            if shared is not None and kv is None:
                kv = shared.keys_values(reference.model)
            ref, _ = completion_logprobs(reference.model, batch, cfg.temperature, prompt_kv=kv)
        logp = torch.zeros_like(ref)
        for j, i in enumerate(rows):
            logp[j, :len(samples.sampler_logprobs[i])] = torch.tensor(samples.sampler_logprobs[i], device=device)
        out[rows] = sequence_kl(logp, ref, batch["completion_mask"], cfg.kl_estimator).double().cpu()
    return out


if __name__ == "__main__":
    main()
