"""The run's bookkeeping, which the loop calls in one line each and a learner may skip: the step's metrics row and
console line, the trackers, the divergence checks, the periodic evaluation and checkpoint, the FSDP sampling
copy, and the finish (last evaluation, last checkpoint, final/ with its model card)."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from e2h_min.analysis.evaluation import evaluate_sharded, sampled_pass_at_k
from e2h_min.engine.distributed import Compute, all_reduce_sum, barrier, gather_lists
from e2h_min.engine.fsdp import FullOptimizerState, is_sharded, log_sharded_memory, refresh_full_copy
from e2h_min.engine.models import Models, checkpoint_dtype
from e2h_min.jsonl import read_log
from e2h_min.rl.curriculum import LevelSampler
from e2h_min.rl.samples import SamplingStats, StepSamples
from e2h_min.rl.scoring import Chat
from e2h_min.run.checkpoint import save_checkpoint, save_final, written_whole
from e2h_min.run.config import Config
from e2h_min.run.divergence import DivergedError, divergence_message, first_nonfinite_parameter, probe_logits_finite
from e2h_min.run.model_card import write_model_card
from e2h_min.run.runlog import append_jsonl, log_completions, sync_logs
from e2h_min.run.tracking import Trackers, console_line, resolve_log_every, should_log
from e2h_min.tasks.base import Task


def no_log(*_) -> None:
    """The log of every rank but rank 0."""


class RunBook:
    """The bookkeeping of one run (built by run/setup.py). Only its own methods read these fields; the loop's
    step helpers take what they use as arguments."""

    def __init__(self, cfg: Config, task: Task, sampler: LevelSampler, run_dir: Path, compute: Compute, log,
                 chat: Chat, models: Models, optimizer, scheduler, generator: torch.Generator, eval_problems: list,
                 trackers: Trackers, start_step: int, model_record: str | None = None):
        self.cfg, self.task, self.sampler, self.run_dir = cfg, task, sampler, run_dir
        self.compute, self.log, self.chat, self.models = compute, log, chat, models
        self.optimizer, self.scheduler, self.generator = optimizer, scheduler, generator
        self.eval_problems, self.trackers, self.start_step = eval_problems, trackers, start_step
        self.model_record = model_record  # what checkpoints record of --model (models.loaded_model_record)
        self.log_every = resolve_log_every(cfg.log_every, cfg.total_steps)
        self.nonfinite_in_a_row = 0

    def steps(self):
        """The loop's steps, start_step .. total_steps - 1, behind a progress bar on rank 0."""
        self.bar = tqdm(range(self.start_step, self.cfg.total_steps), initial=self.start_step,
                        total=self.cfg.total_steps, desc="train", disable=not self.compute.dist.is_main)
        return self.bar

    # ------------------------------------------------------------------ evaluation and checkpoints
    def evaluate(self, step: int) -> dict:
        """Greedy held-out evaluation, each rank on its contiguous share of the problems (the weights are the same
        everywhere); the records are gathered in problem order, so the summary is one process's."""
        cfg, dist_info = self.cfg, self.compute.dist
        summary, _ = evaluate_sharded(self.models.sampling_model, self.chat.tokenizer, self.task, self.eval_problems,
                                      cfg.eval_max_new_tokens or cfg.max_new_tokens, self.chat.stop_checker,
                                      dist_info, autocast=self.compute.autocast, chat_date=cfg.chat_date)
        pass_k = self.sampled_eval(step) if cfg.eval_pass_k else {}
        if dist_info.is_main:
            row = {"step": step, **{f"{k}/{m}": v[m] for k, v in summary.items()
                                    for m in ("accuracy", "reward", "format_rate")},
                   **{f"{k}/{m}": v for k, by_k in pass_k.items() for m, v in by_k.items()}}
            append_jsonl(self.run_dir / "eval.jsonl", row)
            self.trackers.log_eval(row)
            self.log(f"eval step {step}: " + "  ".join(f"{k} {v['accuracy']:.1%}" for k, v in summary.items()))
            if pass_k:
                top = f"pass@{max(cfg.eval_pass_k)}"
                self.log(f"eval step {step} {top}: " + "  ".join(f"{k} {v[top]:.1%}" for k, v in pass_k.items()))
        return summary

    def logged_eval(self, step: int) -> dict | None:
        """The summary of `step`'s held-out evaluation as eval.jsonl holds it ({level: {accuracy, reward,
        format_rate, n}}), or None: what a resumed run knows of the evaluations an earlier process ran."""
        rows, _ = read_log(self.run_dir / "eval.jsonl") if (self.run_dir / "eval.jsonl").is_file() else ([], 0)
        row = next((r for r in rows if r.get("step") == step), None)
        if row is None:
            return None
        names = self.task.level_names()
        counts = Counter(names[p.level] for p in self.eval_problems)
        return {name: {"n": n, **{m: row[f"{name}/{m}"] for m in ("accuracy", "reward", "format_rate")}}
                for name, n in counts.items() if f"{name}/accuracy" in row}

    def sampled_eval(self, step: int) -> dict:
        """--eval-pass-k: pass@k per level on the held-out problems (temperature 1, its own noise per step)."""
        cfg, names = self.cfg, self.task.level_names()
        wanted = set(filter(None, cfg.eval_pass_k_levels.split(","))) or set(names)
        problems = [p for p in self.eval_problems if names[p.level] in wanted]
        return sampled_pass_at_k(self.models.sampling_model, self.chat.tokenizer, self.task, problems,
                                 list(cfg.eval_pass_k), cfg.eval_samples or max(cfg.eval_pass_k),
                                 cfg.eval_max_new_tokens or cfg.max_new_tokens, self.chat.stop_checker,
                                 self.compute.dist, cfg.prompts_per_step * cfg.num_generations,
                                 seed=int(np.random.SeedSequence([cfg.seed, step, 1]).generate_state(1)[0]),
                                 autocast=self.compute.autocast, chat_date=cfg.chat_date)

    def checkpoint(self, step: int) -> None:
        """Save run_dir/checkpoints/step_N (rank 0 writes; under FSDP every rank first gathers the AdamW state)."""
        policy = self.models.policy
        # under FSDP gathering the AdamW state is a collective: every rank gathers, rank 0 writes
        optimizer_state = (FullOptimizerState(policy, self.optimizer) if is_sharded(policy) else self.optimizer
                           ).state_dict()
        if self.compute.dist.is_main:
            sync_logs(self.run_dir)  # the log lines up to this step are on disk before the checkpoint is
            value_head = self.models.value_head
            save_checkpoint(self.run_dir, step, self.models.sampling_model, self.chat.tokenizer, optimizer_state,
                            self.scheduler, {"config": dataclasses.asdict(self.cfg),
                                             "sampler": self.sampler.state_dict(),
                                             "model": self.model_record}, self.generator,
                            keep=self.cfg.keep_checkpoints,
                            extra_modules={"value_head": value_head} if value_head else None)
        barrier(self.compute.dist)

    def evaluate_and_save_every(self, done: int) -> None:
        """The held-out evaluation every --eval-every steps and the checkpoint every --save-every steps (the last
        step's are finish's)."""
        cfg = self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.total_steps:
            self.evaluate(done)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.total_steps:
            self.checkpoint(done)

    # ------------------------------------------------------------------ after the update
    def refresh_sampling_copy(self, step: int) -> None:
        """FSDP: the full-weight copy that rolls out takes the updated shards (after step 1: their memory is
        logged); without FSDP nothing (the policy itself rolls out)."""
        policy, sampling_model = self.models.policy, self.models.sampling_model
        if not is_sharded(policy):
            return
        refresh_full_copy(policy, sampling_model)
        if step == self.start_step:
            log_sharded_memory(policy, sampling_model, self.optimizer, self.compute.dist, self.log)

    def check_update(self, step: int, update: dict, probe_prompt: list[list[int]]) -> None:
        """Warn on an update skipped for a non-finite gradient (stop after --max-nonfinite-steps in a row), then
        stop if the step left a diverged model (check_not_diverged)."""
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if update["skipped_updates"] else 0
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise DivergedError(f"non-finite gradients in {self.nonfinite_in_a_row} updates in a row (step "
                                f"{step + 1}); lower --lr or check the model's dtype. Checkpoints are in "
                                f"{self.run_dir}")
        if self.nonfinite_in_a_row:
            self.log(f"warning: step {step + 1}: non-finite gradient, update skipped")
        self.check_not_diverged(probe_prompt, step + 1)

    def check_not_diverged(self, probe_prompt: list[list[int]], step: int) -> None:
        """Stop with DivergedError (one line, exit 2) if the step just taken left a NaN/inf parameter or a model
        whose logits on one of this step's prompts are NaN/inf (see e2h_min/run/divergence.py). Every rank decides
        together, so no rank is left waiting in a collective. The check reads sampling_model (the policy itself,
        or under FSDP its refreshed full copy), so it never runs a forward of the sharded model outside the
        update."""
        (policy, sampling_model, _, value_head), (device, dist_info, autocast) = self.models, self.compute
        trained = {n for n, p in policy.named_parameters() if p.requires_grad}
        named = [(n, p) for n, p in sampling_model.named_parameters() if n in trained]
        named += [(f"value_head.{n}", p) for n, p in value_head.named_parameters()] if value_head else []
        bad_parameter = first_nonfinite_parameter(named)
        finite_logits = bad_parameter is None and probe_logits_finite(sampling_model, (probe_prompt or [[]])[0],
                                                                      device, autocast)
        votes = all_reduce_sum(torch.tensor([float(bad_parameter is None and finite_logits)], device=device),
                               dist_info)
        if int(votes.item()) != dist_info.world_size:
            what = (f"parameter {bad_parameter} is NaN/inf" if bad_parameter else
                    "the weights are finite but the model's logits are NaN/inf" if not finite_logits else
                    "another rank saw NaN/inf")
            raise DivergedError(divergence_message(step, self.cfg.lr, what, self.run_dir))

    # ------------------------------------------------------------------ the step's log
    def log_step(self, step: int, level_p: list[float], lr: float, update: dict, samples: StepSamples,
                 sampling: SamplingStats, trained: int, sequence_kl_values, rollout_seconds: float,
                 update_seconds: float) -> dict:
        """The step's metrics.jsonl row (step_metrics) to metrics.jsonl and the trackers, and (every
        --log-completions-every steps) completions.jsonl, on rank 0; the console line every log_every steps and
        the progress bar's figures."""
        row = self.step_metrics(step, level_p, lr, update, samples, sampling, trained, sequence_kl_values,
                                rollout_seconds, update_seconds)
        cfg, done = self.cfg, row["step"]
        if self.compute.dist.is_main:
            append_jsonl(self.run_dir / "metrics.jsonl", row)
            self.trackers.log_metrics(row)
            if cfg.log_completions_every and done % cfg.log_completions_every == 0:
                log_completions(self.run_dir, done, samples)
        if should_log(done, cfg.total_steps, self.log_every):
            self.log(console_line(row, self.task.level_names(), cfg.total_steps,
                                  kl_computed=self.models.reference is not None,
                                  clipping_possible=cfg.num_iterations > 1))
        self.bar.set_postfix({"reward": f"{row['reward_mean']:.3f}", "acc": f"{row['accuracy']:.2f}"})  # + ETA
        return row

    def step_metrics(self, step: int, level_p: list[float], lr: float, update: dict, samples: StepSamples,
                     sampling: SamplingStats, trained: int, sequence_kl_values, rollout_seconds: float,
                     update_seconds: float) -> dict:
        """The step's metrics.jsonl row, over every rank's samples (TRL's names where they exist)."""
        dist_info, G, names = self.compute.dist, self.cfg.num_generations, self.task.level_names()
        per_sample = gather_lists([(float(r), int(k), len(c), bool(f)) for r, k, c, f in zip(
            samples.rewards, samples.levels, samples.completions, samples.finished)], dist_info)
        all_rewards, levels, lengths, finished = (np.array(column) for column in zip(*per_sample))
        group_counts = gather_lists([len(sampling.informative_groups), sampling.sampled_groups, trained,
                                     len(samples.rewards)], dist_info)  # per rank: 4 counts
        correct = np.array([self.task.is_correct(r) for r in all_rewards])
        rollout_seconds = max(gather_lists([rollout_seconds], dist_info))
        row = {"step": step + 1, "lr": lr, **update,
               "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
               "accuracy": float(correct.mean()), "level_probs": [round(p, 6) for p in level_p],
               "level_counts": [int((levels == k).sum() // G) for k in range(self.task.num_levels)],
               "completion_length_mean": float(lengths.mean()), "clipped_ratio": float((~finished).mean()),
               "frac_reward_zero_std": 1.0 - sum(group_counts[0::4]) / sum(group_counts[1::4]),
               "resample_rounds": sampling.resample_rounds,
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

    # ------------------------------------------------------------------ the end
    def finish(self, first_eval: dict | None) -> dict:
        """The last evaluation and checkpoint, then final/: the policy (with LoRA its adapter; --save-merged adds
        final-merged/) in the base model's dtype, the tokenizer and a model card."""
        cfg, run_dir, tokenizer = self.cfg, self.run_dir, self.chat.tokenizer
        # a resume with only final/ left to write has its final evaluation in eval.jsonl
        logged = self.logged_eval(cfg.total_steps) if self.start_step == cfg.total_steps else None
        last_eval = logged or self.evaluate(cfg.total_steps)
        self.checkpoint(cfg.total_steps)
        final_dir = run_dir / "final"
        if self.compute.dist.is_main:
            save_dtype = checkpoint_dtype(cfg.model) if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)
            started = cfg if not cfg.resume else dataclasses.replace(  # the command that started the run
                cfg, resume=None, out_dir=json.loads((run_dir / "config.json").read_text()).get("out_dir"))
            card = dict(config=dataclasses.asdict(started), last_eval=last_eval, first_eval=first_eval,
                        step=cfg.total_steps, run_name=run_dir.resolve().name)
            with written_whole(final_dir) as folder:  # a kill part-way leaves no final/ to look finished
                save_final(self.models.sampling_model, folder, save_dtype)  # with LoRA: the adapter, as peft saves
                tokenizer.save_pretrained(folder)
                write_model_card(folder, adapter=bool(cfg.lora_r), **card)
            if cfg.lora_r and cfg.save_merged:
                merged = copy.deepcopy(self.models.policy).merge_and_unload()
                with written_whole(run_dir / "final-merged") as folder:
                    save_final(merged, folder, save_dtype)
                    tokenizer.save_pretrained(folder)
                    write_model_card(folder, adapter=False, **card)
            if first_eval and last_eval:
                print("held-out greedy accuracy, start -> end: " + "  ".join(
                    f"{k} {first_eval[k]['accuracy']:.1%} -> {last_eval[k]['accuracy']:.1%}" for k in last_eval))
            print(f"saved final policy and its model card to {final_dir}")
        self.trackers.close()
        barrier(self.compute.dist)
        return {"first_eval": first_eval, "last_eval": last_eval, "run_dir": str(run_dir)}
