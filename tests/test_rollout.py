"""The batched sampler (e2h_min/engine/sampler.py, e2h_min/engine/decoders.py) against transformers' generate and naive loops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from e2h_min.engine.sampler import (StopChecker, compaction_order, generate, left_pad, sample_from_weights,
                             sample_next_token)
from e2h_min.tasks.countdown import CountdownTask

TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "e2h_min" / "assets" / "tiny-countdown"
DECODERS = [dict(decoder="hf"), dict(decoder="lean"), dict(decoder="lean", static_shapes=True)]
DECODER_IDS = ["hf", "lean", "lean-static"]
PAD, EOS = 0, 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (tests/conftest.py says why)."""


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained in a fraction of a second on Countdown prompts and demonstrations."""
    task = CountdownTask(seed=3)
    problems = [task.problem(level % 4, i) for i, level in enumerate(range(60))]
    texts = [p.user_prompt for p in problems] + [task.demonstration(p) for p in problems]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>")
    assert (tok.pad_token_id, tok.eos_token_id) == (PAD, EOS)
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    """A random small Qwen2 (GQA: 4 heads, 2 KV heads); a wide init so greedy choices have clear margins."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer) + 16, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=True, pad_token_id=PAD)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Four prompts of different lengths (so left padding matters)."""
    texts = ["Using the numbers [3, 5], make 8.", "Using 7 and 2", "[44, 19, 35] equals 98. Show work.", "1 +"]
    return [tokenizer(t).input_ids for t in texts]


def hf_greedy(model, prompts, max_new_tokens, eos=None):
    ids, attention = left_pad(prompts, PAD, "cpu")
    out = model.generate(input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=max_new_tokens,
                         eos_token_id=eos, pad_token_id=PAD)
    return out[:, ids.shape[1]:]


def cut_after(tokens: list[int], eos: int) -> list[int]:
    """Tokens up to and including the first eos."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def naive_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token from one plain forward over prompt + completion: [T]."""
    full = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=full).logits[0].float()  # [L + T, V]
    logprobs = torch.log_softmax(logits[len(prompt) - 1: -1] / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("options", DECODERS, ids=DECODER_IDS)
def test_greedy_is_token_for_token_model_generate_with_left_padding(model, prompts, options):
    reference = hf_greedy(model, prompts, 24)
    rollout = generate(model, prompts, 1, 24, eos_token_ids=[], pad_id=PAD, greedy=True, **options)
    assert torch.equal(rollout.completion_ids, reference)
    assert rollout.completion_mask.all() and not rollout.finished.any()
    # G samples of a prompt are G copies of the same greedy completion (each prompt prefilled once).
    grouped = generate(model, prompts, 3, 24, eos_token_ids=[], pad_id=PAD, greedy=True, **options)
    assert torch.equal(grouped.completion_ids, reference.repeat_interleave(3, dim=0))


def test_compiled_static_step_gives_model_generate_tokens_and_replays_one_graph(model, prompts):
    """compile_step (torch.compile of the static step; CUDA graphs on a GPU, a candidate CUDA default) on CPU:
    the same greedy tokens, and a second call of the same shape compiles nothing new."""
    from torch._dynamo.utils import counters

    from e2h_min.engine import decoders

    reference = hf_greedy(model, prompts, 12)
    graphs_before = counters["stats"]["unique_graphs"]
    try:
        first = generate(model, prompts, 2, 12, eos_token_ids=[], pad_id=PAD, greedy=True, compile_step=True)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > graphs_before  # the step really was compiled
        again = generate(model, prompts, 2, 12, eos_token_ids=[], pad_id=PAD, greedy=True, compile_step=True)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        decoders._STATIC_BUFFERS.clear()
        decoders._COMPILED.clear()
        torch._dynamo.reset()
    for rollout in (first, again):
        assert torch.equal(rollout.completion_ids, reference.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_other_architectures_lean_llama_and_generic_fallback_match_model_generate(prompts, arch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from e2h_min.engine.decoders import HFCacheDecoder, LeanDecoder, make_decoder

    torch.manual_seed(0)
    if arch == "llama":  # same decoder-layer layout as Qwen2 minus the q/k/v biases: runs the lean decoder
        other = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=128, initializer_range=0.1))
    else:  # learned positions, fused qkv: falls back to model(...) with a DynamicCache
        other = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           initializer_range=0.1, bos_token_id=EOS, eos_token_id=EOS))
    other.eval()
    assert isinstance(make_decoder(other), LeanDecoder if arch == "llama" else HFCacheDecoder)
    reference = hf_greedy(other, prompts, 16)
    rollout = generate(other, prompts, 2, 16, eos_token_ids=[], pad_id=PAD, greedy=True)
    assert torch.equal(rollout.completion_ids, reference.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("options", DECODERS, ids=DECODER_IDS)
def test_greedy_with_eos_matches_model_generate_and_keeps_eos(model, prompts, options):
    free = hf_greedy(model, prompts, 20)
    eos = int(free[0, 5])  # a token row 0 really emits, so at least one row stops early
    reference = [cut_after(row, eos) for row in hf_greedy(model, prompts, 20, eos=eos).tolist()]
    rollout = generate(model, prompts, 1, 20, eos_token_ids=[eos], pad_id=PAD, greedy=True, **options)
    assert rollout.completion_token_lists() == reference
    row0 = reference[0]
    assert row0[-1] == eos and len(row0) <= 6 and rollout.finished[0]
    assert rollout.completion_mask[0, len(row0) - 1] and rollout.logprobs[0, len(row0) - 1] < 0
    assert not rollout.completion_mask[0, len(row0):].any()
    assert (rollout.completion_ids[0, len(row0):] == PAD).all()
    assert rollout.finished.tolist() == [eos in row for row in reference]


@pytest.mark.parametrize("decoder", ["hf", "lean"])
def test_rows_that_stop_early_do_not_change_the_others(model, prompts, decoder):
    free = hf_greedy(model, prompts, 16)
    eos = int(free[1, 2])
    together = generate(model, prompts, 2, 16, eos_token_ids=[eos], pad_id=PAD, greedy=True, decoder=decoder,
                        compact_fraction=0.01)  # compact the batch after every finished row
    assert together.finished.any() and not together.finished.all()
    for i, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 1, 16, eos_token_ids=[eos], pad_id=PAD, greedy=True, decoder=decoder)
        assert together.completion_token_lists()[2 * i] == alone.completion_token_lists()[0]
        assert together.completion_token_lists()[2 * i + 1] == alone.completion_token_lists()[0]


@pytest.mark.parametrize("options", DECODERS, ids=DECODER_IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_a_full_forward_recompute(model, prompts, options, temperature):
    generator = torch.Generator().manual_seed(1)
    rollout = generate(model, prompts, 3, 12, eos_token_ids=[EOS], pad_id=PAD, temperature=temperature,
                       generator=generator, **options)
    for row, completion in enumerate(rollout.completion_token_lists()):
        expected = naive_logprobs(model, prompts[row // 3], completion, temperature)
        torch.testing.assert_close(rollout.logprobs[row, : len(completion)], expected, atol=1e-4, rtol=0)
        assert (rollout.logprobs[row, len(completion):] == 0).all()
    assert rollout.logprobs.dtype == torch.float32


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_top_k_top_p_never_sample_outside_the_allowed_set(model, prompts, top_k, top_p):
    temperature = 0.7
    rollout = generate(model, prompts, 4, 10, eos_token_ids=[], pad_id=PAD, temperature=temperature, top_k=top_k,
                       top_p=top_p, generator=torch.Generator().manual_seed(2))
    for row, completion in enumerate(rollout.completion_token_lists()):
        full = torch.tensor([prompts[row // 4] + completion])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompts[row // 4]) - 1: -1] / temperature  # [T, V]
        for step, token in enumerate(completion):
            # top-k first, then the nucleus of the renormalised top-k distribution (transformers' order)
            order = logits[step].argsort(descending=True)[: top_k or logits.shape[-1]]
            probs = torch.softmax(logits[step, order], -1)
            allowed = order[(probs.cumsum(0) - probs) < top_p]
            assert token in allowed.tolist()
            expected = torch.log_softmax(logits[step, allowed], -1)[allowed.tolist().index(token)]
            assert abs(float(rollout.logprobs[row, step]) - float(expected)) < 1e-4


def test_sample_from_weights_draws_the_normalised_distribution_and_never_a_zero_weight():
    weights = torch.zeros(1, 300)
    weights[0, [3, 130, 131, 299]] = torch.tensor([1.0, 2.0, 0.5, 0.5])  # spread over 3 blocks of 128
    draws, total = sample_from_weights(weights.expand(20000, -1).contiguous(), torch.Generator().manual_seed(0))
    assert torch.allclose(total, torch.full((20000,), 4.0, dtype=torch.float64))
    counts = torch.bincount(draws, minlength=300).float() / len(draws)
    assert set(draws.unique().tolist()) == {3, 130, 131, 299}
    torch.testing.assert_close(counts[[3, 130, 131, 299]], torch.tensor([0.25, 0.5, 0.125, 0.125]),
                               atol=0.015, rtol=0)


def test_sample_next_token_greedy_and_truncation_worked_examples():
    tokens, logprob = sample_next_token(torch.tensor([[0.0, 10.0]]), greedy=True)
    assert tokens.tolist() == [1] and abs(float(logprob) - (-4.54e-5)) < 1e-6
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(500, -1)
    tokens, logprob = sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log_softmax(torch.tensor([2.0, 1.0]), -1)[tokens]
    torch.testing.assert_close(logprob, expected)


def test_sampling_is_reproducible_with_a_seeded_generator(model, prompts):
    def run(seed):
        return generate(model, prompts, 3, 12, eos_token_ids=[EOS], pad_id=PAD,
                        generator=torch.Generator().manual_seed(seed))

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.completion_ids, other.completion_ids)


@pytest.mark.parametrize("options", DECODERS, ids=DECODER_IDS)
def test_given_uniforms_a_row_samples_the_same_whatever_else_is_in_the_batch(model, prompts, options):
    """What train.py's torchrun ranks rely on: with the step's random numbers drawn up front, splitting the
    prompts into two batches (two ranks' shares) rolls out exactly the samples of one batch."""
    G, steps = 3, 12
    uniforms = torch.rand((len(prompts) * G, steps), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    run = lambda part, rows: generate(model, part, G, steps, eos_token_ids=[EOS], pad_id=PAD,  # noqa: E731
                                      temperature=1.3, uniforms=uniforms[rows], **options)
    whole = run(prompts, slice(0, 4 * G))
    halves = [run(prompts[:1], slice(0, G)), run(prompts[1:], slice(G, 4 * G))]
    assert whole.completion_token_lists() == halves[0].completion_token_lists() + halves[1].completion_token_lists()
    assert not whole.finished.all() and whole.finished.any()  # rows ended early: the batch compacted
    other = generate(model, prompts, G, steps, eos_token_ids=[EOS], pad_id=PAD, temperature=1.3,
                     uniforms=torch.rand_like(uniforms), **options)
    assert other.completion_token_lists() != whole.completion_token_lists()


@pytest.mark.parametrize("check_every", [1, 5])
@pytest.mark.parametrize("decoder", ["hf", "lean"])
def test_stop_string_stops_a_row_right_after_it(model, tokenizer, prompts, check_every, decoder):
    free = generate(model, prompts, 1, 20, eos_token_ids=[], pad_id=PAD, greedy=True).completion_token_lists()
    stop = tokenizer.decode(free[0][4:6])
    assert stop.isascii() and stop.strip(), "pick a visible ASCII stop string from row 0's own output"
    checker = StopChecker(tokenizer, [stop])
    rollout = generate(model, prompts, 1, 20, eos_token_ids=[], pad_id=PAD, greedy=True, stop_checker=checker,
                       check_every=check_every, decoder=decoder)
    for row, full in enumerate(free):
        # shortest prefix whose text contains the stop string, else the whole completion
        expected = next((full[:k] for k in range(1, len(full) + 1) if stop in tokenizer.decode(full[:k])), full)
        assert rollout.completion_token_lists()[row] == expected
        assert bool(rollout.finished[row]) == (stop in tokenizer.decode(full))
    assert len(rollout.completion_token_lists()[0]) <= 6 and rollout.finished[0]


def test_check_every_only_changes_when_finished_rows_are_found(model, tokenizer, prompts):
    free = generate(model, prompts, 2, 20, eos_token_ids=[], pad_id=PAD, greedy=True).completion_token_lists()
    checker = StopChecker(tokenizer, [tokenizer.decode(free[2][3:4])])
    runs = [generate(model, prompts, 2, 20, eos_token_ids=[free[4][6]], pad_id=PAD, greedy=True,
                     stop_checker=checker, check_every=k) for k in (1, 3, 8)]
    for other in runs[1:]:
        assert other.completion_token_lists() == runs[0].completion_token_lists()
        assert torch.equal(other.finished, runs[0].finished)
        # the running batch differs (rows that ended inside a window run on), which may move the last float bit
        torch.testing.assert_close(other.logprobs, runs[0].logprobs, atol=1e-5, rtol=0)


def test_max_new_tokens_truncation_sets_finished_false_but_eos_on_the_last_step_finishes(model, prompts):
    free = generate(model, prompts, 1, 12, eos_token_ids=[], pad_id=PAD, greedy=True).completion_token_lists()
    # the shortest budget m at which some row emits a token it has not emitted before, as its m-th token
    row, m = min(((r, m) for r, toks in enumerate(free) for m in range(3, 13) if toks[m - 1] not in toks[: m - 1]),
                 key=lambda rm: rm[1])
    last = free[row][m - 1]
    rollout = generate(model, prompts, 1, m, eos_token_ids=[last], pad_id=PAD, greedy=True)
    assert rollout.lengths[row] == m and rollout.finished[row]
    unfinished = [r for r, toks in enumerate(free) if last not in toks[:m]]
    assert unfinished and all(rollout.lengths[r] == m and not rollout.finished[r] for r in unfinished)


def test_stop_checker_ignores_ids_beyond_the_tokenizer(tokenizer):
    checker = StopChecker(tokenizer, ["</answer>"])
    ids = tokenizer("x </answer> y").input_ids
    assert checker.first_stop(ids + [len(tokenizer) + 3], 0, len(ids) + 1) is not None
    assert checker.first_stop([len(tokenizer) + 3], 0, 1) is None
    assert checker.fit(len(tokenizer) + 16, torch.device("cpu")).shape == (len(tokenizer) + 16,)


def test_compaction_order_moves_tail_rows_into_holes():
    ended = torch.tensor([False, True, False, False, True, False])
    assert compaction_order(ended).tolist() == [0, 5, 2, 3]
    assert compaction_order(torch.tensor([True, True, False])).tolist() == [2]
    assert compaction_order(torch.tensor([False, False, True])).tolist() == [0, 1]


def test_bad_arguments_raise_value_errors(model, prompts):
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompts, 1, 4, eos_token_ids=[], pad_id=PAD, temperature=0.0)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]], 1, 4, eos_token_ids=[], pad_id=PAD)
    with pytest.raises(ValueError, match="decoder"):
        generate(model, prompts, 1, 4, eos_token_ids=[], pad_id=PAD, decoder="vllm")


@pytest.mark.skipif(not (TINY_MODEL_DIR / "config.json").exists(),
                    reason="the embedded tiny model e2h_min/assets/tiny-countdown is not built yet "
                           "(python scripts/build_tiny_model.py)")
def test_greedy_matches_model_generate_on_the_tiny_countdown_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tiny = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    task = CountdownTask(seed=0)
    texts = [tok.apply_chat_template(task.messages(task.problem(level, 11 + level, split="test")), tokenize=False,
                                     continue_final_message=True) for level in range(4)]
    tiny_prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert len({len(p) for p in tiny_prompts}) > 1, "prompts of different lengths exercise left padding"
    ids, attention = left_pad(tiny_prompts, tok.pad_token_id, "cpu")
    out = tiny.generate(input_ids=ids, attention_mask=attention, do_sample=False, max_new_tokens=48,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
    reference = [cut_after(row, tok.eos_token_id) for row in out.tolist()]
    for decoder in ("lean", "hf"):
        rollout = generate(tiny, tiny_prompts, 1, 48, eos_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                           greedy=True, decoder=decoder)
        assert rollout.completion_token_lists() == reference
    # With the stop string, each row ends right after the token that completes "</answer>".
    stopped = generate(tiny, tiny_prompts, 1, 48, eos_token_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                       greedy=True, stop_checker=StopChecker(tok, ["</answer>"]))
    for row, full in zip(stopped.completion_token_lists(), reference):
        expected = next((full[:k] for k in range(1, len(full) + 1) if "</answer>" in tok.decode(full[:k])), full)
        assert row == expected
