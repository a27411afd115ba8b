"""The update's logged diagnostics (TRL's names), kept out of the update's loop: token sums per micro-batch of the
last iteration, summed over ranks, then divided by the step's token count."""

from __future__ import annotations

import torch

from e2h_min.engine.distributed import DistInfo, all_reduce_sum
from e2h_min.rl.losses import kl_penalty


class UpdateDiagnostics:
    """Token sums of the last iteration's micro-batches; `summary` all_reduces them once.

    The keys depend on the config only, never on what this rank ran: a rank with no sample to run (every
    advantage 0) reduces the same keys, as zeros, or the ranks' all_reduce sizes would differ (a gloo "size
    mismatch" or a hang). `extra_keys` ("kl", "value_loss", "kl_reference") must be decided from the config too.
    """

    BASE_KEYS = ["loss", "tokens", "entropy", "approx_kl_old", "logprob_mismatch", "active_samples",
                 "clip_ratio/clipped_low", "clip_ratio/clipped_high", "clip_ratio/region"]

    def __init__(self, extra_keys: list[str], active_samples: int):
        self.keys = self.BASE_KEYS + extra_keys
        self.sums = dict.fromkeys(self.keys, 0.0)
        self.sums["active_samples"] = float(active_samples)

    def add(self, mb, loss: torch.Tensor, logp: torch.Tensor, old: torch.Tensor, entropy: torch.Tensor,
            flags: dict[str, torch.Tensor], sampler_logprobs: list[list[float]], kl: torch.Tensor | None = None,
            ref_logp: torch.Tensor | None = None, value_loss: torch.Tensor | None = None) -> None:
        """Add micro-batch `mb`: its loss, per-token [R, T] tensors, clip flags and all N sampler log-prob lists."""
        mask, s = mb.mask, self.sums
        if kl is not None:
            s["kl"] += float((kl.detach() * mask).sum())
        if value_loss is not None:
            s["value_loss"] += float((value_loss.detach() * mask).sum())
        s["loss"] += float(loss.detach())
        s["tokens"] += float(mask.sum())
        s["entropy"] += float((entropy * mask).sum())
        for name, flag in flags.items():
            s[f"clip_ratio/{name}"] += float((flag & mask).sum())
        d = old - logp.detach()  # approx KL(pi_old || pi) = E[(rho - 1) - log rho]
        s["approx_kl_old"] += float(((torch.exp(-d) + d - 1.0) * mask).sum())
        if ref_logp is not None:
            s["kl_reference"] += float((kl_penalty(logp.detach(), ref_logp, "k3") * mask).sum())
        sampled = torch.zeros_like(old)
        for j, i in enumerate(mb.rows):
            sampled[j, :len(sampler_logprobs[i])] = torch.tensor(sampler_logprobs[i], device=old.device)
        s["logprob_mismatch"] += float(((sampled - old).abs() * mask).sum())

    def summary(self, grad_norm: torch.Tensor, skipped: int, num_samples: int, device, dist_info: DistInfo,
                extra: dict | None = None) -> dict:
        """The logged row: loss, grad_norm, skipped_updates, update_sample_share, `extra` (PPO's), token means."""
        totals = dict(zip(self.keys, all_reduce_sum(torch.tensor([self.sums[k] for k in self.keys], device=device,
                                                                 dtype=torch.float64), dist_info).tolist()))
        if totals["tokens"] == 0:  # no rank ran a sample: no per-token diagnostics to report
            totals = {k: totals[k] for k in ("loss", "active_samples")}
        tokens = max(totals.pop("tokens", 0.0), 1.0)
        out = {"loss": totals.pop("loss", 0.0), "grad_norm": float(grad_norm), "skipped_updates": skipped,
               "update_sample_share": totals.pop("active_samples", 0.0) / max(num_samples, 1.0), **(extra or {})}
        out.update({k: v / tokens for k, v in totals.items()})
        out["clip_ratio"] = out.get("clip_ratio/clipped_low", 0.0) + out.get("clip_ratio/clipped_high", 0.0)
        if "kl_reference" in out:  # PPO with the KL in its reward: the policy's k3 to the reference on these tokens
            out.setdefault("kl", out["kl_reference"])
        return out  # no reference model (beta 0): no kl field at all, rather than a 0 that was never measured
