"""One full GRPO training step, timed phase by phase: rollout, reward, reference log-probs, update.

The step is assembled from the real code, in train.py's order: LevelSampler -> encode_prompts -> rollout.generate
-> score_rollout -> compute_advantages -> update.policy_update (whose reference pass, with --beta > 0, is a
models.Reference from frozen_copy). The columns, all in the same run, differ in the sampler and the update:
  before       the step before issue 3: the sampler as it was (e2h_min/rollout.py at --old-commit, read with
               `git show` and imported from a temporary file; skipped with a note when git or that commit is not
               at hand) and the update as it was: every sample, whole prompt + completion rows, micro-batches cut
               by rows only (--no-share-prompt-forward --micro-batch-tokens 0 --no-skip-zero-advantage)
  lean+whole   today's sampler, the update as before
  lean+shared  today's sampler and update, but every sample run (--no-skip-zero-advantage)
  hf           generate(decoder="hf"): the generic sampler, one model(...) call per token with a transformers
               DynamicCache; today's update
  lean         what train.py runs: generate(decoder="auto") (the lean in-place KV-cache decoder) and today's
               update (zero-advantage samples skipped, each prompt run once, micro-batches under a token budget)
The optimizer is fused AdamW (as train.py) in every column, so "before" is slightly faster than it really was.

Protocol: one warm-up step per column, then the policy and AdamW state are snapshotted and restored before every
timed step, so each column runs from the same weights on the same prompts and seed. Timed steps alternate the
columns (load changes hit them all); medians are reported. Phases:
  rollout    encode_prompts + generate (+ the token/log-prob lists train.py builds)
  reward     score_rollout (decode + grade) + group advantages
  reference  the reference model's log-prob passes inside policy_update (0 with --beta 0: no reference model)
  update     the rest of policy_update: forward + backward + clip + AdamW step

Model FLOPs (the MFU convention: useful work only, not padding, recomputation or finished rows still in the batch),
counted for the work each column's algorithm does: a column that skips work has fewer FLOPs, not a higher MFU.
N_t = weights of the Linear layers of the trunk, N_h = LM-head weights (counted even when tied to the embedding),
A = 4 * layers * heads * head_dim (one query's QK^T and AV against one key). Per row with prompt length p and
completion length n (S = p + n):
  rollout   prefill (once per prompt)  2 N_t p + 2 N_h + A p(p+1)/2
            decode (n - 1 fed tokens)  sum_j [2 N_t + 2 N_h + A (p + j + 1)],  j = 0 .. n-2
  reference forward, whole layout      2 N_t S + 2 N_h n + A S(S+1)/2
            shared-prompt layout       per prompt 2 N_t (p-1) + A (p-1)p/2, per row sum_j [2 N_t + 2 N_h + A (p+j)]
  update    forward + backward         3 x the forward figure, over the rows it runs (batching.samples_to_run)
The matmul terms match torch.utils.flop_counter.FlopCounterMode on completion_logprobs exactly (forward, and
forward + backward, which adds the LM head's checkpoint recompute, 2 N_h n, when the logits are big enough to be
checkpointed; that recompute is not model FLOPs).
MFU = model FLOPs / step seconds / peak, peak = a large fp32 matmul timed on the same device and threads (on CUDA
also a bf16 one, since training runs under bf16 autocast there).
Beside the speed-ups, each column's update (its reference and update phases: model FLOPs / their seconds) as a
share of the assumed peak (bench/limits.py: a GPU's dense bf16 datasheet figure; on a CPU threads x clock x 32 or 64
fp32 FLOP/cycle by its vector units; --peak-flops GFLOP/s replaces it) and of the measured matmul peaks (the practical limit on a shared
machine).

    python bench/step.py                          # CPU, 1 thread, the demo settings
    python bench/step.py --beta 0.001 --steps 5   # with a reference model
    python bench/step.py --device cuda

The last line is `step_speedup X.XX`: median step seconds before issue 3 / now (hf / now without the old column).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (seed_step: the trainer's own step code)
from bench.limits import Limit, assumed_flops, beats_assumed, describe, matmul_peak, model_shape, share  # noqa: E402
from e2h_min.errors import OneLineErrorParser, UserError, at_least  # noqa: E402
from e2h_min.run.config import schedule_params  # noqa: E402
from e2h_min.run.presets import parse_config  # noqa: E402
from e2h_min.rl.curriculum import LevelSampler  # noqa: E402
from e2h_min.engine.decoders import lean_decoder_unsupported_reason  # noqa: E402
from e2h_min.rl.scoring import encode_prompts, eos_token_ids, score_rollout  # noqa: E402
from e2h_min.engine.logprobs import pack_micro_batches  # noqa: E402
from e2h_min.rl.update import policy_update  # noqa: E402
from e2h_min.engine.batching import samples_to_run, shared_prompts_for  # noqa: E402
from e2h_min.rl.advantages import compute_advantages  # noqa: E402
from e2h_min.engine.models import Reference, frozen_copy, load_model, load_tokenizer, pick_device  # noqa: E402
from e2h_min.engine.sampler import StopChecker, generate  # noqa: E402
from e2h_min.tasks import make_task  # noqa: E402

PHASES = ("rollout", "reward", "reference", "update")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall-clock seconds accumulated inside `with timer:` blocks (device synchronised at both ends).

    Used as a Reference's context, it times exactly the reference model's passes inside policy_update.
    Example: t = PhaseTimer(cpu); with t: work(); t.seconds -> seconds spent in work()
    """

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._start = device, 0.0, 0.0

    def __enter__(self):
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def load_old_sampler(commit: str):
    """e2h_min/rollout.py as of `commit` (today e2h_min/engine/sampler.py), imported as a module of its own, with
    the e2h_min/decoders.py of that commit where it had one (registered as `e2h_min.decoders`, the name it imports);
    (None, why) when unavailable."""
    sources = {}
    for path in ("e2h_min/decoders.py", "e2h_min/rollout.py"):
        try:
            sources[path] = subprocess.run(["git", "-C", str(ROOT), "show", f"{commit}:{path}"], check=True,
                                           capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            if path.endswith("rollout.py"):
                return None, f"git show {commit}:{path} failed ({str(exc).strip()[:120]})"
    module = None
    with tempfile.TemporaryDirectory() as folder:
        for path, source in sources.items():
            name = "e2h_min.decoders" if path.endswith("decoders.py") else f"e2h_rollout_{commit}"
            file = Path(folder) / f"{Path(path).stem}.py"
            file.write_text(source)
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # dataclasses look their module up there; rollout.py imports decoders
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # an old file that no longer imports: the bench runs without that column
                del sys.modules[name]
                return None, f"importing {path} failed ({type(exc).__name__}: {str(exc)[:120]})"
    return module, None


def step_flops(shape: dict, prompt_lengths: list[int], group: int, completion_lengths: list[int],
               with_reference: bool, run: list[int], shared: bool) -> dict:
    """Model FLOPs of one step's phases (formulas in the module docstring); reference 0 without a reference model.

    prompt_lengths: P distinct prompts; completion_lengths: N = P * group, row i from prompt i // group.
    run: the rows the update runs (batching.samples_to_run); shared: the update uses the shared-prompt layout.
    The reference pass runs every row (a KL term in the loss means no row is skipped).
    Example: N_t = 10, N_h = 2, A = 0, one prompt of 3 tokens, G = 1, one completion of 2 tokens ->
             rollout 2*10*3 + 2*2 + (2*10 + 2*2) * 1 = 88; whole layout: reference 2*10*5 + 2*2*2 = 108,
             update 324; shared layout: reference 2*10*2 + (2*10 + 2*2)*2 = 88, update 264.
    """
    nt, nh, a = shape["n_trunk"], shape["n_head"], shape["attention"]
    rollout = sum(2 * nt * p + 2 * nh + a * p * (p + 1) / 2 for p in prompt_lengths)
    for i, n in enumerate(completion_lengths):
        p, fed = prompt_lengths[i // group], max(0, n - 1)
        rollout += fed * (2 * nt + 2 * nh) + a * (fed * (p + 1) + fed * (fed - 1) / 2)

    def forward(rows: list[int]) -> float:
        if not shared:  # every row: its whole prompt + completion
            return sum(2 * nt * (p + n) + 2 * nh * n + a * (p + n) * (p + n + 1) / 2
                       for p, n in ((prompt_lengths[i // group], completion_lengths[i]) for i in rows))
        prompts = {i // group for i in rows}  # each prompt minus its last token, once
        total = sum(2 * nt * (prompt_lengths[q] - 1) + a * (prompt_lengths[q] - 1) * prompt_lengths[q] / 2
                    for q in prompts)
        for i in rows:  # suffix token j attends to p + j keys
            p, n = prompt_lengths[i // group], completion_lengths[i]
            total += (2 * nt + 2 * nh) * n + a * (n * p + n * (n - 1) / 2)
        return total

    every_row = list(range(len(completion_lengths)))
    return {"rollout": rollout, "reference": forward(every_row) if with_reference else 0.0,
            "update": 3 * forward(run)}


def run_step(ctx: dict, variant: dict, index: int) -> dict:
    """One GRPO step as train.py runs it, with `variant`'s sampler; returns seconds per phase and the lengths."""
    cfg, device, policy = ctx["cfg"], ctx["device"], ctx["policy"]
    G = cfg.num_generations
    train.seed_step(cfg.seed, 0, index, ctx["generator"])
    sampler = LevelSampler(ctx["task"], cfg.schedule, cfg.total_steps, seed=cfg.seed + index, **schedule_params(cfg))
    problems = sampler.sample(ctx["curriculum_step"], cfg.prompts_per_step)
    seconds = {}

    with PhaseTimer(device) as t:
        prompt_ids = encode_prompts(ctx["tokenizer"], ctx["task"], problems)
        policy.eval()
        with ctx["autocast"]():
            rollout = variant["generate"](policy, prompt_ids, G, cfg.max_new_tokens, ctx["eos"], ctx["pad"],
                                          stop_checker=variant["stop_checker"], temperature=cfg.temperature,
                                          generator=ctx["generator"], **variant["options"])
        policy.train()
        completions = rollout.completion_token_lists()
        sampler_logprobs = [lp[:len(c)].tolist() for lp, c in zip(rollout.logprobs, completions)]
    seconds["rollout"] = t.seconds

    with PhaseTimer(device) as t:
        _, rewards = score_rollout(ctx["task"], problems, ctx["tokenizer"], rollout,
                                   variant["stop_checker"].stop_strings)
        advantages = compute_advantages(cfg.advantage, torch.tensor(rewards, dtype=torch.float64), G,
                                        cfg.scale_rewards).float()
    seconds["reward"] = t.seconds

    reference_timer = PhaseTimer(device)
    reference = (Reference(ctx["reference_model"], lambda: reference_timer) if ctx["reference_model"] is not None
                 else None)
    update_cfg = dataclasses.replace(cfg, **variant["update"])
    with PhaseTimer(device) as t:
        policy_update(policy, reference, ctx["optimizer"], [p for p in prompt_ids for _ in range(G)],
                      completions, advantages, sampler_logprobs, update_cfg, device, ctx["autocast"])
    seconds["reference"] = reference_timer.seconds
    seconds["update"] = t.seconds - reference_timer.seconds
    seconds["step"] = sum(seconds[k] for k in PHASES)
    lengths = [len(c) for c in completions]
    return {"seconds": seconds, "tokens": sum(lengths), "prompt_tokens": [len(p) for p in prompt_ids],
            **update_work(ctx["shape"], prompt_ids, G, completions, advantages, update_cfg, policy,
                          with_reference=reference is not None),
            "mean_reward": float(np.mean(rewards))}


def update_work(shape: dict, prompt_ids: list[list[int]], group: int, completions: list[list[int]], advantages, cfg,
                policy, with_reference: bool) -> dict:
    """Model FLOPs per phase ("flops") and (token positions the update's forward runs on, the same with padding)
    ("update_tokens") for one iteration, read off the batches update.policy_update packs for this config.

    Only the samples batching.samples_to_run keeps. Whole-sequence layout: each one's prompt + completion, padded
    per micro-batch. Shared-prompt layout: their distinct prompts minus the last token (padded to the longest),
    then each sample's completion-length suffix.
    """
    rows = [p for p in prompt_ids for _ in range(group)]
    active = samples_to_run(advantages, cfg.skip_zero_advantage, kl_in_loss=with_reference and not cfg.kl_in_reward)
    shared = shared_prompts_for(policy, rows, cfg, active)
    real = int(shared.prefix_mask.sum()) if shared is not None else 0
    padded = shared.prefix_mask.numel() if shared is not None else 0
    packed = pack_micro_batches(rows, completions, cfg.micro_batch_size, cfg.micro_batch_tokens, shared, "cpu",
                                active) if active else []
    for _, batch in packed:  # a suffix row feeds its completion length; a whole row its prompt + completion
        real += int(batch["completion_mask" if shared is not None else "attention_mask"].sum())
        padded += batch["input_ids"].numel()
    flops = step_flops(shape, [len(p) for p in prompt_ids], group, [len(c) for c in completions], with_reference,
                       active, shared is not None)
    return {"flops": flops, "update_tokens": (real, padded), "update_rows": len(active)}


# The update before issue 3: every sample, whole sequences, micro-batches cut by rows only.
WHOLE_SEQUENCE_UPDATE = {"share_prompt_forward": False, "micro_batch_tokens": 0, "skip_zero_advantage": False}


def build_variants(args, tokenizer, cfg, device, policy) -> tuple[list[dict], list[str]]:
    """The columns: the step before issue 3, the lean sampler with the old update, hf and lean with the new one."""
    stops = [cfg.stop] if cfg.stop else []
    checker = StopChecker(tokenizer, stops, device)
    lean_why_not = lean_decoder_unsupported_reason(policy)
    auto_label = "lean" if lean_why_not is None else "auto->hf"
    lean = {"generate": generate, "stop_checker": checker, "options": {"decoder": "auto"}}
    variants, notes = [], []
    old, why = load_old_sampler(args.old_commit) if args.old_commit else (None, "--old-commit ''")
    if old is not None:
        variants.append({"name": "before", "generate": old.generate, "options": {},
                         "stop_checker": old.StopChecker(tokenizer, stops, device), "update": WHOLE_SEQUENCE_UPDATE})
        notes.append(f"before: the step before issue 3: e2h_min/rollout.py as of commit {args.old_commit} (imported "
                     "via git show) and the update as it was (--no-share-prompt-forward --micro-batch-tokens 0 "
                     "--no-skip-zero-advantage)")
    else:
        notes.append(f"before: skipped ({why})")
    variants += [
        {"name": f"{auto_label}+whole", **lean, "update": WHOLE_SEQUENCE_UPDATE},
        {"name": f"{auto_label}+shared", **lean, "update": {"skip_zero_advantage": False}},
        {"name": "hf", "generate": generate, "stop_checker": checker, "options": {"decoder": "hf"}, "update": {}},
        {"name": auto_label, **lean, "update": {}},
    ]
    notes += [f"{auto_label}+whole: today's sampler, the update as before issue 3",
              f"{auto_label}+shared: today's sampler and update, but every sample run (--no-skip-zero-advantage)",
              "hf: generate(decoder='hf'), the generic sampler (model(...) per token, DynamicCache), today's update",
              f"{auto_label}: generate(decoder='auto') and today's update, what train.py runs (shared-prompt forward, "
              f"--micro-batch-size {cfg.micro_batch_size} --micro-batch-tokens {cfg.micro_batch_tokens})"]
    if lean_why_not is not None:
        notes.append(f"auto: the lean decoder does not support this model ({lean_why_not}); auto runs the generic path")
    return variants, notes


def main() -> None:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="hub id, local directory or alias (default: the tiny model)")
    parser.add_argument("--steps", type=at_least(1), default=5, help="timed steps per column, after one warm-up step")
    parser.add_argument("--threads", type=at_least(1), default=1,
                        help="torch CPU threads (default 1: on a busy 2-core machine 2 threads are erratic)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient; > 0 adds the reference model")
    parser.add_argument("--prompts", type=at_least(1), default=16, help="distinct prompts per step")
    parser.add_argument("--generations", type=at_least(1), default=8, help="G, completions per prompt")
    parser.add_argument("--max-new-tokens", type=at_least(1), default=64)
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: the model's preset / config")
    parser.add_argument("--micro-batch-tokens", type=int, default=None, help="default: the model's preset / config")
    parser.add_argument("--curriculum-step", type=int, default=None,
                        help="curriculum step whose level mix the prompts follow (default: the middle of the "
                             "demo run, total_steps // 2)")
    parser.add_argument("--old-commit", default="7c0f032",
                        help="commit of the pre-issue-3 sampler for the third column ('' to skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak-flops", type=float, default=None, metavar="GFLOP/s",
                        help="the assumed peak (default: a GPU's dense bf16 datasheet figure; on CPU threads x clock "
                             "x 32 or 64 fp32 FLOP/cycle, bench/limits.py)")
    args = parser.parse_args()

    try:
        cfg = parse_config(["--model", args.model, "--beta", str(args.beta), "--prompts-per-step", str(args.prompts),
                            "--num-generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
                            *(["--micro-batch-size", str(args.micro_batch_size)] if args.micro_batch_size else []),
                            *(["--micro-batch-tokens", str(args.micro_batch_tokens)]
                              if args.micro_batch_tokens is not None else []),
                            "--seed", str(args.seed),
                            "--device", args.device])
        torch.set_num_threads(args.threads)
        device = pick_device(cfg.device)
        tokenizer = load_tokenizer(cfg.model)
        policy = load_model(cfg.model, device)
    except UserError as exc:
        parser.error(str(exc))  # one line, exit 2

    def autocast():  # as in train.py: bf16 compute on CUDA, fp32 elsewhere
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    ctx = {"cfg": cfg, "device": device, "policy": policy, "tokenizer": tokenizer, "autocast": autocast,
           "task": make_task(cfg.task, seed=cfg.seed, data=cfg.data),
           "generator": torch.Generator(device=device), "eos": eos_token_ids(tokenizer, policy),
           "pad": tokenizer.pad_token_id, "shape": model_shape(policy),
           "reference_model": frozen_copy(policy).model if cfg.beta > 0 else None,
           "curriculum_step": cfg.total_steps // 2 if args.curriculum_step is None else args.curriculum_step,
           "optimizer": torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr,
                                          weight_decay=cfg.weight_decay,
                                          fused=device.type in ("cpu", "cuda") or None)}  # as train.py, every column
    variants, notes = build_variants(args, tokenizer, cfg, device, policy)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, device {device}, CPU threads {torch.get_num_threads()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    n_params = sum(p.numel() for p in policy.parameters())
    print(f"model {cfg.model}: {n_params / 1e6:.2f}M params (N_t {ctx['shape']['n_trunk'] / 1e6:.3f}M trunk matmul "
          f"weights, N_h {ctx['shape']['n_head'] / 1e6:.3f}M LM head) | task {cfg.task} | {cfg.prompts_per_step} "
          f"prompts x G={cfg.num_generations}, max_new_tokens {cfg.max_new_tokens}, micro_batch_size "
          f"{cfg.micro_batch_size}, beta {cfg.beta} ({'reference model' if cfg.beta > 0 else 'no reference model'}),"
          f" curriculum step {ctx['curriculum_step']} of {cfg.total_steps}")
    for note in notes:
        print("  " + note)

    # Warm-up, then every timed step starts from this snapshot (weights + Adam moments after the warm-up steps).
    for v in variants:
        run_step(ctx, v, index=0)
    policy_state = copy.deepcopy(policy.state_dict())
    optimizer_state = copy.deepcopy(ctx["optimizer"].state_dict())
    results = {v["name"]: [] for v in variants}
    for index in range(1, args.steps + 1):
        for v in variants:
            policy.load_state_dict(policy_state)
            ctx["optimizer"].load_state_dict(optimizer_state)
            results[v["name"]].append(run_step(ctx, v, index))

    peaks = {"fp32": matmul_peak(device, torch.float32, 2048 if device.type == "cpu" else 8192)}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, 8192)
    report(results, peaks, args.steps, assumed_flops(device, args.peak_flops))


def report(results: dict, peaks: dict, steps: int, assumed: Limit | None = None) -> None:
    """Median seconds per phase and column, model FLOPs, achieved FLOP/s and MFU, speed-ups (last line hf/lean)."""
    names = list(results)

    def row(label: str, value, fmt: str = "16.3f") -> None:
        """One table line: the median over timed steps of value(step result), per column."""
        print(f"{label:24s}" + "".join(format(statistics.median(value(r) for r in results[n]), fmt) for n in names))

    def rate(phase: str):
        return lambda r: r["flops"][phase] / r["seconds"][phase] / 1e9 if r["seconds"][phase] > 0 else 0.0

    print(f"\nmedian of {steps} timed steps per column (each after one warm-up step); seconds")
    print(f"{'':24s}" + "".join(f"{n:>16s}" for n in names))
    for phase in (*PHASES, "step"):
        row(phase, lambda r: r["seconds"][phase])
    for phase in PHASES:
        row(f"  share {phase} %", lambda r: 100 * r["seconds"][phase] / r["seconds"]["step"], "16.0f")
    first = results[names[0]][0]["prompt_tokens"]
    print(f"prompt tokens {min(first)}-{max(first)} (first timed step; every column gets the same prompts)")
    row("generated tokens", lambda r: r["tokens"], "16.0f")
    row("update samples run", lambda r: r["update_rows"], "16.0f")
    row("update tokens real", lambda r: r["update_tokens"][0], "16.0f")
    row("  padded to", lambda r: r["update_tokens"][1], "16.0f")
    row("rollout tokens/s", lambda r: r["tokens"] / r["seconds"]["rollout"], "16.0f")
    row("mean reward", lambda r: r["mean_reward"])
    row("model GFLOP / step", lambda r: sum(r["flops"].values()) / 1e9, "16.2f")
    for phase in ("rollout", "reference", "update"):
        row(f"  {phase} GFLOP/s", rate(phase), "16.2f")
    row("step GFLOP/s", lambda r: sum(r["flops"].values()) / r["seconds"]["step"] / 1e9, "16.2f")
    for kind, peak in peaks.items():
        row(f"MFU vs {kind} peak %", lambda r: 100 * sum(r["flops"].values()) / r["seconds"]["step"] / peak, "16.2f")
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items())
          + " (best of 5 square matmuls, same device and threads)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    step = {n: statistics.median(r["seconds"]["step"] for r in results[n]) for n in names}
    now = names[-1]
    for n in names[:-1]:
        print(f"step speed-up {n} -> {now}: {step[n] / step[now]:.2f}x (median step {step[n]:.3f} s -> "
              f"{step[now]:.3f} s)")
    limits = [assumed] + [Limit(v, f"measured {k} matmul", "") for k, v in peaks.items()]
    print("update (reference + update phases) FLOP/s as a share of the limits; " + describe(assumed, "--peak-flops"))
    note = beats_assumed(max(peaks.values()), assumed)
    if note:
        print("  " + note)
    for n in names:
        flops = statistics.median(r["flops"]["reference"] + r["flops"]["update"] for r in results[n])
        seconds = statistics.median(r["seconds"]["reference"] + r["seconds"]["update"] for r in results[n])
        print(f"  {n:16s} {flops / seconds / 1e9:8.2f} GFLOP/s = {share(flops / seconds, limits)}")
    base = "before" if "before" in step else "hf"
    print(f"step_speedup {step[base] / step[now]:.2f}")


if __name__ == "__main__":
    main()
