"""Loading the policy, the reference model and the tokenizer through the standard Hugging Face path.

`--model` takes a hub id, a local directory, or a short alias. The embedded tiny model ("tiny") is a local
directory inside the package, loaded through the very same `from_pretrained` calls as any hub model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from e2h_min.errors import UserError


@dataclass(frozen=True)
class ModelFacts:
    """What a --model is, read before loading it (models.describe_model): its resolved path or hub id, its
    architectures and parameter count from config.json (None when no config is reachable offline), and whether
    scripts/build_tiny_model.py built it (its build_info.json says so)."""

    path: str
    architectures: tuple[str, ...] = ()
    num_parameters: Optional[int] = None
    tiny_build: bool = False


TINY_MODEL_DIR = Path(__file__).parents[1] / "assets" / "tiny-countdown"
# The schedule testbed (README: Results): the tiny model trained further on harder demos, so that the hard level
# is out of greedy reach but inside pass@16 (its build_info.json holds the recipe and the measured premise).
TESTBED_MODEL_DIR = Path(__file__).parents[1] / "assets" / "tiny-countdown-testbed"
MODEL_ALIASES = {
    "tiny": str(TINY_MODEL_DIR),
    "tiny-testbed": str(TESTBED_MODEL_DIR),
    # The paper's models are the Instruct variants; the short names map to them (printed when used).
    "Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-1.5B-Instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen2.5-3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen2.5-3B-Instruct": "Qwen/Qwen2.5-3B-Instruct",
    "Llama-3.2-3B-Instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "Qwen2.5-0.5B-Instruct": "Qwen/Qwen2.5-0.5B-Instruct",
}


def resolve_model_name(name: str) -> str:
    """Alias -> hub id or local path; anything else is returned unchanged."""
    return MODEL_ALIASES.get(name, name)


@functools.lru_cache(maxsize=8)
def model_fingerprint(name: str) -> str | None:
    """The sha256 of a local model folder's config.json and weight files (names and bytes; about 1.5 s per GB, once
    per process), so that a resume can tell they changed under the run; None for a hub id (loaded_model_record
    records the commit transformers loaded)."""
    path = Path(resolve_model_name(name))
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.name == "config.json" or p.suffix in (".safetensors", ".bin")):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def loaded_model_record(name: str, reloaded) -> str | None:
    """What checkpoints record of --model `name`: a local folder's model_fingerprint, or for a hub id the commit
    transformers loaded (config._commit_hash of `reloaded`, the model read from --model: the LoRA base, the
    reference, or at the start the policy); None when neither is known."""
    if Path(resolve_model_name(name)).is_dir():
        return model_fingerprint(name)
    commit = getattr(getattr(reloaded, "config", None), "_commit_hash", None)
    return f"hub commit {commit}" if commit else None


def pick_device(requested: str = "auto") -> torch.device:
    """auto = cuda if available, else mps, else cpu. An unavailable explicit device is a UserError."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {requested} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    if requested.startswith("mps") and not (getattr(torch.backends, "mps", None) is not None
                                            and torch.backends.mps.is_available()):
        raise UserError(f"--device {requested} asked for, but this machine has no usable MPS (Apple GPU) backend; "
                        f"use --device cpu or auto")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown --device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA GPU(s) "
                        f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def context_length(name: str) -> int | None:
    """The model's max_position_embeddings from its config.json alone (no weights loaded); None if unknown
    (a LoRA adapter directory, a hub id not cached, a config without the field)."""
    from transformers import AutoConfig

    try:
        # local files only: this is a pre-check, and an uncached hub id must not wait on the network here
        config = AutoConfig.from_pretrained(resolve_model_name(name), trust_remote_code=False, local_files_only=True)
    except Exception:  # noqa: BLE001  (unknown here; loading the model reports its own errors)
        return None
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) else None


def load_tokenizer(name: str):
    """Tokenizer with a pad token distinct from EOS where possible, left padding for generation."""
    from transformers import AutoTokenizer

    path = resolve_model_name(name)
    tokenizer = _from_pretrained(AutoTokenizer, path, name)
    if tokenizer.pad_token_id is None:
        # Reusing EOS as pad is safe here because our masks come from lengths, never from `ids != pad`.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"model {name!r} has no chat template; E2H prompts need one (use an -Instruct model)")
    return tokenizer


def describe_model(name: str) -> ModelFacts:
    """What `name` is, without loading weights: architectures and parameter count from its config.json (a local
    directory, or the Hugging Face cache; never the network), and whether scripts/build_tiny_model.py built it.
    The parameter count comes from instantiating the architecture on the meta device (shapes only, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_name(name)
    build_info = Path(path) / "build_info.json"
    tiny_build = build_info.is_file() and "build_tiny_model" in json.loads(build_info.read_text()).get("recipe", "")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):  # not local, not cached: the hub id's name is all we know
        return ModelFacts(path, tiny_build=tiny_build)
    try:
        with torch.device("meta"):
            num_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    except (ValueError, KeyError):  # an architecture this transformers cannot build
        num_parameters = None
    return ModelFacts(path, tuple(getattr(config, "architectures", None) or ()), num_parameters, tiny_build)


def frozen_dtype(requested: str, device: torch.device) -> torch.dtype:
    """dtype of the frozen weights (reference, LoRA base): auto = bf16 on CUDA (the compute dtype there), fp32
    elsewhere (CPU runs without autocast: bf16 weights would change the numerics and slow the matmuls)."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, requested)


def checkpoint_dtype(name: str) -> torch.dtype:
    """The dtype the model's own config.json declares (`dtype`, or `torch_dtype` in older files); fp32 if none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(resolve_model_name(name), local_files_only=True)
    except (OSError, ValueError):
        return torch.float32
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def checkpoint_file_bytes(name: str) -> int:
    """Bytes of the model's weight files (*.safetensors, *.bin) in its directory or the Hugging Face cache; 0 if
    they cannot be found offline."""
    from transformers.utils import cached_file

    path = resolve_model_name(name)
    if os.path.isdir(path):
        directory = Path(path)
    else:
        try:
            directory = Path(cached_file(path, "config.json", local_files_only=True)).parent
        except (OSError, ValueError, TypeError):
            return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in directory.glob(pattern))


def load_model(name: str, device: torch.device, trainable: bool = True, dtype: torch.dtype = torch.float32):
    """Causal LM in `dtype`: fp32 for trained weights (the optimizer's master weights; bf16 compute comes from
    autocast on CUDA), the frozen dtype for a LoRA base or a reference model."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_name(name)
    model = _from_pretrained(AutoModelForCausalLM, path, name, dtype=dtype)
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        # Our sampler owns decoding; stray generation defaults would only produce warnings.
        eos = model.config.eos_token_id  # a list for Llama 3 ([128001, 128008, 128009]); pad must be one id
        eos = eos[0] if isinstance(eos, list) else eos
        model.generation_config.pad_token_id = model.generation_config.pad_token_id or eos
    return model


class ValueHead(torch.nn.Module):
    """PPO's critic: a linear map from the policy trunk's hidden state to V(s_t), zero-initialised (V = 0 at start).

    It shares the policy's trunk, so values cost no extra forward pass: they are read from the same hidden states
    as the log-probs. The price is that value gradients also shape the trunk; --vf-coef keeps them small.
    hidden [B, T, H] -> values [B, T] (float32).
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


@dataclass
class Reference:
    """The frozen reference policy pi_ref: a model, and a context under which calling it gives pi_ref.

    Full fine-tuning keeps a frozen copy (context does nothing). With LoRA the reference is the policy itself
    with its adapter switched off (context = peft's disable_adapter), so no second copy of the weights exists.
    """

    model: torch.nn.Module
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class Models(NamedTuple):
    """The models of a run: the trained policy (under FSDP: sharded), the model that rolls out, evaluates and is
    saved (the policy itself, or under FSDP its full-weight copy), the frozen reference (None when beta = 0) and
    PPO's value head (None unless --advantage ppo)."""

    policy: torch.nn.Module
    sampling_model: torch.nn.Module
    reference: Reference | None
    value_head: ValueHead | None


def frozen_copy(model, dtype: torch.dtype | None = None) -> Reference:
    """The reference policy: a frozen, eval-mode deep copy of the initial model (never updated), in `dtype`
    (the frozen dtype; default: the model's own). The fp32 copy exists only briefly, before any gradient or
    optimizer state does, so it does not raise the run's peak."""
    reference = copy.deepcopy(model)
    if dtype is not None:
        reference.to(dtype)
    reference.eval()
    reference.requires_grad_(False)
    return Reference(reference)


@contextlib.contextmanager
def peft_building():
    """Silence the one deprecation notice peft itself triggers: peft 0.21's PeftModel.__init__ reads transformers'
    deprecated `is_gradient_checkpointing` (a FutureWarning that is not about our code, and no user can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def require_peft(lora_r: int) -> None:
    """LoRA needs peft (a core dependency: requirements.txt); say so in one line before any model is loaded."""
    import importlib.util

    if lora_r and importlib.util.find_spec("peft") is None:
        raise UserError(f"--lora-r {lora_r} (LoRA, the paper's recipe) needs peft, which is in requirements.txt: "
                        f"pip install -r requirements.txt, or train without LoRA with --lora-r 0")


def apply_lora(model, r: int, alpha: float, dropout: float, targets: str):
    """Wrap the model with LoRA adapters (peft, a core dependency: requirements.txt); only adapter weights train."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError(f"--lora-r {r} needs peft (in requirements.txt): pip install -r requirements.txt, or "
                        f"train without LoRA with --lora-r 0") from None
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=[t.strip() for t in targets.split(",") if t.strip()])
    try:
        with peft_building():
            return get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in this architecture
        raise UserError(f"--lora-targets {targets!r}: {str(exc).splitlines()[0][:200]}") from None


def check_lora_targets(name: str, targets: str) -> None:
    """UserError naming each --lora-targets entry that matches no module of the model, before any weight is read:
    the model is built on the meta device from its config.json. peft's rule: a target matches a module whose name
    is the target or ends with "." + target. Skipped when the config is not on this machine (or needs the model's
    own code): the load that follows says why, or fetches it.
    Example: check_lora_targets("tiny", "q_proj,qproj") raises "--lora-targets: 'qproj' matches no module ..."
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise UserError(f"--lora-targets {targets!r} names no module; pass e.g. q_proj,v_proj")
    try:
        # local files only, and never a model's own code: no hub round-trips, no prompt to run remote code
        config = AutoConfig.from_pretrained(resolve_model_name(name), local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        names = [module for module, _ in model.named_modules()]
    except Exception:  # noqa: BLE001  (no config here: the load that follows reports it)
        return
    missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        examples = sorted({n.rsplit(".", 1)[-1] for n in names if n.endswith("_proj")}) or sorted(names)[:8]
        raise UserError(f"--lora-targets: {', '.join(map(repr, missing))} matches no module of {name} (its "
                        f"projections: {','.join(examples)})")


def load_lora_checkpoint(base_model, path):
    """Base model + the adapter saved in a checkpoint directory, trainable again (for --resume)."""
    from peft import PeftModel

    with peft_building():
        return PeftModel.from_pretrained(base_model, path, is_trainable=True)


def lora_reference(peft_model) -> Reference:
    return Reference(peft_model, peft_model.disable_adapter)


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached right now (one TCP connect, 5 s at most), or None if it can.
    None too behind a proxy (the connect would test the wrong route) and in offline mode (nothing is fetched).
    Without it, an offline machine waits ~50 s on the hub client's retries before the same answer."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                                     "all_proxy")):
        return None
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached ({exc.strerror or type(exc).__name__})"
    return None


def _from_pretrained(auto_cls, path: str, name: str, **kwargs):
    is_local = os.path.isdir(path)
    if path != name:
        logging.getLogger("e2h_min").info("model alias %s -> %s", name, path)
    if not is_local and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise UserError(f"cannot load model {name!r}: no such local directory and not a hub id of the form "
                        f"'org/name'; pass --model /path/to/model or a hub id such as Qwen/Qwen2.5-1.5B-Instruct")
    offline = None if is_local else hub_unreachable()
    if offline:  # the local cache alone, as HF_HUB_OFFLINE=1 would: no wait on the hub's retries
        kwargs = dict(kwargs, local_files_only=True)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry chatter would bury our one-line error
    from safetensors import SafetensorError  # a damaged weights file (truncated, bad header)

    try:
        return auto_cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        if is_local:
            raise UserError(f"cannot load model {name!r} from the local directory {path}: "
                            f"{str(exc).splitlines()[0][:160]}; its files are missing or damaged (restore them, "
                            f"or pass another --model)") from None
        if offline:
            raise UserError(f"cannot load model {name!r}: it is not in the local Hugging Face cache and the Hub "
                            f"is offline ({offline}). Download it where you have network (hf download {path} "
                            f"--local-dir DIR) and pass --model DIR; on an offline machine set HF_HUB_OFFLINE=1 "
                            f"to use the local cache only") from None
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise UserError(f"cannot load model {name!r}: HF_HUB_OFFLINE is set and the local Hugging Face cache "
                            f"does not hold it. Download it where you have network (hf download {path} "
                            f"--local-dir DIR) and pass --model DIR") from None
        where = "the Hugging Face Hub (offline or unknown id?)"
        raise UserError(f"cannot load model {name!r} from {where}: {str(exc).splitlines()[0][:160]}. "
                        f"Download it where you have network (hf download {path} --local-dir DIR) and pass "
                        f"--model DIR (on an offline machine set HF_HUB_OFFLINE=1: the answer comes at once)"
                        ) from None
    finally:
        hub_logger.setLevel(level)
