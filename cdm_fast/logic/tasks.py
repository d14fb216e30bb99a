"""The default task mix: which reasoning-gym tasks, their difficulty levels, and how to read an answer.

Each task is a reasoning-gym dataset name, one config per difficulty level (keyword arguments of that
dataset's config class) and an extractor that turns the answer line of a completion into the exact string
form the task's own ``score_answer`` expects. The problems and the scoring stay the library's.

Levels run 1 (a 135M instruct model gets some right) to 3 (hard for it); the mix spans both ends, from
two-term sums to four-person knights-and-knaves puzzles.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

DIFFICULTIES = (1, 2, 3)

# A number as people write it: optional sign, optional thousands commas, optional decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
# reasoning_gym.graphs.family_relationships.Relationship, the only answers that task has.
_RELATIONSHIPS = frozenset(
    "mother father sister brother daughter son wife husband grandmother grandfather aunt uncle niece nephew "
    "mother-in-law father-in-law".split()
)


def canonical_number(text: str) -> str | None:
    """``"+1,000.50"`` → ``"1000.5"``; ``"13.0"`` → ``"13"``; None when ``text`` is not a number."""
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_number(line: str, metadata: Mapping[str, Any]) -> str:
    """The last number on the line (``"e = 13"`` → ``"13"``, ``"4 - 1 - 7 = -4"`` → ``"-4"``)."""
    numbers = _NUMBER.findall(line.replace("\u2212", "-"))
    if not numbers:
        return line
    return canonical_number(numbers[-1]) or line


def extract_yes_no(line: str, metadata: Mapping[str, Any]) -> str:
    """The first standalone yes/no, capitalised as the gold answers are (``"yes."`` → ``"Yes"``)."""
    match = _YES_NO.search(line)
    return match.group(1).capitalize() if match else line


def extract_relationship(line: str, metadata: Mapping[str, Any]) -> str:
    """The first relationship word (``"Sarah is her mother-in-law."`` → ``"mother-in-law"``)."""
    for word in _WORD.findall(line.lower()):
        if word in _RELATIONSHIPS:
            return word
    return line


def extract_sorted_list(line: str, metadata: Mapping[str, Any]) -> str:
    """The numbers of the first ``[...]`` (or of the line), as the quoted list the task asks for."""
    bracketed = re.search(r"\[([^\]]*)\]", line)
    numbers = _NUMBER.findall((bracketed.group(1) if bracketed else line).replace("\u2212", "-"))
    if not numbers:
        return line
    return "[" + ", ".join(f"'{number.replace(',', '')}'" for number in numbers) + "]"


def extract_roles(line: str, metadata: Mapping[str, Any]) -> str:
    """Each inhabitant's first stated role, rebuilt as ``"A is a knight, and B is a knave."``.

    The task's own parser pairs every word with the next role word, so stray text on the line would
    add bogus pairs; reading only ``<name> is a/an <role>`` for the puzzle's names avoids that.
    """
    terms = metadata["knight_knave_terms"]
    roles = f"{re.escape(terms['knight'])}|{re.escape(terms['knave'])}"
    found = []
    for name in metadata["names"]:
        match = re.search(rf"\b{re.escape(name)}\s+is\s+(?:an?\s+)?({roles})\b", line, re.IGNORECASE)
        if match is None:
            return line
        found.append(f"{name} is a {match.group(1).lower()}")
    return ", and ".join(found) + "."


def extract_backward_word(line: str, metadata: Mapping[str, Any]) -> str:
    """The last word on the line (``"sun -> nus"`` → ``"nus"``, ``"It is: Nus."`` → ``"Nus"``; the task's
    own check ignores case)."""
    words = re.findall(r"[A-Za-z]+", line)
    return words[-1] if words else line


Extractor = Callable[[str, Mapping[str, Any]], str]


@dataclass(frozen=True)
class Task:
    """A reasoning-gym dataset, its config per difficulty level, and its answer extractor."""

    name: str
    levels: Mapping[int, Mapping[str, Any]]
    extract: Extractor


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "chain_sum",
            {
                1: dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1),
                2: dict(min_terms=3, max_terms=4, min_digits=1, max_digits=2),
                3: dict(min_terms=4, max_terms=6, min_digits=2, max_digits=3, allow_negation=True),
            },
            extract_number,
        ),
        Task(
            "basic_arithmetic",
            {
                1: dict(
                    min_terms=2,
                    max_terms=3,
                    min_digits=1,
                    max_digits=1,
                    operators=("+", "-"),
                    allow_parentheses=False,
                    allow_negation=False,
                ),
                2: dict(
                    min_terms=3,
                    max_terms=3,
                    min_digits=1,
                    max_digits=2,
                    operators=("+", "-", "*"),
                    allow_negation=False,
                ),
                3: dict(min_terms=3, max_terms=5, min_digits=2, max_digits=2),
            },
            extract_number,
        ),
        Task(
            "syllogism",
            {
                1: dict(allow_some=False, allow_some_not=False, inversion_probability=0.0),
                2: dict(allow_some_not=False, inversion_probability=0.2),
                3: dict(inversion_probability=0.5),
            },
            extract_yes_no,
        ),
        Task(
            "knights_knaves",
            {
                # depth_constraint=1 never yields a uniquely solvable puzzle in 0.1.25 (IndexError), and
                # width_constraint=1 fails inside numpy: the levels vary only the number of inhabitants.
                1: dict(n_people=2, depth_constraint=2, width_constraint=2),
                2: dict(n_people=3, depth_constraint=2, width_constraint=2),
                3: dict(n_people=4, depth_constraint=2, width_constraint=2),
            },
            extract_roles,
        ),
        Task(
            "family_relationships",
            {
                1: dict(min_family_size=3, max_family_size=4),
                2: dict(min_family_size=4, max_family_size=6),
                3: dict(min_family_size=6, max_family_size=9),
            },
            extract_relationship,
        ),
        Task(
            "simple_equations",
            {
                1: dict(
                    min_terms=2,
                    max_terms=2,
                    min_value=1,
                    max_value=10,
                    operators=("+", "-"),
                    operators_weights=[0.5, 0.5],
                ),
                2: dict(min_terms=2, max_terms=3, min_value=1, max_value=50),
                3: dict(min_terms=3, max_terms=4, min_value=1, max_value=100),
            },
            extract_number,
        ),
        Task(
            "number_sorting",
            {
                1: dict(
                    min_numbers=3, max_numbers=4, min_decimals=0, max_decimals=0, min_value=0, max_value=99
                ),
                2: dict(min_numbers=4, max_numbers=6, min_decimals=0, max_decimals=1),
                3: dict(min_numbers=6, max_numbers=10, min_decimals=0, max_decimals=2),
            },
            extract_sorted_list,
        ),
        # Outside the training mix: the "shallow skills" a distilled adapter must not lose.
        Task(
            "letter_counting",
            {
                1: dict(min_words=3, max_words=5),
                2: dict(min_words=5, max_words=10),
                3: dict(min_words=10, max_words=15),
            },
            extract_number,
        ),
        Task(
            "spell_backward",
            {
                1: dict(min_word_len=3, max_word_len=5),
                2: dict(min_word_len=5, max_word_len=7),
                3: dict(min_word_len=7, max_word_len=10),
            },
            extract_backward_word,
        ),
        Task(
            "gcd",
            {
                1: dict(min_value=1, max_value=30),
                2: dict(min_value=1, max_value=200),
                3: dict(min_value=1, max_value=1000),
            },
            extract_number,
        ),
    )
}

# The logic mix the loops train and evaluate on; the rest of TASKS is held outside it.
DEFAULT_TASKS = (
    "chain_sum",
    "basic_arithmetic",
    "syllogism",
    "knights_knaves",
    "family_relationships",
    "simple_equations",
    "number_sorting",
)
OUTSIDE_MIX_TASKS = tuple(name for name in TASKS if name not in DEFAULT_TASKS)


def validate_tasks(tasks: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Task names as a tuple; ValueError naming the unknown one and the allowed names."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    if not names:
        raise ValueError(f"tasks: expected at least one of {DEFAULT_TASKS}, got none")
    for name in names:
        if name not in TASKS:
            raise ValueError(f"tasks: expected names from {tuple(TASKS)}, got {name!r}")
    return names


def validate_difficulty(difficulty: int) -> int:
    if isinstance(difficulty, bool) or difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty: expected one of {DIFFICULTIES}, got {difficulty!r}")
    return int(difficulty)
