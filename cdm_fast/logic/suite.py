"""Logic suite: seeded reasoning-gym problems, prompt formats, answer extraction and scoring.

``generate`` draws problems, ``Problem.prompt`` formats one ("fewshot" raw text or "chat" messages),
``check`` extracts the answer from a completion and scores it with the task's own ``score_answer``;
``to_jsonl`` / ``read_jsonl`` carry problems to ``cdm-fast score`` and the loops.

Splits never share a problem: each question belongs to one split by a hash of its text (one in
``EVAL_BUCKETS`` goes to "eval"), and each split draws from its own seed stream, so "train" and "eval"
stay disjoint for any ``n`` and ``seed`` without either having to see the other.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import reasoning_gym

from cdm_fast.logic.tasks import DEFAULT_TASKS, TASKS, validate_difficulty, validate_tasks

SPLITS = ("train", "eval")
PROMPT_FORMATS = ("fewshot", "chat")
# Where an answer ends in each format, besides eos: a raw LM continuing the few-shot pattern closes its answer
# with the blank line the shots show, or writes the next "Question:" straight away. `cdm.score(stop=...)`.
STOP = {"fewshot": ("\n\n", "\nQuestion:"), "chat": ()}
EVAL_BUCKETS = 5  # one question in five belongs to "eval"
NUM_SHOTS = 2
INSTRUCTION = (
    "Solve the problem. Write only the final answer on the first line, in the form the question asks for."
)

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_MARKER = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*(.*)", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """One task instance with its gold answer and the prompt format it is to be asked in.

    ``source_seed``/``index`` regenerate it: ``reasoning_gym.create_dataset(task, seed=source_seed,
    **config)[index]`` with ``config`` the task's level ``difficulty``. ``shots`` are the solved
    (question, answer) examples shown before it, the same for every problem of a task and level.
    """

    task: str
    difficulty: int
    split: str
    seed: int
    index: int
    source_seed: int
    question: str
    answer: str
    metadata: dict[str, Any]
    prompt_format: str = "fewshot"
    shots: tuple[tuple[str, str], ...] = field(default=())

    def messages(self) -> list[dict[str, str]]:
        """The chat form: the shots as earlier user/assistant turns, the instruction in the first one."""
        turns = [*self.shots, (self.question, None)]
        messages = []
        for position, (question, answer) in enumerate(turns):
            content = f"{INSTRUCTION}\n\n{question}" if position == 0 else question
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return messages

    def prompt(self, tokenizer: Any = None) -> str:
        """The text a causal LM continues.

        "fewshot": the instruction, the solved shots, then ``"Question: ...\\nAnswer:"``. "chat": the
        messages rendered by ``tokenizer.apply_chat_template`` (with the generation prompt) when a
        tokenizer is given, else a plain ``User:``/``Assistant:`` transcript of them.
        """
        if self.prompt_format == "fewshot":
            solved = "".join(f"Question: {question}\nAnswer: {answer}\n\n" for question, answer in self.shots)
            return f"{INSTRUCTION}\n\n{solved}Question: {self.question}\nAnswer:"
        if tokenizer is not None:
            return tokenizer.apply_chat_template(self.messages(), tokenize=False, add_generation_prompt=True)
        lines = [f"{message['role'].capitalize()}: {message['content']}" for message in self.messages()]
        return "\n\n".join(lines) + "\n\nAssistant:"


def _stable_int(*parts: object) -> int:
    """A 31-bit integer from the parts' text, the same on every machine and Python run."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def split_of(task: str, question: str) -> str:
    """The split a question belongs to, decided by its text alone."""
    return "eval" if _stable_int("split", task, question) % EVAL_BUCKETS == 0 else "train"


@functools.lru_cache(maxsize=256)
def _dataset(task: str, difficulty: int, source_seed: int) -> Any:
    # size only bounds iteration; items are drawn by index, each from Random(source_seed + index).
    return reasoning_gym.create_dataset(task, seed=source_seed, size=2**30, **TASKS[task].levels[difficulty])


def _json_safe(value: Any) -> Any:
    """Tuples to lists, numpy scalars to Python ones: what a JSONL round trip would give anyway."""
    return json.loads(json.dumps(value, default=lambda obj: obj.item() if hasattr(obj, "item") else str(obj)))


def _draw(
    task: str, difficulty: int, stream: str, seed: int, count: int, keep: Callable[[str], bool]
) -> list[tuple[int, int, dict]]:
    """``count`` distinct entries of one seed stream that ``keep(question)`` accepts."""
    source_seed = _stable_int(stream, seed, task, difficulty)
    dataset = _dataset(task, difficulty, source_seed)
    drawn, seen = [], set()
    max_attempts = 20 * count + 200
    for index in range(max_attempts):
        if len(drawn) == count:
            break
        entry = dataset[index]
        if entry["question"] in seen or not keep(entry["question"]):
            continue
        seen.add(entry["question"])
        drawn.append((source_seed, index, entry))
    if len(drawn) < count:
        raise ValueError(
            f"n: {task} at difficulty {difficulty} gave only {len(drawn)} distinct {stream} problems in "
            f"{max_attempts} draws, asked for {count}; ask for fewer or a higher difficulty"
        )
    return drawn


@functools.cache
def shots_for(task: str, difficulty: int, num_shots: int = NUM_SHOTS) -> tuple[tuple[str, str], ...]:
    """The fixed solved examples shown for a task and level: train-split questions of their own stream."""
    drawn = _draw(
        task, difficulty, "shots", 0, num_shots, lambda question: split_of(task, question) == "train"
    )
    return tuple((entry["question"], entry["answer"]) for _, _, entry in drawn)


def generate(
    n: int,
    seed: int = 0,
    tasks: Sequence[str] | str = DEFAULT_TASKS,
    difficulty: int = 1,
    *,
    split: str = "eval",
    prompt_format: str = "fewshot",
    num_shots: int = NUM_SHOTS,
) -> list[Problem]:
    """``n`` distinct problems per task (task by task, in the order given), the same for the same arguments.

    A problem is never one of its task's shots, never repeated, and always of ``split``.
    """
    names = validate_tasks(tasks)
    difficulty = validate_difficulty(difficulty)
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format: expected one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if n < 1 or num_shots < 0:
        raise ValueError(f"n, num_shots: expected n >= 1 and num_shots >= 0, got {n} and {num_shots}")
    problems = []
    for task in names:
        shots = shots_for(task, difficulty, num_shots)
        shown = {question for question, _ in shots}
        drawn = _draw(
            task,
            difficulty,
            split,
            seed,
            n,
            lambda question, task=task, shown=shown: (
                question not in shown and split_of(task, question) == split
            ),
        )
        problems += [
            Problem(
                task=task,
                difficulty=difficulty,
                split=split,
                seed=seed,
                index=index,
                source_seed=source_seed,
                question=entry["question"],
                answer=entry["answer"],
                metadata=_json_safe(entry["metadata"]),
                prompt_format=prompt_format,
                shots=shots,
            )
            for source_seed, index, entry in drawn
        ]
    return problems


def answer_line(completion: str) -> str:
    """The part of a completion that holds the answer.

    A ``\\boxed{...}`` wins; else the text after "answer is"/"Answer:"; else the first non-empty line.
    Text from a following ``Question:`` on (a raw LM continuing the few-shot pattern) is dropped first.
    Surrounding quotes, emphasis and a trailing full stop are stripped.
    """
    text = re.split(r"\n\s*Question:", completion, maxsplit=1)[0]
    boxed = _BOXED.findall(text)
    if boxed:
        line = boxed[-1]
    else:
        marker = _ANSWER_MARKER.search(text)
        lines = [line for line in text.splitlines() if line.strip()]
        line = marker.group(1) if marker and marker.group(1).strip() else (lines[0] if lines else "")
    return line.strip().strip("*`\"' ").rstrip(".").strip()


def extract(problem: Problem, completion: str) -> str:
    """The answer in ``completion``, in the string form the task's ``score_answer`` expects."""
    return TASKS[problem.task].extract(answer_line(completion), problem.metadata)


def check(problem: Problem, completion: str) -> float:
    """Score in [0, 1] of a completion, by the task's own ``score_answer`` on the extracted answer."""
    entry = {"question": problem.question, "answer": problem.answer, "metadata": problem.metadata}
    score = reasoning_gym.get_score_answer_fn(problem.task)(extract(problem, completion), entry)
    return float(score)


def to_jsonl(problems: Iterable[Problem], path: str | Path, tokenizer: Any = None) -> Path:
    """One JSON object per line: ``prompt`` (rendered as ``Problem.prompt(tokenizer)``), ``answer``, and
    every field of the problem, so ``read_jsonl`` rebuilds it and ``cdm-fast score`` reads ``prompt``."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as file:
        for problem in problems:
            record = {"prompt": problem.prompt(tokenizer), **asdict(problem)}
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    """The problems ``to_jsonl`` wrote (the rendered ``prompt`` is dropped: ``Problem.prompt`` remakes it)."""
    problems = []
    with Path(path).open(encoding="utf-8") as file:
        for line in file:
            if not line.strip():
                continue
            record = json.loads(line)
            record.pop("prompt", None)
            record["shots"] = tuple(tuple(shot) for shot in record["shots"])
            problems.append(Problem(**record))
    return problems
