"""The real-model path on Qwen2.5 / Llama-3.2 stand-ins (tests/real_shape.py): prompts, scoring, LoRA, dates.

End to end on each, 2 steps: train (full and LoRA), resume, eval.py; and the pieces those runs rely on, checked
directly: the encoded prompt is the paper's prompt in the model's chat format, a correct answer ending in a merged
`>.` token scores 1.0, LoRA rollouts run on the lean decoder with the merged model's greedy tokens, and a pinned
chat date makes the Llama prompt the same on two different days.
"""

import copy
import datetime as dt
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import chat_template_utils

import eval as evaluate_cli
import train
from e2h_min.rl import scoring
from e2h_min.engine.decoders import LeanDecoder, make_decoder
from e2h_min.rl.scoring import chat_date_variables, encode_prompts, score_rollout
from e2h_min.engine.models import load_tokenizer, peft_building
from e2h_min.engine.sampler import Generation, StopChecker, generate
from e2h_min.tasks import make_task
from tests.real_shape import LLAMA_EOS_IDS, LLAMA_VOCAB_SIZE, QWEN_EOS_IDS, QWEN_VOCAB_SIZE

SHAPES = ["qwen_shape_dir", "llama_shape_dir"]


@pytest.fixture(params=SHAPES)
def shape_dir(request):
    return request.getfixturevalue(request.param)


def set_today(monkeypatch, day: dt.date) -> None:
    """Make "now" be `day` for the chat template's strftime_now and for train.py's default chat date."""

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(day.year, day.month, day.day, 12, tzinfo=tz)

    monkeypatch.setattr(chat_template_utils, "datetime", Frozen)
    monkeypatch.setattr(scoring, "datetime", Frozen)


# ---------------------------------------------------------------------------------------------------------------
# The fixtures are what they claim to be


def test_fixtures_have_the_real_vocabulary_special_ids_and_configs(qwen_shape_dir, llama_shape_dir):
    qwen, llama = load_tokenizer(str(qwen_shape_dir)), load_tokenizer(str(llama_shape_dir))
    assert len(qwen) == 151665 and qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) \
        == [151643, 151644, 151645] and qwen.eos_token_id == 151645
    assert [qwen.decode([i]) for i in qwen("2024", add_special_tokens=False)["input_ids"]] == ["2", "0", "2", "4"]
    assert len(llama) == LLAMA_VOCAB_SIZE and llama.convert_tokens_to_ids(
        ["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"]) == [128000, 128006, 128009]
    for directory, vocab, eos in ((qwen_shape_dir, QWEN_VOCAB_SIZE, QWEN_EOS_IDS),
                                  (llama_shape_dir, LLAMA_VOCAB_SIZE, LLAMA_EOS_IDS)):
        config = json.loads((directory / "config.json").read_text())
        assert config["vocab_size"] == vocab and config["tie_word_embeddings"]
        assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == eos
    assert json.loads((qwen_shape_dir / "config.json").read_text())["rope_parameters"]["rope_theta"] == 1e6


def test_the_encoded_prompt_decodes_to_the_papers_prompt_in_the_models_chat_format(qwen_shape_dir, llama_shape_dir):
    task = make_task("countdown")
    problem = task.problem(2, 5)
    qwen = load_tokenizer(str(qwen_shape_dir))
    assert qwen.decode(encode_prompts(qwen, task, [problem])[0]) == (
        f"<|im_start|>system\n{task.system_prompt}<|im_end|>\n<|im_start|>user\n{problem.user_prompt}<|im_end|>\n"
        f"<|im_start|>assistant\n{task.prefill}")
    llama = load_tokenizer(str(llama_shape_dir))
    assert llama.decode(encode_prompts(llama, task, [problem], chat_date_variables("2024-07-26"))[0]) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: 26 Jul 2024\n\n{task.system_prompt.strip()}<|eot_id|><|start_header_id|>user<|end_header_id|>"
        f"\n\n{problem.user_prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{task.prefill}")


# ---------------------------------------------------------------------------------------------------------------
# Scoring: a merged final token


@pytest.mark.parametrize("tail", [".", "\n\n"])
def test_a_correct_answer_whose_last_token_is_merged_with_the_stop_string_scores_one(shape_dir, tail):
    tokenizer = load_tokenizer(str(shape_dir))
    task = make_task("countdown")
    problem = task.problem(1, 3)
    ids = tokenizer(task.demonstration(problem) + tail, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-1:]) == ">" + tail  # one token: the end of </answer> and what follows
    assert StopChecker(tokenizer, ["</answer>"]).first_stop(ids, 0, len(ids)) == len(ids) - 1
    completion = torch.tensor([ids])
    rollout = Generation([[0]], 1, completion, torch.ones_like(completion, dtype=torch.bool),
                      torch.zeros(completion.shape), torch.ones(1, dtype=torch.bool))
    texts, rewards = score_rollout(task, [problem], tokenizer, rollout, ["</answer>"])
    assert texts == [task.demonstration(problem)] and rewards.tolist() == [1.0]


# ---------------------------------------------------------------------------------------------------------------
# LoRA rollouts on the lean decoder


def test_lora_rollouts_run_on_the_lean_decoder_and_equal_the_merged_models_greedy_tokens(shape_dir):
    import peft  # a core dependency (requirements.txt): the paper's recipe is LoRA

    base = AutoModelForCausalLM.from_pretrained(shape_dir, dtype=torch.float32)
    torch.manual_seed(0)  # init_lora_weights=False: B is random too, so the adapter changes the output
    with peft_building():
        policy = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False, target_modules=["q_proj", "v_proj"]))
    policy.eval()
    assert isinstance(make_decoder(policy), LeanDecoder)
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]  # different lengths: left padding and the mask path
    run = lambda model, **kw: generate(model, prompts, 2, 10, [], 0, greedy=True, **kw).completion_ids  # noqa: E731
    lora_tokens = run(policy)
    merged = copy.deepcopy(policy).merge_and_unload()
    assert torch.equal(lora_tokens, run(merged, decoder="hf"))  # the merged model, through model(...) calls
    assert torch.equal(lora_tokens, run(policy, decoder="hf"))
    assert not torch.equal(lora_tokens, run(base))  # the adapter is applied, not skipped
    with policy.disable_adapter():  # the LoRA reference policy: the base model, still on the lean decoder
        assert torch.equal(run(policy), run(base))


# ---------------------------------------------------------------------------------------------------------------
# Llama's date


def test_the_llama_prompt_is_the_same_on_two_different_dates_once_the_date_is_pinned(llama_shape_dir, monkeypatch):
    tokenizer = load_tokenizer(str(llama_shape_dir))
    task = make_task("countdown")
    problem = task.problem(0, 0)
    prompts = {}
    for day in (dt.date(2025, 1, 31), dt.date(2026, 2, 1)):
        set_today(monkeypatch, day)
        prompts[day] = (encode_prompts(tokenizer, task, [problem])[0],
                        encode_prompts(tokenizer, task, [problem], chat_date_variables("2025-01-31"))[0])
    (unpinned_a, pinned_a), (unpinned_b, pinned_b) = prompts.values()
    assert unpinned_a != unpinned_b  # the template really writes today's date
    assert pinned_a == pinned_b == unpinned_a


# ---------------------------------------------------------------------------------------------------------------
# End to end: train (full and LoRA), resume, eval.py

ARGS = ["--total-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "6",
        "--eval-problems", "1", "--eval-every", "0", "--log-completions-every", "0", "--beta", "0.01",
        "--lr", "1e-4", "--warmup-steps", "0", "--threads", "1"]
TIMING_FIELDS = {"rollout_seconds", "update_seconds", "tokens_per_second"}


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def test_full_fine_tuning_end_to_end_then_eval_reproduces_the_runs_evaluation(shape_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "full"
    set_today(monkeypatch, dt.date(2025, 3, 9))
    # --lora-r 0: the paper preset these architectures get turns LoRA on; full fine-tuning is asked for
    result = train.main(ARGS + ["--model", str(shape_dir), "--lora-r", "0", "--save-every", "0",
                                "--out-dir", str(run_dir)])
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["chat_date"] == "2025-03-09"  # the start date, UTC
    assert saved["lora_r"] == 0  # the user's flag won over the preset's 32 (tests/test_presets.py)
    assert not (run_dir / "final" / "adapter_config.json").exists()
    report = evaluate_cli.main(["--model", str(run_dir), "--threads", "1", "--quiet", "--out", str(tmp_path / "e")])
    assert report["greedy"] == result["last_eval"] and report["step"] == 2


def test_lora_end_to_end_resumes_to_identical_metrics_on_another_day_and_eval_uses_the_runs_date(
        shape_dir, tmp_path, monkeypatch):

    run_dir = tmp_path / "lora"
    set_today(monkeypatch, dt.date(2025, 1, 31))
    lora = ["--model", str(shape_dir), "--lora-r", "4", "--lora-alpha", "8", "--save-every", "1",
            "--gradient-checkpointing"]
    result = train.main(ARGS + lora + ["--out-dir", str(run_dir)])
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "config.json").read_text())["chat_date"] == "2025-01-31"

    # Resume from step 1 on a later day: same prompts (the pinned date), so the same step 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "final"), shutil.rmtree(resumed / "checkpoints" / "step_000002")
    set_today(monkeypatch, dt.date(2026, 2, 1))
    train.main(ARGS + lora + ["--resume", str(resumed)])
    assert json.loads((resumed / "config.json").read_text())["chat_date"] == "2025-01-31"
    assert metrics(resumed) == metrics(run_dir)

    report = evaluate_cli.main(["--model", str(run_dir), "--threads", "1", "--quiet", "--out", str(tmp_path / "e")])
    assert report["chat_date"] == "2025-01-31" and report["greedy"] == result["last_eval"]


def test_chat_date_is_rendered_as_llama_writes_it_and_a_bad_date_is_one_line_exit_2(capsys, tmp_path):
    assert scoring.chat_date_variables("2024-07-26") == {"date_string": "26 Jul 2024"}
    assert scoring.chat_date_variables("2025-12-01") == {"date_string": "01 Dec 2025"}
    assert scoring.chat_date_variables(None) == {}
    for main, argv in ((train.main, ["--out-dir", str(tmp_path)]), (evaluate_cli.main, ["--model", "tiny"])):
        with pytest.raises(SystemExit) as exc:
            main(argv + ["--chat-date", "2024-13-01"])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "--chat-date must be a date YYYY-MM-DD" in err and len(err.splitlines()) == 1
