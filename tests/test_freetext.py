"""The free-text set (prompts and held-out passages of a public-domain text) and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cdm_fast import freetext


def test_splits_are_disjoint_nonempty_and_stable():
    train, held_out = freetext.passages("train"), freetext.passages("eval")
    assert train and held_out
    assert not set(train) & set(held_out)
    assert all(len(p) >= freetext.MIN_PASSAGE_CHARS for p in train + held_out)
    assert all("Gutenberg" not in p for p in train + held_out)
    assert freetext.passages("train") == train


def test_prompts_come_from_their_split_and_are_distinct():
    prompts = freetext.prompts("train", 40)
    assert len(prompts) == len(set(prompts)) == 40
    train_text = " ".join(freetext.passages("train"))
    assert all(p in train_text for p in prompts)
    assert not any(p in " ".join(freetext.passages("eval")) for p in prompts)


@pytest.mark.parametrize(
    "args, match", [(("test", 1), "split"), (("train", -1), "n:"), (("train", 10**6), "n:")]
)
def test_bad_arguments_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        freetext.prompts(*args)


class ByteTokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str) -> dict:
        return {"input_ids": [2 + b % 60 for b in text.encode()]}


def test_perplexity_matches_a_per_text_loop_and_ignores_padding():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
    ).eval()
    texts = ["a short one", "a somewhat longer text than the first", "mid length text"]
    got = freetext.perplexity(model, ByteTokenizer(), texts, max_length=20, batch_size=2)
    sums, counts = [], []
    for text in texts:
        ids = torch.tensor([ByteTokenizer()(text)["input_ids"][:20]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        sums.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")))
        counts.append(ids.shape[1] - 1)
    assert got["token_counts"] == counts
    assert got["nll_sums"] == pytest.approx(sums, rel=1e-4)
    assert got["nll"] == pytest.approx(sum(sums) / sum(counts), rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["nll"]))
