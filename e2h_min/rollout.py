"""Batched rollout generation with a KV cache: every prompt x G samples of a step in one decode loop.

Design (why each choice):
- Each distinct prompt is prefilled once and its KV cache is repeated G times (`batch_repeat_interleave`), so a
  step pays for P prompt prefills, not P*G.
- Rows stop at an EOS token or right after a stop string ("</answer>"). Finished rows are dropped from the running
  batch (the cache rows are compacted once enough of them have finished), so they stop costing compute, and the
  loop exits as soon as every row is done.
- Training rollouts use plain temperature sampling: the sampler returns each token's log-prob under exactly the
  distribution it was drawn from, log softmax(logits / T). With top-k / top-p the drawing distribution is
  truncated and renormalised, so it is no longer the policy whose gradient the trainer follows: the importance
  ratio pi_theta / pi_old would compare a truncated pi_old with the full pi_theta, and tokens outside the nucleus
  could never be sampled at all. top-k / top-p are therefore for evaluation (pass@k) only.
- Nothing of shape [rows, tokens, vocab] is ever built: the prefill asks the model for the last position's logits
  only, and each decode step holds one [rows, vocab] slice.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class Rollout:
    """The samples of one generation call; sample i belongs to prompt i // num_samples.

    completion_ids   [N, T] long, right-padded with pad_id
    completion_mask  [N, T] bool, True on generated tokens (an EOS that ended a row included)
    logprobs         [N, T] float32, log-prob of each sampled token under the distribution it was drawn from
    finished         [N] bool, True if the row ended by EOS / stop string, False if it hit max_new_tokens
    """

    prompt_ids: list[list[int]]
    num_samples: int
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    finished: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def completion_token_lists(self) -> list[list[int]]:
        return [ids[:n].tolist() for ids, n in zip(self.completion_ids, self.lengths.tolist())]


class StopChecker:
    """Finds rows whose text now contains a stop string, looking only at rows whose newest token could end one.

    Token texts are decoded once per tokenizer. A row is a candidate when its newest token's text contains the
    stop string's last character; only candidates have their recent tokens joined and searched.
    Example: StopChecker(tok, ["</answer>"]).hits(recent_ids, rows) -> rows whose text gained "</answer>".
    """

    def __init__(self, tokenizer, stop_strings: list[str], device: torch.device | str = "cpu"):
        self.stop_strings = [s for s in stop_strings if s]
        vocab_size = len(tokenizer)
        self.token_text = [tokenizer.decode([i]) for i in range(vocab_size)] if self.stop_strings else []
        last_chars = {s[-1] for s in self.stop_strings}
        may_end = [any(c in text for c in last_chars) for text in self.token_text]
        self.may_end = torch.tensor(may_end or [False], dtype=torch.bool, device=device)
        # Tokens are at least one character long, so this many recent tokens always cover a stop string.
        self.window = max((len(s) for s in self.stop_strings), default=0) + 1

    def hits(self, recent_tokens: list[list[int]]) -> list[bool]:
        texts = ("".join(self.token_text[i] for i in ids) for ids in recent_tokens)
        return [any(s in text for s in self.stop_strings) for text in texts]


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      greedy: bool = False, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return (tokens [n], logprob of each under the drawing distribution [n]).

    logits [n, V]. Sampling is Gumbel-max in its exponential form, argmax(p / E) with E ~ Exp(1), which draws
    exactly from p without the host sync of torch.multinomial. Greedy returns argmax and its log-prob at T=1.
    Example: logits [[0., 10.]] greedy -> (tensor([1]), tensor([-4.5e-05]))
    """
    logits = logits.float()
    if greedy:
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = logprobs.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    logprobs = torch.log_softmax(scaled, dim=-1)
    noise = torch.empty_like(logprobs).exponential_(generator=generator)
    tokens = (logprobs.exp() / noise).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ids [P, L] and attention mask [P, L] (1 on real tokens)."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cache_argument_name(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both so either release works."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], num_samples: int, max_new_tokens: int, eos_token_ids: list[int],
             pad_id: int, stop_checker: StopChecker | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
             compact_fraction: float = 0.125) -> Rollout:
    """Sample `num_samples` completions for each prompt in one batched KV-cached decode.

    prompt_ids: P token lists (unpadded). Returns a Rollout of N = P * num_samples rows, row i from prompt
    i // num_samples. `compact_fraction`: drop finished rows from the running batch once at least this share of
    it has finished (copying the cache costs a little, so we do not compact after every single finished row).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, attention = left_pad(prompt_ids, pad_id, device)
    n_rows = len(prompt_ids) * num_samples
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)

    cache = DynamicCache(config=model.config)
    cache_kwarg = {_cache_argument_name(model): cache}
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_kwarg).logits[:, -1]  # [P, V]
    if num_samples > 1:  # share each prompt's prefill among its samples
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        attention = attention.repeat_interleave(num_samples, dim=0)
    next_position = attention.sum(-1)  # [n] RoPE position of the token about to be fed

    tokens_out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    batch_rows = torch.arange(n_rows, device=device)  # global row id of each row in the running batch
    alive = torch.ones(n_rows, dtype=torch.bool, device=device)  # per running-batch row: still generating

    for step in range(max_new_tokens):
        token, logprob = sample_next_token(logits, temperature, top_k, top_p, greedy, generator)
        live_rows = batch_rows[alive]
        tokens_out[live_rows, step] = token[alive]
        logprobs_out[live_rows, step] = logprob[alive]
        done = alive & torch.isin(token, eos)
        if stop_checker is not None and stop_checker.stop_strings:
            candidates = (alive & ~done & stop_checker.may_end[token]).nonzero().flatten().tolist()
            if candidates:
                start = max(0, step + 1 - stop_checker.window)
                recent = tokens_out[batch_rows[candidates], start:step + 1].tolist()
                for row, hit in zip(candidates, stop_checker.hits(recent)):
                    done[row] = hit
        if done.any():
            lengths[batch_rows[done]] = step + 1
            finished[batch_rows[done]] = True
            alive &= ~done
        n_alive = int(alive.sum())
        if n_alive == 0 or step == max_new_tokens - 1:
            break
        if len(batch_rows) - n_alive >= max(1, int(compact_fraction * len(batch_rows))):
            keep = alive.nonzero().flatten()
            cache.batch_select_indices(keep)
            batch_rows, attention, next_position, token = (
                batch_rows[keep], attention[keep], next_position[keep], token[keep])
            alive = torch.ones(len(keep), dtype=torch.bool, device=device)
        attention = torch.cat([attention, attention.new_ones((len(batch_rows), 1))], dim=1)
        logits = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_position[:, None],
                       use_cache=True, **cache_kwarg).logits[:, -1]
        next_position = next_position + 1

    width = int(lengths.max()) if n_rows else 0
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    tokens_out = tokens_out[:, :width].masked_fill(~mask, pad_id)
    return Rollout(prompt_ids=prompt_ids, num_samples=num_samples, completion_ids=tokens_out.cpu(),
                   completion_mask=mask.cpu(), logprobs=(logprobs_out[:, :width] * mask).cpu(),
                   finished=finished.cpu())
