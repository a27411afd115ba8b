"""The two KV-cached decoders behind `rollout.generate`: a lean one for Qwen2/Llama-style models, a generic one.

Both follow one small protocol, so the sampling loop in rollout.py does not care which one runs:
    logits = decoder.prefill(ids [P, L], attention [P, L], num_samples G, max_new_tokens M)  # [P*G, V]
    logits = decoder.step(tokens [n])                                                        # [n, V]
    decoder.select(keep [k])   # the running batch becomes these rows, in this order (finished rows dropped)

Why a hand-written decode step (LeanDecoder): with a small model, one `model(...)` call per token spends most of
its time outside the matmuls: rebuilding the attention mask, recomputing RoPE cos/sin, growing the KV cache with
torch.cat (quadratic copying over a rollout), output dataclasses. LeanDecoder calls the model's own submodules
(norms, projections, MLP, lm_head) in the order the model's forward does, with
- a KV cache preallocated once from the real batch and lengths (per layer [rows, kv_heads, L + M, head_dim]),
  written in place, each prompt's prefill copied into its G rows once;
- RoPE cos/sin looked up from a table built once per call by the model's own rotary module;
- the padding mask built once ([rows, 1, 1, L + M]) and only sliced per step, or no mask at all without padding;
- grouped-query attention done as HF does for one query token (the heads of a KV group packed as query rows).
Greedy output is token-for-token what `model.generate` produces (tests/test_rollout.py checks it).

`static_shapes=True` (for CUDA graphs / torch.compile): every step has identical tensor shapes and addresses:
the whole batch keeps running (no compaction), attention covers all cache columns (L + M rounded up to a
multiple of 64) with the not-yet-written ones masked, the step's column is a device tensor, and the buffers
persist across calls, so one captured graph per (rows, capacity) replays for every step of every call.
`compile_step=True` runs that step through torch.compile(mode="reduce-overhead") (CUDA graphs on a GPU).
Status: off by default, and not yet run on a GPU (bench/gpu_check.py measures it there). Both static paths are
tested on CPU (greedy = model.generate). On CPU the compiled step is no option: every row runs to the end and
attention covers every cache column, so it is slower than the dynamic path (docs/benchmarks.md).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

# RoPE variants whose cos/sin depend on the position only (so a table built once is exact); "dynamic" and
# "longrope" rescale with the sequence length seen so far and go through the generic decoder instead.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}
STATIC_CAPACITY_BUCKET = 64


def cache_argument_name(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40); use the name
    this model's forward declares, so releases on either side of the rename work without the deprecated one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoding_model(model):
    """The transformers model the decoders run: a peft model's base model with its adapter layers in place.

    peft's LoRA replaces each targeted nn.Linear (q_proj, v_proj, ...) inside the transformers model by a
    module whose forward is  W x + (alpha / r) * B A dropout(x)  (dropout is the identity in eval mode, as
    rollouts run). So decoding the unwrapped model through its own submodules, as both decoders do, computes
    the adapted policy, no merge needed; `disable_adapter()` still switches the adapter off. Merging B A into W
    for each rollout and subtracting it afterwards would also work, but W then drifts by rounding every step
    (W + BA - BA != W in fp32/bf16), so the base weights and the reference policy would slowly move.
    Prompt-learning adapters (prompt tuning, prefix tuning) add virtual tokens in peft's own forward and are
    not unwrapped (they run on the generic decoder through peft's forward).
    Example: decoding_model(get_peft_model(qwen, LoraConfig(...))) is qwen (with LoRA layers); decoding_model(m)
    is m for a plain transformers model.
    """
    config = getattr(model, "active_peft_config", None)
    if config is None or getattr(config, "is_prompt_learning", False):
        return model
    return model.get_base_model()


def prefill_positions(attention: torch.Tensor) -> torch.Tensor:
    """RoPE positions of left-padded prompts: 0 at each row's first real token (pads get 0, they are masked).

    attention [P, L] (1 = real token) -> positions [P, L].
    Example: attention [[0, 1, 1], [1, 1, 1]] -> [[0, 0, 1], [0, 1, 2]]
    """
    return (attention.cumsum(-1) - 1).clamp(min=0)


class HFCacheDecoder:
    """Generic fallback: one `model(...)` call per token with a transformers DynamicCache.

    Works for any causal LM that accepts position_ids and a cache. Finished rows are dropped from the cache with
    `batch_select_indices`; each prompt's cache is shared with `batch_repeat_interleave`.
    """

    def __init__(self, model):
        self.model = model
        self.cache_kwarg_name = cache_argument_name(model)

    def prefill(self, ids: torch.Tensor, attention: torch.Tensor, num_samples: int, max_new_tokens: int
                ) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        # logits_to_keep=1: the last position's logits only, never [P, L, V]
        accepts = inspect.signature(self.model.forward).parameters
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        logits = self.model(input_ids=ids, attention_mask=attention, position_ids=prefill_positions(attention),
                            use_cache=True, **last_only, **{self.cache_kwarg_name: self.cache}).logits[:, -1]
        self.cache.batch_repeat_interleave(num_samples)
        self.attention = attention.repeat_interleave(num_samples, dim=0)  # [N, L], grows one column per step
        self.positions = self.attention.sum(-1)  # [N] position of the next token fed
        return logits.repeat_interleave(num_samples, dim=0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(tokens), 1))], dim=1)
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.attention,
                            position_ids=self.positions[:, None], use_cache=True,
                            **{self.cache_kwarg_name: self.cache}).logits[:, -1]
        self.positions = self.positions + 1
        return logits

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.attention, self.positions = self.attention[keep], self.positions[keep]


def lean_decoder_unsupported_reason(model) -> str | None:
    """None if LeanDecoder reproduces this model's forward exactly, else why not (then use HFCacheDecoder).

    Supported: a `model.model` with embed_tokens / layers / norm / rotary_emb and an `lm_head`, every layer a
    pre-norm block (input_layernorm -> self_attn(q,k,v,o projections) -> post_attention_layernorm -> mlp), full
    attention on every layer, a position-only RoPE. That is Qwen2 / Qwen2.5 and Llama; Qwen3 (q/k norms),
    sliding-window layers, Gemma-style scaled embeddings and anything else fall back.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("qwen2", "llama"):
        return f"model_type {getattr(config, 'model_type', None)!r} is not qwen2/llama"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "no model.model.{embed_tokens, layers, norm, rotary_emb}"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]):
        return "sliding-window layers"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in _STATIC_ROPE_TYPES:
        return f"rope_type {rope!r} depends on the sequence length"
    for layer in base.layers:
        attn = getattr(layer, "self_attn", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
        if attn is None or not all(hasattr(attn, a) for a in parts) or hasattr(attn, "q_norm"):
            return "attention block is not plain q/k/v/o projections"
        if not all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "decoder layer is not a pre-norm attention + MLP block"
    return None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (the RoPE pairing used by Qwen2 and Llama)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LeanDecoder:
    """Decode step written out for Qwen2/Llama-style models over a preallocated, in-place KV cache.

    State after prefill (N = P * G rows, C = L + M cache columns):
      keys, values  per layer [N, kv_heads, C, head_dim]   rows [:n] are the running batch (one tensor per layer,
                    not one [layers, ...] block: torch.compile rewrites a whole block that it sees written through
                    a per-layer view on every step, and a layer's own tensor it writes in place)
      mask          [N, 1, 1, C] bool (True = attend), or None when no prompt has padding
      positions     [n] RoPE position of the token about to be fed; column = the cache column it is written to
    Attention runs without dropout, as in eval mode (rollouts are generated with the model in eval mode).
    """

    def __init__(self, model, static_shapes: bool = False, compile_step: bool = False):
        reason = lean_decoder_unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model ({reason}); use decoder='hf'")
        self.model, self.base = model, model.model
        self.layers = list(self.base.layers)[: model.config.num_hidden_layers]
        first = self.layers[0].self_attn
        self.head_dim = first.head_dim
        self.n_heads = model.config.num_attention_heads
        self.n_kv_heads = model.config.num_key_value_heads
        self.static_shapes = static_shapes or compile_step
        self.compile_step = compile_step

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, attention: torch.Tensor, num_samples: int, max_new_tokens: int
                ) -> torch.Tensor:
        from transformers import DynamicCache

        n_prompts, width = ids.shape
        n_rows, capacity = n_prompts * num_samples, width + max_new_tokens
        if self.static_shapes:  # a few capacity buckets, so a compiled step is reused across prompt widths
            capacity = -(-capacity // STATIC_CAPACITY_BUCKET) * STATIC_CAPACITY_BUCKET
        cache = DynamicCache(config=self.model.config)
        # The prompt pass goes through the model's own forward (one call, so its overhead does not matter).
        hidden = self.base(input_ids=ids, attention_mask=attention, position_ids=prefill_positions(attention),
                           use_cache=True, **{cache_argument_name(self.base): cache}).last_hidden_state
        logits = self.model.lm_head(hidden[:, -1])  # [P, V]: only the last position, never [P, L, V]

        first_keys = cache.layers[0].keys
        shape = (n_rows, self.n_kv_heads, capacity, self.head_dim)  # one layer's
        if self.static_shapes:
            self._bind_static_buffers(shape, first_keys.dtype, hidden.dtype, ids.device)
        else:  # unwritten columns are never read: attention slices them off
            self.keys = [torch.empty(shape, dtype=first_keys.dtype, device=ids.device) for _ in self.layers]
            self.values = [torch.empty(shape, dtype=first_keys.dtype, device=ids.device) for _ in self.layers]
        for i, layer in enumerate(cache.layers[: len(self.layers)]):
            # [N, kv, C, D] seen as [P, G, kv, C, D]: each prompt's keys broadcast into its G sample rows
            self.keys[i].unflatten(0, (n_prompts, num_samples))[..., :width, :] = layer.keys[:, None]
            self.values[i].unflatten(0, (n_prompts, num_samples))[..., :width, :] = layer.values[:, None]
        del cache

        cos, sin = self.base.rotary_emb(hidden[:1, :1], torch.arange(capacity, device=ids.device)[None])
        positions = attention.sum(-1).repeat_interleave(num_samples)  # [N]
        prompt_mask = attention.bool().repeat_interleave(num_samples, dim=0)  # [N, L]
        self.column = width
        if self.static_shapes:  # refill the persistent buffers in place (their addresses must not change)
            self.cos_table.copy_(cos[0]), self.sin_table.copy_(sin[0])
            self.positions.copy_(positions)
            self.column_tensor.fill_(width)
            self.mask.zero_()  # completion columns open one per step
            self.mask[:, 0, 0, :width] = prompt_mask
        else:
            self.cos_table, self.sin_table = cos[0], sin[0]  # [C, D], the model's own RoPE
            self.positions = positions
            self.mask = None
            if not prompt_mask.all():
                self.mask = torch.ones((n_rows, 1, 1, capacity), dtype=torch.bool, device=ids.device)
                self.mask[:, 0, 0, :width] = prompt_mask
        return logits.repeat_interleave(num_samples, dim=0)

    def _bind_static_buffers(self, shape, cache_dtype, rope_dtype, device) -> None:
        """Static mode: take this shape's persistent buffers (created once, zeros, so masked columns stay finite).

        CUDA graphs replay fixed addresses, so the cache, mask, positions and RoPE tables live across calls; the
        two most recent shapes are kept (training steps reuse one or two capacity buckets).
        """
        key = (id(self.model), shape, cache_dtype, rope_dtype, str(device))
        buffers = _STATIC_BUFFERS.pop(key, None)
        if buffers is None:
            n_rows, _, capacity, head_dim = shape
            buffers = dict(keys=[torch.zeros(shape, dtype=cache_dtype, device=device) for _ in self.layers],
                           values=[torch.zeros(shape, dtype=cache_dtype, device=device) for _ in self.layers],
                           mask=torch.zeros((n_rows, 1, 1, capacity), dtype=torch.bool, device=device),
                           positions=torch.zeros(n_rows, dtype=torch.long, device=device),
                           column_tensor=torch.zeros(1, dtype=torch.long, device=device),
                           cos_table=torch.zeros((capacity, head_dim), dtype=rope_dtype, device=device),
                           sin_table=torch.zeros((capacity, head_dim), dtype=rope_dtype, device=device))
            if self.compile_step:
                for value in buffers.values():
                    for tensor in value if isinstance(value, list) else [value]:
                        torch._dynamo.mark_static_address(tensor)
        _STATIC_BUFFERS[key] = buffers
        while len(_STATIC_BUFFERS) > 2:
            _STATIC_BUFFERS.pop(next(iter(_STATIC_BUFFERS)))
        for name, tensor in buffers.items():
            setattr(self, name, tensor)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compile_step:
            logits = _compiled_static_step()(self, tokens)
        elif self.static_shapes:
            logits = self._static_step(tokens)
        else:
            logits = self._dynamic_step(tokens)
        if self.static_shapes:
            self.column_tensor += 1
            self.positions += 1
        else:
            self.positions = self.positions + 1
        self.column += 1
        return logits

    def _dynamic_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [n] -> logits [n, V]; writes cache column `self.column`, attends to columns [0, column]."""
        n, column = tokens.shape[0], self.column
        seen = column + 1

        def write_and_read(i, key, value):  # key/value [n, kv, 1, D]
            self.keys[i][:n, :, column] = key[:, :, 0]
            self.values[i][:n, :, column] = value[:, :, 0]
            return self.keys[i][:n, :, :seen], self.values[i][:n, :, :seen]

        mask = None if self.mask is None else self.mask[:n, :, :, :seen]
        return self._forward_one_token(tokens, write_and_read, mask)

    def _static_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Same math over all N rows and all C columns; the column is a device tensor (no Python int)."""
        column = self.column_tensor  # [1]
        self.mask.index_fill_(3, column, True)

        def write_and_read(i, key, value):
            self.keys[i].index_copy_(2, column, key.to(self.keys[i].dtype))
            self.values[i].index_copy_(2, column, value.to(self.values[i].dtype))
            return self.keys[i], self.values[i]

        return self._forward_one_token(tokens, write_and_read, self.mask)

    def _forward_one_token(self, tokens: torch.Tensor, write_and_read, mask) -> torch.Tensor:
        """The model's forward for one new token per row, in the model's own order of operations.

        tokens [n] -> logits [n, V]. write_and_read(layer, key, value) stores the new key/value in the cache and
        returns the layer's keys/values to attend to ([n, kv, S, D]).
        """
        n = tokens.shape[0]
        cos = self.cos_table[self.positions][:, None, None]  # [n, 1, 1, D]
        sin = self.sin_table[self.positions][:, None, None]
        hidden = self.base.embed_tokens(tokens[:, None])  # [n, 1, H]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            # One token: HF's view(n, 1, heads, D).transpose(1, 2) is this view, without the transpose.
            query = attn.q_proj(normed).view(n, self.n_heads, 1, self.head_dim)  # [n, heads, 1, D]
            key = attn.k_proj(normed).view(n, self.n_kv_heads, 1, self.head_dim)
            value = attn.v_proj(normed).view(n, self.n_kv_heads, 1, self.head_dim)
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
            keys, values = write_and_read(i, key, value)
            hidden = hidden + attn.o_proj(self._attend(query, keys, values, mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(self.base.norm(hidden)[:, 0])

    def _attend(self, query, keys, values, mask, scaling) -> torch.Tensor:
        """One query token per row: query [n, heads, 1, D], keys/values [n, kv, S, D] -> [n, 1, heads * D].

        With a mask, the `heads // kv` query heads sharing a KV head are packed as that head's query rows
        ([n, kv, heads // kv, D]), so keys are not repeated; this is also what transformers' SDPA path does.
        """
        n = query.shape[0]
        keys, values = keys.to(query.dtype), values.to(query.dtype)
        if mask is None:
            out = F.scaled_dot_product_attention(query, keys, values, scale=scaling,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
        else:
            packed = query.reshape(n, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
        return out.reshape(n, 1, self.n_heads * self.head_dim)

    def select(self, keep: torch.Tensor) -> None:
        """Running batch becomes rows `keep` (in that order); only rows that change place are copied.

        `compaction_order` in rollout.py keeps most rows in place and moves a few from the tail into the holes
        left by finished rows, so a compaction copies O(finished rows) cache rows, not the whole cache.
        Only the columns written so far are copied.
        """
        if self.static_shapes:
            raise RuntimeError("static-shape decoding keeps every row; the caller must not compact")
        moved = (keep != torch.arange(len(keep), device=keep.device)).nonzero().flatten()
        if len(moved):
            source, written = keep[moved], self.column
            for keys, values in zip(self.keys, self.values):
                keys[moved, :, :written] = keys[source, :, :written]
                values[moved, :, :written] = values[source, :, :written]
            if self.mask is not None:
                self.mask[moved] = self.mask[source]
        self.positions = self.positions[keep]


_STATIC_BUFFERS: dict = {}  # static-mode buffers by (model, shape, dtypes, device), the two most recent
_COMPILED = {}


def _compiled_static_step():
    """LeanDecoder._static_step under torch.compile, built once per process.

    mode="reduce-overhead" captures the step as a CUDA graph on a GPU: its inputs other than the token ids are
    persistent, address-marked buffers, so one graph per (rows, capacity bucket) replays every step.
    """
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(LeanDecoder._static_step, mode="reduce-overhead", dynamic=False)
    return _COMPILED["step"]


def make_decoder(model, kind: str = "auto", static_shapes: bool = False, compile_step: bool = False):
    """kind "auto": LeanDecoder when the model is supported, else HFCacheDecoder; "lean" / "hf" force one.

    A peft LoRA model is decoded as its base model with the adapter layers in place (`decoding_model`), so it
    runs on the lean decoder like the plain model."""
    if kind not in ("auto", "lean", "hf"):
        raise ValueError(f"decoder must be 'auto', 'lean' or 'hf', got {kind!r}")
    model = decoding_model(model)  # a LoRA policy decodes through its own adapted layers
    if kind == "hf" or (kind == "auto" and lean_decoder_unsupported_reason(model) is not None):
        if static_shapes or compile_step:
            raise ValueError("static_shapes / compile_step need the lean decoder (a Qwen2/Llama-style model)")
        return HFCacheDecoder(model)
    return LeanDecoder(model, static_shapes=static_shapes, compile_step=compile_step)
