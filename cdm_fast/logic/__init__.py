"""Logic suite: a thin adapter over reasoning-gym (seeded task generators with their own verifiers).

The task mix, difficulty levels, prompt formats and answer extraction are ours; the problems and the
scoring are the library's.
"""

from cdm_fast.logic.evaluate import evaluate
from cdm_fast.logic.suite import (
    PROMPT_FORMATS,
    SPLITS,
    STOP,
    Problem,
    answer_line,
    check,
    extract,
    generate,
    read_jsonl,
    split_of,
    to_jsonl,
)
from cdm_fast.logic.tasks import DEFAULT_TASKS, DIFFICULTIES, OUTSIDE_MIX_TASKS, TASKS

__all__ = [
    "DEFAULT_TASKS",
    "DIFFICULTIES",
    "OUTSIDE_MIX_TASKS",
    "PROMPT_FORMATS",
    "SPLITS",
    "STOP",
    "TASKS",
    "Problem",
    "answer_line",
    "check",
    "evaluate",
    "extract",
    "generate",
    "read_jsonl",
    "split_of",
    "to_jsonl",
]
