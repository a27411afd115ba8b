"""Build the embedded default model: a ~1.8M-parameter Qwen2 trained to solve easy Countdown problems.

    python scripts/build_tiny_model.py                       # rebuilds e2h_min/assets/tiny-countdown/
    python scripts/build_tiny_model.py --out /tmp/tiny --minutes 1 --seed 1     # a quick look (~1-2 min)

Why this model. A curriculum is only worth testing when there is a frontier: levels the policy already solves,
levels it solves sometimes (reward variance inside a GRPO group, hence a gradient), and levels it never solves.
A randomly initialised model solves nothing, and a hub model cannot be fetched offline, so the project ships a
few-MB checkpoint that this script rebuilds on a 2-core CPU in about ten minutes. Recipe and why (from a probe's
one-seed measurements and this script's own runs):

- Tokenizer: byte-level BPE, vocab 1024, trained in seconds on rendered Countdown prompts and demonstrations.
  Runs of digits are split off as their own pre-tokens, so every number is tokenised the same way wherever it
  stands, while the fixed prompt text merges into a few long tokens: the full prompt is 25-35 tokens (~450
  characters), a 3-number completion ~19, which is what makes CPU training and sampling fast. Special tokens
  <|im_start|>, <|im_end|> (EOS) and <|endoftext|> (PAD, distinct from EOS so EOS is trained and the model
  learns to stop); no BOS. A Qwen-style chat template:
  `apply_chat_template(messages, tokenize=False, continue_final_message=True)` renders system + user + the
  assistant prefill "Let me solve this step by step.\n<think>" with no end token.
  tokenizer_config.json pins the tokenizer class so AutoTokenizer does not swap in Qwen's pre-tokenizer
  (pin_tokenizer_class explains).
- Model: Qwen2ForCausalLM, hidden 192, 4 layers, 4 heads / 2 KV heads, MLP 512, tied embeddings, fp32. Wider
  models train more slowly per token and a 3.2M model got stuck at lr 3e-3 in the probe; 1.8M was the best
  measured size.
- Supervised warm start: sequence = chat-template prompt + task.demonstration(problem) (a short think trace of
  the generator's chain, then the answer) + EOS; cross-entropy on the completion tokens and EOS only. AdamW,
  linear warm-up then cosine decay, peak lr 2e-3 (3e-3 for 3 minutes gave 50% on 2 numbers, 2e-3 for 10
  minutes with more 4-number demos gave 90%); fresh TRAIN-split problems every step (no epochs, no overlap with
  the TEST split used for evaluation). The level mix leans on 3 and 4 numbers: 2-number problems are learnt
  quickly, the longer demos teach the format of the harder levels, and 5-number demos are few because the
  model does not solve them anyway. The curriculum wants a frontier, not a solver: ~75% on 2 numbers, ~20% on
  3, ~1% on 4, 0 on 5 and 6 (build_info.json holds the measured figures).
- Later stages (`--init DIR`): continue supervised training of a built model, keeping its tokenizer, with
  another level mix and peak lr (a new warm-up and cosine). The schedule testbed
  (e2h_min/assets/tiny-countdown-testbed, README: Results) is the demo model trained further on harder demos, so
  that its hard level is out of greedy reach but inside pass@16; its build_info.json nests the build_info of
  every stage before it (init_build_info) and the README gives the commands that rebuild it.
- Reproducibility: `--minutes` is a nominal budget converted to a fixed step count (SECONDS_PER_STEP_REFERENCE),
  so the same flags train the same steps on any machine; a loaded CPU is only slower. torch and random are
  seeded. One thread by default: on 2 cores shared with other jobs, 2 threads were 3-5x SLOWER per step than
  one (OpenMP waits on a descheduled thread at every small op), and CPU float results depend slightly on the
  thread count, so a fixed count keeps the build reproducible. Greedy accuracy on 200 TEST problems per level
  is written to build_info.json next to the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/build_tiny_model.py` from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

from e2h_min.errors import OneLineErrorParser, UserError, check_output_dir, exit_on_user_error  # noqa: E402
from e2h_min.rl.scoring import cut_at_stop  # noqa: E402
from e2h_min.tasks.countdown import CountdownTask  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "e2h_min" / "assets" / "tiny-countdown"

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]  # ids 0, 1, 2
# Qwen's layout. apply_chat_template(continue_final_message=True) cuts the text right after the final message,
# so the assistant prefill is left open for generation to continue.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# ---- recipe defaults (the committed artifact) ----
VOCAB_SIZE = 1024
MODEL_SHAPE = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=512, max_position_embeddings=512)
LEVEL_MIX = {0: 0.2, 1: 0.35, 2: 0.3, 3: 0.15}  # share of demos per training level (2..5 numbers)
BATCH_SIZE = 64
PEAK_LR = 2e-3
WARMUP_STEPS = 30
# One step of BATCH_SIZE with 1 thread on the shared 2-core machine: 0.55 s when quiet, 0.8-1.6 s under load.
SECONDS_PER_STEP_REFERENCE = 0.6
TOKENIZER_PROBLEMS_PER_LEVEL = 2000
EVAL_PROBLEMS_PER_LEVEL = 200
EVAL_MAX_NEW_TOKENS = 64


# ---------------------------------------------------------------- tokenizer

def train_bpe_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE whose pre-tokens are digit runs and the text between them.

    Every byte is in the base alphabet (no unknown token); merges never cross a digit/non-digit boundary, so
    "98" is one number token in any context, while constant text such as ".</think>\\n<answer> " may merge into
    one token. The special tokens get ids 0, 1, 2 and are never split.
    Example: on Countdown text, "Using the numbers [44, 19, 35]" -> pre-tokens
    ["Using the numbers [", "44", ", ", "19", ", ", "35", "]"] before byte-level merging.
    """
    if not texts:
        raise ValueError("train_bpe_tokenizer needs a non-empty list of training texts")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[0-9]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer: EOS <|im_end|>, PAD <|endoftext|>, no BOS, the chat template, left padding.

    Left padding because the model's main use is batched generation; no clean-up of spaces so that
    decode(encode(text)) == text exactly.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, padding_side="left",
        clean_up_tokenization_spaces=False, model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def pin_tokenizer_class(out_dir: Path) -> None:
    """Make AutoTokenizer load tokenizer.json as saved, not through Qwen2Tokenizer.

    transformers 5 maps model_type "qwen2" to Qwen2Tokenizer whatever tokenizer_config.json says, and that class
    rebuilds the pipeline with Qwen's own pre-tokenizer (one token per digit, one per word): our merges would be
    applied to different pre-tokens and the model would read garbage. The one way around it in AutoTokenizer
    (transformers 5.24) is an auto_map entry: for such model types it then skips remote code and uses
    tokenizer_class (with trust_remote_code=True it fails loudly instead; do not pass it). Training with Qwen's
    pre-tokenizer instead would cost 3-4x the tokens (prompt ~130 tokens instead of ~30, a 3-number completion
    ~41 instead of ~19), so every SFT, RL and eval step would be that much slower.
    """
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["auto_map"] = {"AutoTokenizer": [None, "TokenizersBackend"]}
    path.write_text(json.dumps(config, indent=2) + "\n")


def render_prompt(tokenizer: PreTrainedTokenizerFast, task: CountdownTask, problem) -> str:
    """The chat-template prompt that generation continues: system, user, then the open assistant prefill.

    Example: "<|im_start|>system\\nYou are a helpful assistant. ...\\n<|im_end|>\\n<|im_start|>user\\nUsing the
    numbers [44, 19, 35], ...<|im_end|>\\n<|im_start|>assistant\\nLet me solve this step by step.\\n<think>"
    """
    return tokenizer.apply_chat_template(task.messages(problem), tokenize=False, continue_final_message=True)


def tokenizer_corpus(task: CountdownTask, problems_per_level: int) -> list[str]:
    """Prompt parts, demonstrations and role headers of TRAIN problems at every level, OOD included.

    The special tokens are left out: they are whole tokens already. More problems give more distinct 3-digit
    intermediate values, hence more merges available to fill the vocabulary.
    """
    texts = []
    for level in task.eval_levels:
        for index in range(problems_per_level):
            problem = task.problem(level, index, split="train")
            texts.extend([task.system_prompt, problem.user_prompt, task.prefill, task.demonstration(problem)])
        texts.extend(["system\n", "user\n", "assistant\n"] * problems_per_level)  # chat-template role headers
    return texts


# ---------------------------------------------------------------- data

def encode_example(tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for prompt + completion + EOS, labels -100 on the prompt (no loss there).

    Prompt and completion are encoded separately, exactly as generation sees them (the prompt is encoded, then
    completion tokens are appended one by one), so training and sampling agree on token boundaries.
    Example: prompt ids [5, 6], completion ids [7, 8], EOS 2 -> ([5, 6, 7, 8, 2], [-100, -100, 7, 8, 2]).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def collate_right_padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack examples into input_ids [B, T] and labels [B, T], padding on the right (labels -100 on pads).

    Right padding needs no attention mask under a causal model: real tokens never attend to later pads, and
    positions start at 0 for every row, as in generation.
    Example: [([1, 2, 3], [-100, 2, 3]), ([4], [4])] -> ids [[1, 2, 3], [4, P, P]],
             labels [[-100, 2, 3], [4, -100, -100]].
    """
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), length), -100, dtype=torch.long)  # [B, T]
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
    return input_ids, labels


class DemoStream:
    """Fresh TRAIN-split demonstrations: each slot's level drawn from the mix, then that level's next problem."""

    def __init__(self, task: CountdownTask, tokenizer: PreTrainedTokenizerFast, level_mix: dict[int, float],
                 rng: random.Random):
        self.task, self.tokenizer, self.rng = task, tokenizer, rng
        self.levels, self.weights = list(level_mix), list(level_mix.values())
        self.next_index = {level: 0 for level in level_mix}

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = []
        for level in self.rng.choices(self.levels, weights=self.weights, k=size):
            problem = self.task.problem(level, self.next_index[level], split="train")
            self.next_index[level] += 1
            prompt = render_prompt(self.tokenizer, self.task, problem)
            examples.append(encode_example(self.tokenizer, prompt, self.task.demonstration(problem)))
        return collate_right_padded(examples, self.tokenizer.pad_token_id)


# ---------------------------------------------------------------- model and training

def make_model(tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """A freshly initialised fp32 Qwen2 of MODEL_SHAPE with tied embeddings and the tokenizer's EOS/PAD ids."""
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_theta=10000.0, **MODEL_SHAPE)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return model


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to peak_lr over warmup_steps, then cosine decay to 0 at total_steps.

    lr(s) = peak * (s+1)/W for s < W, else peak * 0.5 * (1 + cos(pi * (s-W)/(N-W))).
    Example: lr_at(0, 100, 1.0, 10) == 0.1; lr_at(10, 100, 1.0, 10) == 1.0; lr_at(55, 100, 1.0, 10) == 0.5.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: Qwen2ForCausalLM, stream: DemoStream, total_steps: int, batch_size: int,
          peak_lr: float) -> list[float]:
    """Supervised training on completion tokens (+EOS); returns the loss of every step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    progress = tqdm(range(total_steps), desc="sft", mininterval=5.0)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, peak_lr, WARMUP_STEPS)
        input_ids, labels = stream.batch(batch_size)  # [B, T], [B, T]
        loss = model(input_ids=input_ids, labels=labels).loss  # mean over completion tokens of the batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 0:
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    return losses


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def greedy_completions(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[str],
                       max_new_tokens: int = EVAL_MAX_NEW_TOKENS, batch_size: int = 200) -> list[str]:
    """Greedy continuation of each prompt (left-padded batches), stopped at EOS, decoded without special tokens."""
    completions = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)  # [B, T + new]
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return completions


def evaluate(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, task: CountdownTask,
             problems_per_level: int) -> dict[str, float]:
    """Greedy accuracy (share with reward above the format reward) on the first TEST problems of every level, each
    completion scored up to its first </answer> as training scores it (evaluation.cut_at_stop)."""
    accuracy = {}
    for level in tqdm(task.eval_levels, desc="eval"):
        problems = [task.problem(level, i, split="test") for i in range(problems_per_level)]
        completions = greedy_completions(model, tokenizer, [render_prompt(tokenizer, task, p) for p in problems])
        correct = sum(task.is_correct(task.score(p, cut_at_stop(c, ["</answer>"])))
                      for p, c in zip(problems, completions))
        accuracy[task.level_names()[level]] = correct / problems_per_level
    return accuracy


# ---------------------------------------------------------------- entry point

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="artifact folder (created)")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="nominal training budget on the 2-core reference machine (fixes the step count)")
    parser.add_argument("--seed", type=int, default=0, help="seeds torch, the demo stream and the task generator")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: see the module docstring)")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from this built model (its tokenizer is kept) instead of a fresh one")
    parser.add_argument("--level-mix", type=parse_level_mix, default=LEVEL_MIX,
                        help="share of demos per level, e.g. 0:0.1,1:0.3,2:0.4,3:0.2 (default: %(default)s)")
    parser.add_argument("--peak-lr", type=float, default=PEAK_LR, help="peak learning rate (default: %(default)s)")
    return parser.parse_args(argv)


def repo_relative(path: Path) -> str:
    """path relative to the repository when it is inside it (build_info.json must not name this machine's paths)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def init_build_info(init: Path | None) -> dict | None:
    """The build_info.json of the model a stage started from (so a chain of stages records every recipe)."""
    path = init / "build_info.json" if init else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def parse_level_mix(text: str) -> dict[int, float]:
    """"0:0.1,1:0.3" -> {0: 0.1, 1: 0.3}; argparse turns a ValueError into a one-line usage error."""
    mix = {int(level): float(share) for level, share in (item.split(":") for item in text.split(","))}
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(text)
    return mix


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for flag, value in (("--minutes", args.minutes), ("--peak-lr", args.peak_lr)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"{flag} must be a positive number, got {value}")
    if args.init is not None and not (args.init / "config.json").is_file():
        raise UserError(f"--init {args.init}: no built model there (config.json); pass a folder this script wrote")
    check_output_dir(args.out, "--out")  # a bad --out fails now, not after the training
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    task = CountdownTask(seed=args.seed)
    total_steps = max(WARMUP_STEPS + 1, round(args.minutes * 60 / SECONDS_PER_STEP_REFERENCE))
    started = time.time()

    if args.init is None:
        tokenizer = wrap_tokenizer(train_bpe_tokenizer(tokenizer_corpus(task, TOKENIZER_PROBLEMS_PER_LEVEL)))
    else:  # a second stage keeps the first stage's tokenizer: the model's embeddings are indexed by it
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.init)
    tokenizer_seconds = time.time() - started
    print(f"tokenizer: vocab {len(tokenizer)} in {tokenizer_seconds:.1f}s; example prompt "
          f"{len(tokenizer(render_prompt(tokenizer, task, task.problem(0, 0)))['input_ids'])} tokens")

    model = make_model(tokenizer) if args.init is None else Qwen2ForCausalLM.from_pretrained(args.init)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; {total_steps} steps of {BATCH_SIZE}")
    stream = DemoStream(task, tokenizer, args.level_mix, random.Random(args.seed))
    train_started = time.time()
    losses = train(model, stream, total_steps, BATCH_SIZE, args.peak_lr)
    train_seconds = time.time() - train_started

    eval_started = time.time()
    accuracy = evaluate(model, tokenizer, task, EVAL_PROBLEMS_PER_LEVEL)
    eval_seconds = time.time() - eval_started
    print("greedy accuracy on TEST (" + f"{EVAL_PROBLEMS_PER_LEVEL} per level): "
          + "  ".join(f"{name} {acc:.1%}" for name, acc in accuracy.items()))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    if args.init is None:
        tokenizer.save_pretrained(args.out, save_jinja_files=False)  # chat template inside tokenizer_config.json
        pin_tokenizer_class(args.out)
    else:  # the same tokenizer: its files as they are (a re-save would add loading-time keys to the config)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(args.init / name, args.out / name)
    info = {
        "recipe": "scripts/build_tiny_model.py", "seed": args.seed, "minutes_nominal": args.minutes,
        "threads": args.threads,
        "init": repo_relative(args.init) if args.init else None,
        "init_build_info": init_build_info(args.init),
        "steps": total_steps, "batch_size": BATCH_SIZE, "peak_lr": args.peak_lr, "warmup_steps": WARMUP_STEPS,
        "schedule": "linear warm-up then cosine to 0", "optimizer": "AdamW(0.9, 0.95), weight decay 0.01, clip 1.0",
        "level_mix": {str(k): v for k, v in args.level_mix.items()}, "demos_per_level": stream.next_index,
        "vocab_size": len(tokenizer), "model_shape": MODEL_SHAPE, "parameters": n_params,
        "final_loss_mean_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "seconds": {"tokenizer": round(tokenizer_seconds, 1), "train": round(train_seconds, 1),
                    "eval": round(eval_seconds, 1), "total": round(time.time() - started, 1)},
        "eval": {"split": "test", "problems_per_level": EVAL_PROBLEMS_PER_LEVEL, "decoding": "greedy",
                 "max_new_tokens": EVAL_MAX_NEW_TOKENS, "accuracy": accuracy},
        "torch": torch.__version__,
    }
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
