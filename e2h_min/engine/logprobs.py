"""Per-token log-probs (and entropy) of completion tokens, computed in chunks so no [B, T, V] tensor exists.

The model's trunk gives hidden states [B, L, H]; only the positions that predict completion tokens go through
the LM head, a chunk of rows at a time. Under autograd a chunk whose logits would be large (>= 32 MiB: any
real vocabulary) is checkpointed, so the backward pass keeps the chunk's hidden states, not its [rows, V]
logits: with a 151,936-token vocabulary that is the difference between megabytes and gigabytes. Small ones (the
tiny model's 1,024-token vocabulary) are kept, which saves the recompute.

Two batch layouts, one `completion_logprobs`:
- `pack_sequences`: every row is its whole prompt + completion (right-padded). Simple; it runs each prompt's
  tokens G times, once per sample of the group.
- `SharedPrompts` + `pack_suffixes`: the G samples of a prompt share one forward pass over the prompt. The
  distinct prompts (minus their last token) run once, their keys/values are handed to every micro-batch as a
  KV cache, and a micro-batch feeds only [last prompt token] + completion[:-1] (whose hidden states predict the
  completion). Causal attention makes the prompt's keys/values independent of what follows, so the log-probs
  and the gradients are the same as the full layout's (tests check both); the work on the prompt drops from
  N rows to P, and micro-batches sorted by completion length carry almost no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from e2h_min.engine.decoders import cache_argument_name, prefill_positions


def pack_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int
                   ) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion pairs for a training forward pass.

    Returns input_ids [B, L], attention_mask [B, L], targets [B, T] (completion tokens, pad-filled),
    completion_mask [B, T] bool, and logit_index [B, T]: the position whose logits predict each completion token
    (prompt_len - 1 + j). Positions are 0..len-1 per row, the same RoPE positions the left-padded sampler used.
    Example: prompt [5, 6], completion [7, 8] -> input [5, 6, 7, 8], targets [7, 8], logit_index [1, 2].
    """
    rows = len(prompt_ids)
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    t_max = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    targets = torch.full((rows, t_max), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((rows, t_max), dtype=torch.bool)
    logit_index = torch.zeros((rows, t_max), dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        seq = p + c
        input_ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[r, :len(seq)] = 1
        targets[r, :len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[r, :len(c)] = True
        logit_index[r, :len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
    return {"input_ids": input_ids, "attention_mask": attention, "targets": targets,
            "completion_mask": completion_mask, "logit_index": logit_index}


CHECKPOINT_LOGITS_BYTES = 32 * 2 ** 20  # checkpoint a chunk whose fp32 logits would be at least this big


def _chunk_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, temperature: float, with_entropy: bool = True
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hidden [n, H], targets [n] -> (log p(target) at temperature [n], entropy of that distribution [n] or None).

    log p(target) = logit_target - logsumexp(logits), written as -cross_entropy: one fused kernel whose backward
    is softmax - onehot, instead of a logsumexp backward plus a gather backward that scatters into [n, V] zeros.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [n, V]
    logp = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    if not with_entropy:  # the reference's entropy is never used: 3 more passes over [n, V] saved
        return logp, None
    with torch.no_grad():  # a diagnostic only: -sum_v p_v log p_v
        log_probs = torch.log_softmax(logits.detach(), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, chunk_rows: int = 1024,
                        return_hidden: bool = False, prompt_kv: "PromptKV | None" = None, with_entropy: bool = True):
    """log pi(o_t | q, o_<t) / T-scaled, and the true entropy of pi at each completion position.

    On an FSDP2-sharded model (e2h_min/engine/fsdp.py) this runs as the model's registered forward method, so the
    sharded embeddings / LM head are gathered around it; otherwise it is `local_completion_logprobs`.
    """
    sharded = getattr(model, "e2h_completion_logprobs", None)
    if sharded is not None:
        return sharded(batch, temperature, chunk_rows, return_hidden, prompt_kv, with_entropy)
    return local_completion_logprobs(model, batch, temperature, chunk_rows, return_hidden, prompt_kv, with_entropy)


def local_completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                              chunk_rows: int = 1024, return_hidden: bool = False,
                              prompt_kv: "PromptKV | None" = None, with_entropy: bool = True):
    """log pi(o_t | q, o_<t) / T-scaled, and the true entropy of pi at each completion position.

    batch: from `pack_sequences`, or from `pack_suffixes` together with `prompt_kv` (SharedPrompts.keys_values),
    already on the model's device. Returns (logp [B, T], entropy [B, T]), zeros at padding, plus with
    return_hidden the trunk's hidden state at each of those positions [B, T, H] (the state a value head reads).
    The temperature must be the sampling temperature, otherwise the importance ratio compares two different
    distributions. `chunk_rows` completion positions go through the LM head at a time.
    """
    trunk = model.get_decoder()
    if "prompt_rows" in batch:  # the suffix layout: hidden state j predicts completion token j
        if prompt_kv is None:
            raise ValueError("a pack_suffixes batch needs prompt_kv from SharedPrompts")
        from transformers import DynamicCache

        rows = batch["prompt_rows"]
        cache = DynamicCache(ddp_cache_data=[(k[rows], v[rows]) for k, v in prompt_kv.layers] or None,
                             config=model.config)
        picked = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=True,
                       **{cache_argument_name(trunk): cache}).last_hidden_state  # [B, T, H]
    else:
        hidden = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False).last_hidden_state  # [B, L, H]
        index = batch["logit_index"]
        picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
    head = model.get_output_embeddings()
    flat_hidden = picked.reshape(-1, picked.shape[-1])
    flat_targets = batch["targets"].reshape(-1)
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_rows):
        args = (flat_hidden[start:start + chunk_rows], head.weight, head.bias,
                flat_targets[start:start + chunk_rows], temperature, with_entropy)
        if torch.is_grad_enabled() and len(args[0]) * head.weight.shape[0] * 4 >= CHECKPOINT_LOGITS_BYTES:
            logp, ent = checkpoint(_chunk_logprobs_entropy, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs_entropy(*args)
        logps.append(logp)
        entropies.append(ent)
    mask = batch["completion_mask"]
    logp = torch.cat(logps).view_as(mask) * mask
    entropy = torch.cat(entropies).view_as(mask) * mask if with_entropy else None
    return (logp, entropy, picked) if return_hidden else (logp, entropy)


def shared_prompts_unsupported_reason(model, gradient_checkpointing: bool) -> str | None:
    """None if `SharedPrompts` works for this model, else why not (then the trainer packs whole sequences).

    It needs a trunk that takes position_ids and a KV cache with full attention on every layer (a sliding-window
    cache would drop prompt keys), and no activation checkpointing (transformers turns the cache off under it).
    """
    if gradient_checkpointing:
        return "gradient checkpointing disables the KV cache"
    config = getattr(model, "config", None)
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]):
        return "sliding-window or non-attention layers"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


@dataclass
class SharedPrompts:
    """The distinct prompts of a step, run once per optimizer iteration and shared by every micro-batch.

    prefix_ids / prefix_mask / prefix_positions [P, Lp] (CPU): each prompt minus its last token, left-padded (the
    sampler's layout: RoPE position 0 at the first real token). `keys_values(model)` runs them through a model's
    trunk (the policy's once per optimizer iteration, a reference model's once per step) and returns a PromptKV.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    prefix_positions: torch.Tensor
    row_prompt: dict[int, int]  # sample row -> prompt index
    prompt_lengths: list[int]  # P
    last_tokens: list[int]  # P: each prompt's last token, fed at the head of every suffix

    @classmethod
    def from_rows(cls, prompt_ids: list[list[int]], rows: list[int] | None = None, pad_id: int = 0
                  ) -> "SharedPrompts":
        """prompt_ids: N rows (prompts repeated per sample); rows: the samples to serve (default all), so prompts
        none of them uses are not run. Every prompt needs at least one token.
        Example: prompt_ids [[1, 2], [1, 2], [3, 4]], rows [1, 2] -> 2 prompts, row_prompt {1: 0, 2: 1}
        """
        index: dict[tuple[int, ...], int] = {}
        rows = range(len(prompt_ids)) if rows is None else rows
        row_prompt = {i: index.setdefault(tuple(prompt_ids[i]), len(index)) for i in rows}
        prompts = [list(p) for p in index]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every row needs at least one prompt token")
        width = max([0] + [len(p) - 1 for p in prompts])
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            if len(p) > 1:
                ids[r, width - len(p) + 1:] = torch.tensor(p[:-1], dtype=torch.long)
                mask[r, width - len(p) + 1:] = 1
        return cls(ids, mask, prefill_positions(mask), row_prompt, [len(p) for p in prompts],
                   [p[-1] for p in prompts])

    def keys_values(self, model) -> "PromptKV":
        """Run the prompt prefixes through `model`'s trunk: per layer (K, V) [P, kv_heads, Lp, head_dim]."""
        from transformers import DynamicCache

        if self.prefix_ids.shape[1] == 0:  # one-token prompts only: nothing to cache
            return PromptKV([], None)
        trunk = model.get_decoder()
        device = model.get_output_embeddings().weight.device
        cache = DynamicCache(config=model.config)
        trunk(input_ids=self.prefix_ids.to(device), attention_mask=self.prefix_mask.to(device),
              position_ids=self.prefix_positions.to(device), use_cache=True, **{cache_argument_name(trunk): cache})
        computed = [(layer.keys, layer.values) for layer in cache.layers]
        if not torch.is_grad_enabled():
            return PromptKV(computed, None)
        # A K/V that no trainable weight produced (e.g. layer 0's keys under LoRA on q/v only) stays as it is.
        leaves = [tuple(t.detach().requires_grad_() if t.requires_grad else t for t in pair) for pair in computed]
        return PromptKV(leaves, computed)


@dataclass
class PromptKV:
    """The prompts' keys/values that micro-batches attend to, and (under autograd) the graph that made them.

    layers: per layer (K, V) [P, kv_heads, Lp, head_dim]; under autograd these are detached leaves, so every
    micro-batch's backward stops there and accumulates its gradient on them. `backward()` then pushes the summed
    gradient through the prompt forward once: the prompt's forward and backward each run once per optimizer
    iteration, whatever the number of micro-batches, and no graph is retained between micro-batches.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    graph_outputs: list[tuple[torch.Tensor, torch.Tensor]] | None

    def backward(self) -> None:
        """Send the gradient the micro-batches left on the K/V leaves through the prompt forward."""
        if self.graph_outputs is None:
            return
        outputs, grads = [], []
        for pair, leaf_pair in zip(self.graph_outputs, self.layers):
            for out, leaf in zip(pair, leaf_pair):
                if out.requires_grad and leaf.grad is not None:
                    outputs.append(out)
                    grads.append(leaf.grad)
        if outputs:
            torch.autograd.backward(outputs, grads)
        self.graph_outputs = None


def pack_suffixes(shared: SharedPrompts, rows: list[int], completion_ids: list[list[int]], pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """The per-row part of the shared-prompt layout for the samples `rows` (keys of shared.row_prompt).

    Each row feeds [last prompt token] + completion[:-1], right-padded to T = the longest completion; hidden
    state j predicts completion token j. Returns input_ids / position_ids [R, T], attention_mask [R, Lp + T]
    (the prompt prefix's mask, then the row's), prompt_rows [R] (which K/V row to attend to), targets and
    completion_mask [R, T]. completion_ids: the completions of `rows`, in that order.
    Example: prompt [5, 6, 7], completion [8, 9] -> input [7, 8], positions [2, 3], targets [8, 9].
    """
    t_max = max(1, max(len(c) for c in completion_ids))
    count = len(rows)
    prompt_rows = torch.tensor([shared.row_prompt[i] for i in rows], dtype=torch.long)
    input_ids = torch.full((count, t_max), pad_id, dtype=torch.long)
    positions = torch.zeros((count, t_max), dtype=torch.long)
    suffix_mask = torch.zeros((count, t_max), dtype=torch.long)
    targets = torch.full((count, t_max), pad_id, dtype=torch.long)
    for r, (prompt, c) in enumerate(zip(prompt_rows.tolist(), completion_ids)):
        p_len = shared.prompt_lengths[prompt]
        input_ids[r, :len(c)] = torch.tensor([shared.last_tokens[prompt]] + c[:-1], dtype=torch.long)
        positions[r, :] = torch.arange(p_len - 1, p_len - 1 + t_max)
        suffix_mask[r, :len(c)] = 1
        targets[r, :len(c)] = torch.tensor(c, dtype=torch.long)
    attention = torch.cat([shared.prefix_mask[prompt_rows], suffix_mask], dim=1)
    return {"input_ids": input_ids, "position_ids": positions, "attention_mask": attention,
            "prompt_rows": prompt_rows, "targets": targets, "completion_mask": suffix_mask.bool()}


def micro_batches(lengths: list[int], max_rows: int, max_tokens: int = 0) -> list[list[int]]:
    """Sample indices sorted by length, cut greedily into batches of at most `max_rows` rows and, with
    max_tokens > 0, at most max_tokens padded tokens (rows x the longest row); a row longer than the budget goes
    alone. Similar lengths share a batch, so little compute goes to padding.

    Example: lengths [5, 1, 9, 3], max_rows 3 -> [[1, 3, 0], [2]]; with max_tokens 12 -> [[1, 3], [0], [2]]
    (adding row 0 to [1, 3] would pad 3 rows to length 5: 15 tokens > 12).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the newest row is the longest of its batch
        if current and (len(current) == max_rows or (max_tokens and (len(current) + 1) * lengths[i] > max_tokens)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pack_micro_batches(prompt_ids: list[list[int]], completions: list[list[int]], max_rows: int, max_tokens: int,
                       shared: SharedPrompts | None, device, rows: list[int] | None = None
                       ) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """(sample rows, batch on `device`) per micro-batch of the samples `rows` (default all), in the shared-prompt
    layout when `shared` is given (built for those rows), else in the whole-sequence one. Lengths for the budget:
    completion length (shared) or prompt + completion (whole)."""
    rows = list(range(len(completions))) if rows is None else list(rows)
    if shared is not None:
        lengths = [len(completions[i]) for i in rows]
    else:
        lengths = [len(prompt_ids[i]) + len(completions[i]) for i in rows]
    out = []
    for local in micro_batches(lengths, max_rows, max_tokens):
        chosen = [rows[j] for j in local]
        completion_ids = [completions[i] for i in chosen]
        batch = (pack_suffixes(shared, chosen, completion_ids, pad_id=0) if shared is not None
                 else pack_sequences([prompt_ids[i] for i in chosen], completion_ids, pad_id=0))
        out.append((chosen, {k: v.to(device) for k, v in batch.items()}))  # pad id: arbitrary, masks come from lengths
    return out
