"""What a run's weights, gradients, optimizer and reference model take in memory, estimated before the first step.

The rules (bytes per parameter):
- trained parameters are fp32 master weights (4), with an fp32 gradient (4) and AdamW's two fp32 moments (8):
  16 bytes per trained parameter;
- frozen parameters (a LoRA base, the reference copy of full fine-tuning) are stored in the frozen dtype:
  2 bytes in bf16 (the default on CUDA), 4 in fp32 (the default on CPU, where bf16 matmuls are slow and would
  change the reference's numerics);
- LoRA needs no reference copy: the reference is the policy with its adapter switched off.
So full fine-tuning with a reference costs 16 + 2 = 18 bytes per parameter on CUDA (20 on CPU), LoRA about
2 (4 on CPU) plus 16 per adapter parameter. Activations and the KV cache of the rollout come on top (they depend
on the batch and the sequence lengths, not on the parameter count). On CPU the same RAM also holds the
interpreter and its libraries (torch, transformers: ~0.3 GiB), which the start-up line adds as "process", read
off the process before the models are loaded.
"""

from __future__ import annotations

import torch

MASTER_BYTES = 4  # fp32 master weights, gradients and each of AdamW's two moments
GIB = 2 ** 30


def estimate_memory(trainable: int, frozen: int, reference: int, frozen_bytes: int) -> dict[str, int]:
    """Bytes of each part of the training state.

    trainable: parameters the optimizer updates; frozen: parameters of the policy that do not train (the LoRA
    base); reference: parameters of a separate frozen reference model (full fine-tuning with beta > 0);
    frozen_bytes: bytes per frozen parameter (2 for bf16, 4 for fp32).
    Example: full fine-tuning of 1e9 parameters with a bf16 reference, estimate_memory(10**9, 0, 10**9, 2) ->
    weights 4e9, gradients 4e9, optimizer 8e9, reference 2e9, total 18e9 bytes.
    """
    parts = {"weights": trainable * MASTER_BYTES + frozen * frozen_bytes,
             "gradients": trainable * MASTER_BYTES,
             "optimizer": trainable * 2 * MASTER_BYTES,
             "reference": reference * frozen_bytes}
    parts["total"] = sum(parts.values())
    return parts


def lora_parameter_count(model: torch.nn.Module, r: int, targets: tuple[str, ...]) -> int:
    """Parameters LoRA adds: r * (in + out) for each Linear whose own name is one of `targets` (A is [r, in],
    B is [out, r]). Works on a meta-device model, so sizes can be known without allocating weights."""
    return sum(r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def training_memory(policy: torch.nn.Module, reference_model: torch.nn.Module | None,
                    extra_trainable: int = 0) -> dict[str, int]:
    """The estimate for a built run: counts and the frozen dtype read off the models themselves.

    reference_model: a separate reference copy, or None (beta = 0, or LoRA, whose reference is the policy).
    extra_trainable: trained parameters outside the policy (the PPO value head).
    """
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad) + extra_trainable
    frozen_params = [p for p in policy.parameters() if not p.requires_grad]
    if reference_model is not None:
        frozen_params += list(reference_model.parameters())
    frozen_bytes = frozen_params[0].element_size() if frozen_params else MASTER_BYTES
    frozen = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    reference = sum(p.numel() for p in reference_model.parameters()) if reference_model is not None else 0
    return estimate_memory(trainable, frozen, reference, frozen_bytes)


def with_process(parts: dict[str, int], process_bytes: int) -> dict[str, int]:
    """The estimate plus the memory the process already held (interpreter, libraries), before the total."""
    out = {k: v for k, v in parts.items() if k != "total"}
    out["process"] = process_bytes
    out["total"] = parts["total"] + process_bytes
    return out


def resident_bytes() -> int:
    """This process's resident set size now (Linux /proc/self/statm; 0 where that does not exist)."""
    import resource

    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def loading_peak(parts: dict[str, int], checkpoint_bytes: int) -> int:
    """RAM while the policy loads on CPU: the process, the policy's weights and its checkpoint files, which
    from_pretrained reads through a memory map (resident until loading returns). No gradient, optimizer state or
    reference copy exists yet."""
    return parts.get("process", 0) + parts["weights"] + checkpoint_bytes


def format_memory(parts: dict[str, int], loading: int | None = None) -> str:
    """The start-up line, e.g. 'memory estimate: weights 1.84 GiB | ... | total 9.54 GiB ...'; with `loading`
    (CPU runs) also the loading phase and the expected peak, the larger of the two."""
    line = "memory estimate: " + " | ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items()) + \
        " (before activations and the rollout's KV cache)"
    if loading is not None:
        line += (f"; while loading {loading / GIB:.2f} GiB (the checkpoint is memory-mapped); "
                 f"expected peak {max(loading, parts['total']) / GIB:.2f} GiB")
    return line
