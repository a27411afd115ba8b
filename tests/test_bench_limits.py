"""bench/limits.py: the bytes and FLOPs the benchmarks divide by, against hand computations."""

import pytest
import torch

from bench.limits import (Limit, assumed_bandwidth, assumed_flops, beats_assumed, cpu_clock_hz,
                          cpu_fp32_flops_per_cycle, cpu_peak_flops, decode_read_bytes,
                          decode_weight_bytes, gpu_peaks, kv_bytes_per_token, model_shape, share,
                          tokens_fed)


def test_kv_bytes_per_token_qwen25_15b():
    assert kv_bytes_per_token(layers=28, kv_heads=2, head_dim=128, dtype_bytes=2) == 28 * 2 * 128 * 2 * 2 == 28672


def test_decode_read_bytes_one_row():
    # p = 3, n = 4: decode steps feed tokens 1..3, attending to 4, 5, 6 positions
    out = decode_read_bytes(100, 10, [3], [4])
    assert out == {"steps": 3, "weights": 300.0, "kv": 150.0, "total": 450.0}


def test_decode_read_bytes_rows_of_different_lengths():
    # rows step together for max n - 1 = 4 steps; a row that ended early reads no more KV
    # row 0: p 2, n 5 -> 3 + 4 + 5 + 6 = 18 positions; row 1: p 4, n 2 -> 5; row 2: n 1 -> nothing decoded
    out = decode_read_bytes(7, 3, [2, 4, 9], [5, 2, 1])
    assert out["steps"] == 4
    assert out["weights"] == 28
    assert out["kv"] == 3 * (18 + 5)
    assert out["total"] == 28 + 69


def test_decode_read_bytes_matches_a_loop():
    prompts, lengths = [5, 17, 1, 30], [9, 1, 12, 4]
    kv = sum(p + j for p, n in zip(prompts, lengths) for j in range(1, n))
    assert decode_read_bytes(0, 1, prompts, lengths)["kv"] == kv


def _tiny(tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config)


def test_decode_weight_bytes_tied_and_untied():
    tied, untied = _tiny(True), _tiny(False)
    all_tied = sum(p.numel() for p in tied.parameters()) * 4
    assert decode_weight_bytes(tied) == all_tied  # the shared [50, 8] tensor once
    # untied: the LM head [50, 8] is read every step, the input embedding [50, 8] is not
    assert decode_weight_bytes(untied) == sum(p.numel() for p in untied.parameters()) * 4 - 50 * 8 * 4
    assert decode_weight_bytes(untied) == all_tied


def test_tokens_fed_worked_example_and_a_loop():
    assert tokens_fed(2, 2, 5, [3, 1, 2, 2], shared_prompts=True) == 10 + (2 + 0 + 1 + 1)
    assert tokens_fed(2, 2, 5, [3, 1, 2, 2], shared_prompts=False) == 20 + 4 * 2
    # the same counts, stepping a batch the way each side does
    lengths, width, prompts, group = [4, 7, 1, 3, 3, 6], 9, 3, 2
    ours = prompts * width + sum(sum(1 for n in lengths if n > step) for step in range(1, max(lengths)))
    theirs = prompts * group * width + sum(len(lengths) for _ in range(1, max(lengths)))
    assert tokens_fed(prompts, group, width, lengths, True) == ours
    assert tokens_fed(prompts, group, width, lengths, False) == theirs


def test_model_shape_counts_each_matrix_once():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1)
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16  # q, k, v, o (head_dim 4, one KV head), MLP
    tied = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True))
    untied = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    per_token = {name: 2 * (m["n_trunk"] + m["n_head"]) for name, m in (("tied", model_shape(tied)),
                                                                          ("untied", model_shape(untied)))}
    assert per_token["tied"] == 2 * (2 * per_layer + 50 * 8)
    assert per_token["untied"] == per_token["tied"]  # the untied embedding is a lookup


def test_cpu_peak_flops():
    assert cpu_peak_flops(1, 2.6e9) == pytest.approx(83.2e9)
    assert cpu_peak_flops(2, 3e9, flops_per_cycle=64) == pytest.approx(384e9)


INTEL_AVX512 = "processor : 0\nvendor_id : GenuineIntel\ncpu family : 6\ncpu MHz : 2599.998\nflags : fma avx2 avx512f\n"


def test_cpu_flops_per_cycle_follow_the_vector_units():
    assert cpu_fp32_flops_per_cycle(INTEL_AVX512)[0] == 64  # two 512-bit FMA units
    assert cpu_fp32_flops_per_cycle(INTEL_AVX512.replace(" avx512f", ""))[0] == 32  # AVX2: two 256-bit pipes
    zen4 = INTEL_AVX512.replace("GenuineIntel", "AuthenticAMD").replace("family : 6", "family : 25")
    assert cpu_fp32_flops_per_cycle(zen4)[0] == 32  # Zen 4 runs AVX-512 on 256-bit units
    assert cpu_fp32_flops_per_cycle(zen4.replace("family : 25", "family : 26"))[0] == 64  # Zen 5
    assert cpu_fp32_flops_per_cycle("")[0] == 32
    # only the first core's fields count
    assert cpu_fp32_flops_per_cycle(INTEL_AVX512.replace(" avx512f", "") + INTEL_AVX512)[0] == 32
    assert cpu_clock_hz(INTEL_AVX512) == pytest.approx(2.599998e9)
    assert cpu_clock_hz("cpu MHz : unknown\n") is None and cpu_clock_hz("") is None


def test_a_measured_rate_above_the_assumed_peak_is_flagged():
    assumed = Limit(100e9, "assumed", "1 core(s) x 2.60 GHz x 32")
    assert beats_assumed(99e9, assumed) is None and beats_assumed(1e12, None) is None
    assert "beats the assumed peak 100.0 G/s" in beats_assumed(169e9, assumed)


def test_gpu_peak_table_matches_specific_names_first():
    assert gpu_peaks("NVIDIA H200")[1] == 4.8e12
    assert gpu_peaks("NVIDIA H100 PCIe")[1] == 2.0e12
    assert gpu_peaks("NVIDIA H100 80GB HBM3")[1] == 3.35e12
    assert gpu_peaks("NVIDIA A100-SXM4-40GB")[1] == 1.555e12
    assert gpu_peaks("Some Other GPU") is None


def test_overrides_and_cpu_defaults():
    cpu = torch.device("cpu")
    assert assumed_bandwidth(cpu) is None  # no published figure for a CPU's share of memory channels
    assert assumed_bandwidth(cpu, 12.5) == Limit(12.5e9, "assumed", "--peak-bandwidth")
    assert assumed_flops(cpu, 100.0) == Limit(100e9, "assumed", "--peak-flops")


def test_share_formats_every_known_limit():
    text = share(50e9, [Limit(100e9, "assumed", "x"), None, Limit(200e9, "measured copy", "y")])
    assert text == "50.0% of assumed 100.0 G/s; 25.0% of measured copy 200.0 G/s"
    assert "no limit known" in share(1.0, [None])
