"""Per-token log-probs (and entropy) of completion tokens, computed in chunks so no [B, T, V] tensor exists.

The model's trunk gives hidden states [B, L, H]; only the positions that predict completion tokens go through
the LM head, a chunk of rows at a time. Under autograd each chunk is checkpointed, so the backward pass keeps
the chunk's hidden states, not its [rows, V] logits: with a 151,936-token vocabulary that is the difference
between megabytes and gigabytes.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


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


def _chunk_logprobs_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [n, H], targets [n] -> (log p(target) at temperature [n], entropy of that distribution [n])."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float() / temperature  # [n, V]
    logz = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, targets[:, None]).squeeze(-1) - logz
    with torch.no_grad():  # a diagnostic only: sum_v p_v * (logz - logit_v)
        probs = torch.softmax(logits.detach(), dim=-1)
        entropy = logz.detach() - (probs * logits.detach()).sum(-1)
    return logp, entropy


def completion_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0, chunk_rows: int = 1024,
                        return_hidden: bool = False):
    """log pi(o_t | q, o_<t) / T-scaled, and the true entropy of pi at each completion position.

    batch: from `pack_sequences`, already on the model's device. Returns (logp [B, T], entropy [B, T]), zeros at
    padding, plus with return_hidden the trunk's hidden state at each of those positions [B, T, H] (the state a
    value head reads). The temperature must be the sampling temperature, otherwise the importance ratio compares
    two different distributions. `chunk_rows` completion positions go through the LM head at a time.
    """
    trunk = model.get_decoder()
    head = model.get_output_embeddings()
    hidden = trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).last_hidden_state  # [B, L, H]
    index = batch["logit_index"]
    picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
    flat_hidden = picked.reshape(-1, picked.shape[-1])
    flat_targets = batch["targets"].reshape(-1)
    logps, entropies = [], []
    for start in range(0, flat_hidden.shape[0], chunk_rows):
        args = (flat_hidden[start:start + chunk_rows], head.weight, head.bias,
                flat_targets[start:start + chunk_rows], temperature)
        if torch.is_grad_enabled():
            logp, ent = checkpoint(_chunk_logprobs_entropy, *args, use_reentrant=False)
        else:
            logp, ent = _chunk_logprobs_entropy(*args)
        logps.append(logp)
        entropies.append(ent)
    mask = batch["completion_mask"]
    logp = torch.cat(logps).view_as(index) * mask
    entropy = torch.cat(entropies).view_as(index) * mask
    return (logp, entropy, picked) if return_hidden else (logp, entropy)
