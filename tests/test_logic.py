"""Logic suite: gold answers survive our formatting and extraction, seeding, splits, JSONL, evaluate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cdm_fast.logic import (
    DEFAULT_TASKS,
    DIFFICULTIES,
    check,
    evaluate,
    extract,
    generate,
    read_jsonl,
    to_jsonl,
)


def completions_around(answer: str) -> list[str]:
    """Ways a model states a gold answer: a few-shot continuation, a sentence, a boxed answer."""
    return [
        f" {answer}\n\nQuestion: What is 2 + 2?\nAnswer: 4",
        f"The answer is {answer}",
        f"Let me think.\nFinal answer: {answer}\n",
        f"\\boxed{{{answer}}}",
    ]


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
@pytest.mark.parametrize("task", DEFAULT_TASKS)
def test_every_default_task_gold_answer_scores_one_through_formatting_and_extraction(task, difficulty):
    for problem in generate(8, seed=3, tasks=task, difficulty=difficulty):
        for completion in completions_around(problem.answer):
            assert check(problem, completion) == 1.0, (
                problem.question,
                completion,
                extract(problem, completion),
            )
        assert check(problem, "") < 1.0


@pytest.mark.parametrize(
    ("task", "completion", "expected"),
    [
        ("chain_sum", " 1,234.\n", "1234"),
        ("chain_sum", "**-4**", "-4"),
        ("simple_equations", "x = 13.0", "13"),
        ("syllogism", "yes, it follows.", "Yes"),
        ("family_relationships", "Sarah is her Mother-in-law.", "mother-in-law"),
        ("number_sorting", "The sorted list is [3, -1.5, 2]", "['3', '-1.5', '2']"),
        ("number_sorting", "3, 2, 1", "['3', '2', '1']"),
    ],
)
def test_extraction_reads_common_answer_forms(task, completion, expected):
    problem = generate(1, seed=0, tasks=task)[0]
    assert extract(problem, completion) == expected


def test_knights_knaves_extraction_ignores_text_around_the_roles():
    problem = generate(1, seed=0, tasks="knights_knaves", difficulty=2)[0]
    stated = " and ".join(
        f"so {name} is clearly a {'knight' if truthful else 'knave'}!"
        for name, truthful in zip(problem.metadata["names"], problem.metadata["solution"], strict=True)
    )
    terms = problem.metadata["knight_knave_terms"]
    stated = stated.replace("knight", terms["knight"]).replace("knave", terms["knave"])
    assert check(problem, stated.replace("clearly ", "")) == 1.0


def test_generation_is_deterministic_per_seed():
    first = generate(5, seed=11, difficulty=2)
    assert first == generate(5, seed=11, difficulty=2)
    assert [p.question for p in first] != [p.question for p in generate(5, seed=12, difficulty=2)]
    assert len(first) == 5 * len(DEFAULT_TASKS)


@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_train_and_eval_splits_never_share_a_problem(difficulty):
    train = generate(30, seed=0, difficulty=difficulty, split="train")
    evaluation = generate(30, seed=0, difficulty=difficulty, split="eval")
    train_questions = {(p.task, p.question) for p in train}
    eval_questions = {(p.task, p.question) for p in evaluation}
    shot_questions = {(p.task, question) for p in train for question, _ in p.shots}
    assert len(train_questions) == len(train) and len(eval_questions) == len(evaluation)
    assert not train_questions & eval_questions
    assert not shot_questions & (train_questions | eval_questions)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"tasks": ["chain_sum", "sudoku"]}, "tasks"),
        ({"difficulty": 4}, "difficulty"),
        ({"split": "test"}, "split"),
        ({"prompt_format": "json"}, "prompt_format"),
    ],
)
def test_unknown_names_raise_value_error_naming_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=rf"^{argument}: expected"):
        generate(1, **kwargs)


def test_jsonl_round_trip_keeps_every_field_and_the_prompt(tmp_path):
    problems = generate(2, seed=5, difficulty=3) + generate(
        1, seed=5, tasks="syllogism", prompt_format="chat"
    )
    path = to_jsonl(problems, tmp_path / "logic.jsonl")
    assert read_jsonl(path) == problems
    assert path.read_text().count('"prompt": ') == len(problems)


class TemplateTokenizer:
    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_chat_prompt_puts_the_shots_in_earlier_turns_and_uses_the_template():
    problem = generate(1, seed=0, tasks="chain_sum", prompt_format="chat")[0]
    messages = problem.messages()
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(problem.shots) + ["user"]
    assert messages[-1]["content"] == problem.question
    assert problem.prompt(TemplateTokenizer()).endswith(f"{problem.question}</user><assistant>")
    assert problem.prompt().endswith("Assistant:")


class FakeTokenizer:
    """One token per whole prompt or answer string; 0 pads."""

    pad_token_id = 0
    eos_token_id = 0

    def __init__(self):
        self.padding_side = "right"
        self.vocab = ["<pad>"]

    def token(self, text: str) -> int:
        if text not in self.vocab:
            self.vocab.append(text)
        return self.vocab.index(text)

    def __call__(self, texts, return_tensors, padding, add_special_tokens):
        assert self.padding_side == "left"
        ids = torch.tensor([[self.token(text)] for text in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def batch_decode(self, rows, skip_special_tokens):
        return ["".join(self.vocab[i] for i in row.tolist() if i != self.pad_token_id) for row in rows]


class GoldModel:
    """Answers each prompt with its gold answer, on the first line."""

    device = torch.device("cpu")

    def __init__(self, tokenizer, problems):
        self.answers = {
            tokenizer.token(p.prompt(tokenizer)): tokenizer.token(f" {p.answer}\n") for p in problems
        }

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample
        new = torch.tensor([[self.answers[row[-1].item()]] for row in input_ids])
        return torch.cat([input_ids, new], dim=1)


def test_evaluate_gives_per_task_accuracy_of_a_model_that_answers_with_the_gold():
    problems = generate(3, seed=1)
    tokenizer = FakeTokenizer()
    model = GoldModel(tokenizer, problems)
    problems[0] = dataclasses.replace(problems[0], answer="999999")  # the model's answer is now wrong
    report = evaluate(model, tokenizer, problems, batch_size=4, progress=False)
    assert tokenizer.padding_side == "right"
    expected = {task: 1.0 for task in DEFAULT_TASKS} | {problems[0].task: 2 / 3}
    assert report["accuracy"] == pytest.approx(expected)
    assert [result["score"] < 1.0 for result in report["results"]][:2] == [True, False]
    assert len(report["results"]) == len(problems)


def test_evaluate_refuses_a_mix_of_prompt_formats():
    problems = generate(1, seed=0, tasks="chain_sum") + generate(
        1, seed=0, tasks="chain_sum", prompt_format="chat"
    )
    tokenizer = FakeTokenizer()
    with pytest.raises(ValueError, match="^problems: expected one prompt_format"):
        evaluate(None, tokenizer, problems, progress=False)
