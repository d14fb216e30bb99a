"""The free-text set: passages of plain English prose, prompts cut from them, and held-out perplexity.

The text is "In the Year 2889" (Jules and Michel Verne, 1889; public domain, Project Gutenberg #19362), which
reasoning-gym ships as package data: it is on every machine that has the logic suite, and nothing is
downloaded. Its paragraphs (whitespace normalised, at least `MIN_PASSAGE_CHARS` long) are split into "train"
and "eval" by a hash of their text (one in `EVAL_BUCKETS`), so a loop can generate from train passages and
measure perplexity on eval passages it never trained on.

    prompts("train", n)      -> n prompts: `PROMPT_SENTENCES` consecutive sentences of a train passage, which
                                the model is to continue (plain text, no instruction)
    passages("eval")         -> the held-out paragraphs, for `perplexity`
    perplexity(model, tok, texts) -> token-weighted mean NLL, its exp, and per-text NLL sums/counts
                                (per-text values so a paired bootstrap over texts can compare two models)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

SPLITS = ("train", "eval")
EVAL_BUCKETS = 5
MIN_PASSAGE_CHARS = 200
PROMPT_SENTENCES = 2
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'_])")


def source_path() -> Path:
    """reasoning-gym's copy of the text; FileNotFoundError naming the package when it is missing."""
    spec = importlib.util.find_spec("reasoning_gym")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("reasoning_gym: expected the installed package (pip install reasoning-gym)")
    path = Path(spec.origin).parent / "data" / "in_the_year_2889.txt"
    if not path.is_file():
        raise FileNotFoundError(f"reasoning_gym: expected its package data file {path}")
    return path


def split_of(text: str) -> str:
    digest = hashlib.sha256(("freetext\x1f" + text).encode()).digest()
    return "eval" if int.from_bytes(digest[:4], "little") % EVAL_BUCKETS == 0 else "train"


@functools.cache
def _all_passages() -> tuple[str, ...]:
    text = source_path().read_text(encoding="utf-8")
    # The story lies between Project Gutenberg's start and end markers (license text stays out).
    start, end = text.index("*** START"), text.index("*** END")
    body = text[start:end].split("\n", 1)[1]
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", body))
    # "[Redactor's note: ...]" is the editor's, not the story's.
    return tuple(p for p in paragraphs if len(p) >= MIN_PASSAGE_CHARS and not p.startswith("["))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


def passages(split: str) -> list[str]:
    """The paragraphs of `split`, in text order."""
    _check_split(split)
    return [p for p in _all_passages() if split_of(p) == split]


@functools.cache
def _windows(split: str) -> tuple[str, ...]:
    windows = []
    for passage in passages(split):
        sentences = _SENTENCE_END.split(passage)
        for start in range(0, len(sentences) - PROMPT_SENTENCES, PROMPT_SENTENCES):
            windows.append(" ".join(sentences[start : start + PROMPT_SENTENCES]))
    return tuple(windows)


def num_prompts(split: str) -> int:
    """How many prompts `split` has (the train split about 100)."""
    _check_split(split)
    return len(_windows(split))


def prompts(split: str, n: int) -> list[str]:
    """The first `n` prompts of `split`: windows of `PROMPT_SENTENCES` sentences, passage by passage, each
    followed in its passage by at least one more sentence. ValueError when the split has fewer than `n`."""
    _check_split(split)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    windows = _windows(split)
    if n > len(windows):
        raise ValueError(f"n: the {split} split has {len(windows)} free-text prompts, asked for {n}")
    return list(windows[:n])


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    texts: list[str],
    max_length: int = 512,
    batch_size: int = 4,
    map_texts: Callable[[Callable[[list[str]], list], list[str]], list] | None = None,
) -> dict:
    """Next-token NLL of `model` on `texts` (each cut to `max_length` tokens, BOS as the tokenizer adds it).

    Returns {"nll": token-weighted mean NLL (nats), "perplexity": exp of it, "tokens": total scored tokens,
    "nll_sums": per text, "token_counts": per text, "nll_per_text": per text, mean per token}. Padding never
    counts; batches are right-padded. map_texts(f, texts) spreads the per-text work and must return f's
    results for every text, in order (e.g. `distributed.map_sharded` over ranks); default f(texts).
    """
    if not texts:
        raise ValueError("texts: expected at least one text, got none")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def per_text(shard: list[str]) -> list[tuple[float, int]]:
        encoded = [list(tokenizer(t)["input_ids"])[:max_length] for t in shard]
        pairs = []
        for first in range(0, len(encoded), batch_size):
            chunk = encoded[first : first + batch_size]
            length = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for row, ids in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets = input_ids[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            valid = mask[:, 1:].bool()
            pairs += zip((nll * valid).sum(1).tolist(), valid.sum(1).tolist(), strict=True)
        return pairs

    was_training = model.training
    model.eval()
    pairs = (map_texts or (lambda f, items: f(items)))(per_text, texts)
    model.train(was_training)
    sums, counts = [total for total, _ in pairs], [count for _, count in pairs]
    tokens = sum(counts)
    mean = sum(sums) / max(1, tokens)
    return {
        "nll": mean,
        "perplexity": math.exp(mean),
        "tokens": tokens,
        "nll_sums": sums,
        "token_counts": counts,
        "nll_per_text": [total / max(1, count) for total, count in pairs],
    }
