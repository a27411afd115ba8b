"""The machine's limits a benchmark compares its speed with, and the work a decode step or an update must do.

Two limits are printed side by side, and each figure says which it is:
  assumed   a spec-sheet peak: a GPU's memory bandwidth and dense bf16 FLOP/s from GPU_PEAKS (matched on
            torch.cuda.get_device_name); a CPU's FLOP/s as cores x clock x fp32 FLOP/cycle (32 or 64, from
            /proc/cpuinfo's vendor, family and flags: cpu_fp32_flops_per_cycle). A CPU has no
            assumed bandwidth: what share of a socket's memory channels a VM's cores get is not published.
            --peak-bandwidth GB/s and --peak-flops GFLOP/s replace it.
  measured  what this machine reaches now, in the same run: a large tensor copy (STREAM's "copy": every byte read
            once and written once) and a large square matmul. On a shared machine this is the practical limit,
            the better denominator; on a quiet GPU it lands below the assumed peak (a copy reaches ~90% of it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

# name fragment (first match wins, so the specific names come first) -> (bytes/s, dense bf16 FLOP/s); NVIDIA's
# datasheets (the FLOP/s without sparsity).
GPU_PEAKS = [
    ("H200", 4.8e12, 989e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),  # SXM, "NVIDIA H100 80GB HBM3"
    ("A100-SXM4-80GB", 2.039e12, 312e12),
    ("A100 80GB PCIe", 1.935e12, 312e12),
    ("A100", 1.555e12, 312e12),  # the 40 GB cards
    ("L40S", 864e9, 362e12),
    ("L4", 300e9, 121e12),
]
CPU_FP32_FLOPS_PER_CYCLE = 32  # two 256-bit FMA pipes: 2 x 8 lanes x 2 (AVX2 cores, and Zen 4's AVX-512)


@dataclass(frozen=True)
class Limit:
    """A rate limit: `value` per second (bytes/s or FLOP/s), a short label and where the figure came from."""

    value: float
    label: str  # "assumed" or "measured ..."
    source: str


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_peak_flops(cores: int, hz: float, flops_per_cycle: int = CPU_FP32_FLOPS_PER_CYCLE) -> float:
    """Peak FLOP/s of `cores` CPU cores: cores x hz x flops_per_cycle.

    Example: 1 core at 2.6 GHz, 32 FLOP/cycle -> 83.2e9 FLOP/s.
    """
    return cores * hz * flops_per_cycle


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text, "" where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:
        return ""


def cpu_clock_hz(cpuinfo: str) -> float | None:
    """The clock cpuinfo reports ("cpu MHz", the first core), in Hz; None where it has none. In a VM this is the
    base clock: cores that boost above it can beat the assumed peak (the benchmarks then say so)."""
    for line in cpuinfo.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return float(line.split(":")[1]) * 1e6
            except ValueError:
                return None
    return None


def cpu_fp32_flops_per_cycle(cpuinfo: str) -> tuple[int, str]:
    """(fp32 FLOP per cycle per core, why) from cpuinfo's vendor, family and flags of the first core.

    64: two 512-bit FMA units (2 x 16 lanes x 2): Intel cores with AVX-512 (Xeon Gold / Platinum and newer;
        Xeon Silver / Bronze and client chips have one 512-bit unit, so pass --peak-flops there) and AMD Zen 5
        (family 26) and later.
    32: two 256-bit FMA pipes: every other core, Zen 4 included (its AVX-512 runs on 256-bit units).
    Example: vendor_id GenuineIntel, flags "fma avx2 avx512f" -> (64, "two 512-bit FMA units: GenuineIntel with
             AVX-512").
    """
    fields = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first core's
    flags = set(fields.get("flags", "").split())
    vendor, family = fields.get("vendor_id", ""), fields.get("cpu family", "0")
    wide = "avx512f" in flags and (vendor == "GenuineIntel"
                                   or (vendor == "AuthenticAMD" and family.isdigit() and int(family) >= 26))
    if wide:
        return 64, f"two 512-bit FMA units: {vendor} with AVX-512"
    return CPU_FP32_FLOPS_PER_CYCLE, "two 256-bit FMA pipes"


def gpu_peaks(name: str) -> tuple[str, float, float] | None:
    """(matched fragment, bytes/s, bf16 FLOP/s) for a device name such as 'NVIDIA H200'; None if not in the table."""
    return next((row for row in GPU_PEAKS if row[0].lower() in name.lower()), None)


def assumed_bandwidth(device: torch.device, override_gbs: float | None = None) -> Limit | None:
    """The assumed peak memory bandwidth: --peak-bandwidth (GB/s), else the GPU's datasheet figure, else None."""
    if override_gbs:
        return Limit(override_gbs * 1e9, "assumed", "--peak-bandwidth")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = gpu_peaks(name)
        if row is not None:
            return Limit(row[1], "assumed", f"{name}: datasheet {row[1] / 1e12:.2f} TB/s")
    return None


def assumed_flops(device: torch.device, override_gflops: float | None = None) -> Limit | None:
    """The assumed peak FLOP/s: --peak-flops (GFLOP/s); else a GPU's dense bf16 datasheet figure; else on a CPU
    cpu_peak_flops(torch threads, the reported clock); None when nothing is known."""
    if override_gflops:
        return Limit(override_gflops * 1e9, "assumed", "--peak-flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        row = gpu_peaks(name)
        return Limit(row[2], "assumed", f"{name}: datasheet dense bf16 {row[2] / 1e12:.0f} TFLOP/s") if row else None
    cpuinfo = read_cpuinfo()
    hz = cpu_clock_hz(cpuinfo)
    if hz is None:
        return None
    threads = torch.get_num_threads()
    per_cycle, why = cpu_fp32_flops_per_cycle(cpuinfo)
    return Limit(cpu_peak_flops(threads, hz, per_cycle), "assumed",
                 f"{threads} core(s) x {hz / 1e9:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({why})")


def beats_assumed(measured: float, assumed: Limit | None) -> str | None:
    """A warning when a measured rate is above the assumed peak (so the assumed one is wrong), else None."""
    if assumed is None or measured <= assumed.value:
        return None
    return (f"note: the measured {measured / 1e9:,.1f} G/s beats the assumed peak {assumed.value / 1e9:,.1f} G/s "
            f"[{assumed.source}], so the cores run above the reported clock (a VM reports the base clock) or have "
            f"more FMA units than assumed; --peak-flops sets the right peak")


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> Limit:
    """Measured memory bandwidth in bytes/s: the fastest of 3 copies of a `megabytes` tensor, counting 2 x its
    bytes (each byte read once and written once), after one untimed copy."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    target = torch.empty_like(source)
    target.copy_(source)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return Limit(2 * source.numel() * 4 / best, "measured copy", f"the fastest of 3 copies of a {megabytes} MiB tensor")


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` [size, size] @ [size, size] matmuls (2 size^3 FLOPs), after a warm-up."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one token position holds: layers x kv_heads x head_dim x 2 (K and V) x dtype_bytes.

    Example: Qwen2.5-1.5B (28 layers, 2 KV heads, head_dim 128) in bf16 -> 28 * 2 * 128 * 2 * 2 = 28,672 bytes.
    """
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def model_kv_bytes_per_token(model, dtype_bytes: int) -> int:
    """kv_bytes_per_token read off a transformers model's config."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype_bytes)


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied LM head and embedding is one tensor),
    except an untied input embedding, of which a step reads only one row per token."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() counts a tied tensor once
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if embedding is not head:
        total -= embedding.numel() * embedding.element_size()
    return total


def decode_read_bytes(weight_bytes: int, kv_per_token: int, prompt_lengths: list[int],
                      completion_lengths: list[int]) -> dict[str, float]:
    """Bytes the decode steps of one generation call must read at least (no padding, no finished rows).

    prompt_lengths / completion_lengths: per row (prompt p_i tokens, n_i generated). The prefill yields each row's
    first token; every later token costs one decode step that feeds the token before it, and the rows step
    together, so there are S = max_i n_i - 1 steps, each reading the weights once:
      weights = S x weight_bytes
      kv      = kv_per_token x sum_i sum_{j=1}^{n_i - 1} (p_i + j)       (step j attends to p_i + j positions)
              = kv_per_token x sum_i [(n_i - 1) p_i + (n_i - 1) n_i / 2]
    Returns {"steps": S, "weights": ..., "kv": ..., "total": weights + kv}.
    Example: weight_bytes 100, kv_per_token 10, one row p = 3, n = 4 -> S 3, weights 300,
             kv 10 x (4 + 5 + 6) = 150, total 450.
    """
    steps = max(0, max(completion_lengths, default=0) - 1)
    positions = sum((n - 1) * p + (n - 1) * n / 2 for p, n in zip(prompt_lengths, completion_lengths) if n > 1)
    weights, kv = steps * weight_bytes, kv_per_token * positions
    return {"steps": steps, "weights": float(weights), "kv": float(kv), "total": float(weights + kv)}


def model_shape(model) -> dict:
    """N_t (trunk Linear weights), N_h (LM-head weights), A (attention FLOPs per query-key pair, forward).

    One token's pass through the weight matrices costs 2 (N_t + N_h) FLOPs: a multiply and an add per weight; an
    untied input embedding is a lookup, not a matmul, and norms are not counted."""
    trunk = model.get_decoder()
    n_trunk = sum(m.weight.numel() for m in trunk.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"n_trunk": n_trunk, "n_head": model.get_output_embeddings().weight.numel(),
            "attention": 4 * config.num_hidden_layers * config.num_attention_heads * head_dim}


def tokens_fed(n_prompts: int, group: int, prompt_width: int, lengths: list[int], shared_prompts: bool) -> int:
    """Tokens one generation call feeds through the model: the matmul work, in units of 2 (N_t + N_h) FLOPs
    (model_shape).

    lengths: each of the n_prompts x group rows' completion length n_i. The prefill of the left-padded prompts
    (prompt_width each) yields every row's first token; after that:
      shared_prompts (ours): each prompt prefilled once, and only rows still running are fed, one step per token
                             they generate:  n_prompts x width + sum_i (n_i - 1)
      otherwise (model.generate with num_return_sequences): every row's copy of its prompt is prefilled, and
                             every row keeps running until the longest ends:  rows x width + rows x (max_i n_i - 1)
    Example: 2 prompts x 2 samples, width 5, lengths [3, 1, 2, 2] -> shared 10 + 4 = 14; not shared 20 + 8 = 28.
    """
    rows = n_prompts * group
    if shared_prompts:
        return n_prompts * prompt_width + sum(max(0, n - 1) for n in lengths)
    return rows * prompt_width + rows * max(0, max(lengths, default=0) - 1)


def share(rate: float, limits: list[Limit | None]) -> str:
    """rate as a share of each known limit, e.g. '12.3% of assumed 4,800.0 G/s; 13.5% of measured copy 4,370.2 G/s'
    (limits in the rate's unit, bytes/s or FLOP/s, printed in units of 1e9 per second)."""
    parts = [f"{100 * rate / limit.value:.1f}% of {limit.label} {limit.value / 1e9:,.1f} G/s"
             for limit in limits if limit is not None and limit.value > 0]
    return "; ".join(parts) if parts else "no limit known (pass --peak-bandwidth / --peak-flops)"


def describe(limit: Limit | None, flag: str) -> str:
    """One line naming a limit and its source, or saying that none is known and which flag sets one."""
    if limit is None:
        return f"assumed: none known for this device ({flag} sets one)"
    return f"{limit.label} {limit.value / 1e9:,.1f} G/s ({limit.source})"
