"""The start-up memory estimate against a hand computation, frozen weights in the frozen dtype, and final/ in the
base model's own dtype."""

import json
import shutil

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import train
from e2h_min.run.setup import build_models
from e2h_min.run.checkpoint import save_final
from e2h_min.run.presets import parse_config
from e2h_min.run.memory import (GIB, estimate_memory, format_memory, loading_peak, lora_parameter_count, training_memory,
                            with_process)
from e2h_min.engine.models import TINY_MODEL_DIR, apply_lora, checkpoint_dtype, frozen_copy
from tests.test_train import random_model

CPU = torch.device("cpu")


def test_estimate_by_hand_full_fine_tuning_and_lora():
    # full fine-tuning of 1,000 parameters, bf16 reference: 4 + 4 + 8 bytes per trained parameter, 2 per reference
    assert estimate_memory(1000, 0, 1000, 2) == {"weights": 4000, "gradients": 4000, "optimizer": 8000,
                                                 "reference": 2000, "total": 18000}
    # LoRA: 10 adapter parameters on a 1,000-parameter fp32 base, no reference copy
    assert estimate_memory(10, 1000, 0, 4) == {"weights": 40 + 4000, "gradients": 40, "optimizer": 80,
                                               "reference": 0, "total": 4160}


def test_process_memory_and_the_loading_phase_by_hand():
    parts = with_process(estimate_memory(1000, 0, 1000, 4), 500)  # 20 bytes per parameter + what the process held
    assert parts == {"weights": 4000, "gradients": 4000, "optimizer": 8000, "reference": 4000, "process": 500,
                     "total": 20500}
    assert loading_peak(parts, 2000) == 500 + 4000 + 2000  # process + weights + memory-mapped checkpoint file
    lora = with_process(estimate_memory(0, GIB, 0, 4), GIB // 2)  # LoRA-like: loading is the peak
    line = format_memory(lora, loading_peak(lora, 3 * GIB))
    assert "total 4.50 GiB" in line and "while loading 7.50 GiB" in line and "expected peak 7.50 GiB" in line


def test_lora_parameter_count_is_what_peft_adds():
    model = random_model()  # hidden 32, 4 heads, 2 KV heads (head dim 8): q_proj 32 -> 32, v_proj 32 -> 16
    by_hand = 2 * 4 * ((32 + 32) + (32 + 16))  # 2 layers, r 4
    assert lora_parameter_count(model, 4, ("q_proj", "v_proj")) == by_hand
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    assert sum(p.numel() for p in policy.parameters() if p.requires_grad) == by_hand


def test_training_memory_reads_counts_and_frozen_dtype_off_the_built_models():
    policy = random_model()
    n = sum(p.numel() for p in policy.parameters())
    reference = frozen_copy(policy, torch.bfloat16).model
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in reference.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # the policy itself is untouched
    assert training_memory(policy, reference) == estimate_memory(n, 0, n, 2)
    lora = apply_lora(random_model().to(torch.bfloat16), r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    adapters = [p for p in lora.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in adapters)  # fp32 master weights on a bf16 base
    assert training_memory(lora, None) == estimate_memory(sum(p.numel() for p in adapters), n, 0, 2)


def test_build_models_keeps_frozen_weights_in_the_frozen_dtype():
    base = ["--model", "tiny", "--beta", "0.01", "--device", "cpu"]
    for extra, frozen in (([], torch.float32), (["--frozen-dtype", "bfloat16"], torch.bfloat16)):
        policy, reference, _ = build_models(parse_config(base + extra), CPU, None)  # full fine-tuning
        assert {p.dtype for p in policy.parameters()} == {torch.float32}
        assert {p.dtype for p in reference.model.parameters()} == {frozen}
        policy, reference, _ = build_models(parse_config(base + extra + ["--lora-r", "4"]), CPU, None)
        assert {p.dtype for p in policy.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in policy.parameters() if not p.requires_grad} == {frozen}
        assert reference.model is policy


def test_a_lora_step_on_a_bf16_base_runs_on_cpu_under_bf16_autocast(tmp_path):
    result = train.main(["--model", "tiny", "--lora-r", "4", "--frozen-dtype", "bfloat16", "--beta", "0.01",
                         "--total-steps", "1", "--prompts-per-step", "2", "--num-generations", "2",
                         "--max-new-tokens", "8", "--eval-problems", "1", "--eval-every", "0", "--save-every", "0",
                         "--log-completions-every", "0", "--threads", "1", "--device", "cpu",
                         "--out-dir", str(tmp_path)])
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and all(v == v for v in (row["loss"], row["grad_norm"]))  # finite, not NaN
    assert (tmp_path / "final" / "adapter_model.safetensors").exists() and result["last_eval"]


def saved_dtypes(directory) -> set:
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return {handle.get_tensor(k).dtype for k in handle.keys()}


def test_save_final_casts_to_the_given_dtype_keeps_tied_weights_and_reloads(tmp_path):
    model = random_model()
    save_final(model, tmp_path, torch.bfloat16)
    assert saved_dtypes(tmp_path) == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the live model is not cast
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16 and reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_a_run_saves_final_in_the_base_models_own_dtype(tmp_path):
    bf16_model = tmp_path / "tiny-bf16"  # the tiny model as a hub checkpoint would ship it: bf16
    shutil.copytree(TINY_MODEL_DIR, bf16_model)
    AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.bfloat16).save_pretrained(bf16_model)
    assert checkpoint_dtype(str(bf16_model)) == torch.bfloat16 and checkpoint_dtype("tiny") == torch.float32
    args = ["--total-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8",
            "--eval-problems", "1", "--eval-every", "0", "--save-every", "0", "--log-completions-every", "0",
            "--threads", "1", "--device", "cpu"]
    train.main(args + ["--model", str(bf16_model), "--out-dir", str(tmp_path / "run")])
    assert saved_dtypes(tmp_path / "run" / "final") == {torch.bfloat16}
    checkpoint = next((tmp_path / "run" / "checkpoints").iterdir())
    assert saved_dtypes(checkpoint) == {torch.float32}  # fp32 master weights: a resume continues exactly
    train.main(args + ["--model", str(bf16_model), "--save-dtype", "float32", "--out-dir", str(tmp_path / "f32")])
    assert saved_dtypes(tmp_path / "f32" / "final") == {torch.float32}
