"""Peak memory of one policy-gradient backward pass, naive full-vocabulary log-softmax vs our chunked log-probs.

    python bench/memory.py                      # Qwen2.5-0.5B-shaped random model (vocab 151,936), CPU or CUDA
    python bench/memory.py --layers 4 --rows 8  # quicker

Each mode runs in its own subprocess so that peaks do not mix. On CUDA the figure is
torch.cuda.max_memory_allocated; on CPU it is the process's peak resident set size (ru_maxrss) minus the
resident size right after the model was built, i.e. what the update itself added.
  naive    model(...).logits -> float32 log_softmax over [B, L, V] -> gather (what most scripts do)
  chunked  e2h_min.logprobs.completion_logprobs: LM head only at completion positions, checkpointed chunks
  chunked+gc  the same with gradient checkpointing of the decoder layers (--gradient-checkpointing)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(layers: int, device):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096)
    return Qwen2ForCausalLM(config).to(device)


def run_mode(mode: str, layers: int, rows: int, prompt_len: int, completion_len: int, device_name: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from e2h_min.logprobs import completion_logprobs, pack_sequences

    device = torch.device(device_name)
    model = build_model(layers, device)
    model.train()
    if mode == "chunked+gc":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 151_936, (prompt_len,), generator=g).tolist() for _ in range(rows)]
    completions = [torch.randint(0, 151_936, (completion_len,), generator=g).tolist() for _ in range(rows)]
    batch = {k: v.to(device) for k, v in pack_sequences(prompts, completions, 0).items()}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_now()
    start = time.perf_counter()
    if mode == "naive":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        logp_all = torch.log_softmax(logits, dim=-1)  # [B, L, V] float32
        index = batch["logit_index"]
        picked = logp_all.gather(1, index[:, :, None].expand(-1, -1, logp_all.shape[-1]))
        logp = picked.gather(-1, batch["targets"][:, :, None]).squeeze(-1)
    else:
        logp, _ = completion_logprobs(model, batch, temperature=1.0, chunk_rows=256)
    (logp * batch["completion_mask"]).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"mode": mode, "peak_bytes": peak, "seconds": time.perf_counter() - start}


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rows", type=int, default=4, help="sequences in the micro-batch")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--modes", nargs="+", default=["naive", "chunked", "chunked+gc"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.child:
        print(json.dumps(run_mode(args.child, args.layers, args.rows, args.prompt_len, args.completion_len,
                                  device)))
        return
    print(f"Qwen2.5-0.5B-shaped random model, {args.layers} layers, vocab 151,936, device {device}; "
          f"{args.rows} rows x ({args.prompt_len} prompt + {args.completion_len} completion) tokens")
    results = []
    for mode in args.modes:
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--layers", str(args.layers), "--rows",
                              str(args.rows), "--prompt-len", str(args.prompt_len), "--completion-len",
                              str(args.completion_len), "--device", device],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"  {r['mode']:<11} peak {r['peak_bytes'] / 2**30:6.2f} GiB   {r['seconds']:6.1f} s")
    naive = next((r for r in results if r["mode"] == "naive"), None)
    chunked = next((r for r in results if r["mode"] == "chunked"), None)
    if naive and chunked:
        print(f"memory_ratio {naive['peak_bytes'] / max(chunked['peak_bytes'], 1):.2f}")


if __name__ == "__main__":
    main()
