"""Model loading: aliases, fp32 master weights, clear errors, device choice."""

import pytest
import torch

from e2h_min.errors import UserError
from e2h_min.engine.models import MODEL_ALIASES, TINY_MODEL_DIR, load_model, pick_device, resolve_model_name
from tests.test_train import random_model


def test_aliases_map_to_the_papers_hub_ids():
    assert resolve_model_name("Qwen2.5-1.5B") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_model_name("Llama-3.2-3B-Instruct") == "meta-llama/Llama-3.2-3B-Instruct"
    assert resolve_model_name("tiny") == str(TINY_MODEL_DIR)
    assert resolve_model_name("org/other") == "org/other"
    assert all("/" in v for v in MODEL_ALIASES.values())


def test_bf16_checkpoint_loads_as_fp32_master_weights(tmp_path):
    random_model().to(torch.bfloat16).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(p.requires_grad for p in model.parameters())
    frozen = load_model(str(tmp_path), torch.device("cpu"), trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training


@pytest.mark.parametrize("name", ["does/not/exist", "./no_such_dir", "/abs/missing"])
def test_missing_model_is_a_user_error_naming_the_fix(name):
    with pytest.raises(UserError, match="--model"):
        load_model(name, torch.device("cpu"))


def test_device_choice_never_calls_cuda_unguarded():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            pick_device("cuda")
