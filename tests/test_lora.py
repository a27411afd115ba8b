"""LoRA: only adapters train, the reference is the adapter switched off, the merged model reloads."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import train
from e2h_min.run.config import Config
from e2h_min.engine.logprobs import completion_logprobs, pack_sequences
from e2h_min.engine.models import apply_lora, lora_reference
from tests.test_train import random_model, sample_batch


def test_lora_update_trains_adapters_only_and_reference_is_the_base_model(tmp_path):
    base = random_model()
    untouched = copy.deepcopy(base)
    policy = apply_lora(base, r=4, alpha=8, dropout=0.0, targets="q_proj,v_proj")
    reference = lora_reference(policy)
    prompts, completions = sample_batch(n=4)
    batch = pack_sequences(prompts, completions, 0)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    frozen_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    cfg = Config(micro_batch_size=2, beta=0.1, max_new_tokens=8, lr=1e-2)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(2):
        stats = train.policy_update(policy, reference, optimizer, prompts, completions, torch.randn(4),
                                    [[0.0] * len(c) for c in completions], cfg, torch.device("cpu"),
                                    lambda: torch.autocast("cpu", enabled=False))
    assert stats["kl"] > 0  # the adapted policy moved away from its reference
    assert all(torch.equal(p, frozen_before[n]) for n, p in policy.named_parameters() if not p.requires_grad)
    with torch.no_grad():
        with reference.context():
            ref_logp, _ = completion_logprobs(reference.model, batch)
        base_logp, _ = completion_logprobs(untouched, batch)
        policy_logp, _ = completion_logprobs(policy, batch)
    assert torch.allclose(ref_logp, base_logp, atol=1e-6)
    assert not torch.allclose(policy_logp, base_logp, atol=1e-4)
    merged = copy.deepcopy(policy).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        merged_logp, _ = completion_logprobs(reloaded, batch)
    assert torch.allclose(merged_logp, policy_logp, atol=1e-5)


def test_unknown_lora_target_is_a_one_line_user_error():
    from e2h_min.errors import UserError
    with pytest.raises(UserError, match="--lora-targets"):
        apply_lora(random_model(), r=4, alpha=8, dropout=0.0, targets="no_such_proj")


def test_lora_run_end_to_end_on_the_tiny_model_saves_adapter_and_a_reloadable_merged_model(tmp_path):
    from tests.test_train import TINY_ARGS, requires_tiny
    if requires_tiny.args[0]:
        pytest.skip(requires_tiny.kwargs["reason"])
    train.main(TINY_ARGS + ["--total-steps", "2", "--save-every", "0", "--lora-r", "4", "--lora-alpha", "8",
                            "--save-merged", "--out-dir", str(tmp_path)])
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    assert (tmp_path / "checkpoints" / "step_000002" / "adapter_model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final-merged")
    assert merged.config.model_type == "qwen2" and not hasattr(merged, "peft_config")
    from huggingface_hub import ModelCard  # a transformers dependency
    adapter_card, merged_card = (ModelCard.load(tmp_path / name / "README.md") for name in ("final", "final-merged"))
    assert adapter_card.data.library_name == "peft" and merged_card.data.library_name == "transformers"
    assert adapter_card.data.base_model == merged_card.data.base_model == "e2h_min/assets/tiny-countdown"
    assert "LoRA adapter for" in adapter_card.text and "LoRA r=4, alpha=8.0" in merged_card.text
