"""Training steps that must come out the same on 2 torchrun ranks as in one process (tests/test_distributed.py).

Run as `torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR`, or call `run_all(OUT_DIR)` in one process.
Two kinds of checks, each with a plain SGD optimizer, so a weight change is -lr * (clipped) gradient and the
comparison is of gradients, not of AdamW's normalised steps (which blow float noise on near-zero gradients up
to a full lr-sized step):

- update/<loss>: one `policy_update` on a fixed batch where every advantage of rank 0's half is exactly 0 (its
  groups all had equal rewards) and rank 1's are not, so rank 0 runs no sample at all.
- loop/<variant>: `train.main` for 2 steps of the tiny model, with the rollout and the scores replaced by
  deterministic functions of the prompt (one process and two ranks then see the same samples whatever their
  random generators), and a fixed draw of problems: the first half of each step's prompts (rank 0's share) have
  equal rewards in every group, the second half do not. Everything after the rollout is the real loop:
  advantages over the gathered rewards, --dynamic-sampling redraws and the choice of groups, --drop-zero-std,
  the update, the logged metrics, evaluation and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import sys
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import torch

import train
from e2h_min.rl.curriculum import LevelSampler
from e2h_min.run import bookkeeping
from e2h_min.run import setup as run_setup
from e2h_min.engine import logprobs
from e2h_min.run.config import Config
from e2h_min.engine.distributed import DistInfo, init_distributed
from e2h_min.analysis.evaluation import evaluate_sharded, held_out_problems
from e2h_min.engine.models import frozen_copy, load_model, load_tokenizer
from e2h_min.engine.sampler import Generation, StopChecker
from e2h_min.tasks import make_task

LOOP_ARGS = ["--model", "tiny", "--total-steps", "2", "--prompts-per-step", "4", "--num-generations", "4",
             "--max-new-tokens", "8", "--eval-problems", "2", "--eval-every", "0", "--save-every", "0",
             "--log-completions-every", "0", "--lr", "0.5", "--warmup-steps", "0", "--beta", "0", "--threads", "1"]
LOOP_VARIANTS = {
    "grpo": [],
    "ppo": ["--advantage", "ppo"],
    "kl_in_loss": ["--beta", "0.05"],
    "dynamic_sampling": ["--dynamic-sampling", "--max-resample-rounds", "3"],
    "drop_zero_std": ["--drop-zero-std", "--no-skip-zero-advantage"],
    "fsdp": ["--parallel", "fsdp", "--beta", "0.05"],  # one process: the replicated path (nothing to shard)
    "kl_in_reward": ["--beta", "0.05", "--kl-in-reward"],  # the KL's leave-one-out baseline across ranks
    "scale_batch": ["--scale-rewards", "batch"],  # the batch std over every rank's rewards
    "dr_grpo": ["--loss-type", "dr_grpo"],
}
CHECKPOINTED_LM_HEAD = {"fsdp"}  # variants whose LM-head chunks are recomputed in backward (as a real vocab's)
# FSDP2 with AdamW (its sharded state goes through the checkpoint): uninterrupted, and stopped on every rank
# right after the step-1 checkpoint, then resumed.
RESUME_ARGS = ["--parallel", "fsdp", "--save-every", "1", "--lr", "1e-3"]
UPDATE_LOSSES = ["grpo", "dapo", "dr_grpo"]


class PlainSGD(torch.optim.SGD):
    """Stands in for AdamW (same constructor arguments): the update is -lr * gradient, weight decay off."""

    def __init__(self, params, lr, weight_decay=0.0, fused=None):
        super().__init__(params, lr=lr)


def _digest(tokens) -> int:
    return zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())


class FixedDraws(LevelSampler):
    """Level-0 test problems in a fixed order, whatever p_t says: the k-th problem drawn at step t is problem
    20 t + k (a function of the step, so a resumed run draws the same). Problems whose index % 20 is in EQUAL
    score the same for every sample; the pattern puts them in the first half of a 4-prompt step (rank 0's
    share) and mixes them into the --dynamic-sampling redraws (which then shard unevenly)."""

    EQUAL = {0, 1, 4, 5, 7}

    def sample(self, step: int, n: int):
        if getattr(self, "step", None) != step:
            self.step, self.drawn = step, 0
        problems = [self.task.problem(0, 20 * step + self.drawn + k, "test") for k in range(n)]
        self.drawn += n
        return problems


def fake_generate(model, prompt_ids, num_samples, max_new_tokens, eos_token_ids, pad_id, **_):
    """Completions that depend only on (prompt, sample index): the same on any rank and in any batch."""
    vocab = model.config.vocab_size
    rows = []
    for prompt in prompt_ids:
        for j in range(num_samples):
            g = torch.Generator().manual_seed(_digest(prompt) * 8 + j)
            length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
            rows.append(torch.randint(10, vocab, (length,), generator=g).tolist())
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    logprobs = -0.1 * mask.float()  # what a sampler would report; only logprob_mismatch reads it
    finished = torch.tensor([len(r) < max_new_tokens for r in rows])
    return Generation(prompt_ids=prompt_ids, num_samples=num_samples, completion_ids=ids, completion_mask=mask,
                   logprobs=logprobs, finished=finished)


def fake_score(task, problems, tokenizer, rollout, stop_strings=()):
    """Equal rewards in the groups of FixedDraws.EQUAL problems; otherwise a reward that depends on the sample."""
    completions = rollout.completion_token_lists()
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = [0.1 if problems[i // rollout.num_samples].index % 20 in FixedDraws.EQUAL
               else float(_digest(c) % 3) / 2 for i, c in enumerate(completions)]
    return texts, np.array(rewards, dtype=np.float64)


@contextlib.contextmanager
def deterministic_rollouts(sgd: bool = True):
    with mock.patch.object(run_setup, "LevelSampler", FixedDraws), mock.patch.object(train, "generate", fake_generate), \
            mock.patch.object(train, "score_rollout", fake_score), \
            mock.patch.object(torch.optim, "AdamW", PlainSGD if sgd else torch.optim.AdamW):
        yield


def run_resume(out: Path, dist_info: DistInfo) -> None:
    """The FSDP2 run uninterrupted (out/resume_full) and stopped after its step-1 checkpoint, then resumed
    (out/resume_broken); rank 0 also writes the memory figures the run logged (out/fsdp_memory.json)."""
    real_barrier, real_memory = bookkeeping.barrier, bookkeeping.log_sharded_memory
    broken = out / "resume_broken"

    def stop_after_first_checkpoint(info):  # checkpoint() ends in this barrier, on every rank
        real_barrier(info)
        if (broken / "checkpoints" / "step_000001").exists() and not (broken / "stopped").exists():
            real_barrier(info)  # every rank has seen the checkpoint before rank 0 marks it
            if info.is_main:
                (broken / "stopped").touch()
            raise KeyboardInterrupt

    def keep_memory(*args):
        figures = real_memory(*args)
        if dist_info.is_main:
            (out / "fsdp_memory.json").write_text(json.dumps(figures))
        return figures

    with deterministic_rollouts(sgd=False), mock.patch.object(bookkeeping, "log_sharded_memory", keep_memory):
        train.main(LOOP_ARGS + RESUME_ARGS + ["--out-dir", str(out / "resume_full")])
        with mock.patch.object(bookkeeping, "barrier", stop_after_first_checkpoint):
            try:
                train.main(LOOP_ARGS + RESUME_ARGS + ["--out-dir", str(broken)])
            except KeyboardInterrupt:
                pass
        train.main(LOOP_ARGS + RESUME_ARGS + ["--resume", str(broken)])


def run_update(loss_type: str, dist_info: DistInfo) -> dict:
    """One policy_update (SGD, lr 1) on 8 samples; samples 0-3 (rank 0's share on 2 ranks) have advantage 0."""
    from tests.test_train import random_model, sample_batch
    policy = random_model()
    before = [p.detach().clone() for p in policy.parameters()]
    reference = frozen_copy(random_model(seed=5))
    prompts, completions = sample_batch(n=8)
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(3))
    advantages[:4] = 0.0
    mine = dist_info.shard(list(range(8)))
    cfg = Config(micro_batch_size=2, loss_type=loss_type, beta=0.0, max_new_tokens=8, max_grad_norm=1.0,
                 temperature=0.9)
    optimizer = PlainSGD(policy.parameters(), lr=1.0)
    stats = train.policy_update(policy, reference if cfg.beta else None, optimizer, [prompts[i] for i in mine],
                                [completions[i] for i in mine], advantages[mine],
                                [[0.0] * len(completions[i]) for i in mine], cfg, torch.device("cpu"),
                                lambda: torch.autocast("cpu", enabled=False), dist_info)
    return {"stats": stats, "update": [p.detach() - b for p, b in zip(policy.parameters(), before)]}


def run_eval(dist_info: DistInfo) -> dict:
    """Greedy evaluation of the tiny model, each rank on its share of 4 problems per level (5 on 2 ranks with the
    checks' 2 per level would leave the demo model at 0% everywhere: too weak to compare)."""
    task = make_task("countdown", seed=0)
    model, tokenizer = load_model("tiny", torch.device("cpu")), load_tokenizer("tiny")
    summary, records = evaluate_sharded(model, tokenizer, task, held_out_problems(task, 4), 64,
                                        StopChecker(tokenizer, [Config().stop]), dist_info)
    return {"summary": summary, "records": records}


def run_all(out_dir: str, dist_info: DistInfo) -> None:
    out = Path(out_dir)
    results = {f"update/{loss}": run_update(loss, dist_info) for loss in UPDATE_LOSSES}
    results["eval"] = run_eval(dist_info)
    with deterministic_rollouts():
        for name, flags in LOOP_VARIANTS.items():
            threshold = 0 if name in CHECKPOINTED_LM_HEAD else logprobs.CHECKPOINT_LOGITS_BYTES
            with mock.patch.object(logprobs, "CHECKPOINT_LOGITS_BYTES", threshold):
                train.main(LOOP_ARGS + flags + ["--out-dir", str(out / name)])
    if dist_info.enabled:
        run_resume(out, dist_info)
    if dist_info.is_main:
        torch.save(results, out / "updates.pt")


if __name__ == "__main__":
    run_all(sys.argv[1], init_distributed("cpu"))
