"""Presets are chosen by what the model is (its build_info / config), print every value they set, and lose to
every explicit flag."""

import shutil

import pytest
from transformers import GPT2Config, LlamaConfig, Qwen2Config

import train
from e2h_min.errors import UserError
from e2h_min.run.config import Config
from e2h_min.run.presets import DEMO_PRESET, PAPER_RECIPE, describe_preset, parse_config, resolve_config
from e2h_min.engine.models import TINY_MODEL_DIR, require_peft

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936, tie_word_embeddings=True, rope_theta=1e6)


def config_dir(tmp_path, config) -> str:
    """A model directory holding only config.json (presets never read weights)."""
    config.architectures = [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                             "gpt2": "GPT2LMHeadModel"}[config.model_type]]
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_the_tiny_model_gets_the_demo_preset_by_alias_by_its_path_and_as_a_copy(tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(TINY_MODEL_DIR, copy)
    for model in ("tiny", str(TINY_MODEL_DIR), str(copy)):
        cfg, preset, applied = resolve_config(["--model", model])
        assert preset.name == "demo", model
        assert applied == DEMO_PRESET and cfg.lr == DEMO_PRESET["lr"] and cfg.lora_r == 0


def test_a_qwen25_shaped_model_gets_the_paper_recipe_with_the_task_budgets(tmp_path):
    model = config_dir(tmp_path, Qwen2Config(**QWEN25_05B))
    budgets = {"countdown": (1600, 512), "gsm8k": (1600, 512), "blocksworld": (1200, 512), "math": (1200, 1600)}
    for task, (steps, tokens) in budgets.items():
        cfg, preset, applied = resolve_config(["--model", model, "--task", task])
        assert preset.name == "paper" and "494.0M parameters" in preset.reason
        assert (cfg.total_steps, cfg.max_new_tokens) == (steps, tokens), task
        assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (32, 64.0, 0.1, "q_proj,v_proj")
        assert (cfg.lr, cfg.lr_schedule, cfg.num_generations, cfg.prompts_per_step, cfg.beta, cfg.kl_estimator) == \
            (1e-6, "cosine", 8, 8, 0.001, "k3")
        line = describe_preset(preset, applied)
        assert all(f"--{k.replace('_', '-')} {v}" in line for k, v in applied.items())  # every value it set
    # the estimator follows the KL's placement under the preset too: k1 when the KL is in the reward
    assert resolve_config(["--model", model, "--kl-in-reward"])[0].kl_estimator == "k1"
    # FSDP is full fine-tuning: the preset's LoRA is named in the one-line refusal, with the way out
    with pytest.raises(UserError, match="the paper preset turns it on.*--lora-r 0"):
        resolve_config(["--model", model, "--parallel", "fsdp"])
    assert resolve_config(["--model", model, "--parallel", "fsdp", "--lora-r", "0"])[0].lora_r == 0
    # full fine-tuning asked for: the line does not claim to set the LoRA shape it does not use
    line = describe_preset(*resolve_config(["--model", model, "--lora-r", "0"])[1:])
    assert "--lora-alpha" not in line and "--lr 1e-06" in line and line.endswith("your flags win over its --lora-r")


def test_llama_architecture_and_paper_hub_ids_get_the_paper_recipe_other_models_none(tmp_path):
    llama = config_dir(tmp_path / "llama", LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2))
    assert resolve_config(["--model", llama])[1].name == "paper"
    # a hub id that is not in the local cache: its family name decides (no network is touched)
    assert resolve_config(["--model", "Qwen2.5-1.5B", "--task", "math"])[0].max_new_tokens == 1600
    gpt2 = config_dir(tmp_path / "gpt2", GPT2Config(n_layer=2, n_embd=64, n_head=4))
    cfg, preset, applied = resolve_config(["--model", gpt2])
    assert preset.name == "none" and applied == {}
    assert cfg == Config(model=gpt2, kl_estimator="k3")  # the flags' defaults (k3: the in-loss KL's), full FT


def test_explicit_flags_win_over_every_preset(tmp_path):
    model = config_dir(tmp_path, Qwen2Config(**QWEN25_05B))
    cfg, preset, applied = resolve_config(["--model", model, "--task", "math", "--lora-r", "0", "--lr", "3e-6",
                                           "--max-new-tokens", "64"])
    assert (cfg.lora_r, cfg.lr, cfg.max_new_tokens, cfg.total_steps) == (0, 3e-6, 64, 1200)
    assert not {"lora_r", "lr", "max_new_tokens"} & set(applied)
    assert "your flags win over its --lora-r, --lr, --max-new-tokens" in describe_preset(preset, applied)
    demo = parse_config(["--model", str(TINY_MODEL_DIR), "--lr", "1e-6", "--beta", "0.01", "--total-steps", "3"])
    assert (demo.lr, demo.beta, demo.total_steps, demo.warmup_steps) == (1e-6, 0.01, 3, 2)  # warmup kept valid
    assert set(PAPER_RECIPE) <= {f for f in Config.__dataclass_fields__}


def test_lora_without_peft_is_one_line_naming_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(UserError, match=r"needs peft.*pip install -r requirements.txt.*--lora-r 0"):
        require_peft(32)
    require_peft(0)  # full fine-tuning does not need it
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded
        train.main(["--model", str(TINY_MODEL_DIR), "--lora-r", "4", "--device", "cpu"])
    assert exit_info.value.code == 2


def test_resume_compares_the_fields_a_run_recorded_and_skips_those_it_predates():
    import dataclasses

    from e2h_min.run.runlog import check_resume_config

    cfg = Config()
    saved = dataclasses.asdict(cfg)
    del saved["frozen_dtype"]  # a run saved before --frozen-dtype existed
    check_resume_config(saved, cfg)
    with pytest.raises(UserError, match="--lora-r was 0, now 32"):
        check_resume_config({**saved, "lora_r": 0}, dataclasses.replace(cfg, lora_r=32))


def test_a_paper_model_prints_its_preset_and_on_cpu_the_no_gpu_note_before_loading(tmp_path, capsys):
    from e2h_min.engine.models import pick_device

    model = config_dir(tmp_path, Qwen2Config(**QWEN25_05B))  # config and tokenizer only: loading weights fails
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the prompts' lengths are checked with it first
        shutil.copy(TINY_MODEL_DIR / name, tmp_path / name)
    with pytest.raises(SystemExit):
        train.main(["--model", model, "--out-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "preset paper (Qwen2ForCausalLM, 494.0M parameters" in out and "--lora-r 32" in out
    assert ("note: no GPU found" in out) == (pick_device("auto").type == "cpu")


# ----------------------------------------------------------------------------- --help
def test_help_shows_every_flag_once_in_its_group_and_says_which_preset_applies(capsys):
    import dataclasses
    import re

    from e2h_min.run.config import HELP_GROUPS

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    assert sum(f"\n{title}:\n" in text for title in HELP_GROUPS) == len(HELP_GROUPS) >= 6
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert len(re.findall(rf"^  {re.escape(flag)}(?![\w-])", text.split("options:")[1], re.M)) == 1, flag
        assert "_" not in f.name or f"--{f.name}" not in text, f"{f.name}: the underscored alias is shown"
    intro = text.split("options:")[0]
    assert "bare `python train.py`" in intro and "demo preset: --schedule cosine --lr 0.0001" in intro
    assert "`--model Qwen2.5-1.5B`" in intro and "paper preset" in intro and "overriding the defaults" in intro


def test_flags_are_not_abbreviated_and_underscored_aliases_still_work(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(["--total-step", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --total-step" in capsys.readouterr().err
    cfg = parse_config(["--total_steps", "3", "--no-share_prompt_forward"])
    assert cfg.total_steps == 3 and cfg.share_prompt_forward is False


def test_config_is_frozen():
    import dataclasses

    cfg = parse_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert dataclasses.replace(cfg, lr=1.0).lr == 1.0 and cfg.eval_pass_k == ()
