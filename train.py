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
- fp32 master weights under AdamW; bf16 autocast on CUDA, fp32 on CPU; one code path for both.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from e2h_min.checkpoint import latest_checkpoint, load_training_state, save_checkpoint
from e2h_min.config import Config, UserError, exit_on_user_error, parse_config, schedule_params
from e2h_min.curriculum import LevelSampler
from e2h_min.evaluation import encode_prompts, eos_token_ids, evaluate, score_rollout
from e2h_min.logprobs import completion_logprobs, pack_sequences
from e2h_min.losses import clipped_surrogate, compute_advantages, kl_penalty, masked_mean, token_loss_weights
from e2h_min.models import frozen_copy, load_model, load_tokenizer, pick_device, resolve_model_name
from e2h_min.rollout import StopChecker, generate
from e2h_min.tasks import make_task


def lr_multiplier(step: int, cfg: Config) -> float:
    """Linear warmup to 1, then cosine decay to 0 at total_steps (or constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def micro_batches(lengths: list[int], size: int) -> list[list[int]]:
    """Sample indices sorted by length, cut into chunks of `size`: similar lengths share a batch, less padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + size] for i in range(0, len(order), size)]


def policy_update(policy, reference, optimizer, prompt_ids, completions, advantages, sampler_logprobs, cfg,
                  device, autocast) -> dict:
    """num_iterations clipped-surrogate steps on one rollout batch (GRPO, spec section 5).

    prompt_ids / completions: N token lists; advantages [N]; sampler_logprobs: N lists of per-token log-probs.
    Loss per token: -min(rho A, clip(rho) A) + beta * KL_k(pi || pi_ref), weighted by token_loss_weights.
    """
    n = len(completions)
    width = max(1, max(len(c) for c in completions))
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, :len(c)] = True
    weights = token_loss_weights(mask, cfg.loss_type, cfg.max_new_tokens)  # [N, T], fixed for the whole step
    batches = micro_batches([len(p) + len(c) for p, c in zip(prompt_ids, completions)], cfg.micro_batch_size)
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    old_logprobs: dict[int, torch.Tensor] = {}  # micro-batch -> log-probs before any update (pi_old)
    stats = defaultdict(float)
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for b, rows in enumerate(batches):
            batch = pack_sequences([prompt_ids[i] for i in rows], [completions[i] for i in rows],
                                   pad_id=0)
            batch = {k: v.to(device) for k, v in batch.items()}
            tokens = batch["completion_mask"]
            t_mb = tokens.shape[1]
            with autocast():
                logp, entropy = completion_logprobs(policy, batch, cfg.temperature)  # [b, T]
            if iteration == 0:
                old_logprobs[b] = logp.detach()
            old = old_logprobs[b]
            adv = advantages[rows].to(device)
            loss_tok, clip_low, clip_high = clipped_surrogate(logp, old, adv, cfg.epsilon, eps_high)
            if reference is not None:
                with torch.no_grad(), autocast():
                    ref_logp, _ = completion_logprobs(reference, batch, cfg.temperature)
                kl = kl_penalty(logp, ref_logp, cfg.kl_estimator)
                loss_tok = loss_tok + cfg.beta * kl
                stats["kl"] += float((kl.detach() * tokens).sum())
            w = weights[rows, :t_mb].to(device)
            loss = (loss_tok * w).sum()
            loss.backward()
            if iteration == cfg.num_iterations - 1:  # diagnostics of the last pass, as token sums
                stats["loss"] += float(loss.detach())
                stats["tokens"] += float(tokens.sum())
                stats["entropy"] += float((entropy * tokens).sum())
                stats["clip_low"] += float((clip_low & tokens).sum())
                stats["clip_high"] += float((clip_high & tokens).sum())
                d = (old - logp.detach())
                stats["approx_kl_old"] += float(((torch.exp(-d) + d - 1.0) * tokens).sum())
                if iteration == 0:
                    sampled = torch.zeros_like(old)
                    for j, i in enumerate(rows):
                        sampled[j, :len(sampler_logprobs[i])] = torch.tensor(sampler_logprobs[i], device=device)
                    stats["logprob_mismatch"] += float(((sampled - old).abs() * tokens).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                   cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
    tokens = max(stats.pop("tokens"), 1.0)
    out = {"loss": stats.pop("loss"), "grad_norm": float(grad_norm)}
    out.update({k: v / tokens for k, v in stats.items()})
    if reference is not None:
        out["kl"] = stats["kl"] / tokens / cfg.num_iterations
    out["clip_ratio"] = out["clip_low"] + out["clip_high"]
    return out


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    # ---------------------------------------------------------------- setup
    cfg = parse_config(argv)
    run_dir = Path(cfg.resume or cfg.out_dir or f"runs/{cfg.task}-{cfg.schedule}-s{cfg.seed}")
    resume_from = None
    if cfg.resume:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None:
            raise UserError(f"--resume {run_dir}: no checkpoint found there (expected {run_dir}/checkpoints/step_*)")
        saved = json.loads((resume_from / "trainer_state.json").read_text())["config"]
        check_resume_config(saved, cfg)
    task = make_task(cfg.task, seed=cfg.seed, data=cfg.data)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)

    def autocast():  # bf16 compute on CUDA; fp32 elsewhere (CPU autocast would only slow this down)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    if resolve_model_name(cfg.model) != cfg.model:
        print(f"model {cfg.model} -> {resolve_model_name(cfg.model)}")
    tokenizer = load_tokenizer(cfg.model)
    policy = load_model(str(resume_from) if resume_from else cfg.model, device)
    reference = None
    if cfg.beta > 0:  # the reference is the initial policy; on resume it is reloaded from --model
        reference = frozen_copy(load_model(cfg.model, device, trainable=False) if resume_from else policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
    sampler = LevelSampler(task, cfg.schedule, cfg.total_steps, seed=cfg.seed, **schedule_params(cfg))
    stop_checker = StopChecker(tokenizer, [cfg.stop], device)
    eos, pad = eos_token_ids(tokenizer, policy), tokenizer.pad_token_id
    eval_problems = [task.problem(level, i, "test") for level in task.eval_levels for i in range(cfg.eval_problems)]
    eval_tokens = cfg.eval_max_new_tokens or cfg.max_new_tokens
    G, names = cfg.num_generations, task.level_names()

    start_step = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from:
        state = load_training_state(resume_from, optimizer, scheduler, generator)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
        for name in ("metrics.jsonl", "eval.jsonl", "completions.jsonl"):  # drop lines after the checkpoint
            truncate_jsonl(run_dir / name, start_step)
        print(f"resumed from {resume_from} at step {start_step}")
    else:
        for name in ("metrics.jsonl", "eval.jsonl", "completions.jsonl"):
            (run_dir / name).unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    print(f"run {run_dir} | device {device} | task {task.name} | schedule {cfg.schedule} | "
          f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params")

    def run_eval(step: int) -> dict:
        summary, _ = evaluate(policy, tokenizer, task, eval_problems, eval_tokens, stop_checker, autocast=autocast)
        append_jsonl(run_dir / "eval.jsonl", {"step": step, **{f"{k}/{m}": v[m] for k, v in summary.items()
                                                               for m in ("accuracy", "reward", "format_rate")}})
        tqdm.write(f"eval step {step}: " + "  ".join(f"{k} {v['accuracy']:.1%}" for k, v in summary.items()))
        return summary

    def checkpoint(step: int) -> None:
        save_checkpoint(run_dir, step, policy, tokenizer, optimizer, scheduler,
                        {"config": dataclasses.asdict(cfg), "sampler": sampler.state_dict()}, generator,
                        keep=cfg.keep_checkpoints)

    first_eval = run_eval(start_step) if start_step == 0 else None
    # ---------------------------------------------------------------- the loop
    bar = tqdm(range(start_step, cfg.total_steps), initial=start_step, total=cfg.total_steps, desc="train")
    for step in bar:
        # 1. curriculum: p_t over levels, then each prompt slot's level and problem
        level_p = sampler.probs(step)
        problems = sampler.sample(step, cfg.prompts_per_step)
        levels = np.repeat([p.level for p in problems], G)  # level of each of the N = P * G samples

        # 2. rollout: all prompts x G samples in one batched decode
        t0 = time.perf_counter()
        policy.eval()
        prompt_ids = encode_prompts(tokenizer, task, problems)
        with autocast():
            rollout = generate(policy, prompt_ids, G, cfg.max_new_tokens, eos, pad, stop_checker=stop_checker,
                               temperature=cfg.temperature, generator=generator)
        policy.train()
        rollout_seconds = time.perf_counter() - t0

        # 3. rewards (float64) and group-relative advantages
        texts, rewards = score_rollout(task, problems, tokenizer, rollout)
        rewards_t = torch.tensor(rewards, dtype=torch.float64)
        advantages = compute_advantages(cfg.advantage, rewards_t, G, cfg.scale_rewards).float()
        sampler.update({int(k): float(advantages[torch.from_numpy(levels == k)].abs().mean())
                        for k in set(levels.tolist())})

        # 4. policy update
        t1 = time.perf_counter()
        completions = rollout.completion_token_lists()
        sampler_logprobs = [lp[:len(c)].tolist() for lp, c in zip(rollout.logprobs, completions)]
        update = policy_update(policy, reference, optimizer, [prompt_ids[i // G] for i in range(len(completions))],
                               completions, advantages, sampler_logprobs, cfg, device, autocast)
        scheduler.step()
        update_seconds = time.perf_counter() - t1

        # 5. log: one JSON line per step, one console line
        correct = np.array([task.is_correct(r) for r in rewards])
        lengths = rollout.lengths.numpy()
        row = {"step": step + 1, "lr": scheduler.get_last_lr()[0], **update,
               "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
               "accuracy": float(correct.mean()), "level_probs": [round(p, 6) for p in level_p],
               "level_counts": [int((levels == k).sum() // G) for k in range(task.num_levels)],
               "completion_length_mean": float(lengths.mean()),
               "clipped_ratio": float((~rollout.finished).float().mean()),
               "frac_reward_zero_std": float((rewards.reshape(-1, G).std(axis=1) == 0).mean()),
               "rollout_seconds": rollout_seconds, "update_seconds": update_seconds,
               "tokens_per_second": float(lengths.sum() / rollout_seconds)}
        for k in sorted(set(levels.tolist())):
            row[f"reward/{names[k]}"] = float(rewards[levels == k].mean())
            row[f"accuracy/{names[k]}"] = float(correct[levels == k].mean())
        append_jsonl(run_dir / "metrics.jsonl", row)
        if cfg.log_completions_every and (step + 1) % cfg.log_completions_every == 0:
            log_completions(run_dir, step + 1, problems, texts, rewards, G)
        histogram = Counter(int(k) for k in levels[::G])
        tqdm.write(f"step {step + 1:4d} | reward {row['reward_mean']:.3f} | acc "
                   + " ".join(f"{names[k]} {row[f'accuracy/{names[k]}']:.2f}" for k in sorted(histogram))
                   + f" | levels {dict(sorted(histogram.items()))} | kl {row.get('kl', 0):.4f} | clip "
                   f"{row['clip_ratio']:.3f} | ent {row['entropy']:.2f} | len {row['completion_length_mean']:.1f}"
                   f" | {row['tokens_per_second']:.0f} tok/s")
        bar.set_postfix(reward=f"{row['reward_mean']:.3f}")

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
    policy.save_pretrained(final_dir, safe_serialization=True)
    tokenizer.save_pretrained(final_dir)
    if first_eval:
        print("held-out greedy accuracy, start -> end: " + "  ".join(
            f"{k} {first_eval[k]['accuracy']:.1%} -> {last_eval[k]['accuracy']:.1%}" for k in last_eval))
    print(f"saved final policy to {final_dir}")
    return {"first_eval": first_eval, "last_eval": last_eval, "run_dir": str(run_dir)}


# Fields that may differ when resuming: they change bookkeeping or speed, not what the run computes.
RESUME_SAFE_FIELDS = {"resume", "out_dir", "eval_every", "eval_problems", "eval_max_new_tokens", "save_every",
                      "keep_checkpoints", "log_completions_every", "device", "threads", "micro_batch_size"}


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse to resume with a changed config unless every changed field is bookkeeping (RESUME_SAFE_FIELDS)."""
    current = dataclasses.asdict(cfg)
    changed = [k for k in current if k not in RESUME_SAFE_FIELDS and saved.get(k) != current[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: {k} was {saved.get(k)!r} in the saved run but is {current[k]!r} now; "
                        f"resume with the same value (only {', '.join(sorted(RESUME_SAFE_FIELDS))} may change)")


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only lines of steps <= `step` (work after the checkpoint is redone by the resumed run)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def log_completions(run_dir: Path, step: int, problems, texts, rewards, group_size: int, per_level: int = 2) -> None:
    """A few sampled completions per level drawn this step (first sample of each chosen prompt)."""
    seen = Counter()
    for i, problem in enumerate(problems):
        if seen[problem.level] < per_level:
            seen[problem.level] += 1
            append_jsonl(run_dir / "completions.jsonl", {
                "step": step, "level": problem.level, "prompt": problem.user_prompt,
                "completion": texts[i * group_size], "reward": float(rewards[i * group_size])})


if __name__ == "__main__":
    main()
