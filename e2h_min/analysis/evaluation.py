"""Held-out evaluation: greedy per-level accuracy and sampled pass@k, shared by train.py and eval.py (the prompts
and the scoring are the training ones, e2h_min/rl/scoring.py)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from e2h_min.engine.distributed import DistInfo, gather_lists
from e2h_min.analysis.passk import pass_at_k_by_level
from e2h_min.engine.sampler import StopChecker, generate
from e2h_min.rl.scoring import chat_date_variables, encode_prompts, eos_token_ids, score_rollout


def held_out_problems(task, per_level: int, levels: list[int] | None = None) -> list:
    """The first `per_level` test-split problems of each level (default: every level incl. OOD), level by level;
    fewer where a data file has fewer. train.py's periodic evaluation and eval.py both use exactly this list."""
    problems = []
    for level in task.eval_levels if levels is None else levels:
        available = task.num_problems(level, "test")
        count = per_level if available is None else min(per_level, available)
        problems += [task.problem(level, i, "test") for i in range(count)]
    return problems


@torch.no_grad()
def evaluate(model, tokenizer, task, problems, max_new_tokens: int, stop_checker: StopChecker,
             batch_size: int = 256, autocast=None, progress: bool = True, chat_date: str | None = None
             ) -> tuple[dict, list[dict]]:
    """Greedy decoding on `problems` (prompts dated chat_date, see encode_prompts); returns (summary, records).

    summary: per level name -> {accuracy, reward, format_rate, length, n}; accuracy = share of samples whose
    reward exceeds the task's format reward (spec section 7). records: one dict per problem with its completion.
    """
    was_training = model.training
    model.eval()
    records = []
    eos = eos_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    batches = range(0, len(problems), batch_size)
    dated = chat_date_variables(chat_date)
    for start in tqdm(batches, desc="eval", leave=False, disable=not progress):
        chunk = problems[start:start + batch_size]
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            rollout = generate(model, encode_prompts(tokenizer, task, chunk, dated), 1, max_new_tokens, eos, pad,
                               stop_checker=stop_checker, greedy=True)
        texts, rewards = score_rollout(task, chunk, tokenizer, rollout, stop_checker.stop_strings)
        for problem, text, reward, length in zip(chunk, texts, rewards, rollout.lengths.tolist()):
            records.append({"level": problem.level, "index": problem.index, "completion": text,
                            "reward": float(reward), "correct": task.is_correct(reward),
                            "formatted": bool(reward >= task.format_reward - 1e-9), "length": length})
    model.train(was_training)
    return summarize(task, records), records


def evaluate_sharded(model, tokenizer, task, problems, max_new_tokens: int, stop_checker: StopChecker,
                     dist_info: DistInfo, autocast=None, chat_date: str | None = None) -> tuple[dict, list[dict]]:
    """`evaluate` with each torchrun rank decoding its contiguous share of `problems` (a 4-rank evaluation takes
    about a quarter of the time); the records are gathered in problem order on every rank, so the summary and
    the records are one process's. Without torchrun it is `evaluate`."""
    _, records = evaluate(model, tokenizer, task, dist_info.shard(problems), max_new_tokens, stop_checker,
                          autocast=autocast, progress=dist_info.is_main, chat_date=chat_date)
    records = gather_lists(records, dist_info)
    return summarize(task, records), records


def summarize(task, records: list[dict]) -> dict:
    """Per-level accuracy, mean reward, format rate and mean length of scored records."""
    by_level = defaultdict(list)
    for r in records:
        by_level[r["level"]].append(r)
    names = task.level_names()
    summary = {}
    for level in sorted(by_level):
        rows = by_level[level]
        summary[names[level] if level < len(names) else f"L{level}"] = {
            "accuracy": float(np.mean([r["correct"] for r in rows])),
            "reward": float(np.mean([r["reward"] for r in rows])),
            "format_rate": float(np.mean([r["formatted"] for r in rows])),
            "length": float(np.mean([r["length"] for r in rows])),
            "n": len(rows),
        }
    return summary


@torch.no_grad()
def sampled_pass_at_k(model, tokenizer, task, problems, ks: list[int], samples: int, max_new_tokens: int,
                      stop_checker: StopChecker, dist_info: DistInfo, rows_per_call: int, seed: int, autocast,
                      chat_date: str | None = None) -> dict:
    """Unbiased pass@k per level name from `samples` completions per problem at temperature 1 (passk.pass_at_k).

    Returns {level name: {"pass@k": mean over the level's problems for each k, "sample_accuracy": c/n}}.
    The problems go in chunks of rows_per_call // samples prompts; chunk j's noise comes from its own generator
    seeded (seed, j), and the ranks take contiguous shares of the chunks, so the counts are the same for any
    number of ranks, and the training run's own random streams are never touched.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, dated = eos_token_ids(tokenizer, model), chat_date_variables(chat_date)
    per_call = max(1, rows_per_call // samples)
    chunks = [(j, problems[s:s + per_call]) for j, s in enumerate(range(0, len(problems), per_call))]
    counts = []  # (level, correct samples) per problem, this rank's chunks in order
    for j, chunk in dist_info.shard(chunks):
        generator = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
        with autocast():
            rollout = generate(model, encode_prompts(tokenizer, task, chunk, dated), samples, max_new_tokens, eos,
                               tokenizer.pad_token_id, stop_checker=stop_checker, temperature=1.0,
                               generator=generator)
        _, rewards = score_rollout(task, chunk, tokenizer, rollout, stop_checker.stop_strings)
        correct = np.array([task.is_correct(r) for r in rewards]).reshape(len(chunk), samples).sum(axis=1)
        counts += [(problem.level, int(c)) for problem, c in zip(chunk, correct)]
    model.train(was_training)
    by_level, names = defaultdict(list), task.level_names()
    for level, c in sorted(gather_lists(counts, dist_info), key=lambda pair: pair[0]):  # stable: problem order
        by_level[names[level]].append(c)
    return pass_at_k_by_level(by_level, samples, ks)
