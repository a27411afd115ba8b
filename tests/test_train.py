"""The update path: chunked log-probs, micro-batch invariance, EOS in the loss, the loop end to end, errors."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import train
from e2h_min.run import bookkeeping
from e2h_min.run.setup import lr_multiplier
from e2h_min.run.config import Config
from e2h_min.engine.logprobs import completion_logprobs, micro_batches, pack_sequences
from e2h_min.engine.models import TINY_MODEL_DIR, ValueHead, frozen_copy
from e2h_min.rl.ppo import ppo_update
from e2h_min.engine.sampler import generate

requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")


def random_model(seed=0, vocab=97):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=3, pad_token_id=0,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).float()


def sample_batch(seed=1, n=6, vocab=97):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, vocab, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    completions = [torch.randint(4, vocab, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(n)]
    return prompts, completions


def naive_logprobs(model, prompt, completion, temperature):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)
    return [logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(completion)]


def test_chunked_completion_logprobs_match_full_forward():
    model = random_model()
    prompts, completions = sample_batch()
    batch = pack_sequences(prompts, completions, pad_id=0)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, batch, temperature=0.7, chunk_rows=3)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        assert logp[i, :len(c)].tolist() == pytest.approx(naive_logprobs(model, p, c, 0.7), abs=1e-5)
        assert torch.all(logp[i, len(c):] == 0) and torch.all(entropy[i, len(c):] == 0)
    # entropy is the true entropy of the tempered distribution at the first completion position
    first = torch.log_softmax(model(input_ids=torch.tensor([prompts[0]])).logits[0, -1] / 0.7, -1)
    assert entropy[0, 0].item() == pytest.approx(-(first.exp() * first).sum().item(), abs=1e-4)


def test_without_entropy_the_logprobs_are_the_same_and_no_entropy_is_computed():
    model = random_model()
    batch = pack_sequences(*sample_batch(), pad_id=0)
    with torch.no_grad():
        logp, entropy = completion_logprobs(model, batch, temperature=0.7, chunk_rows=3)
        bare, none = completion_logprobs(model, batch, temperature=0.7, chunk_rows=3, with_entropy=False)
    assert none is None and entropy is not None
    assert torch.equal(bare, logp)


@pytest.mark.parametrize("checkpoint_bytes", [0, 2 ** 62])  # every chunk checkpointed / none (the default here)
def test_chunking_and_checkpointing_do_not_change_gradients(monkeypatch, checkpoint_bytes):
    import e2h_min.engine.logprobs

    prompts, completions = sample_batch()
    grads = []
    for chunk, threshold in ((1000, 2 ** 62), (4, checkpoint_bytes)):  # reference: one chunk, no checkpoint
        monkeypatch.setattr(e2h_min.engine.logprobs, "CHECKPOINT_LOGITS_BYTES", threshold)
        model = random_model()
        logp, _ = completion_logprobs(model, pack_sequences(prompts, completions, 0), 1.0, chunk_rows=chunk)
        logp.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_sampler_logprobs_equal_training_logprobs_at_the_sampling_temperature():
    model = random_model().eval()
    prompts, _ = sample_batch(n=3)
    rollout = generate(model, prompts, 2, 6, eos_token_ids=[3], pad_id=0, temperature=0.6,
                       generator=torch.Generator().manual_seed(0))
    completions = rollout.completion_token_lists()
    batch = pack_sequences([prompts[i // 2] for i in range(6)], completions, 0)
    with torch.no_grad():
        at_t, _ = completion_logprobs(model, batch, temperature=0.6)
        at_one, _ = completion_logprobs(model, batch, temperature=1.0)
    mask = batch["completion_mask"]
    assert torch.allclose(at_t[mask], rollout.logprobs[mask], atol=1e-4)
    assert not torch.allclose(at_one[mask], rollout.logprobs[mask], atol=1e-2)  # the trap: T=1 at training


def run_update(micro_batch_size, loss_type, beta=0.05, **overrides):
    """One policy_update with SGD(lr=1): the parameter change is exactly minus the accumulated gradient."""
    policy = random_model()
    reference = frozen_copy(random_model(seed=5)) if beta else None
    value_head = None
    if overrides.get("advantage") == "ppo":
        torch.manual_seed(11)
        value_head = ValueHead(policy.config.hidden_size)
        torch.nn.init.normal_(value_head.score.weight, std=0.1)  # non-zero values, so GAE uses them
    params = list(policy.parameters()) + (list(value_head.parameters()) if value_head else [])
    prompts, completions = sample_batch(n=8)
    advantages = torch.randn(8, generator=torch.Generator().manual_seed(3))
    cfg = Config(micro_batch_size=micro_batch_size, loss_type=loss_type, beta=beta, max_new_tokens=8,
                 max_grad_norm=0.0, temperature=0.9, **overrides)
    before = [p.detach().clone() for p in params]
    sampler_lp = [[0.0] * len(c) for c in completions]
    args = (policy, reference, torch.optim.SGD(params, lr=1.0), prompts, completions, advantages, sampler_lp, cfg,
            torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    stats = ppo_update(*args, value_head) if value_head else train.policy_update(*args)  # ppo: advantages = rewards
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)]), stats


@pytest.mark.parametrize("loss_type, overrides", [
    ("grpo", {}), ("dapo", {}), ("dr_grpo", {}),
    ("grpo", {"importance_sampling_level": "sequence", "num_iterations": 2}),
    ("dapo", {"advantage": "ppo"}),
    ("grpo", {"advantage": "ppo", "kl_in_reward": True, "num_iterations": 2}),
])
def test_gradients_do_not_depend_on_micro_batch_size(loss_type, overrides):
    whole, stats_whole = run_update(8, loss_type, **overrides)
    assert whole.abs().max() > 1e-4  # the update is not trivially zero
    for size in (1, 2):
        part, stats = run_update(size, loss_type, **overrides)
        assert torch.allclose(part, whole, atol=1e-5), (loss_type, overrides, size)
        assert stats["loss"] == pytest.approx(stats_whole["loss"], abs=1e-5)
        assert stats["kl"] == pytest.approx(stats_whole["kl"], rel=1e-5, abs=1e-6)


def test_ppo_update_trains_the_value_head_and_reports_its_diagnostics():
    delta, stats = run_update(4, "grpo", advantage="ppo")
    assert delta[-33:].abs().max() > 0  # value head weight (32) and bias (1) moved
    assert {"value_loss", "explained_variance"} <= set(stats)


def test_eos_token_is_inside_the_loss_even_when_pad_equals_eos():
    # pad id 3 == eos id 3: masks come from lengths, so the final EOS still carries loss weight
    batch = pack_sequences([[5, 6]], [[7, 3]], pad_id=3)
    assert batch["completion_mask"].tolist() == [[True, True]]
    assert batch["targets"].tolist() == [[7, 3]] and batch["logit_index"].tolist() == [[1, 2]]


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = Config(total_steps=100, warmup_steps=10)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_micro_batches_sort_by_length_and_cover_every_sample():
    batches = micro_batches([5, 1, 9, 3, 7], 2)
    assert batches == [[1, 3], [0, 4], [2]]


# ----------------------------------------------------------------------------- command line errors
@pytest.mark.parametrize("argv, fragment", [
    (["--num-generations", "1"], "--num-generations must be >= 2"),
    (["--schedule", "linear"], "unknown --schedule 'linear'"),
    (["--lr", "fast"], "'fast' is not a valid float"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--model", "does/not/exist"], "cannot load model"),
    (["--task", "math"], "reads a data file"),
])
def test_bad_input_gives_one_line_and_exit_code_2(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(argv + ["--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------- end to end
TINY_ARGS = ["--total-steps", "4", "--prompts-per-step", "2", "--num-generations", "4", "--max-new-tokens", "24",
             "--eval-problems", "2", "--eval-every", "0", "--save-every", "2", "--log-completions-every", "2",
             "--beta", "0.01", "--threads", "1"]
TIMING_FIELDS = {"rollout_seconds", "update_seconds", "tokens_per_second"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@requires_tiny
def test_train_end_to_end_writes_metrics_checkpoints_and_a_reloadable_policy(tmp_path):
    result = train.main(TINY_ARGS + ["--out-dir", str(tmp_path)])
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    required = {"step", "lr", "loss", "reward_mean", "reward_std", "accuracy", "level_probs", "level_counts", "kl",
                "clip_ratio", "entropy", "completion_length_mean", "clipped_ratio", "frac_reward_zero_std",
                "grad_norm", "rollout_seconds", "update_seconds"}
    assert required <= set(rows[0])
    for r in rows:
        assert sum(r["level_counts"]) == 2 and math.isclose(sum(r["level_probs"]), 1.0, abs_tol=1e-5)
        assert any(k.startswith("accuracy/L") for k in r)
    evals = read_jsonl(tmp_path / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 4] and "OOD/accuracy" in evals[0]
    assert result["last_eval"]["OOD"]["n"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert reloaded.config.model_type == "qwen2"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


@requires_tiny
def test_killed_run_resumes_to_identical_metrics(tmp_path, monkeypatch):
    full, broken = tmp_path / "full", tmp_path / "broken"
    train.main(TINY_ARGS + ["--out-dir", str(full)])

    real_save = bookkeeping.save_checkpoint

    def save_then_die(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # as if killed right after the step-2 checkpoint
        return path

    monkeypatch.setattr(bookkeeping, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY_ARGS + ["--out-dir", str(broken)])
    monkeypatch.setattr(bookkeeping, "save_checkpoint", real_save)
    # a half-finished step 3 line would be dropped too; add one to prove it
    with open(broken / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 3, "partial": True}) + "\n")
    train.main(TINY_ARGS + ["--resume", str(broken)])

    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]  # noqa: E731
    assert strip(read_jsonl(broken / "metrics.jsonl")) == strip(read_jsonl(full / "metrics.jsonl"))
    a = AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(broken / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@requires_tiny
def test_resume_with_a_changed_config_is_refused(tmp_path, capsys):
    train.main(TINY_ARGS + ["--total-steps", "2", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        train.main(TINY_ARGS + ["--total-steps", "2", "--lr", "0.1", "--resume", str(tmp_path)])
    assert exc.value.code == 2 and "lr was" in capsys.readouterr().err


@requires_tiny
@pytest.mark.parametrize("flags, keys", [
    (["--advantage", "ppo", "--beta", "0.01", "--kl-in-reward"], {"value_loss", "explained_variance", "kl"}),
    (["--loss-type", "dapo", "--epsilon-high", "0.28", "--dynamic-sampling", "--max-resample-rounds", "2"],
     {"resample_rounds", "clip_ratio/clipped_high", "clip_ratio/region"}),
    (["--advantage", "rloo", "--drop-zero-std", "--mask-truncated", "--importance-sampling-level", "sequence",
      "--num-iterations", "2"], {"trained_fraction", "approx_kl_old"}),
])
def test_algorithm_variants_run_end_to_end_with_their_diagnostics(tmp_path, flags, keys):
    train.main(TINY_ARGS + ["--total-steps", "2", "--save-every", "0", "--out-dir", str(tmp_path)] + flags)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    always = {"frac_reward_zero_std", "clipped_ratio", "trained_fraction", "resample_rounds"}
    from_update = {"entropy", "approx_kl_old", "clip_ratio", "logprob_mismatch", "grad_norm"} | keys - always
    for row in rows:
        assert always <= set(row)
        if row["trained_fraction"] > 0:  # --drop-zero-std may leave nothing to train on in a step
            assert from_update <= set(row), from_update - set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
