"""Batched rollout generation with a KV cache: every prompt x G samples of a step in one decode loop.

Design (why each choice):
- Each distinct prompt is prefilled once and its KV cache is copied into its G sample rows, so a step pays for
  P prompt prefills, not P*G. With a Qwen-sized model and ~150-token Countdown prompts, the prompt pass is most
  of what `model.generate(num_return_sequences=G)` computes.
- The decode step is hand-written for Qwen2/Llama-style models (e2h_min/engine/decoders.py: preallocated in-place KV
  cache, RoPE table, mask built once) and goes through `model(...)` with a DynamicCache for anything else.
- Rows stop at an EOS token (kept in the completion and its mask) or right after the token that completes a stop
  string ("</answer>"). Finished rows leave the running batch once at least `compact_fraction` of it has
  finished (alive rows from the tail move into their slots, so a compaction copies only a few cache rows), so
  they stop costing compute, and the loop exits as soon as every row is done.
- Sampling draws one uniform number per row (two-level inverse CDF), not one per vocabulary entry: for a 150k
  vocabulary the noise of the Gumbel / exponential trick cost more than the model on CPU.
- Stops are checked every `check_every` steps (1 on CPU; 8 on CUDA, where each check is a host sync that stalls
  the GPU queue). A row that ended inside the window is cut back to its true end, so the result is the same;
  only up to check_every - 1 wasted tokens per row are computed.
- Training rollouts use plain temperature sampling: the sampler returns each token's log-prob under exactly the
  distribution it was drawn from, log softmax(logits / T). With top-k / top-p the drawing distribution is
  truncated and renormalised, so it is no longer the policy whose gradient the trainer follows: the importance
  ratio pi_theta / pi_old would compare a truncated pi_old with the full pi_theta, and tokens outside the nucleus
  could never be sampled at all. top-k / top-p are therefore for evaluation (pass@k) only. When the update is
  on-policy the trainer can reuse these log-probs as the old log-probs (the trainer must then score with the same
  temperature) and skip a forward pass.
- Nothing of shape [rows, tokens, vocab] is ever built: the prefill computes the last position's logits only, and
  each decode step holds one [rows, vocab] slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from e2h_min.engine.decoders import make_decoder


@dataclass
class Generation:
    """The samples of one generation call; sample i belongs to prompt i // num_samples.

    completion_ids   [N, T] long, right-padded with pad_id
    completion_mask  [N, T] bool, True on generated tokens (an EOS that ended a row included)
    logprobs         [N, T] float32, log-prob of each sampled token under the distribution it was drawn from
                     (0 on padding)
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
    """Finds where a row's text first contains a stop string, looking only at tokens that could end one.

    Token texts are decoded once per tokenizer (token by token, so a multi-byte character split across tokens
    decodes as replacement characters; stop strings such as "</answer>" are ASCII, which byte-level tokenizers
    keep intact). A token is a candidate end when its text contains the last character of a stop string; only
    at candidates are the row's recent tokens joined and searched. Ids beyond the tokenizer (models often pad
    their vocabulary) decode to "".
    Example: StopChecker(tok, ["</answer>"]).first_stop(ids, start=0, end=len(ids)) -> index of the token that
    completes the first "</answer>", or None.
    """

    def __init__(self, tokenizer, stop_strings: list[str], device: torch.device | str = "cpu"):
        self.stop_strings = [s for s in stop_strings if s]
        vocab_size = len(tokenizer)
        self.token_text = [tokenizer.decode([i]) for i in range(vocab_size)] if self.stop_strings else []
        last_chars = {s[-1] for s in self.stop_strings}
        may_end = [any(c in text for c in last_chars) for text in self.token_text]
        self.may_end_list = may_end
        self.may_end = torch.tensor(may_end or [False], dtype=torch.bool, device=device)  # [vocab]
        # Tokens are at least one character long, so this many recent tokens always cover a stop string.
        self.window = max((len(s) for s in self.stop_strings), default=0) + 1

    def fit(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """`may_end` on `device`, padded with False up to the model's vocabulary size: [vocab_size] bool."""
        may_end = self.may_end.to(device)
        if len(may_end) < vocab_size:
            may_end = torch.cat([may_end, may_end.new_zeros(vocab_size - len(may_end))])
        return may_end

    def text(self, ids: list[int]) -> str:
        return "".join(self.token_text[i] if i < len(self.token_text) else "" for i in ids)

    def hits(self, recent_tokens: list[list[int]]) -> list[bool]:
        """For each token list: does its text contain a stop string?"""
        return [any(s in self.text(ids) for s in self.stop_strings) for ids in recent_tokens]

    def first_stop(self, ids: list[int], start: int, end: int) -> int | None:
        """Smallest s in [start, end) whose token completes a stop string in ids (searching `window` back).

        Example: ids = tokens of " 1 + 2</answer> x", start 0 -> index of the token holding the final ">".
        """
        for s in range(start, end):
            if ids[s] < len(self.may_end_list) and self.may_end_list[ids[s]]:
                text = self.text(ids[max(0, s + 1 - self.window): s + 1])
                if any(stop in text for stop in self.stop_strings):
                    return s
        return None


def sample_from_weights(weights: torch.Tensor, generator: torch.Generator | None = None, block: int = 128,
                        uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one index per row with probability weights[i] / sum(weights), from a single uniform per row.

    weights [n, V] >= 0 (unnormalised; zero weight is never drawn) -> (tokens [n] long, sum(weights) [n] float64).
    Inverse-CDF sampling in two levels: pick a block of `block` consecutive tokens by the cumulative block sums,
    then the token inside it by its float64 cumulative sum. This draws n random numbers instead of n * V (the
    Gumbel / exponential trick spent most of a CPU decode step generating noise for a 150k vocabulary), needs no
    host sync (unlike torch.multinomial on CUDA), and the float64 in-block sum keeps tail tokens' mass.
    uniforms [n] float64 in [0, 1) (optional): the rows' random numbers, drawn by the caller instead of here.
    Example: weights [[0., 3., 1.]] -> (index 1 with probability 0.75 or index 2 with 0.25, never 0; total 4.)
    """
    n, vocab = weights.shape
    if vocab % block:
        weights = torch.nn.functional.pad(weights, (0, block - vocab % block))
    blocks = weights.view(n, -1, block)  # [n, V / block, block]
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [n, V / block]
    if uniforms is None:
        uniforms = torch.rand((n,), generator=generator, dtype=torch.float64, device=weights.device)
    u = 1 - uniforms[:, None].to(torch.float64)  # (0, 1]
    target = u * block_cdf[:, -1:]  # [n, 1]
    chosen = torch.searchsorted(block_cdf, target).clamp(max=block_cdf.shape[1] - 1)  # first cdf >= target
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), 0.0)
    inner_cdf = blocks.gather(1, chosen[:, :, None].expand(n, 1, block))[:, 0].double().cumsum(-1)  # [n, block]
    # The in-block sum can differ from the block sum in the last bits; never step past the last weighted token.
    offset = torch.searchsorted(inner_cdf, torch.minimum(target - before, inner_cdf[:, -1:]))
    return (chosen * block + offset).squeeze(1), block_cdf[:, -1]


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      greedy: bool = False, generator: torch.Generator | None = None,
                      uniforms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row and return (tokens [n], logprob of each under the drawing distribution [n]).

    logits [n, V]. The drawing distribution is softmax(logits / T), with top_k keeping the k largest logits and
    top_p the smallest set of most likely tokens whose mass reaches top_p, both renormalised (evaluation only,
    see the module docstring). The log-prob is logits[token] / T - logsumexp(kept logits / T), computed without
    a [n, V] log_softmax. Greedy returns argmax(logits) (what `model.generate(do_sample=False)` picks) and its
    log-prob at T=1.
    Example: logits [[0., 10.]] greedy -> (tensor([1]), tensor([-4.5e-05]))
    """
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(dim=-1)
        logprob = logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        return tokens, logprob
    scaled = logits / temperature if temperature != 1.0 else logits
    if top_k and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    top = scaled.amax(dim=-1, keepdim=True)  # [n, 1]
    weights = (scaled - top).exp_()  # [n, V] in [0, 1], the max is exactly 1
    tokens, total = sample_from_weights(weights, generator, uniforms=uniforms)
    log_normaliser = top.squeeze(-1) + total.log().float()  # logsumexp of the kept scaled logits
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_normaliser


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into ids [P, L] and attention mask [P, L] (1 on real tokens).

    Example: left_pad([[5, 6], [7]], pad_id=0, "cpu") -> ids [[5, 6], [0, 7]], mask [[1, 1], [0, 1]]
    """
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _validate(prompt_ids, num_samples, max_new_tokens, temperature, greedy, top_k, top_p, check_every):
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate needs at least one prompt and no empty prompt; check the tokenised prompts")
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0 for sampling (got {temperature}); use greedy=True for T=0")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, top_p={top_p}")
    if check_every is not None and check_every < 1:
        raise ValueError(f"check_every must be >= 1 (steps between stop checks), got {check_every}")


@torch.no_grad()
def generate(model, prompt_ids: list[list[int]], num_samples: int, max_new_tokens: int, eos_token_ids: list[int],
             pad_id: int, stop_checker: StopChecker | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
             compact_fraction: float = 0.125, check_every: int | None = None, decoder: str = "auto",
             static_shapes: bool = False, compile_step: bool = False, uniforms: torch.Tensor | None = None
             ) -> Generation:
    """`num_samples` completions for each of P prompts (token lists) in one KV-cached decode: a Generation of N = P *
    num_samples rows, row i from prompt i // num_samples. Noise: `generator`, or uniforms [N, max_new_tokens] in
    [0, 1), row i's at decode step s (a row's sample then ignores its neighbours). Options: the module docstring
    and e2h_min/engine/decoders.py. Example: generate(model, [[1, 2, 3]], 2, 5, [0], 0).completion_ids: shape [2, <=5]."""
    _validate(prompt_ids, num_samples, max_new_tokens, temperature, greedy, top_k, top_p, check_every)
    device = next(model.parameters()).device
    if check_every is None:
        check_every = 8 if device.type == "cuda" else 1
    dec = make_decoder(model, decoder, static_shapes=static_shapes, compile_step=compile_step)
    static = getattr(dec, "static_shapes", False)  # static-shape decoding never compacts the batch
    ids, attention = left_pad(prompt_ids, pad_id, device)
    n_rows = len(prompt_ids) * num_samples
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    stops = stop_checker if stop_checker is not None and stop_checker.stop_strings else None

    logits = dec.prefill(ids, attention, num_samples, max_new_tokens)  # [N, V]
    may_end = stops.fit(logits.shape[-1], device) if stops else None
    tokens_out = torch.full((n_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs_out = torch.zeros((n_rows, max_new_tokens), dtype=torch.float32, device=device)
    lengths = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(n_rows, dtype=torch.bool, device=device)
    # Running batch: global row id, whether the row has ended, and its length if so.
    rows = torch.arange(n_rows, device=device)
    ended = torch.zeros(n_rows, dtype=torch.bool, device=device)
    end = torch.full((n_rows,), max_new_tokens, dtype=torch.long, device=device)
    last_check = 0  # first step not yet searched for stop strings

    for step in range(max_new_tokens):
        token, logprob = sample_next_token(logits, temperature, top_k, top_p, greedy, generator,
                                           None if uniforms is None else uniforms[rows, step])
        tokens_out[rows, step] = token
        logprobs_out[rows, step] = logprob
        if len(eos):
            hit_eos = torch.isin(token, eos) & ~ended
            end = torch.where(hit_eos, step + 1, end)
            ended = ended | hit_eos
        last_step = step == max_new_tokens - 1
        if (step + 1 - last_check) >= check_every or last_step:
            if stops is not None:
                end, ended = _find_stop_strings(stops, may_end, tokens_out, rows, end, ended, last_check, step)
            last_check = step + 1
            lengths[rows] = end
            finished[rows] = ended
            n_alive = int((~ended).sum())
            if n_alive == 0 or last_step:
                break
            if not static and len(rows) - n_alive >= max(1, int(compact_fraction * len(rows))):
                keep = compaction_order(ended)
                dec.select(keep)
                rows, token, ended, end = rows[keep], token[keep], ended[keep], end[keep]
        logits = dec.step(token)

    width = int(lengths.max())
    mask = torch.arange(width, device=device)[None, :] < lengths[:, None]
    tokens_out = tokens_out[:, :width].masked_fill(~mask, pad_id)
    return Generation(prompt_ids=prompt_ids, num_samples=num_samples, completion_ids=tokens_out.cpu(),
                   completion_mask=mask.cpu(), logprobs=logprobs_out[:, :width].masked_fill(~mask, 0.0).cpu(),
                   finished=finished.cpu())


def compaction_order(ended: torch.Tensor) -> torch.Tensor:
    """Which running rows to keep, and where: alive rows of the tail fill the holes of finished rows in the head.

    ended [n] bool -> keep [k] (k = alive rows); keep[j] is the old position of the row that goes to position j.
    Rows already in the head stay where they are, so the decoder copies only the few rows that move.
    Example: ended [F, T, F, F, T, F] -> k = 4, hole 1 gets row 5 -> keep [0, 5, 2, 3]
    """
    alive = ~ended
    k = int(alive.sum())
    keep = torch.arange(k, device=ended.device)
    holes = ended[:k].nonzero().flatten()
    keep[holes] = alive[k:].nonzero().flatten() + k
    return keep


def _find_stop_strings(stops: StopChecker, may_end: torch.Tensor, tokens_out: torch.Tensor, rows: torch.Tensor,
                       end: torch.Tensor, ended: torch.Tensor, first: int, last: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut rows whose text completed a stop string at a step in [first, last] (before any EOS end).

    Only rows with a candidate-end token in the window are moved to the host and searched. Returns the updated
    (end [n], ended [n]); a stop at step s gives end s + 1.
    Example: window steps 4..7, row 2's tokens complete "</answer>" at step 5 -> end[2] = 6, ended[2] = True
    """
    window = tokens_out[rows, first:last + 1]  # [n, w]
    steps = torch.arange(first, last + 1, device=rows.device)
    candidate = may_end[window] & (steps[None, :] < end[:, None])  # a stop only counts before the row's end
    candidate_rows = candidate.any(-1).nonzero().flatten().tolist()
    if not candidate_rows:
        return end, ended
    start = max(0, first + 1 - stops.window)
    history = tokens_out[rows[candidate_rows], start:last + 1].tolist()
    end_host = end[candidate_rows].tolist()
    end, ended = end.clone(), ended.clone()
    for row, ids, row_end in zip(candidate_rows, history, end_host):
        stop = stops.first_stop(ids, first - start, min(last, row_end - 1) - start + 1)
        if stop is not None:
            end[row], ended[row] = stop + start + 1, True
    return end, ended
