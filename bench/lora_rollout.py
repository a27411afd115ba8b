"""LoRA rollouts: why the decoders run peft's adapter layers instead of merging the adapter for each rollout.

    python bench/lora_rollout.py                # Qwen2.5-shape stand-in (tests/real_shape.py), r 32, alpha 64, q/v
    python bench/lora_rollout.py --model tiny   # the embedded model: decode overhead, not the LM head, dominates

1. Drift. Merging B A into W before a rollout and subtracting it afterwards is not the identity in floating
   point: after `--cycles` merge/unmerge pairs, the share of base weights that changed and the largest change,
   in fp32 and in bf16 (a bf16 base, as LoRA on a GPU keeps it), next to the mean |W|.
2. Speed. Greedy rollouts of the LoRA policy on the lean decoder (adapter layers in place) and on the generic
   decoder (one model(...) call per token), same tokens, seconds per call (best of --repeats).
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2h_min.engine.models import peft_building  # noqa: E402
from e2h_min.engine.sampler import generate  # noqa: E402
from e2h_min.errors import OneLineErrorParser, at_least  # noqa: E402
from tests.real_shape import build_qwen_shape  # noqa: E402


def lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: B is random, as after training, not zero
    with peft_building():
        return get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))


def main() -> None:
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-shape", help="qwen-shape (built here), or an alias / directory")
    parser.add_argument("--cycles", type=at_least(1), default=100, help="merge/unmerge pairs")
    parser.add_argument("--layers", type=at_least(1), default=2, help="qwen-shape: decoder layers")
    parser.add_argument("--rows", type=at_least(1), default=16, help="prompts x samples per rollout")
    parser.add_argument("--new-tokens", type=at_least(1), default=64)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from e2h_min.engine.models import resolve_model_name

    if args.model != "qwen-shape" and not (Path(resolve_model_name(args.model)) / "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there (config.json); pass qwen-shape, tiny or a folder")
    with tempfile.TemporaryDirectory() as directory:
        path = build_qwen_shape(directory, layers=args.layers) if args.model == "qwen-shape" else \
            resolve_model_name(args.model)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        policy = lora(copy.deepcopy(base).to(dtype))
        weights = [m.base_layer.weight for m in policy.modules() if hasattr(m, "base_layer")]
        before = [w.detach().clone() for w in weights]
        for _ in range(args.cycles):
            policy.merge_adapter()
            policy.unmerge_adapter()
        changed = sum(int((w != b).sum()) for w, b in zip(weights, before)) / sum(b.numel() for b in before)
        largest = max(float((w.float() - b.float()).abs().max()) for w, b in zip(weights, before))
        mean = sum(float(b.float().abs().sum()) for b in before) / sum(b.numel() for b in before)
        print(f"{str(dtype):15s} after {args.cycles} merge/unmerge: {changed:.1%} of base weights changed, "
              f"largest change {largest:.2e} (mean |W| {mean:.2e})")

    policy = lora(copy.deepcopy(base)).eval()
    prompts = [list(range(10, 90))] * (args.rows // 4)
    tokens, seconds = {}, {}
    for decoder in ("lean", "hf"):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            rollout = generate(policy, prompts, 4, args.new_tokens, [], 0, greedy=True, decoder=decoder)
            best = min(best, time.perf_counter() - start)
        tokens[decoder], seconds[decoder] = rollout.completion_ids, best
    print(f"rollout {args.rows} rows x {args.new_tokens} tokens, {args.threads} thread(s): "
          f"lean {seconds['lean']:.2f} s, generic {seconds['hf']:.2f} s ({seconds['hf'] / seconds['lean']:.2f}x); "
          f"same tokens: {torch.equal(tokens['lean'], tokens['hf'])}")


if __name__ == "__main__":
    main()
