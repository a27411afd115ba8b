"""How far each run's policy moved from the reference: exact KL(pi || pi_ref) per completion token.

    python scripts/kl_to_reference.py runs/a runs/b runs/c           # the policies in <run>/final
    python scripts/kl_to_reference.py runs/a --step 20               # <run>/checkpoints/step_000020

The same measurement for every run, whatever its --beta (a run with --beta 0 loads no reference and logs no
KL): the reference is the run's --model (the initial policy, as train.py builds it), the prompts are the first
--problems held-out problems of every level, each run's policy samples --samples completions per prompt at the
run's temperature with a fixed seed, and at every completion position the KL between the two next-token
distributions is summed over the whole vocabulary (no estimator, no sampling noise in the per-position value).
Printed: the mean over completion tokens, i.e. E_pi[sum_t KL_t] / E[tokens]. Full fine-tuning runs only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/kl_to_reference.py`
from e2h_min.analysis.evaluation import held_out_problems
from e2h_min.rl.scoring import encode_prompts, eos_token_ids
from e2h_min.engine.logprobs import pack_sequences
from e2h_min.engine.models import load_model, load_tokenizer
from e2h_min.engine.sampler import StopChecker, generate
from e2h_min.tasks import make_task
from e2h_min.errors import OneLineErrorParser, at_least, exit_on_user_error


@torch.no_grad()
def token_kl(policy, reference, prompt_ids: list[list[int]], completions: list[list[int]], temperature: float,
             pad_id: int) -> tuple[float, int]:
    """(sum over completion tokens of KL(pi_t || ref_t) over the full vocabulary, number of tokens)."""
    batch = pack_sequences(prompt_ids, completions, pad_id)
    rows = torch.arange(len(completions))[:, None]
    logp, ref = (torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                   .logits[rows, batch["logit_index"]].float() / temperature, -1)
                 for model in (policy, reference))  # [B, T, V] each
    kl = (logp.exp() * (logp - ref)).sum(-1)  # [B, T]
    mask = batch["completion_mask"]
    return float((kl * mask).sum()), int(mask.sum())


def measure(run_dir: Path, step: int | None, problems_per_level: int, samples: int, seed: int) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())
    if cfg["lora_r"]:
        raise SystemExit(f"error: {run_dir} is a LoRA run; this script measures full fine-tuning runs only")
    policy_dir = run_dir / "final" if step is None else run_dir / "checkpoints" / f"step_{step:06d}"
    device = torch.device("cpu")
    tokenizer = load_tokenizer(cfg["model"])
    policy = load_model(str(policy_dir), device, trainable=False).eval()
    reference = load_model(cfg["model"], device, trainable=False).eval()
    task = make_task(cfg["task"], seed=cfg["seed"], data=cfg["data"])
    prompt_ids = encode_prompts(tokenizer, task, held_out_problems(task, problems_per_level))
    rollout = generate(policy, prompt_ids, samples, cfg["max_new_tokens"], eos_token_ids(tokenizer, policy),
                       tokenizer.pad_token_id, stop_checker=StopChecker(tokenizer, [cfg["stop"]], device),
                       temperature=cfg["temperature"], generator=torch.Generator().manual_seed(seed))
    completions = rollout.completion_token_lists()
    rows = [p for p in prompt_ids for _ in range(samples)]
    total, tokens = 0.0, 0
    for start in range(0, len(rows), 64):
        kl, n = token_kl(policy, reference, rows[start:start + 64], completions[start:start + 64],
                         cfg["temperature"], tokenizer.pad_token_id)
        total, tokens = total + kl, tokens + n
    return {"run": str(run_dir), "policy": str(policy_dir), "beta": cfg["beta"], "kl_in_reward": cfg["kl_in_reward"],
            "kl_estimator": cfg["kl_estimator"], "kl_per_token": total / max(tokens, 1), "tokens": tokens}


@exit_on_user_error
def main() -> None:
    parser = OneLineErrorParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: <run>/final)")
    parser.add_argument("--problems", type=at_least(1), default=50, help="held-out problems per level")
    parser.add_argument("--samples", type=at_least(1), default=4, help="completions per problem")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for run in args.runs:  # every run is checked before the first is measured
        if not (run / "config.json").is_file():
            parser.error(f"{run}: no config.json, so not a train.py run directory; pass a run's folder")
    torch.set_num_threads(1)
    for run in args.runs:
        r = measure(run, args.step, args.problems, args.samples, args.seed)
        print(f"{r['run']}: KL(pi||ref) per token {r['kl_per_token']:.5f} over {r['tokens']} tokens "
              f"(beta {r['beta']}, kl_in_reward {r['kl_in_reward']}, estimator {r['kl_estimator']})")


if __name__ == "__main__":
    main()
