"""The update's work savings behind one interface: the update loops over micro-batches as if it ran every sample.

`UpdateBatches` packs a step's samples once and hands the update its micro-batches, each with log-probs on
demand. Three savings sit inside it, none of which changes the gradient (tests/test_plain_update.py):
- only the samples that can move the weights are run (`samples_to_run`): with no KL term in the loss, a sample
  whose advantage is exactly 0 adds exactly 0 to the loss and its gradient;
- each distinct prompt runs through the model once per iteration for all its samples (logprobs.SharedPrompts):
  its keys/values are computed before the micro-batches, which attend to them, and its backward runs once after
  them, with the gradient every micro-batch left on those keys/values;
- micro-batches are cut by rows and by padded tokens after sorting by length (logprobs.micro_batches).
Plus the plumbing the update calls explicitly: the prompts' forward and backward, the FSDP filler micro-batches
(every rank runs as many forwards as the busiest), and the frozen reference's log-probs (computed once per step,
reused by every iteration). The optimizer step is the update's (e2h_min/rl/update.py: step_optimizer).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch

from e2h_min.engine.distributed import DistInfo, all_reduce_max, all_reduce_sum
from e2h_min.engine.fsdp import is_sharded
from e2h_min.engine.logprobs import (PromptKV, SharedPrompts, completion_logprobs, pack_micro_batches,
                              shared_prompts_unsupported_reason)


@dataclass(frozen=True)
class MicroBatchLimits:
    """How a micro-batch is cut: at most `rows` rows and, if `tokens` > 0, at most `tokens` padded tokens.
    The OOM retry halves both (run/oom.py: update_with_oom_retry) instead of changing the config."""

    rows: int
    tokens: int = 0

    def halved(self) -> "MicroBatchLimits":
        return MicroBatchLimits(max(1, self.rows // 2), max(1, self.tokens // 2) if self.tokens else 0)


def completion_mask(completions: list[list[int]]) -> torch.Tensor:
    """[N, T] bool, True on each completion's tokens (the last one, EOS or stop, included), T = the longest."""
    mask = torch.zeros((len(completions), max([1] + [len(c) for c in completions])), dtype=torch.bool)
    for i, c in enumerate(completions):
        mask[i, :len(c)] = True
    return mask


def samples_to_run(advantages: torch.Tensor, skip_zero_advantage: bool, kl_in_loss: bool) -> list[int]:
    """The samples an update must run: all, or (--skip-zero-advantage, no KL in the loss) those with A != 0."""
    skip = skip_zero_advantage and not kl_in_loss
    return [i for i, a in enumerate(advantages.tolist()) if not skip or a != 0]


def shared_prompts_for(model, prompt_ids: list[list[int]], cfg, rows: list[int] | None = None
                       ) -> SharedPrompts | None:
    """The distinct prompts of the samples `rows` (default all), for the shared-prompt layout; None where the
    whole-sequence layout is used."""
    if not cfg.share_prompt_forward or not prompt_ids or (rows is not None and not rows) or is_sharded(model):
        return None  # (FSDP2: the prompts' backward would run through each layer once more after its own)
    if shared_prompts_unsupported_reason(model, cfg.gradient_checkpointing) is not None:
        return None
    return SharedPrompts.from_rows(prompt_ids, rows)


@dataclass
class MicroBatch:
    """One micro-batch: `index` (the same at every iteration), the sample `rows` it holds, the packed `batch`,
    `mask` [R, T] (its completion tokens); log-probs come from its UpdateBatches."""

    index: int
    rows: list[int]
    batch: dict[str, torch.Tensor]
    owner: "UpdateBatches"
    prompt_kv: PromptKV | None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch["completion_mask"]

    def select(self, step_tensor: torch.Tensor) -> torch.Tensor:
        """The part [R, T] of a step-wide [N, T_step] tensor (loss weights, advantages) this micro-batch covers."""
        return step_tensor[self.rows, :self.mask.shape[1]]

    def logprobs(self, return_hidden: bool = False):
        """The policy's (logp [R, T], entropy [R, T]) at the sampling temperature, with gradient (+ hidden)."""
        owner = self.owner
        with owner.autocast():
            return completion_logprobs(owner.policy, self.batch, owner.temperature, return_hidden=return_hidden,
                                       prompt_kv=self.prompt_kv)

    def reference_logprobs(self) -> torch.Tensor:
        """The frozen reference's log-probs [R, T]: computed on first use, then reused by every iteration."""
        return self.owner.reference_logprobs(self.index, self.batch)


class UpdateBatches:
    """The samples `rows` (default all) of one update, packed once into micro-batches under `limits`.

        batches = UpdateBatches(policy, reference, prompt_ids, completions, rows, cfg, device, autocast, dist_info)
        for iteration in range(cfg.num_iterations):
            prompt_kv = batches.prompts_forward()
            for mb in batches.micro_batches(prompt_kv):
                logp, entropy = mb.logprobs()       # [R, T], rows mb.rows of the step's samples
                (loss_tok * mb.select(weights)).sum().backward()
            batches.run_fsdp_fillers()
            batches.prompts_backward(prompt_kv)     # now the gradients are complete
    """

    def __init__(self, policy, reference, prompt_ids: list[list[int]], completions: list[list[int]],
                 rows: list[int] | None, cfg, device, autocast, dist_info: DistInfo = DistInfo(),
                 limits: MicroBatchLimits | None = None):
        limits = limits or MicroBatchLimits(cfg.micro_batch_size, cfg.micro_batch_tokens)
        rows = list(range(len(completions))) if rows is None else rows
        self.policy, self.reference, self.autocast, self.temperature = policy, reference, autocast, cfg.temperature
        self.shared = shared_prompts_for(policy, prompt_ids, cfg, rows)
        packed = pack_micro_batches(prompt_ids, completions, limits.rows, limits.tokens, self.shared, device,
                                    rows) if rows else []
        self.packed: list[tuple[list[int], dict]] = packed
        self.fillers: list[dict] = []
        if is_sharded(policy):  # each FSDP forward all-gathers: every rank runs as many micro-batches as the most
            most = int(all_reduce_max(torch.tensor([len(packed)], device=device), dist_info))
            filler = pack_micro_batches([[0]], [[0]], 1, 0, None, device)[0][1]  # one token, no loss weight
            self.fillers = [filler] * (most - len(packed))
        self._reference_logprobs: dict[int, torch.Tensor] = {}
        self._reference_kv = None  # the reference model's prompt keys/values (shared layout), on first use

    def prompt_kv(self, model) -> PromptKV | None:
        """The prompts' keys/values for the shared layout (graph kept under autograd); None for whole rows."""
        if self.shared is None:
            return None
        with self.autocast():
            return self.shared.keys_values(model)

    def prompts_forward(self) -> PromptKV | None:
        """Per iteration, first: the policy's keys/values of the distinct prompts (shared layout; None otherwise)."""
        return self.prompt_kv(self.policy)

    def micro_batches(self, prompt_kv: PromptKV | None) -> list[MicroBatch]:
        """This rank's micro-batches, attending to `prompt_kv` (the same list at every iteration)."""
        return [MicroBatch(b, rows, batch, self, prompt_kv) for b, (rows, batch) in enumerate(self.packed)]

    def run_fsdp_fillers(self) -> None:
        """FSDP: a forward and backward of one token with no loss weight for each micro-batch this rank has fewer
        than the busiest rank (every FSDP forward all-gathers, so every rank must run as many); else nothing."""
        for batch in self.fillers:
            with self.autocast():
                (completion_logprobs(self.policy, batch, self.temperature)[0].sum() * 0.0).backward()

    @staticmethod
    def prompts_backward(prompt_kv: PromptKV | None) -> None:
        """After the micro-batches' backward: the gradient they left on the prompts' keys/values, through the
        prompts' forward once (shared layout); the gradients are then complete."""
        if prompt_kv is not None:
            prompt_kv.backward()

    def reference_logprobs(self, b: int, batch: dict) -> torch.Tensor:
        """The reference's log-probs of micro-batch b, computed once per step (the reference is frozen)."""
        if b not in self._reference_logprobs:
            with torch.no_grad(), self.autocast(), self.reference.context():
                if self._reference_kv is None:
                    self._reference_kv = self.prompt_kv(self.reference.model)
                self._reference_logprobs[b], _ = completion_logprobs(self.reference.model, batch, self.temperature,
                                                                     prompt_kv=self._reference_kv,
                                                                     with_entropy=False)
        return self._reference_logprobs[b]

    def cached_reference_logprobs(self, b: int) -> torch.Tensor | None:
        """Micro-batch b's reference log-probs if some pass computed them, else None (for the diagnostics)."""
        return self._reference_logprobs.get(b)


def global_counts(mask: torch.Tensor, device, dist_info: DistInfo) -> tuple[int, float]:
    """(samples, completion tokens) of the whole step, summed over ranks: the loss weights' denominators."""
    counts = all_reduce_sum(torch.tensor([float(mask.shape[0]), float(mask.sum())], device=device),
                            dist_info).tolist()
    return int(counts[0]), counts[1]
