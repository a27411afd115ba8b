"""Rollout benchmark: e2h_min.engine.sampler.generate against transformers' model.generate(num_return_sequences=G).

Both sides get the same model, prompts, G and max_new_tokens in the same run: one warm-up call each, then
`--repeats` timed calls alternating ours / theirs (so load changes hit both), median seconds per call. Throughput
is generated tokens per second, counting each side's own completions (sampling at T=1 makes lengths differ run
to run; rows that stop early are not counted as if they had run to the end).

Cases
  a  the embedded tiny model (e2h_min/assets/tiny-countdown) on Countdown prompts rendered by the chat template,
     16 prompts x G=8, max_new_tokens 64, stopping at EOS and after "</answer>" on both sides.
  b  a randomly initialised Qwen2.5-0.5B-shaped model (24 layers, hidden 896, MLP 4864, 14 heads, 2 KV heads,
     vocab 151,936, tied embeddings; --b-size 1.5B for the 1.5B shape) with 4 Countdown-length prompts of random
     ids (100-150 tokens), G=8, max_new_tokens 32 and no stopping (a random model rarely emits EOS; both sides
     produce exactly P*G*M tokens). Also reports decode's share of the measured memory bandwidth.

Beside each speed-up: each side's share of the memory-bandwidth limit (bench/limits.py): the bytes its decode steps
must read (weights once per step + each row's KV cache so far, counted from the tokens it produced) over its whole
call's time (prefill included, so a lower bound), against the assumed peak (a GPU's datasheet figure, or
--peak-bandwidth GB/s; none for a CPU) and the copy bandwidth measured in the same run. On a CPU the tiny model
(case a) fits in the caches, so its share of the DRAM copy bandwidth can pass 100%.

The last line is `speedup X.XX`: the smaller of the cases' speed-ups.

  python bench/rollout.py                            # both cases, CPU or the GPU if there is one
  python bench/rollout.py --case b --repeats 5 --device cuda   # bf16 on CUDA, fp32 on CPU
  python bench/rollout.py --case a --threads 1 --old-commit d8aa5dc   # also the sampler of that commit
  python bench/rollout.py --case b --b-size 1.5B --b-prompts 16 --b-max-new-tokens 256 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.limits import (Limit, assumed_bandwidth, assumed_flops, beats_assumed, copy_bandwidth,  # noqa: E402
                          decode_read_bytes, decode_weight_bytes, describe, matmul_peak, model_shape,
                          model_kv_bytes_per_token, share, tokens_fed)
from e2h_min.engine.sampler import StopChecker, generate, left_pad  # noqa: E402
from e2h_min.errors import OneLineErrorParser, at_least  # noqa: E402

TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "e2h_min" / "assets" / "tiny-countdown"
_QWEN25_COMMON = dict(num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                      rms_norm_eps=1e-6, max_position_embeddings=32768)
QWEN25_SHAPES = {  # the published configs' shapes (Qwen2.5-0.5B / -1.5B); weights are random
    "0.5B": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                 **_QWEN25_COMMON),
    "1.5B": dict(num_hidden_layers=28, hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                 **_QWEN25_COMMON),
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case_a(device, dtype, n_prompts: int, seed: int, model_dir: Path = TINY_MODEL_DIR) -> dict:
    """Tiny model + real Countdown prompts; stop at EOS or after </answer>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from e2h_min.tasks.countdown import CountdownTask

    if not (model_dir / "config.json").exists():
        raise SystemExit(f"case a needs the embedded tiny model at {model_dir}; build it with "
                         f"python scripts/build_tiny_model.py, or run --case b")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    task = CountdownTask(seed)
    problems = [task.problem(level=i % task.num_levels, index=i) for i in range(n_prompts)]
    texts = [tokenizer.apply_chat_template(task.messages(p), tokenize=False, continue_final_message=True)
             for p in problems]
    prompts = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    eos = sorted({tokenizer.eos_token_id, *_as_list(model.generation_config.eos_token_id)} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return dict(name=f"a: {model_dir.name}, Countdown prompts", model=model, tokenizer=tokenizer, prompts=prompts,
                eos=eos, pad=pad, stop_strings=["</answer>"])


def case_b(device, dtype, n_prompts: int, seed: int, size: str = "0.5B") -> dict:
    """Random Qwen2.5-shaped model, random prompts of Countdown length (100-150 tokens), no stopping."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    shape = QWEN25_SHAPES[size]
    model = Qwen2ForCausalLM(Qwen2Config(**shape)).to(device=device, dtype=dtype).eval()
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(100, 150, max(n_prompts, 2)).round().long()[:n_prompts].tolist()
    prompts = [torch.randint(0, shape["vocab_size"], (n,), generator=rng).tolist() for n in lengths]
    return dict(name=f"b: random Qwen2.5-{size} shape, random prompts", model=model, tokenizer=None,
                prompts=prompts, eos=[], pad=0, stop_strings=[])


def _as_list(x) -> list:
    return [] if x is None else list(x) if isinstance(x, (list, tuple)) else [x]


def run_ours(case: dict, group: int, max_new_tokens: int, seed: int, stop_checker, sampler=None) -> list[int]:
    device = next(case["model"].parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    if sampler is not None:  # an older commit's module: its own generate (and stop_checker its own), no options
        return sampler.generate(case["model"], case["prompts"], group, max_new_tokens, eos_token_ids=case["eos"],
                                pad_id=case["pad"], stop_checker=stop_checker, temperature=1.0,
                                generator=generator).lengths.tolist()
    rollout = generate(case["model"], case["prompts"], group, max_new_tokens, eos_token_ids=case["eos"],
                       pad_id=case["pad"], stop_checker=stop_checker, temperature=1.0, generator=generator,
                       **case.get("options", {}))
    return rollout.lengths.tolist()


def run_theirs(case: dict, group: int, max_new_tokens: int, seed: int) -> list[int]:
    model = case["model"]
    device = next(model.parameters()).device
    ids, attention = left_pad(case["prompts"], case["pad"], device)
    torch.manual_seed(seed)
    stop = dict(stop_strings=case["stop_strings"], tokenizer=case["tokenizer"]) if case["stop_strings"] else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=max_new_tokens, num_return_sequences=group,
                             eos_token_id=case["eos"] or None, pad_token_id=case["pad"], **stop)
    completions = out[:, ids.shape[1]:]
    # A finished row is filled with pad after its last token: count up to the last non-pad token.
    real = completions != case["pad"]
    positions = torch.arange(1, completions.shape[1] + 1, device=device)
    return (real * positions).amax(dim=1).tolist()


def time_call(fn, device) -> tuple[float, list[int]]:
    """(seconds, what fn returned): fn() between two device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    tokens = fn()
    synchronize(device)
    return time.perf_counter() - start, tokens


def bench_case(case: dict, group: int, max_new_tokens: int, repeats: int, seed: int, limits: list,
               old_sampler=None) -> float:
    device = next(case["model"].parameters()).device
    stop_checker = StopChecker(case["tokenizer"], case["stop_strings"], device) if case["stop_strings"] else None
    ours = lambda r: run_ours(case, group, max_new_tokens, seed + r, stop_checker)  # noqa: E731
    theirs = lambda r: run_theirs(case, group, max_new_tokens, seed + r)  # noqa: E731
    # Warm-up (allocator, kernels, lazy imports) on a short call, so case b does not pay a full extra run; a
    # compiled step is warmed up on the real shapes (one graph per shape).
    warm = dict(case, prompts=case["prompts"][:2])
    if case.get("options", {}).get("compile_step"):
        run_ours(case, group, max_new_tokens, seed, stop_checker)
    else:
        run_ours(warm, group, min(4, max_new_tokens), seed, stop_checker)
    run_theirs(warm, group, min(4, max_new_tokens), seed)
    results = {"ours": [], "model.generate": []}
    if old_sampler is not None:
        old_stops = old_sampler.StopChecker(case["tokenizer"], case["stop_strings"]) if case["stop_strings"] else None
        old = lambda r: run_ours(case, group, max_new_tokens, seed + r, old_stops, old_sampler)  # noqa: E731
        old(0)  # its warm-up
        results["old commit"] = []
    for r in range(repeats):
        results["ours"].append(time_call(lambda: ours(r), device))
        results["model.generate"].append(time_call(lambda: theirs(r), device))
        if old_sampler is not None:
            results["old commit"].append(time_call(lambda: old(r), device))
    n_rows = len(case["prompts"]) * group
    print(f"\n== case {case['name']}: {len(case['prompts'])} prompts x G={group}, max_new_tokens {max_new_tokens}, "
          f"prompt tokens {min(map(len, case['prompts']))}-{max(map(len, case['prompts']))}, device {device}")
    rates, bandwidths = {}, {}
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        rate = statistics.median(sum(n) / t for t, n in runs)
        tokens = statistics.median(sum(n) for _, n in runs)
        rates[name] = rate
        bandwidths[name] = statistics.median(decode_bytes(case, group, n) / t for t, n in runs)
        print(f"  {name:15s} median {seconds:7.3f} s/call  {rate:9.1f} generated tokens/s  "
              f"(median {tokens:.0f} tokens = {tokens / n_rows:.1f} per row; runs: "
              + ", ".join(f"{t:.2f}s/{sum(n)}" for t, n in runs) + ")")
    speedup = rates["ours"] / rates["model.generate"]
    print(f"  speed-up (tokens/s ours / model.generate): {speedup:.2f}x")
    if "old commit" in rates:
        print(f"  the old commit's sampler: {rates['old commit'] / rates['model.generate']:.2f}x model.generate; "
              f"ours / old commit {rates['ours'] / rates['old commit']:.2f}x")
    for name, rate in bandwidths.items():
        print(f"  {name:15s} decode reads {rate / 1e9:8.2f} GB/s = {share(rate, limits)}")
    work_report(case, group, results)
    return speedup


def work_report(case: dict, group: int, results: dict) -> None:
    """The matmul work each side's calls must do (limits.tokens_fed x 2 (N_t + N_h), limits.model_shape) and the share
    of the machine's matmul FLOP/s each reaches. When both sides are bound by the same matmul kernels (a small
    model on a CPU), the ratio of the work is the speed-up to expect; the rest is each side's overhead."""
    model, prompts = case["model"], case["prompts"]
    device = next(model.parameters()).device
    shape = model_shape(model)
    width, per_token = max(map(len, prompts)), 2 * (shape["n_trunk"] + shape["n_head"])
    work = {name: [per_token * tokens_fed(len(prompts), group, width, n, shared_prompts=name != "model.generate")
                   for _, n in runs] for name, runs in results.items()}
    dtype = next(model.parameters()).dtype
    limits = [assumed_flops(device, None), Limit(matmul_peak(device, dtype, 1024 if device.type == "cpu" else 8192),
                                                 "measured matmul", "")]
    ratio = statistics.median(w_theirs / w_ours for w_ours, w_theirs in zip(work["ours"], work["model.generate"]))
    print(f"  matmul work per call (2 x weight entries per token fed): ours "
          f"{statistics.median(work['ours']) / 1e9:.2f} GFLOP (each prompt once, then only running rows), "
          f"model.generate {statistics.median(work['model.generate']) / 1e9:.2f} GFLOP (every row's prompt, every "
          f"row until the longest ends): {ratio:.2f}x the work")
    for name, runs in results.items():
        rate = statistics.median(w / t for w, (t, _) in zip(work[name], runs))
        print(f"  {name:15s} matmul FLOP/s {rate / 1e9:8.2f} G/s = {share(rate, limits)}")
    note = beats_assumed(limits[1].value, limits[0])
    if note:
        print("  " + note)


def decode_bytes(case: dict, group: int, lengths: list[int]) -> float:
    """Bytes the call's decode steps must read (limits.decode_read_bytes), from the rows' completion lengths."""
    model = case["model"]
    rows = [len(p) for p in case["prompts"] for _ in range(group)]
    kv = model_kv_bytes_per_token(model, next(model.parameters()).element_size())
    return decode_read_bytes(decode_weight_bytes(model), kv, rows, lengths)["total"]


def decode_bandwidth_report(case: dict, group: int, max_new_tokens: int, seed: int, repeats: int,
                            limits: list) -> None:
    """How close our decode steps come to the memory-bandwidth limit (case b: every row runs every step).

    Bytes: limits.decode_read_bytes (weights once per step + each row's KV cache so far). Decode time = a full call
    minus a call with max_new_tokens=1 (prefill + first token), so the prefill is not in it.
    """
    device = next(case["model"].parameters()).device
    full = statistics.median(time_call(lambda: run_ours(case, group, max_new_tokens, seed, None), device)[0]
                             for _ in range(repeats))
    first = statistics.median(time_call(lambda: run_ours(case, group, 1, seed, None), device)[0]
                              for _ in range(repeats))
    steps, rows = max_new_tokens - 1, len(case["prompts"]) * group
    read = decode_bytes(case, group, [max_new_tokens] * rows)
    achieved = read / (full - first)
    print(f"  decode only: {(full - first) / steps * 1e3:.1f} ms/step for {rows} rows, {read / steps / 1e9:.3f} GB "
          f"read per step -> {achieved / 1e9:.1f} GB/s = {share(achieved, limits)}")


def main() -> None:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["a", "b", "both"], default="both")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="timed calls per side (after one warm-up)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-commit", default=None, metavar="REV",
                        help="also time the sampler of this commit (e2h_min/rollout.py there, via git show), "
                             "in the same alternation: did the sampler get faster or slower since")
    parser.add_argument("--compile-step", action="store_true",
                        help="ours: static-shape decode step under torch.compile / CUDA graphs (meant for CUDA)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                        help="the assumed peak memory bandwidth (default: the GPU's datasheet figure; none on CPU)")
    parser.add_argument("--bandwidth", action=argparse.BooleanOptionalAction, default=True,
                        help="case b: also report decode's share of the measured memory bandwidth")
    # case a
    parser.add_argument("--a-model-dir", type=Path, default=TINY_MODEL_DIR, help="the tiny model's folder")
    parser.add_argument("--a-prompts", type=at_least(1), default=16)
    parser.add_argument("--a-group", type=at_least(1), default=8)
    parser.add_argument("--a-max-new-tokens", type=at_least(1), default=64)
    # case b
    parser.add_argument("--b-size", choices=sorted(QWEN25_SHAPES), default="0.5B", help="Qwen2.5 shape")
    parser.add_argument("--b-prompts", type=at_least(1), default=4)
    parser.add_argument("--b-group", type=at_least(1), default=8)
    parser.add_argument("--b-max-new-tokens", type=at_least(1), default=32)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = pick_device(args.device)
    except RuntimeError:  # torch.device("bogus")
        parser.error(f"--device {args.device}: not a device torch knows; use auto, cpu or cuda")
    if args.case in ("a", "both") and not (args.a_model_dir / "config.json").exists():
        parser.error(f"--a-model-dir {args.a_model_dir}: no model there (config.json); build it with python "
                     f"scripts/build_tiny_model.py, or run --case b")
    old_sampler = None
    if args.old_commit:  # before any measurement: a bad commit fails now
        from bench.step import load_old_sampler

        old_sampler, why = load_old_sampler(args.old_commit)
        if old_sampler is None:
            parser.error(f"--old-commit {args.old_commit}: {why}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, device {device}, dtype {dtype}, CPU threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    if device.type == "cpu" and torch.get_num_threads() > 1 and os.getloadavg()[0] >= (os.cpu_count() or 1):
        print("note: the CPUs are busy with other work; multi-threaded matmuls then stall at every barrier while a "
              "thread waits for a core, and timings swing 10x between runs. --threads 1 gives stable figures.")
    limits = [assumed_bandwidth(device, args.peak_bandwidth), copy_bandwidth(device)]
    print("memory-bandwidth limits (bytes/s): " + describe(limits[0], "--peak-bandwidth GB/s") + "; "
          + describe(limits[1], "") + ", the practical limit on a shared machine")
    speedups = {}
    if args.case in ("a", "both"):
        case = case_a(device, dtype, args.a_prompts, args.seed, args.a_model_dir)
        case["options"] = dict(compile_step=args.compile_step)
        speedups["a"] = bench_case(case, args.a_group, args.a_max_new_tokens, args.repeats, args.seed, limits,
                                   old_sampler)
        del case
    if args.case in ("b", "both"):
        case = case_b(device, dtype, args.b_prompts, args.seed, args.b_size)
        case["options"] = dict(compile_step=args.compile_step)
        speedups["b"] = bench_case(case, args.b_group, args.b_max_new_tokens, args.repeats, args.seed, limits,
                                   old_sampler)
        if args.bandwidth:
            decode_bandwidth_report(case, args.b_group, args.b_max_new_tokens, args.seed, repeats=2, limits=limits)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    worst = min(speedups, key=speedups.get)
    print("\n" + ", ".join(f"case {k}: {v:.2f}x" for k, v in speedups.items())
          + (f"; the figure below is the smaller one (case {worst})" if len(speedups) > 1 else ""))
    print(f"speedup {speedups[worst]:.2f}")


if __name__ == "__main__":
    main()
