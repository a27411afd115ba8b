"""The committed tiny Countdown model (e2h_min/assets/tiny-countdown) and the pure helpers of its build script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from e2h_min.tasks.base import PREFILL, SYSTEM_PROMPT
from e2h_min.tasks.countdown import CountdownTask
from tests.scripts import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACT = REPO_ROOT / "e2h_min" / "assets" / "tiny-countdown"


build = load_script("build_tiny_model")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ARTIFACT)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(ARTIFACT).eval()


def test_artifact_loads_with_auto_classes_and_is_small(model, tokenizer):
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    total_bytes = sum(f.stat().st_size for f in ARTIFACT.iterdir() if f.is_file())
    assert total_bytes < 25 * 2**20


def test_auto_tokenizer_keeps_the_trained_pipeline(tokenizer):
    # AutoTokenizer maps model_type qwen2 to Qwen2Tokenizer (one token per digit) unless pinned; see
    # pin_tokenizer_class. The loaded tokenizer must split exactly as the raw tokenizer.json does.
    raw = Tokenizer.from_file(str(ARTIFACT / "tokenizer.json"))
    task = CountdownTask(seed=0)
    problem = task.problem(2, 5, split="test")
    for text in (build.render_prompt(tokenizer, task, problem), task.demonstration(problem)):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids


def test_special_tokens_eos_is_im_end_and_distinct_from_pad(model, tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.bos_token is None
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_template_renders_the_paper_prompt_ending_in_the_open_prefill(tokenizer):
    task = CountdownTask(seed=0)
    problem = task.problem(1, 7, split="test")
    rendered = tokenizer.apply_chat_template(task.messages(problem), tokenize=False, continue_final_message=True)
    expected = (
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
        "<|im_start|>user\n" + problem.user_prompt + "<|im_end|>\n"
        "<|im_start|>assistant\n" + PREFILL
    )
    assert rendered == expected
    assert rendered.endswith("step by step.\n<think>")


def test_tokenizer_round_trips_prompt_and_demonstration_and_isolates_numbers(tokenizer):
    task = CountdownTask(seed=0)
    for level in range(5):
        problem = task.problem(level, 3, split="test")
        prompt = build.render_prompt(tokenizer, task, problem)
        demo = task.demonstration(problem)
        for text in (prompt, demo):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == text
            pieces = [tokenizer.decode([i]) for i in ids]
            # digit runs are their own pre-tokens: no token mixes digits with other characters
            assert all(p.isdigit() or not any(c.isdigit() for c in p) for p in pieces)
        for n in problem.data["numbers"]:  # every number 1..100 is a single token
            assert len(tokenizer(str(n), add_special_tokens=False)["input_ids"]) == 1


def test_train_bpe_tokenizer_on_a_tiny_corpus():
    tok = build.train_bpe_tokenizer(["Using the numbers [44, 19, 35] <answer> 44 + 19 </answer>"] * 5, vocab_size=300)
    assert [tok.token_to_id(t) for t in build.SPECIAL_TOKENS] == [0, 1, 2]
    text = "h\u00e9llo 12345 \u0663 \U0001f600 <answer>"  # unseen bytes still encode: byte-level alphabet
    assert tok.decode(tok.encode(text).ids) == text
    pieces = [tok.decode([i]) for i in tok.encode("[44, 19, 35]").ids]
    assert "44" in pieces and "19" in pieces and "35" in pieces
    with pytest.raises(ValueError):
        build.train_bpe_tokenizer([])


def test_encode_example_masks_the_prompt_and_trains_eos(tokenizer):
    ids, labels = build.encode_example(tokenizer, "<|im_start|>user\nhi", " 3 + 5 = 8</think>")
    prompt_len = len(tokenizer("<|im_start|>user\nhi", add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[prompt_len:-1]) == " 3 + 5 = 8</think>"


def test_collate_right_padded_worked_example():
    ids, labels = build.collate_right_padded([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=9)
    assert ids.tolist() == [[1, 2, 3], [4, 9, 9]]
    assert labels.tolist() == [[-100, 2, 3], [4, -100, -100]]


def test_lr_schedule_worked_examples():
    assert build.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert build.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert build.lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)
    assert build.lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_greedy_generation_solves_some_level0_problems_and_padding_does_not_matter(model, tokenizer):
    task = CountdownTask(seed=0)
    problems = [task.problem(0, i, split="test") for i in range(6)] + [task.problem(2, 0, split="test")]
    prompts = [build.render_prompt(tokenizer, task, p) for p in problems]
    batched = build.greedy_completions(model, tokenizer, prompts, max_new_tokens=48)
    correct = sum(task.is_correct(task.score(p, c)) for p, c in zip(problems[:6], batched[:6]))
    assert correct >= 1
    # left padding (the level-2 prompt is longer) must not change what a prompt generates on its own
    for i in (0, 6):
        assert build.greedy_completions(model, tokenizer, [prompts[i]], max_new_tokens=48) == [batched[i]]


def test_build_info_describes_the_committed_weights_and_the_script_s_settings(model, tokenizer):
    """build_info.json must describe the weights next to it and the recipe in scripts/build_tiny_model.py: a
    rebuilt model, a changed script constant or a renamed level without a rebuild fails here."""
    info = json.loads((ARTIFACT / "build_info.json").read_text())
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["vocab_size"] == len(tokenizer) == model.config.vocab_size
    assert info["model_shape"] == {k: getattr(model.config, k) for k in info["model_shape"]} == build.MODEL_SHAPE
    assert (info["batch_size"], info["peak_lr"], info["warmup_steps"]) == (build.BATCH_SIZE, build.PEAK_LR,
                                                                         build.WARMUP_STEPS)
    assert info["eval"]["problems_per_level"] == build.EVAL_PROBLEMS_PER_LEVEL
    assert info["eval"]["max_new_tokens"] == build.EVAL_MAX_NEW_TOKENS
    assert list(info["eval"]["accuracy"]) == CountdownTask(seed=0).level_names()
    assert all(0.0 <= a <= 1.0 for a in info["eval"]["accuracy"].values())


TESTBED = REPO_ROOT / "e2h_min" / "assets" / "tiny-countdown-testbed"


def test_testbed_is_the_tiny_model_trained_further_with_its_recipe_chain_recorded():
    """The schedule testbed (README: Results) keeps the demo model's tokenizer and shape, and its build_info.json
    records every stage back to the committed demo model, whose own build_info it must repeat exactly."""
    from e2h_min.engine.models import resolve_model_name

    assert Path(resolve_model_name("tiny-testbed")) == TESTBED
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (TESTBED / name).read_bytes() == (ARTIFACT / name).read_bytes()
    info = json.loads((TESTBED / "build_info.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(TESTBED)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["model_shape"] == build.MODEL_SHAPE
    chain = [info]
    while chain[-1].get("init") != "e2h_min/assets/tiny-countdown":
        assert chain[-1].get("init_build_info"), "every stage names the build it started from"
        chain.append(chain[-1]["init_build_info"])
    assert chain[-1]["init_build_info"] == json.loads((ARTIFACT / "build_info.json").read_text())
    assert all(stage["recipe"] == "scripts/build_tiny_model.py" for stage in chain)


def test_parse_level_mix_and_its_errors():
    assert build.parse_level_mix("0:0.1,2:0.5") == {0: 0.1, 2: 0.5}
    for bad in ("", "1", "0:-1", "0:0,1:0", "a:1"):
        with pytest.raises(ValueError):
            build.parse_level_mix(bad)
