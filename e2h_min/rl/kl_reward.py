"""--kl-in-reward on the GRPO path: each sample's KL to the frozen reference, summed over its tokens, subtracted
from its advantage after the group normalisation (advantages.kl_penalised_advantages). PPO puts its KL penalty in
the per-token rewards instead (e2h_min/rl/ppo.py)."""

from __future__ import annotations

import torch

from e2h_min.engine.batching import MicroBatchLimits, shared_prompts_for
from e2h_min.engine.logprobs import completion_logprobs, pack_micro_batches
from e2h_min.rl.advantages import kl_penalised_advantages
from e2h_min.rl.losses import kl_estimator_for, sequence_kl
from e2h_min.rl.samples import StepSamples


@torch.no_grad()
def reference_sequence_kl(reference, samples: StepSamples, cfg, device, autocast,
                          limits: MicroBatchLimits) -> torch.Tensor:
    """sum_t KL_t(pi || pi_ref) per sample [N] (float64), from the sampler's log-probs, for --kl-in-reward."""
    out = torch.zeros(len(samples.completions), dtype=torch.float64)
    shared = shared_prompts_for(reference.model, samples.prompt_ids, cfg)
    kv = None
    for rows, batch in pack_micro_batches(samples.prompt_ids, samples.completions, limits.rows, limits.tokens,
                                          shared, device):
        with autocast(), reference.context():
            if shared is not None and kv is None:
                kv = shared.keys_values(reference.model)
            ref, _ = completion_logprobs(reference.model, batch, cfg.temperature, prompt_kv=kv, with_entropy=False)
        logp = torch.zeros_like(ref)
        for j, i in enumerate(rows):
            logp[j, :len(samples.sampler_logprobs[i])] = torch.tensor(samples.sampler_logprobs[i], device=device)
        out[rows] = sequence_kl(logp, ref, batch["completion_mask"], kl_estimator_for(cfg)).double().cpu()
    return out


def kl_penalised(reference, samples: StepSamples, advantages: torch.Tensor, cfg, device, autocast,
                 limits: MicroBatchLimits) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages less the KL penalty, subtracted after the normalisation (see
    advantages.kl_penalised_advantages), float32; the per-sample KL [N]). Groups are rank-local: each rank
    penalises its own samples."""
    sequence_kl_values = reference_sequence_kl(reference, samples, cfg, device, autocast, limits)
    penalised = kl_penalised_advantages(advantages, sequence_kl_values, cfg.beta, cfg.num_generations)
    return penalised.float(), sequence_kl_values
