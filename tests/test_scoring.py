"""What is scored: the completion's text cut right after the first stop string, wherever text is scored."""

import torch

from e2h_min.rl.scoring import completion_texts, cut_at_stop, score_rollout
from e2h_min.engine.models import load_tokenizer
from e2h_min.engine.sampler import Generation, StopChecker
from e2h_min.tasks import make_task


def test_cut_at_stop_keeps_the_text_up_to_the_first_stop_string():
    assert cut_at_stop("<answer> 1 </answer>.", ["</answer>"]) == "<answer> 1 </answer>"
    assert cut_at_stop("<answer> 1 </answer>\n\nmore </answer>", ["</answer>"]) == "<answer> 1 </answer>"
    assert cut_at_stop("no stop here.", ["</answer>"]) == "no stop here."
    assert cut_at_stop("a STOP b END c", ["END", "STOP"]) == "a STOP"  # the earliest of several
    assert cut_at_stop("x </answer>.", []) == "x </answer>." and cut_at_stop("x", [""]) == "x"


def rollout_of(token_lists: list[list[int]], pad: int) -> Generation:
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad)
    mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)], mask[row, :len(tokens)] = torch.tensor(tokens), True
    return Generation([[1]], len(token_lists), ids, mask, torch.zeros(ids.shape), torch.ones(len(token_lists), dtype=bool))


def test_a_correct_answer_ending_in_a_merged_stop_token_scores_one_and_the_stop_checker_ends_there():
    tokenizer = load_tokenizer("tiny")
    task = make_task("countdown")
    problem = task.problem(0, 0)
    ids = tokenizer(task.demonstration(problem) + ".", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[-1:]).endswith("</answer>.")  # the tiny vocabulary merges ' </answer>.'
    checker = StopChecker(tokenizer, ["</answer>"])
    assert checker.first_stop(ids, 0, len(ids)) == len(ids) - 1  # the row ends with the merged token, kept whole
    with_eos = ids + [tokenizer.eos_token_id]
    texts, rewards = score_rollout(task, [problem], tokenizer, rollout_of([ids, with_eos], tokenizer.pad_token_id),
                                   ["</answer>"])
    assert texts == [task.demonstration(problem)] * 2
    assert rewards.tolist() == [1.0, 1.0]
    # without the cut (EOS-only runs have no stop string) the trailing "." fails the format check
    assert score_rollout(task, [problem], tokenizer, rollout_of([ids], tokenizer.pad_token_id), [])[1].tolist() == [0.0]
    assert completion_texts(tokenizer, rollout_of([ids], tokenizer.pad_token_id), []) == [tokenizer.decode(ids)]
