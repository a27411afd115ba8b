"""Catch a diverged update right after the optimizer step, before it reaches the next rollout.

Guarding only the gradient is not enough: a finite gradient times a huge learning rate gives finite but enormous
weights (--lr 1e30 gives |w| ~ 1e29), whose next forward pass overflows to inf/NaN logits, and the sampler then
fails far from the cause (an out-of-range token index). So after every optimizer step we check
1. every trained parameter is finite, and
2. one forward pass on one prompt of this step gives finite logits (no dropout, no RNG: the run is unchanged).
Either failure stops the run with one line naming the step and the fix. No copy of the last good weights and
optimizer state is kept to roll back to (it would double the memory of a large model); the run's checkpoints
are the last good states.
"""

from __future__ import annotations

import torch

from e2h_min.errors import UserError


class DivergedError(UserError):
    """The weights or the model's outputs became non-finite after an optimizer step (one line, exit code 2)."""


def first_nonfinite_parameter(named_params: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None. One host sync for all of them.

    Example: [("w", tensor([1., nan]))] -> "w"; [("w", tensor([1e30]))] -> None (finite, however large)
    """
    if not named_params:
        return None
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named_params])
    if bool(finite.all()):
        return None
    return named_params[int((~finite).nonzero()[0])][0]


@torch.no_grad()  # a probe, not a training forward: no graph is kept
def probe_logits_finite(model, prompt: list[int], device, autocast) -> bool:
    """Whether one forward pass of `model` on `prompt` gives finite logits at every position (eval mode, so no
    dropout draws; the training mode is restored)."""
    if not prompt:
        return True
    was_training = model.training
    model.eval()
    try:
        with autocast():
            logits = model(input_ids=torch.tensor([prompt], device=device)).logits
    finally:
        model.train(was_training)
    return bool(torch.isfinite(logits).all())


def divergence_message(step: int, lr: float, what: str, run_dir) -> str:
    """The one line a diverged run ends with."""
    kept = f"checkpoints written before step {step} are intact in {run_dir}" if step > 1 else "nothing to keep"
    return (f"step {step}: the run diverged after the optimizer step ({what}); lower --lr (it is {lr:g}; try "
            f"{lr / 10:g}) and start again ({kept})")
