"""Memory: the update's peak (naive vs chunked log-probs), the start-up estimate table, and a measured train step.

    python bench/memory.py                      # Qwen2.5-0.5B-shaped random model (vocab 151,936), CPU or CUDA
    python bench/memory.py --layers 4 --rows 8  # quicker
    python bench/memory.py --estimate-table     # README table: weights/gradients/optimizer/reference, 0.5B-3B
    python bench/memory.py --train-peak /tmp/qwen05-shape   # build that dir once, then one train.py step full
                                                            # and LoRA: printed estimate vs measured peak RSS

Each mode runs in its own subprocess so that peaks do not mix. On CUDA the figure is
torch.cuda.max_memory_allocated; on CPU it is the process's peak resident set size (ru_maxrss) minus the
resident size right after the model was built, i.e. what the update itself added.
  naive    model(...).logits -> float32 log_softmax over [B, L, V] -> gather (what most scripts do)
  chunked  e2h_min.engine.logprobs.completion_logprobs: LM head only at completion positions, checkpointed chunks
  chunked+gc  the same with gradient checkpointing of the decoder layers (--gradient-checkpointing)

--train-peak runs `python train.py --model DIR --total-steps 1` (2 prompts x 2 samples, 16 new tokens, no
periodic eval) in a child process per mode and reports the child's peak resident set size (ru_maxrss) next to
the memory estimate train.py printed at start-up (e2h_min/run/memory.py). DIR is built on first use: the real
Qwen2.5-0.5B-Instruct architecture (hidden 896, 24 layers, 14 / 2 KV heads, MLP 4864, vocab 151,936, tied
embeddings, rope_theta 1e6), random weights saved in bf16 as on the hub, and the tiny model's tokenizer (its
1,024 ids fit the vocabulary; memory does not depend on which tokens are drawn). A full fine-tuning step of
this model needs ~10 GiB of RAM.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# The real architectures (config.json of each hub model): the shapes the estimate table and --train-peak use.
QWEN25_VOCAB = dict(vocab_size=151_936, tie_word_embeddings=True, rope_theta=1_000_000.0)
SHAPES = {
    "Qwen2.5-0.5B-Instruct": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2, **QWEN25_VOCAB)),
    "Qwen2.5-1.5B-Instruct": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                            num_attention_heads=12, num_key_value_heads=2, **QWEN25_VOCAB)),
    "Qwen2.5-3B-Instruct": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                                          num_attention_heads=16, num_key_value_heads=2, **QWEN25_VOCAB)),
    "Llama-3.2-3B-Instruct": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                            num_attention_heads=24, num_key_value_heads=8, vocab_size=128_256,
                                            tie_word_embeddings=True, rope_theta=500_000.0)),
}


def shape_config(name: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config

    kind, kwargs = SHAPES[name]
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**{**kwargs, **overrides})


def build_model(layers: int, device):
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    config = shape_config("Qwen2.5-0.5B-Instruct", num_hidden_layers=layers, max_position_embeddings=4096)
    return Qwen2ForCausalLM(config).to(device)


def build_shape_dir(out: Path) -> None:
    """A Qwen2.5-0.5B-Instruct-shaped model directory with random bf16 weights and the tiny model's tokenizer."""
    import shutil

    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    sys.path.insert(0, str(ROOT))
    from e2h_min.engine.models import TINY_MODEL_DIR

    torch.manual_seed(0)
    tiny_eos, tiny_pad = 2, 0  # the tiny tokenizer's <|im_end|> and <|endoftext|> ids
    config = shape_config("Qwen2.5-0.5B-Instruct", eos_token_id=tiny_eos, pad_token_id=tiny_pad,
                          max_position_embeddings=32_768)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # the hub's checkpoint dtype
    model.generation_config = GenerationConfig(eos_token_id=tiny_eos, pad_token_id=tiny_pad)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL_DIR / name, out / name)


def run_mode(mode: str, layers: int, rows: int, prompt_len: int, completion_len: int, device_name: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from e2h_min.engine.logprobs import completion_logprobs, pack_sequences

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


def estimate_table() -> None:
    """The start-up estimate (GiB, weights + gradients + optimizer + reference) for each paper model size."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from e2h_min.run.memory import GIB, estimate_memory, lora_parameter_count

    print("| model | parameters (LoRA r 32) | full, CUDA (bf16 reference) | full, CPU (fp32) | "
          "LoRA, CUDA (bf16 base) | LoRA, CPU (fp32) |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES:
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(shape_config(name))
        n = sum(p.numel() for p in model.parameters())
        lora = lora_parameter_count(model, r=32, targets=("q_proj", "v_proj"))
        cells = [estimate_memory(n, 0, n, 2), estimate_memory(n, 0, n, 4),
                 estimate_memory(lora, n, 0, 2), estimate_memory(lora, n, 0, 4)]
        print(f"| {name} | {n / 1e9:.2f}B ({lora / 1e6:.1f}M) | "
              + " | ".join(f"{c['total'] / GIB:.1f} GiB" for c in cells) + " |")


def train_peak(model_dir: Path) -> None:
    """One train.py step on the 0.5B-shaped model, full and LoRA: printed estimate vs measured peak RSS."""
    if not (model_dir / "config.json").exists():
        print(f"building {model_dir} (random Qwen2.5-0.5B-Instruct-shaped weights, bf16) ...")
        build_shape_dir(model_dir)
    common = ["--model", str(model_dir), "--device", "cpu", "--total-steps", "1", "--prompts-per-step", "2",
              "--num-generations", "2", "--max-new-tokens", "16", "--eval-every", "0", "--eval-problems", "1",
              "--save-every", "0", "--log-completions-every", "0", "--warmup-steps", "0"]
    peaks = {}
    for mode, extra in (("lora", ["--lora-r", "32"]), ("full", ["--lora-r", "0"])):
        with tempfile.TemporaryDirectory() as out:
            args = common + extra + ["--out-dir", out]
            run = subprocess.run([sys.executable, __file__, "--child-train", json.dumps(args)], capture_output=True,
                                 text=True)
            if run.returncode:
                raise SystemExit(f"{mode} run failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
            estimate = next(line for line in run.stdout.splitlines() if line.startswith("memory estimate"))
            peak = json.loads(run.stdout.strip().splitlines()[-1])["peak_rss_bytes"]
        peaks[mode] = peak
        expected = float(estimate.split("expected peak ")[1].split(" GiB")[0])
        print(f"{mode:<4}  {estimate}")
        print(f"      measured peak RSS {peak / 2**30:.2f} GiB; expected / measured = {expected * 2**30 / peak:.2f}")
    print(f"peak RSS LoRA / full = {peaks['lora'] / peaks['full']:.2f}")


def child_train(args: list[str]) -> None:
    """Run train.main in this process, then print its peak RSS (ru_maxrss, kibibytes on Linux) as the last line."""
    sys.path.insert(0, str(ROOT))
    sys.argv = ["train.py"]
    import train

    train.main(args)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from e2h_min.errors import OneLineErrorParser, at_least

    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=at_least(1), default=24)
    parser.add_argument("--rows", type=at_least(1), default=4, help="sequences in the micro-batch")
    parser.add_argument("--prompt-len", type=at_least(1), default=64)
    parser.add_argument("--completion-len", type=at_least(1), default=128)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--modes", nargs="+", default=["naive", "chunked", "chunked+gc"],
                        choices=["naive", "chunked", "chunked+gc"])
    parser.add_argument("--estimate-table", action="store_true", help="print the README's memory estimate table")
    parser.add_argument("--train-peak", type=Path, metavar="DIR",
                        help="one train.py step full and LoRA on the 0.5B-shaped model in DIR (built if absent)")
    parser.add_argument("--build-shape", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.estimate_table:
        return estimate_table()
    if args.build_shape:
        return build_shape_dir(args.build_shape)
    if args.train_peak:
        if args.train_peak.exists() and not args.train_peak.is_dir():
            parser.error(f"--train-peak {args.train_peak} is a file; pass a folder (built there if absent)")
        return train_peak(args.train_peak)
    if args.child_train:
        return child_train(json.loads(args.child_train))
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU; use --device cpu")
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
