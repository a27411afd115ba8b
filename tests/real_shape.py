"""Real-shape stand-ins for Qwen2.5-Instruct and Llama-3.2-Instruct, built offline in about a second each.

What is real: the architecture config and generation config (vocabulary size, EOS ids, tied embeddings, RoPE
parameters), the special tokens at their real ids, the pre-tokenizer split pattern (Qwen2 splits digits one by
one, Llama 3 in runs of up to three), byte-level BPE, `len(tokenizer)`, and the chat template (Qwen2.5-Instruct's
verbatim; a Llama-3.2-style one that writes today's date into the system turn). What is not: the weights are
random, the layers few and narrow, and the BPE is trained on a little E2H text, its vocabulary padded with filler
tokens (that no text encodes to) up to the first special id.

Use from tests: `build_qwen_shape(directory)` / `build_llama_shape(directory)` write a model directory that
`--model DIR` loads like a hub download; tests/conftest.py caches one of each per session (`qwen_shape_dir`,
`llama_shape_dir`). Layer sizes are arguments, so a larger stand-in can be built the same way, e.g. Qwen2.5-0.5B's
shape: build_qwen_shape(d, hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

# The pre-tokenizer split patterns of the real tokenizer.json files.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2.5's added tokens, ids 151643.. in this order; <tool_call> and </tool_call> are not "special".
QWEN_FIRST_SPECIAL_ID = 151643
QWEN_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
              "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_EOS_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|> (generation_config.json)
QWEN_VOCAB_SIZE = 151936  # the embedding rows; len(tokenizer) is 151665

# Llama 3.x's 256 special tokens, ids 128000..128255.
LLAMA_FIRST_SPECIAL_ID = 128000
LLAMA_SPECIAL = (["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
                 + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)])
LLAMA_EOS_IDS = [128001, 128008, 128009]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
LLAMA_VOCAB_SIZE = 128256


def training_text() -> list[str]:
    """E2H prompts and answers of every built-in task, with the endings real models write after </answer>."""
    from e2h_min.tasks import make_task

    texts = []
    for name in ("countdown", "blocksworld"):
        task = make_task(name)
        texts.append(task.system_prompt + "\n" + task.prefill)
        for level in range(task.num_levels):
            for index in range(6):
                problem = task.problem(level, index)
                answer = task.demonstration(problem) or " a plan</think>\n<answer> 1 </answer>"
                texts.append(problem.user_prompt)
                texts += [answer, answer + ".", answer + "\n\n", answer + ".\n"]
    return texts


def train_byte_level_bpe(split_pattern: str, vocab_size: int, first_special_id: int, specials: list[str],
                         non_special: tuple[str, ...] = ()):
    """A byte-level BPE trained on `training_text`, padded with unreachable fillers to `first_special_id`, then
    `specials` added at first_special_id, first_special_id + 1, ... Returns a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    # Fillers: byte-level strings no merge produces, decoding to "~N~" (no character a stop string ends with).
    for i in range(len(vocab), first_special_id):
        vocab[f"~{i}~"] = i
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_tokens([AddedToken(t, special=t not in non_special, normalized=False) for t in specials])
    assert tokenizer.token_to_id(specials[0]) == first_special_id, "special ids moved"
    return tokenizer


def write_model(directory: Path, config, generation: dict, seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu") -> None:
    """Random weights in `dtype`, initialised on `device` (a GPU builds a 1.5B shape in seconds)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(**generation).save_pretrained(directory)


def build_qwen_shape(directory: Path | str, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0, dtype: torch.dtype = torch.float32,
                     device: str = "cpu") -> Path:
    """A Qwen2.5-Instruct stand-in at `directory` (vocabulary 151,936; len(tokenizer) 151,665); weights in `dtype`,
    initialised on `device`."""
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = train_byte_level_bpe(QWEN2_SPLIT, 1024, QWEN_FIRST_SPECIAL_ID, QWEN_ADDED,
                                   non_special=("<tool_call>", "</tool_call>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None, model_max_length=131072,
                                        clean_up_tokenization_spaces=False, split_special_tokens=False)
    tokenizer.chat_template = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(vocab_size=QWEN_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         bos_token_id=151643, eos_token_id=151645, use_sliding_window=False, sliding_window=None)
    write_model(directory, config, {"bos_token_id": 151643, "eos_token_id": QWEN_EOS_IDS, "pad_token_id": 151643,
                                    "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                    "repetition_penalty": 1.05}, seed, dtype, device)
    return directory


def build_llama_shape(directory: Path | str, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                      kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0) -> Path:
    """A Llama-3.2-Instruct stand-in at `directory` (vocabulary 128,256, llama3 RoPE, date-bearing template)."""
    from tokenizers import processors
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backend = train_byte_level_bpe(LLAMA3_SPLIT, 1024, LLAMA_FIRST_SPECIAL_ID, LLAMA_SPECIAL)
    backend.post_processor = processors.TemplateProcessing(  # the real one prepends BOS to plain encodes
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", LLAMA_FIRST_SPECIAL_ID)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", model_max_length=131072,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = (TEMPLATES / "llama-3.2-style.jinja").read_text()
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(vocab_size=LLAMA_VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden_size // heads, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=128000, eos_token_id=LLAMA_EOS_IDS,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                          "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                          "original_max_position_embeddings": 8192})
    write_model(directory, config, {"bos_token_id": 128000, "eos_token_id": LLAMA_EOS_IDS, "do_sample": True,
                                    "temperature": 0.6, "top_p": 0.9}, seed)
    return directory
