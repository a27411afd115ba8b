"""The GPU check: one command, one short GPU loan. Decode speed against the memory-bandwidth limit, three train.py
steps (LoRA and full fine-tuning), and the out-of-memory retry, forced.

    python bench/gpu_check.py --out DIR            # Qwen2.5-1.5B shape on the GPU; budgeted for one 8-minute call
    python bench/gpu_check.py --smoke --out DIR    # the same code on a tiny shape on CPU (under a minute; a test)
    python bench/gpu_check.py --out DIR --skip decode-compiled,train-full

Writes DIR/gpu_check.md (the tables of docs/benchmarks.md) and DIR/gpu_check.json (every figure), both rewritten
after each section, so a call cut short keeps what it measured. Each section catches its own errors and records
them in its row; the elapsed time is printed after each. No hub and no network: the model directory is built
locally (under --work, default a temporary folder): Qwen2.5-1.5B-Instruct's config (28 layers, hidden 1536, MLP
8960, 12 / 2 KV heads, vocabulary 151,936, tied embeddings), random bf16 weights, and the tokenizer stand-in of
tests/real_shape.py (a byte-level BPE with Qwen2.5's special ids and chat template).

Sections
  decode-*   8 prompts (Countdown, chat-templated) x 8 samples = 64 rows x 512 new tokens, greedy, no EOS (every
             row runs all 512 steps), for model.generate (the 64 rows as its batch: greedy generate takes no
             num_return_sequences), transformers' continuous batching (model.generate_batch, the 64 rows as
             requests; skipped with a note where transformers has none), and our sampler (e2h_min/engine/sampler.py) with
             the lean decoder, the static-shape one, and the static one under torch.compile (CUDA graphs; GPU only;
             run last, after the train sections, as its compile time is the least predictable part of the budget).
             Each: one warm-up call (for the compiled step a full-length one, as its graph is per capacity bucket),
             then a prefill call (max_new_tokens 1) and a full call, timed between torch.cuda.synchronize() calls.
               tokens/s        generated tokens / the full call's seconds
               ms/step         (full - prefill call) / 511 decode steps
               GB read/step    bench/limits.decode_read_bytes / 511: every weight once per step (the tied
                               embedding / LM head once) + each row's KV cache so far
               GB/s, % peak    those bytes / (full - prefill call), over the assumed peak (the GPU's datasheet
                               bandwidth, bench/limits.GPU_PEAKS, or --peak-bandwidth) and over the copy bandwidth
                               measured at the start
               greedy equal    every row's tokens equal model.generate's (else the rows that are, and the first
                               step where any row differs: bf16 argmax ties on random weights can flip)
  train-lora, train-full   python train.py --model DIR at the paper preset (LoRA r 32 on q/v, beta 0.001 with k3 in
             the loss, 8 prompts x 8 samples x 512 tokens), then again with --lora-r 0: three steps each, run through
             train.main in this process, the final evaluation and checkpoint left out (train.finish is replaced; a
             step is what is timed). Per step from metrics.jsonl: rollout_seconds, update_seconds; the reference
             passes inside the update timed through the reference's context (synchronised), so update = the rest.
             Peak = torch.cuda.max_memory_allocated over the run (CPU: the process's peak RSS) against the start-up
             estimate train.py logs (e2h_min/run/memory.py, before activations and the KV cache).
  oom-retry  one train.py step at the paper preset with the CUDA memory capped (set_per_process_memory_fraction)
             at what the process holds when the update starts plus 3/4 of what train-lora's update added: the first
             micro-batches run out of memory, train.update_with_oom_retry halves the micro-batch and the step
             finishes. On CPU (--smoke) the first reference pass raises torch.OutOfMemoryError instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import math
import resource
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2h_min.errors import OneLineErrorParser, UserError, check_output_dir  # noqa: E402
from bench.limits import (assumed_bandwidth, copy_bandwidth, decode_read_bytes,  # noqa: E402
                          decode_weight_bytes, model_kv_bytes_per_token)

GIB = 2 ** 30
# Qwen2.5-1.5B-Instruct's config.json (the rest, vocabulary 151,936, tied embeddings, rope_theta 1e6, is
# tests/real_shape.build_qwen_shape's).
QWEN25_15B = dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960)
DECODERS = {  # section -> our sampler's options (e2h_min/rollout.generate)
    "decode-lean": dict(decoder="lean"),
    "decode-static": dict(decoder="lean", static_shapes=True),
    "decode-compiled": dict(decoder="lean", compile_step=True),
}
DECODE_SECTIONS = ["decode-generate", "decode-continuous-batching", *DECODERS]
# run order: the compiled decoder last, as its compile time is the least predictable part of the budget
SECTIONS = ["decode-generate", "decode-continuous-batching", "decode-lean", "decode-static", "train-lora",
            "train-full", "oom-retry", "decode-compiled"]
TRAIN_FLAGS = ["--total-steps", "3", "--eval-every", "0", "--eval-problems", "1", "--eval-max-new-tokens", "8",
               "--save-every", "0", "--log-completions-every", "0"]


@dataclass(frozen=True)
class Mode:
    name: str
    shape: dict  # build_qwen_shape's layer sizes ({} = its tiny defaults)
    device: str
    dtype: torch.dtype
    prompts: int
    group: int
    new_tokens: int
    train_flags: tuple[str, ...] = ()


FULL = Mode("full", QWEN25_15B, "cuda", torch.bfloat16, prompts=8, group=8, new_tokens=512)
SMOKE = Mode("smoke", {}, "cpu", torch.float32, prompts=2, group=2, new_tokens=8,
             train_flags=("--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8",
                          "--micro-batch-size", "2", "--threads", "1"))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, fn()) with the device synchronised before the clock starts and before it stops."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class OverBudget(BaseException):  # not Exception: a library's broad except must not swallow the stop
    """Raised inside a section still running when the check's --budget-s is up."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise OverBudget in the main thread after `seconds` (a hung section must not spend the rest of a GPU loan)."""
    def stop(signum, frame):
        raise OverBudget(f"stopped: --budget-s was up ({seconds:.0f} s were left when the section started)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # the previous handler comes back even if the alarm fired just now
            signal.signal(signal.SIGALRM, previous)


class Report:
    """The sections' results, written to gpu_check.json and gpu_check.md after every section."""

    def __init__(self, out: Path, meta: dict, budget_s: float):
        self.out, self.meta, self.budget_s = out, meta, budget_s
        self.sections: dict[str, dict] = {}
        self.start = time.perf_counter()

    def run(self, name: str, fn, skip: dict[str, str]) -> dict:
        """Run section `name` (fn() -> its figures) unless skipped; record ok / error / skipped and the seconds.
        The check ends by --budget-s: a section not started by then is skipped, one still running is stopped."""
        start = time.perf_counter()
        elapsed = start - self.start
        row = {"status": "skipped"}
        if name in skip:
            row["note"] = skip[name]
        elif elapsed >= self.budget_s:
            row["note"] = f"{elapsed:.0f} s elapsed, --budget-s {self.budget_s:.0f} is up"
        else:
            try:
                with time_limit(self.budget_s - elapsed):
                    row = {"status": "ok", **fn()}
            except (Exception, SystemExit, OverBudget) as exc:  # noqa: BLE001  (one failing section: the check goes on)
                traceback.print_exc()
                row = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                       if str(exc).strip() else type(exc).__name__}
            free_memory()
        row["seconds"] = time.perf_counter() - start
        self.sections[name] = row
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name}: {row['status']} in {row['seconds']:.1f} s"
              + (f" ({row.get('error') or row.get('note')})" if row["status"] != "ok" else ""), flush=True)
        self.write()
        return row

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": {**self.meta, "elapsed_s": time.perf_counter() - self.start}, "sections": self.sections}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1))
        (self.out / "gpu_check.md").write_text(markdown(data))


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if row.get("status") != "ok":
        return "-"
    if value is None:
        return "n/a"
    return "yes" if value is True else "no" if value is False else format(value, fmt)


def _status(row: dict) -> str:
    if row.get("status") == "ok":
        return "ok" + (f" ({row['note']})" if row.get("note") else "")
    return f"{row.get('status', 'not run')}: {row.get('error') or row.get('note') or ''}".replace("|", "/")


def fastest_equal_decoder(sections: dict) -> str:
    """The line that picks the CUDA default: the fastest of our decoders whose greedy tokens equal model.generate's.

    If none is equal on every row, each one that ran, most agreeing first: random bf16 weights leave near-tied
    logits, where a change in a kernel's summation order can flip an argmax, so the pick is then a judgement (the
    exactness tests are the fp32 ones of tests/test_rollout.py)."""
    ran = {name: sections[name] for name in DECODERS
           if sections.get(name, {}).get("status") == "ok" and sections[name].get("greedy_equal") is not None}
    equal = [name for name, row in ran.items() if row["greedy_equal"]]
    head = "Fastest of ours with greedy tokens = model.generate:"
    if equal:
        best = max(equal, key=lambda name: ran[name]["tokens_per_s"])
        options = ", ".join(f"{key}={value!r}" for key, value in DECODERS[best].items())
        return f"{head} **{best.removeprefix('decode-')}** ({ran[best]['tokens_per_s']:,.0f} tokens/s; {options})."
    if not ran:
        return f"{head} none compared (see the rows)."
    order = sorted(ran, key=lambda name: (ran[name]["equal_rows"], ran[name]["first_difference"] or 0), reverse=True)
    return (f"{head} none on every row (near-tied logits of random bf16 weights); most agreeing first: "
            + "; ".join(f"{name.removeprefix('decode-')} {ran[name]['equal_rows']}/{ran[name]['rows']} rows, "
                        f"first difference at step {ran[name]['first_difference']}, "
                        f"{ran[name]['tokens_per_s']:,.0f} tokens/s" for name in order) + ".")


def markdown(data: dict) -> str:
    """The tables of docs/benchmarks.md ("GPU check"), filled in."""
    meta, sections = data["meta"], data["sections"]
    lines = [f"# GPU check: {meta['device_name']}, {meta['date']} ({meta['mode']} mode)", "",
             f"`{meta['command']}`; torch {meta['torch']}, transformers {meta['transformers']}; "
             f"{meta['elapsed_s']:.0f} s in all.", "",
             f"Model: {meta['model']}. Decode: {meta['decode']}.", "",
             f"Bandwidth limits: {meta['bandwidth_limits']}.", "",
             "## Decode", "",
             "| decoder | tokens/s | ms per decode step | prefill ms | GB read per step | GB/s | % of assumed peak "
             "| % of measured copy | greedy tokens = model.generate | warm-up s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in DECODE_SECTIONS:
        row = sections.get(name, {})
        equal = row.get("greedy_equal")
        different = (f"no ({row.get('equal_rows')}/{row.get('rows')} rows; first difference at step "
                     f"{row.get('first_difference')})")
        equal_text = ("reference" if name == "decode-generate" else "-" if row.get("status") != "ok" else
                      "n/a (model.generate did not run)" if equal is None else "yes" if equal else different)
        lines.append(f"| {name.removeprefix('decode-')} | {_cell(row, 'tokens_per_s', ',.0f')} | "
                     f"{_cell(row, 'ms_per_step', '.2f')} | {_cell(row, 'prefill_ms', '.1f')} | "
                     f"{_cell(row, 'gb_per_step', '.3f')} | {_cell(row, 'gb_per_s', ',.1f')} | "
                     f"{_cell(row, 'pct_assumed', '.1f')} | {_cell(row, 'pct_measured', '.1f')} | {equal_text} | "
                     f"{_cell(row, 'warmup_s', '.1f')} | {_status(row)} |")
    lines += ["", fastest_equal_decoder(sections)]
    lines += ["", "## Train steps (train.py, median of steps 2-3; every step in the JSON)", "",
              "| run | rollout s | reference s | update s | step s | peak memory GiB | start-up estimate GiB | "
              "peak / estimate | status |", "|---|---|---|---|---|---|---|---|---|"]
    for name in ("train-lora", "train-full"):
        row = sections.get(name, {})
        lines.append(f"| {name.removeprefix('train-')} | {_cell(row, 'rollout_s', '.2f')} | "
                     f"{_cell(row, 'reference_s', '.2f')} | {_cell(row, 'update_s', '.2f')} | "
                     f"{_cell(row, 'step_s', '.2f')} | {_cell(row, 'peak_gib', '.2f')} | "
                     f"{_cell(row, 'estimate_gib', '.2f')} | {_cell(row, 'peak_over_estimate', '.2f')} | "
                     f"{_status(row)} |")
    row = sections.get("oom-retry", {})
    lines += ["", "## Out-of-memory retry", "",
              "| forced by | out-of-memory errors caught | micro-batch size after | step finished | status |",
              "|---|---|---|---|---|",
              f"| {row.get('forced_by', '-')} | {_cell(row, 'oom_errors', 'd')} | "
              f"{_cell(row, 'micro_batch_after', 'd')} | {_cell(row, 'finished', '')} | {_status(row)} |",
              "", "## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {sections[name]['status']} | {sections[name]['seconds']:.1f} |"
              for name in SECTIONS if name in sections]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- decode

@dataclass
class DecodeCase:
    model: torch.nn.Module
    prompts: list[list[int]]  # P prompts
    group: int  # G samples each: rows i = prompt i // G
    new_tokens: int
    pad: int
    device: torch.device
    limits: list  # [assumed bandwidth or None, measured copy]
    reference: list[list[int]] | None = None  # model.generate's greedy tokens, per row


def decode_case(model_dir: Path, mode: Mode, device: torch.device, limits: list) -> DecodeCase:
    from transformers import AutoModelForCausalLM, GenerationConfig

    from e2h_min.rl.scoring import encode_prompts
    from e2h_min.engine.models import load_tokenizer
    from e2h_min.tasks import make_task

    tokenizer = load_tokenizer(str(model_dir))
    task = make_task("countdown")
    problems = [task.problem(level=i % task.num_levels, index=i) for i in range(mode.prompts)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=mode.dtype).to(device).eval()
    # plain greedy, no EOS: the stand-in's sampling defaults (top-k, repetition penalty) must not reach generate
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id)
    return DecodeCase(model, encode_prompts(tokenizer, task, problems), mode.group, mode.new_tokens,
                      tokenizer.pad_token_id, device, limits)


def rows_of(case: DecodeCase) -> list[list[int]]:
    return [p for p in case.prompts for _ in range(case.group)]


def generate_tokens(case: DecodeCase, new_tokens: int) -> list[list[int]]:
    """model.generate, greedy, over the P x G rows."""
    from e2h_min.engine.sampler import left_pad

    ids, attention = left_pad(rows_of(case), case.pad, case.device)
    with torch.no_grad():
        out = case.model.generate(input_ids=ids, attention_mask=attention, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=0, eos_token_id=None,
                                  pad_token_id=case.pad)
    return out[:, ids.shape[1]:].tolist()


def ours_tokens(case: DecodeCase, new_tokens: int, options: dict) -> list[list[int]]:
    """e2h_min/rollout.generate, greedy: each prompt prefilled once, its G rows decoded together."""
    from e2h_min.engine.sampler import generate

    rollout = generate(case.model, case.prompts, case.group, new_tokens, eos_token_ids=[], pad_id=case.pad,
                       greedy=True, **options)
    return rollout.completion_token_lists()


def batch_generate_tokens(case: DecodeCase, new_tokens: int) -> list[list[int]]:
    """transformers' continuous batching (model.generate_batch), greedy, the P x G rows as requests; the manager is
    kept between calls (warm-up, prefill, full) and sized explicitly (pages for every row's prompt + completion)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    rows = rows_of(case)
    page = 256
    per_row = math.ceil((max(map(len, rows)) + case.new_tokens) / page) + 1
    per_row += per_row % 2  # even, as transformers sizes it itself
    # flash attention only where the flash_attn package is installed (its `kernels` fallback would ask the hub)
    config = ContinuousBatchingConfig(page_size=page, num_blocks=len(rows) * per_row, max_blocks_per_request=per_row,
                                      auto_switch_to_flash=importlib.util.find_spec("flash_attn") is not None)
    generation = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=case.pad)
    out = case.model.generate_batch(rows, generation_config=generation, continuous_batching_config=config,
                                    max_new_tokens=new_tokens, persistent_manager=True)
    results = list(out.values())
    errors = [r.error for r in results if r.error]
    if len(results) != len(rows) or errors:
        raise RuntimeError(f"generate_batch returned {len(results)} of {len(rows)} rows; errors: {errors[:1]}")
    return [r.generated_tokens for r in results]


def measure_decoder(case: DecodeCase, call, full_warmup: bool = False) -> dict:
    """Warm-up, prefill call (1 new token), full call; the figures of the decode table (module docstring)."""
    warmup_s, _ = timed(lambda: call(case.new_tokens if full_warmup else min(8, case.new_tokens)), case.device)
    prefill_s, _ = timed(lambda: call(1), case.device)
    full_s, tokens = timed(lambda: call(case.new_tokens), case.device)
    lengths = [len(t) for t in tokens]
    model = case.model
    read = decode_read_bytes(decode_weight_bytes(model), model_kv_bytes_per_token(model, model.dtype.itemsize),
                             [len(p) for p in rows_of(case)], lengths)
    decode_s = full_s - prefill_s
    rate = read["total"] / decode_s if decode_s > 0 and read["steps"] else None
    assumed, measured = case.limits
    row = {"tokens_per_s": sum(lengths) / full_s, "full_s": full_s, "prefill_ms": 1e3 * prefill_s,
           "ms_per_step": 1e3 * decode_s / read["steps"] if read["steps"] else None,
           "gb_per_step": read["total"] / read["steps"] / 1e9 if read["steps"] else None,
           "gb_per_s": rate / 1e9 if rate else None,
           "pct_assumed": 100 * rate / assumed.value if rate and assumed else None,
           "pct_measured": 100 * rate / measured.value if rate else None,
           "warmup_s": warmup_s, "rows": len(tokens), "generated_tokens": sum(lengths)}
    if case.reference is not None:
        row.update(compare_tokens(tokens, case.reference))
    return row, tokens


def compare_tokens(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    """greedy_equal (every row equal), equal_rows, first_difference (the first step where any row differs)."""
    equal_rows = sum(a == b for a, b in zip(tokens, reference))
    first = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(tokens, reference) if a != b]
    return {"greedy_equal": equal_rows == len(reference) == len(tokens), "equal_rows": equal_rows,
            "first_difference": min(first) if first else None}


def meta_transformers() -> str:
    import transformers

    return transformers.__version__


class DecodeSections:
    """The decode sections on one lazily loaded model; model.generate's tokens are kept for the later sections'
    equality check across release() (the model is freed while the train sections run)."""

    def __init__(self, case_fn):
        self.case_fn, self.case, self.reference = case_fn, None, None

    def get(self) -> DecodeCase:
        if self.case is None:
            self.case = self.case_fn()
            self.case.reference = self.reference
        return self.case

    def run(self, name: str) -> dict:
        case = self.get()
        if name == "decode-generate":
            row, self.reference = measure_decoder(case, lambda n: generate_tokens(case, n))
            case.reference = self.reference
            return row
        if name == "decode-continuous-batching":
            if not hasattr(case.model, "generate_batch"):
                return {"status": "skipped", "note": f"transformers {meta_transformers()} has no generate_batch"}
            try:
                return measure_decoder(case, lambda n: batch_generate_tokens(case, n))[0]
            finally:
                case.model.destroy_cached_continuous_batching_manager()
        options = DECODERS[name]
        if not options.get("compile_step"):
            return measure_decoder(case, lambda n: ours_tokens(case, n, options))[0]
        from torch._dynamo.utils import counters

        before = counters["inductor"]["cudagraph_skips"]
        row = measure_decoder(case, lambda n: ours_tokens(case, n, options), full_warmup=True)[0]
        skipped = counters["inductor"]["cudagraph_skips"] - before  # inductor only logs why it ran without graphs
        return {**row, "note": f"CUDA graphs skipped {skipped}x, see the log" if skipped
                else "no CUDA-graph skip logged"}

    def release(self) -> None:
        from e2h_min.engine import decoders

        self.case = None
        decoders._STATIC_BUFFERS.clear()  # the static decoders' persistent buffers and the compiled step's graphs
        decoders._COMPILED.clear()
        torch._dynamo.reset()
        free_memory()


# ---------------------------------------------------------------------------------------------------- train

class TrainProbe:
    """Patches train.py's module globals for one train.main call: records the start-up memory estimate, times the
    reference passes (synchronised, through the reference's context), records memory around each policy_update
    call, optionally forces an out-of-memory error, and leaves out the final evaluation and checkpoint."""

    def __init__(self, train, device: torch.device, force_oom: str | None = None, extra_bytes: float = 0.0):
        self.train, self.device, self.force_oom, self.extra_bytes = train, device, force_oom, extra_bytes
        self.estimate: dict | None = None
        self.reference_s = 0.0
        self.calls: list[dict] = []
        self.peak = 0
        self.cap_bytes = None
        self.injected = False

    @contextlib.contextmanager
    def patched(self):
        from e2h_min.run import setup as run_setup
        from e2h_min.run.bookkeeping import RunBook

        # where each patched name is looked up when train.main runs: the set-up's module, the loop's, the run book
        homes = {"format_memory": run_setup, "build_models": run_setup, "policy_update": self.train,
                 "finish": RunBook}
        originals = {name: getattr(home, name) for name, home in homes.items()}

        def format_memory(parts, *args, **kwargs):
            self.estimate = dict(parts)
            return originals["format_memory"](parts, *args, **kwargs)

        def build_models(*args, **kwargs):
            policy, reference, value_head = originals["build_models"](*args, **kwargs)
            if reference is not None:
                reference = dataclasses.replace(reference, context=self.timed_context(reference.context))
            return policy, reference, value_head

        def policy_update(*args, **kwargs):
            call = {"reference_s": self.reference_s}
            if self.device.type == "cuda":
                synchronize(self.device)
                self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
                if self.force_oom == "cap" and self.cap_bytes is None:
                    self.cap(self.extra_bytes)
                torch.cuda.reset_peak_memory_stats(self.device)
                call["before"] = torch.cuda.memory_allocated(self.device)
            try:
                return originals["policy_update"](*args, **kwargs)
            except torch.OutOfMemoryError:
                call["oom"] = True
                raise
            finally:
                call["reference_s"] = self.reference_s - call["reference_s"]
                if self.device.type == "cuda":
                    call["peak"] = torch.cuda.max_memory_allocated(self.device)
                    self.peak = max(self.peak, call["peak"])
                self.calls.append(call)

        def finish(book, first_eval):  # the step is what is measured: no final evaluation, checkpoint or final/
            book.trackers.close()
            return {"run_dir": str(book.run_dir)}

        for name, fn in (("format_memory", format_memory), ("build_models", build_models),
                         ("policy_update", policy_update), ("finish", finish)):
            setattr(homes[name], name, fn)
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(homes[name], name, fn)
            if self.cap_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(1.0, self.device)

    def timed_context(self, context):
        @contextlib.contextmanager
        def timed_reference():
            with context():
                if self.force_oom == "inject" and not self.injected:
                    self.injected = True
                    raise torch.OutOfMemoryError("forced by bench/gpu_check.py (CPU: no memory cap)")
                synchronize(self.device)
                start = time.perf_counter()
                try:
                    yield
                finally:
                    synchronize(self.device)
                    self.reference_s += time.perf_counter() - start
        return timed_reference

    def cap(self, extra_bytes: float) -> None:
        """Cap the CUDA allocator at what it holds now plus 3/4 of what the update added in train-lora."""
        torch.cuda.empty_cache()
        self.cap_bytes = torch.cuda.memory_reserved(self.device) + 0.75 * extra_bytes
        total = torch.cuda.get_device_properties(self.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.cap_bytes / total), self.device)


def run_train(model_dir: Path, work: Path, mode: Mode, name: str, flags: list[str], device: torch.device,
              force_oom: str | None = None, extra_bytes: float = 0.0) -> tuple[dict, TrainProbe, list[dict], str]:
    """train.main on the built model in this process; (the probe, metrics.jsonl rows, the captured console)."""
    import train

    run_dir = work / f"run-{name}"
    argv = ["--model", str(model_dir), "--out-dir", str(run_dir), "--overwrite", "--device", mode.device,
            *TRAIN_FLAGS, *mode.train_flags, *flags]
    probe = TrainProbe(train, device, force_oom, extra_bytes)
    console = io.StringIO()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with probe.patched(), contextlib.redirect_stdout(console):
            train.main(argv)
    except BaseException:
        sys.stderr.write(console.getvalue()[-4000:])  # train.py's own lines say what went wrong
        raise
    if device.type == "cuda":
        probe.peak = max(probe.peak, torch.cuda.max_memory_allocated(device))
    else:  # the process's peak resident set (Linux: KiB), earlier sections included
        probe.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"argv": " ".join(argv)}, probe, rows, console.getvalue()


def train_section(model_dir: Path, work: Path, mode: Mode, name: str, flags: list[str], device: torch.device,
                  store: dict) -> dict:
    info, probe, rows, _ = run_train(model_dir, work, mode, name, flags, device)
    calls = [c for c in probe.calls if not c.get("oom")]
    steps = []
    for row, call in zip(rows, calls):
        update = row["update_seconds"]
        steps.append({"rollout_s": row["rollout_seconds"], "reference_s": call["reference_s"],
                      "update_s": update - call["reference_s"], "step_s": row["rollout_seconds"] + update})
    if len(steps) < 3:
        raise RuntimeError(f"{len(steps)} steps recorded of 3")
    later = steps[1:]  # the first step pays for lazy initialisation (kernels, allocator)
    figures = {k: statistics.median(s[k] for s in later) for k in steps[0]}
    if device.type == "cuda" and calls:
        store[f"{name}-update-extra"] = max(c["peak"] - c["before"] for c in calls)
    estimate = probe.estimate["total"] if probe.estimate else None
    return {**figures, "steps": steps, "peak_gib": probe.peak / GIB,
            "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process",
            "estimate_gib": estimate / GIB if estimate else None,
            "peak_over_estimate": probe.peak / estimate if estimate else None,
            "estimate_parts_gib": {k: v / GIB for k, v in (probe.estimate or {}).items()}, **info}


def oom_section(model_dir: Path, work: Path, mode: Mode, device: torch.device, store: dict) -> dict:
    if device.type == "cuda":
        extra = store.get("train-lora-update-extra")
        if not extra:
            raise RuntimeError("the memory cap is set from train-lora's update peak; run train-lora first")
        force = "cap"
    else:
        extra, force = 0.0, "inject"
    info, probe, rows, console = run_train(model_dir, work, mode, "oom", ["--total-steps", "1"], device, force,
                                           extra)
    warnings = [line for line in console.splitlines() if line.startswith("warning: out of memory")]
    after = int(warnings[-1].split("--micro-batch-size ")[1].split()[0]) if warnings else None
    forced_by = (f"memory cap {probe.cap_bytes / GIB:.2f} GiB" if force == "cap"
                 else "torch.OutOfMemoryError raised in the first reference pass (CPU)")
    if not warnings:
        raise RuntimeError(f"no out-of-memory error under the {forced_by}: the retry was not exercised")
    return {"forced_by": forced_by, "oom_errors": len(warnings), "micro_batch_after": after,
            "finished": len(rows) == 1, "warnings": warnings, **info}


# ---------------------------------------------------------------------------------------------------- main

def build_model_dir(directory: Path, mode: Mode) -> Path:
    from tests.real_shape import build_qwen_shape

    if not (directory / "config.json").exists():
        with contextlib.redirect_stdout(io.StringIO()):
            build_qwen_shape(directory, dtype=mode.dtype, device=mode.device, **mode.shape)
    return directory


def version_problem(requirements: Path = ROOT / "requirements.txt", names=("transformers", "peft")) -> str | None:
    """Why the installed transformers / peft miss requirements.txt's ranges, or None if both are in them.

    A GPU box often comes with its own transformers (the H200 image of 2026-11 has 5.17); the figures are only worth
    a loan on the versions the tests pass on, so the check stops before any GPU work and says how to bring them.
    """
    from importlib import metadata

    from packaging.requirements import Requirement

    for line in requirements.read_text().splitlines():
        text = line.split("#")[0].strip()
        if not text or Requirement(text).name not in names:
            continue
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or installed not in requirement.specifier:
            return (f"{requirement.name} {installed or 'is not installed'}, requirements.txt needs "
                    f"{requirement.specifier}")
    return None


def parse_args(argv: list[str] | None):
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.md and gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on CPU (under a minute)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the model and the runs (default: a temporary folder, removed at the end)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="end the check by this many seconds after its start: later sections are skipped, "
                             "one still running is stopped (default 450 full, 300 smoke)")
    parser.add_argument("--peak-bandwidth", type=float, default=None, metavar="GB/s",
                        help="the assumed peak memory bandwidth (default: the GPU's datasheet figure)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.skip.split(",") if s and s not in SECTIONS]
    if unknown:
        parser.error(f"--skip {','.join(unknown)}: unknown section; choose from {', '.join(SECTIONS)}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("the full check needs a CUDA GPU and torch sees none; run --smoke for the CPU version")
    try:
        check_output_dir(args.out, "--out")  # a file or an unwritable place fails now, not after the first section
    except UserError as exc:
        parser.error(str(exc))
    problem = version_problem()
    if problem:
        parser.error(f"{problem}; install the tested versions, or on a machine without network carry their wheels "
                     f"(docs/benchmarks.md, GPU check)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    mode = SMOKE if args.smoke else FULL
    # with an index: torch.cuda.set_per_process_memory_fraction (oom-retry) rejects a bare "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if mode.device == "cuda" else torch.device("cpu")
    if mode is SMOKE:
        torch.set_num_threads(1)  # tiny matrices on a shared CPU: a second thread only waits
    skip = {s: "--skip" for s in args.skip.split(",") if s}
    if device.type != "cuda":
        skip.setdefault("decode-compiled", "CPU: the compiled step's CUDA graphs need a GPU")
    limits = [assumed_bandwidth(device, args.peak_bandwidth),
              copy_bandwidth(device, megabytes=1024 if device.type == "cuda" else 256)]
    assumed, measured = limits
    shape = {**dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128), **mode.shape}
    meta = {"mode": mode.name, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "transformers": meta_transformers(),
            "model": (f"{'Qwen2.5-1.5B-Instruct' if mode is FULL else 'tiny Qwen2.5'} shape ({shape['layers']} layers, "
                      f"hidden {shape['hidden_size']}, MLP {shape['intermediate_size']}, {shape['heads']} / "
                      f"{shape['kv_heads']} KV heads, vocabulary 151,936, tied), random {str(mode.dtype)[6:]} "
                      f"weights, tokenizer stand-in of tests/real_shape.py"),
            "decode": f"{mode.prompts} prompts x {mode.group} samples x {mode.new_tokens} new tokens, greedy, no EOS",
            "bandwidth_limits": (f"assumed {assumed.value / 1e9:,.0f} GB/s ({assumed.source})" if assumed else
                                 "assumed: none known for this device (--peak-bandwidth GB/s)")
            + f"; measured copy {measured.value / 1e9:,.0f} GB/s ({measured.source})"}
    budget = args.budget_s if args.budget_s is not None else (450.0 if mode is FULL else 300.0)
    report = Report(args.out, meta, budget)
    print(f"gpu check ({mode.name}): {meta['device_name']}, {meta['bandwidth_limits']}", flush=True)
    work_context = (contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory())
    with work_context as work:
        work = Path(work)
        start = time.perf_counter()
        model_dir = build_model_dir(work / "model", mode)
        print(f"[{time.perf_counter() - report.start:6.1f} s] model built in {time.perf_counter() - start:.1f} s: "
              f"{model_dir}", flush=True)
        decode = DecodeSections(lambda: decode_case(model_dir, mode, device, limits))
        for name in ("decode-generate", "decode-continuous-batching", "decode-lean", "decode-static"):
            report.run(name, lambda n=name: decode.run(n), skip)
        decode.release()
        store: dict = {}
        report.run("train-lora", lambda: train_section(model_dir, work, mode, "train-lora", [], device, store), skip)
        report.run("train-full", lambda: train_section(model_dir, work, mode, "train-full", ["--lora-r", "0"],
                                                       device, store), skip)
        report.run("oom-retry", lambda: oom_section(model_dir, work, mode, device, store), skip)
        report.run("decode-compiled", lambda: decode.run("decode-compiled"), skip)
        decode.release()
    print(f"wrote {args.out / 'gpu_check.md'} and {args.out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
