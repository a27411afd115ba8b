"""Our GRPO step against TRL's GRPOTrainer: same tiny model, prompts, reward and lr schedule, steps alternated.

    /work/trl-venv/bin/python bench/vs_trl.py                    # demo and paper settings, 8 timed steps each
    /work/trl-venv/bin/python bench/vs_trl.py --settings paper --steps 12

trl is an optional dependency (not in requirements.txt, not in CI). Install it in a virtual environment of its own
with this project's pinned libraries, so both sides run on the same torch / transformers / peft:
    python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install -r requirements.txt trl==1.16.0
and run this script with that environment's python.

The same on both sides: the embedded tiny model (e2h_min/assets/tiny-countdown, fp32, CPU, one torch thread), the
demo preset's settings (16 prompts x 8 samples, 64 new tokens, T = 1, lr 1e-4 with 5 warm-up steps and a cosine
over 200 steps, AdamW, clip 1.0, epsilon 0.2, one update per rollout, loss "grpo", advantages scaled by the group
std), the prompts of each step (our curriculum sampler's draws, rendered by the chat template; TRL gets them as text
in that order, shuffle_dataset=False), and the reward (the task's own grader on the text cut after "</answer>").
  demo   beta 0: no reference model
  paper  beta 0.001, k3 in the loss (both sides' in-loss KL estimator), a frozen reference copy
Each side otherwise runs its defaults: TRL samples with model.generate and stops at EOS only (a stop string needs a
tokenizer passed to generate, which TRL does not), so the mean completion length of each side is printed.

Protocol: two worker processes (this file with --worker ours / trl), set up before anything is timed. The parent
lets one step run at a time, alternating which side goes first, so the two never run together and a change of load
on a shared machine hits both. A step: ours from the rollout's start to the end of the step's logging (train.py's
own loop through train.main, evaluation and checkpoints off); TRL from on_step_begin to on_step_end (generation,
rewards, reference log-probs, loss, backward, optimizer step). Step 1 of each side is a warm-up, not counted.
Printed: per-step seconds, the medians and their ratio (TRL / ours), the median of the per-step ratios (paired),
peak RSS, mean completion length, and whether both sides saw the same prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"demo": ["--beta", "0"], "paper": ["--beta", "0.001"]}
OUR_FLAGS = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--eval-every", "0", "--eval-problems", "1",
             "--eval-max-new-tokens", "8", "--save-every", "0", "--log-completions-every", "0"]
TAG = "@@ "  # protocol lines on a worker's stdout; everything else there is the trainer's own output


def prompts_hash(problems: list[tuple[int, int]]) -> str:
    return hashlib.sha1(json.dumps(problems).encode()).hexdigest()[:10]


def say(kind: str, **fields) -> None:
    print(TAG + json.dumps({"kind": kind, **fields}), flush=True)


def wait_for_go() -> bool:
    """Block until the parent says go (True) or stop (False)."""
    return sys.stdin.readline().strip() == "go"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Finished(BaseException):
    """Raised from inside train.py's loop once the parent stops asking for steps."""


def our_worker(settings: str, out: Path) -> None:
    """train.main on the tiny model; each step waits for the parent at its rollout and reports after its logging."""
    sys.path.insert(0, str(ROOT))
    import train
    from e2h_min.run.bookkeeping import RunBook

    original_roll_out, original_log_step = train.roll_out, RunBook.log_step
    state = {"start": 0.0, "hash": ""}

    def roll_out(collect, draw, *args):
        if not wait_for_go():
            raise Finished
        state["hash"] = prompts_hash([(p.level, p.index) for p in draw])
        state["start"] = time.perf_counter()
        return original_roll_out(collect, draw, *args)

    def log_step(book, *args):
        row = original_log_step(book, *args)
        say("step", seconds=time.perf_counter() - state["start"], prompts=state["hash"],
            mean_length=row["completion_length_mean"], peak_rss_mib=peak_rss_mib())
        return row

    train.roll_out, RunBook.log_step = roll_out, log_step
    say("ready")
    try:
        train.main(OUR_FLAGS + SETTINGS[settings] + ["--out-dir", str(out / "ours")])
    except Finished:
        pass


def trl_worker(settings: str, out: Path, steps: int) -> None:
    """TRL's GRPOTrainer on the same model, prompts, reward and schedule (module docstring)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import train
    from e2h_min.run.presets import resolve_config
    from e2h_min.rl.scoring import cut_at_stop
    from e2h_min.engine.models import load_tokenizer, resolve_model_name

    torch.set_num_threads(1)
    cfg, _, _ = resolve_config(OUR_FLAGS + SETTINGS[settings] + ["--out-dir", str(out / "unused")])
    task, sampler = train.load_task(cfg)  # our curriculum sampler, drawing exactly as train.py's loop does
    tokenizer = load_tokenizer(cfg.model)
    rows = []
    for step in range(steps):
        for problem in sampler.sample(step, cfg.prompts_per_step):
            text = tokenizer.apply_chat_template(task.messages(problem), tokenize=False, continue_final_message=True)
            rows.append({"prompt": text, "level": problem.level, "index": problem.index})
    stops = [cfg.stop] if cfg.stop else []
    state = {"start": 0.0, "seconds": None, "hash": "", "split": sampler.split}

    def countdown_reward(prompts, completions, level, index, **kwargs):
        state["hash"] = prompts_hash([(lv, ix) for lv, ix in zip(level[::cfg.num_generations],
                                                                  index[::cfg.num_generations])])
        return [task.score(task.problem(lv, ix, state["split"]), cut_at_stop(text, stops))
                for text, lv, ix in zip(completions, level, index)]

    class Lockstep(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if not wait_for_go():
                raise Finished
            state["start"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            state["seconds"] = time.perf_counter() - state["start"]

        def on_log(self, args, st, control, logs=None, **kw):
            if state["seconds"] is not None and logs and "completions/mean_length" in logs:
                say("step", seconds=state["seconds"], prompts=state["hash"],
                    mean_length=logs["completions/mean_length"], peak_rss_mib=peak_rss_mib())
                state["seconds"] = None

    config = GRPOConfig(
        output_dir=str(out / "trl"), use_cpu=True, bf16=False, seed=cfg.seed, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        shuffle_dataset=False, per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations,
        gradient_accumulation_steps=1, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
        beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
        num_iterations=cfg.num_iterations, learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps, max_steps=cfg.total_steps, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_name(cfg.model), dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=countdown_reward, args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Lockstep()])
    say("ready")
    try:
        trainer.train()
    except Finished:
        pass


class Worker:
    """One side's process: protocol lines from its stdout, its other output to a log file."""

    def __init__(self, side: str, settings: str, steps: int, out: Path):
        self.side, self.log = side, out / f"{side}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log_file = open(self.log, "w")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker", side, "--settings", settings, "--steps", str(steps),
             "--work", str(out)], cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log_file, text=True)

    def read(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            self.log_file.write(line)
        self.log_file.flush()
        raise SystemExit(f"error: the {self.side} worker ended early; the end of {self.log}:\n"
                         + self.log.read_text()[-3000:])

    def step(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.read()

    def stop(self) -> None:
        try:
            self.process.stdin.write("stop\n")
            self.process.stdin.flush()
            self.process.wait(timeout=120)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log_file.close()


def compare(settings: str, steps: int, out: Path) -> dict:
    """Run both sides step by step, alternating; print the table; return the medians and ratios."""
    workers = {side: Worker(side, settings, steps + 1, out) for side in ("ours", "trl")}
    try:
        for worker in workers.values():
            worker.read()  # "ready": set up, nothing timed yet
        results = {side: [] for side in workers}
        for k in range(steps + 1):  # step 0 is the warm-up
            order = ("ours", "trl") if k % 2 == 0 else ("trl", "ours")
            for side in order:
                results[side].append(workers[side].step())
    finally:
        for worker in workers.values():
            worker.stop()
    timed = {side: runs[1:] for side, runs in results.items()}
    median = {side: statistics.median(r["seconds"] for r in runs) for side, runs in timed.items()}
    paired = statistics.median(t["seconds"] / o["seconds"] for o, t in zip(timed["ours"], timed["trl"]))
    same_prompts = all(o["prompts"] == t["prompts"] for o, t in zip(results["ours"], results["trl"]))
    print(f"\n== {settings} settings ({' '.join(SETTINGS[settings])}): {steps} timed steps per side after one "
          f"warm-up, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'step':>6s}{'ours s':>10s}{'TRL s':>10s}{'TRL/ours':>10s}{'ours len':>10s}{'TRL len':>10s}")
    for k, (o, t) in enumerate(zip(results["ours"], results["trl"])):
        print(f"{k + 1:>6d}{o['seconds']:>10.3f}{t['seconds']:>10.3f}{t['seconds'] / o['seconds']:>10.2f}"
              f"{o['mean_length']:>10.1f}{t['mean_length']:>10.1f}" + ("   (warm-up)" if k == 0 else ""))
    peak = {side: runs[-1]["peak_rss_mib"] for side, runs in results.items()}
    print(f"median step: ours {median['ours']:.3f} s, TRL {median['trl']:.3f} s -> TRL / ours "
          f"{median['trl'] / median['ours']:.2f}x (paired median {paired:.2f}x); peak RSS ours {peak['ours']:.0f} "
          f"MiB, TRL {peak['trl']:.0f} MiB; same prompts every step: {'yes' if same_prompts else 'NO'}")
    return {"settings": settings, "median_s": median, "ratio": median["trl"] / median["ours"], "paired": paired,
            "peak_rss_mib": peak, "same_prompts": same_prompts}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from e2h_min.errors import OneLineErrorParser

    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", choices=[*SETTINGS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        return our_worker(args.settings, args.work)
    if args.worker == "trl":
        return trl_worker(args.settings, args.work, args.steps)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if importlib.util.find_spec("trl") is None:
        print(f"error: trl is not installed for {sys.executable}; it is optional (not in requirements.txt): "
              f"pip install -r requirements.txt trl==1.16.0 in a separate venv and run this script with its python",
              file=sys.stderr)
        raise SystemExit(2)
    import torch
    import transformers
    import trl

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summaries = []
    for settings in (SETTINGS if args.settings == "both" else [args.settings]):
        with tempfile.TemporaryDirectory() as work:
            summaries.append(compare(settings, args.steps, Path(work)))
    print("\n" + "; ".join(f"{s['settings']}: TRL / ours {s['ratio']:.2f}x (paired {s['paired']:.2f}x)"
                           for s in summaries))


if __name__ == "__main__":
    main()
