"""CDM: how deep in a basin a causal LM's greedy continuation of a prompt sits (0 to 100).

For a prompt, the model's greedy continuation of at most `max_new_tokens` tokens is taken, or a supplied
completion (`completions=`, teacher-forced). Its *answer span* ends at the first end token: eos, or the token
whose text completes one of the `stop` strings (a prompt format's answer end, e.g. a blank line or the next
"Question:"), generation stopping there; a continuation that reaches `max_new_tokens` first is `truncated`.
A supplied completion is scored whole. The *scored positions* are the positions whose next-token
distributions p_t chose the span's tokens: the last prompt token and every span token but the last (the end
token, when there is one, is the span's last token: choosing to stop is scored), T of them. Over those
positions:

- E, entropy collapse      = mean_t 1 - H(p_t) / log|V|, |V| the logits width
- S, attention sparsity    = mean over layers l in the last half, heads h, scored queries t of
                             1 - H(a_lht) / log n_t, with a_lht the eager attention row and n_t the number of
                             non-padding keys the query may see. Padding keys are left out of the entropy and
                             the count; rows with n_t = 1 (entropy 0 over log 1) are left out of the mean, and
                             S = 1 when no row is left (a one-token prompt with one new token).
- R, basin resistance      = 1 - mean_{k,t} JS(p_t || q_t^k) / log 2, where q^k is the next-token
                             distribution with the residual stream output of layer `noise_layer` perturbed, at
                             every token i, by a Gaussian direction scaled to norm noise_scale * ||h_i||
                             (K = noise_samples draws, seeded from `seed` and the prompt's tokens, so the
                             numbers are deterministic and do not depend on the batch a prompt lands in).
- CDM = 100 * (E * S * R) ** (1/3); a prompt is "deep" when CDM >= threshold (default 80).

E, S and the clean p_t come from one eager forward over prompt + completion, R from K more forwards;
position ids come from the attention mask, so a prompt scores the same alone and inside a left-padded batch.
Cost per batch: one greedy generation, one forward over prompt + completion, and K forwards over only the
blocks above `noise_layer` (blocks 0..noise_layer see the clean inputs in every pass, so their clean output
is replayed, not recomputed). The output head runs on the T scored positions only. S is reduced layer by
layer by hooks on the chosen layers' attention modules, so memory holds one layer's attention weights
(batch x heads x length^2 floats) at a time, plus batch x T x |V| logits.
`attention_sparsity_from_weights` is the eager definition of S, the reference for the fused entropy kernel;
on a model running attn_implementation="cdm_block_sparse" S comes from that kernel's per-query entropy
(`attention_sparsity_from_entropy`), recorded during the same forward: no attention weights are materialised.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

DEFINITION = "cdm_fast.cdm/1"
DEFAULT_THRESHOLD = 80.0
# On this attention implementation S comes from the fused entropy (cdm_fast.patch.register_hf_attention).
FUSED_ATTENTION = "cdm_block_sparse"


@dataclass
class CDMResult:
    """The CDM of one prompt, its three parts (each in [0, 1]) and the parameters that produced it.

    completion: the answer span's text (without the end token or stop string); n_tokens: the span's tokens,
    end token included; mean_logprob: the span tokens' mean log-probability under the model (nats), the
    plainest confidence baseline (E is the other: an affine map of the mean next-token entropy);
    truncated: the span hit max_new_tokens before an end token; sample: which of the prompt's
    `num_samples` sampled completions this is (None when greedy or supplied)."""

    prompt: str
    completion: str
    cdm: float
    entropy_collapse: float
    attention_sparsity: float
    basin_resistance: float
    n_tokens: int
    mean_logprob: float | None = None
    truncated: bool = False
    sample: int | None = None
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    """The list of transformer blocks whose outputs form the residual stream (Llama-, GPT-2-style models)."""
    bases = [model]
    if hasattr(model, "get_decoder"):
        bases.insert(0, model.get_decoder())
    for base in bases:
        for name in ("layers", "h", "blocks"):
            layers = getattr(base, name, None)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                return layers
    raise TypeError(
        f"model: cannot find the decoder layers of {type(model).__name__} (looked for .layers, .h)"
    )


def _resolve_attention_layers(attention_layers, num_layers: int) -> list[int]:
    if isinstance(attention_layers, str):
        if attention_layers == "last_half":
            return list(range(num_layers // 2, num_layers))
        if attention_layers == "all":
            return list(range(num_layers))
        raise ValueError(
            f"attention_layers: expected 'last_half', 'all' or layer indices, got {attention_layers!r}"
        )
    layers = [int(index) for index in attention_layers]
    if not layers or any(not -num_layers <= index < num_layers for index in layers):
        raise ValueError(
            f"attention_layers: expected indices in [-{num_layers}, {num_layers}), "
            f"got {list(attention_layers)}"
        )
    return sorted({index % num_layers for index in layers})


def _validate_sampling(num_samples, temperature, top_p, completions) -> None:
    if num_samples is None:
        return
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected None or an int >= 1, got {num_samples!r}")
    if completions is not None:
        raise ValueError("num_samples: expected None when completions are supplied (nothing is sampled)")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")


def _validate_texts(name: str, texts) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: expected a list of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{index}]: expected str, got {type(text).__name__}")


def _validate(
    model, tokenizer, prompts, max_new_tokens, noise_scale, noise_samples, batch_size, stop, completions
) -> None:
    _validate_texts("prompts", prompts)
    if len(prompts) == 0:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    _validate_texts("stop", stop)
    for index, text in enumerate(stop):
        if not text:
            raise ValueError(f"stop[{index}]: expected a non-empty str, got {text!r}")
    if completions is not None:
        _validate_texts("completions", completions)
        if len(completions) != len(prompts):
            raise ValueError(f"completions: expected one per prompt ({len(prompts)}), got {len(completions)}")
    for name, value in (("max_new_tokens", max_new_tokens), ("noise_samples", noise_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    if not isinstance(noise_scale, (int, float)) or not math.isfinite(noise_scale) or noise_scale < 0:
        raise ValueError(f"noise_scale: expected a finite number >= 0, got {noise_scale!r}")
    if not callable(getattr(model, "generate", None)) or not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model: expected a causal LM with .generate (an nn.Module), got {type(model).__name__}"
        )
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"model: expected a decoder-only causal LM, got {type(model).__name__}")
    if hasattr(model, "can_generate") and not model.can_generate():
        raise TypeError(f"model: {type(model).__name__} cannot generate; expected a *ForCausalLM model")
    if not callable(tokenizer) or not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"tokenizer: expected a tokenizer with __call__ and decode, got {type(tokenizer).__name__}"
        )


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def _encode(tokenizer, prompts: Sequence[str], chat_template: bool, offset: int) -> list[list[int]]:
    encoded = []
    for index, prompt in enumerate(prompts, start=offset):
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        if len(ids) == 0:
            raise ValueError(
                f"prompts[{index}]: expected text that tokenizes to at least one token, got {prompt!r}"
            )
        encoded.append(list(ids))
    return encoded


def _encode_completions(tokenizer, completions: Sequence[str], offset: int) -> list[list[int]]:
    encoded = []
    for index, completion in enumerate(completions, start=offset):
        ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
        if len(ids) == 0:
            raise ValueError(
                f"completions[{index}]: expected text that tokenizes to at least one token, "
                f"got {completion!r}"
            )
        encoded.append(ids)
    return encoded


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) / log|V| along the last dim, in float64."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return entropy / math.log(logits.shape[-1])


def _js_divergence(p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """JS(p || softmax(logits_q)) in nats along the last dim, float64, as H(m) - (H(p) + H(q)) / 2.

    p: float64 probabilities. Exactly 0 when softmax(logits_q) == p bitwise (then m == p).
    """
    q = torch.softmax(logits_q.double(), dim=-1)
    m = 0.5 * (p + q)
    half_sum = 0.5 * torch.xlogy(p, p).sum(-1) + 0.5 * torch.xlogy(q, q).sum(-1)
    return (half_sum - torch.xlogy(m, m).sum(-1)).clamp_min(0.0)


def _visible_keys(key_mask: torch.Tensor, query_mask: torch.Tensor) -> tuple:
    """(scored row indices, visible (batch, rows, keys), counted and log n_visible (batch, rows))."""
    key_mask = key_mask.bool()
    query_rows = query_mask.bool().any(0).nonzero().flatten()
    length = key_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=key_mask.device).tril()[query_rows]
    visible = causal[None] & key_mask[:, None, :]  # (batch, rows, keys)
    n_visible = visible.sum(-1)  # (batch, rows)
    counted = query_mask.bool()[:, query_rows] & (n_visible >= 2)
    return query_rows, visible, counted, torch.log(n_visible.clamp_min(2).double())


def _concentration_sum(weights: torch.Tensor, rows: tuple) -> torch.Tensor:
    """(batch,) float64 sum of 1 - H(row) / log(n_visible) over one layer's heads and counted rows."""
    query_rows, visible, counted, log_n = rows
    weights = weights[:, :, query_rows, :].double() * visible[:, None]
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.xlogy(weights, weights).sum(-1)  # (batch, heads, rows)
    return ((1.0 - entropy / log_n[:, None]) * counted[:, None]).sum((1, 2))


def _mean_concentration(total: torch.Tensor, counted: torch.Tensor, num_heads: int, num_layers: int):
    count = counted.sum(-1) * num_heads * num_layers
    return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))


def attention_sparsity_from_weights(
    attentions: Sequence[torch.Tensor], key_mask: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """S per sequence from eager attention weights: the reference for the fused attention-entropy kernel.

    attentions: the chosen layers' weights, each (batch, heads, length, length), causal, any float dtype.
    key_mask: (batch, length) bool, True for real (non-padding) tokens.
    query_mask: (batch, length) bool, True for the query rows to score.
    Returns (batch,) float64: the mean of 1 - H(row) / log(n_visible) over layers, heads and scored rows
    with at least two visible keys; the row is renormalized over its visible keys (padding keys excluded
    from the entropy and from n_visible). A sequence with no such row gets 1.0.
    """
    rows = _visible_keys(key_mask, query_mask)
    total = torch.zeros(key_mask.shape[0], dtype=torch.float64, device=key_mask.device)
    for weights in attentions:
        total += _concentration_sum(weights, rows)
    return _mean_concentration(total, rows[2], attentions[0].shape[1], len(attentions))


def _entropy_concentration_sum(entropy: torch.Tensor, rows: tuple) -> torch.Tensor:
    """(batch,) float64 sum of 1 - H(row) / log(n_visible) over one layer's heads and counted rows, from the
    fused entropy (batch, heads, length): it is already over the visible keys, so nothing is renormalized."""
    query_rows, _, counted, log_n = rows
    entropy = entropy[:, :, query_rows].double()
    return ((1.0 - entropy / log_n[:, None]) * counted[:, None]).sum((1, 2))


def attention_sparsity_from_entropy(
    entropies: Sequence[torch.Tensor], key_mask: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """S per sequence from the fused attention entropy: `attention_sparsity_from_weights` without weights.

    entropies: the chosen layers' per-query entropies, each (batch, heads, length) nats, as
    `block_sparse_attention(..., causal=True, key_padding_mask=key_mask, return_entropy=True)` returns them.
    key_mask, query_mask: as for `attention_sparsity_from_weights`. Returns (batch,) float64.
    """
    rows = _visible_keys(key_mask, query_mask)
    total = torch.zeros(key_mask.shape[0], dtype=torch.float64, device=key_mask.device)
    for entropy in entropies:
        total += _entropy_concentration_sum(entropy, rows)
    return _mean_concentration(total, rows[2], entropies[0].shape[1], len(entropies))


def _chosen_entropies(recorder, chosen: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The recorded entropies of the attention modules inside the chosen blocks, in block order."""
    owner = {id(module): position for position, block in enumerate(chosen) for module in block.modules()}
    found = sorted(
        (owner[id(record.module)], record.entropy)
        for record in recorder.records
        if id(record.module) in owner
    )
    if len(found) != len(chosen):
        raise ValueError(
            f"model: expected one {FUSED_ATTENTION!r} attention call per chosen layer ({len(chosen)}), "
            f"recorded {len(found)}"
        )
    return [entropy for _, entropy in found]


def _noise_directions(
    input_ids: torch.Tensor, mask: torch.Tensor, hidden_size: int, seed: int, sample: int
) -> torch.Tensor:
    """(batch, length, hidden) unit Gaussian directions at real tokens, zeros at padding.

    Each row draws from a generator seeded by (seed, sample, the row's tokens), so a prompt gets the same
    noise alone and in any batch.
    """
    directions = torch.zeros(*input_ids.shape, hidden_size, dtype=torch.float32)
    for row in range(input_ids.shape[0]):
        real = mask[row].bool()
        tokens = input_ids[row, real].numpy().astype(np.int64).tobytes()
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{sample}:".encode() + tokens))
        draw = torch.randn(int(real.sum()), hidden_size, generator=generator)
        directions[row, real] = draw / draw.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return directions


def _noisy_logits(model, layer, inputs: dict, directions: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """Logits with layer's output h replaced by h + noise_scale * ||h|| * direction at every token."""

    def add_noise(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        scaled = directions.to(hidden.device, hidden.dtype) * hidden.norm(dim=-1, keepdim=True)
        noisy = hidden + noise_scale * scaled
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

    handle = layer.register_forward_hook(add_noise)
    try:
        return model(**inputs).logits
    finally:
        handle.remove()


@contextlib.contextmanager
def _replaying(blocks: Sequence[torch.nn.Module], output):
    """The blocks return `output` without computing anything (hooks still run).

    The noisy passes perturb the output of block l; blocks 0..l see exactly the clean inputs, so their
    clean output is replayed instead of recomputed: the same numbers for about half the cost.
    """
    saved = [vars(block).get("forward") for block in blocks]
    for block in blocks:
        block.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@contextlib.contextmanager
def _logits_of_last(model, count: int):
    """The output head sees only the last `count` positions (the scored ones): the vocabulary-wide GEMM
    and the logits in memory shrink from the whole sequence to those positions."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def last_positions(module, args):
        return (args[0][:, -count:], *args[1:]) if args else None

    handle = head.register_forward_pre_hook(last_positions)
    try:
        yield
    finally:
        handle.remove()


def _attention_modules(model, blocks: Sequence[torch.nn.Module]) -> tuple[list[torch.nn.Module], int] | None:
    """Each block's attention module and where its output holds the weights, from transformers' own
    output-recording spec (`_can_record_outputs`); None when it is absent or ambiguous."""
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    if isinstance(spec, type):
        target, index = spec, 1
    elif spec is not None and not getattr(spec, "layer_name", None):
        target, index = getattr(spec, "target_class", None), getattr(spec, "index", 1)
    else:
        return None
    if not isinstance(target, type):
        return None
    modules = []
    for block in blocks:
        found = [module for module in block.modules() if isinstance(module, target)]
        if len(found) != 1:
            return None
        modules.append(found[0])
    return modules, index


def _no_weights_error(model) -> ValueError:
    return ValueError(
        "model: no attention weights came back; load it with attn_implementation='eager' "
        f"(it uses {getattr(model.config, '_attn_implementation', 'unknown')!r})"
    )


def _clean_pass(model, inputs: dict, key_mask, query_mask, settings: dict, steps: int):
    """One eager forward: (logits at the last `steps` positions, S per row, the noise block's output).

    On the "cdm_block_sparse" attention S comes from the fused per-query entropy the attention calls record
    (no weights materialised) instead.

    S is accumulated layer by layer by hooks on the chosen layers' attention modules, so no layer's
    (batch, heads, length, length) weights outlive its own forward; models without a usable
    `_can_record_outputs` spec fall back to output_attentions=True (all layers kept, then reduced).
    """
    blocks = _decoder_layers(model)
    chosen = [blocks[index] for index in settings["attention_layers"]]
    rows = _visible_keys(key_mask, query_mask)
    captured: dict = {"heads": None, "layers": 0}
    total = torch.zeros(key_mask.shape[0], dtype=torch.float64, device=key_mask.device)

    def keep_output(module, args, output):
        captured["output"] = output

    with contextlib.ExitStack() as stack:
        stack.enter_context(_logits_of_last(model, steps))
        handles = [blocks[settings["noise_layer"]].register_forward_hook(keep_output)]
        fused = getattr(model.config, "_attn_implementation", None) == FUSED_ATTENTION
        attention = None if fused else _attention_modules(model, chosen)
        if attention is not None:
            modules, index = attention

            def reduce_weights(module, args, output):
                weights = output[index] if isinstance(output, (tuple, list)) and len(output) > index else None
                if not isinstance(weights, torch.Tensor) or weights.dim() != 4:
                    raise _no_weights_error(model)
                total.add_(_concentration_sum(weights, rows))
                captured["heads"], captured["layers"] = weights.shape[1], captured["layers"] + 1

            handles += [module.register_forward_hook(reduce_weights) for module in modules]
        for handle in handles:
            stack.callback(handle.remove)
        if fused:
            from cdm_fast.patch import attention_entropy_recorder

            recorder = stack.enter_context(attention_entropy_recorder())
            logits = model(**inputs, use_cache=False).logits
            entropies = _chosen_entropies(recorder, chosen)
            for entropy in entropies:
                total.add_(_entropy_concentration_sum(entropy, rows))
            sparsity = _mean_concentration(total, rows[2], entropies[0].shape[1], len(entropies))
        elif attention is not None:
            logits = model(**inputs, use_cache=False).logits
            sparsity = _mean_concentration(total, rows[2], captured["heads"], captured["layers"])
        else:
            clean = model(**inputs, use_cache=False, output_attentions=True)
            if clean.attentions is None or any(weights is None for weights in clean.attentions):
                raise _no_weights_error(model)
            logits = clean.logits
            sparsity = attention_sparsity_from_weights(
                [clean.attentions[index] for index in settings["attention_layers"]], key_mask, query_mask
            )
    return logits[:, -steps:], sparsity, captured["output"]


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the `stop` strings starts in `text`, or None."""
    found = [index for index in (text.find(string) for string in stop) if index >= 0]
    return min(found) if found else None


def _stop_on_text(tokenizer, stop: Sequence[str], prompt_length: int):
    """A transformers stopping criterion: a row is done once its generated text holds a stop string (the
    same decode `_answer_spans` reads, so generation and scoring agree on where the answer ends)."""
    from transformers import StoppingCriteria

    class StopOnText(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = [
                _first_stop(tokenizer.decode(row[prompt_length:].tolist()), stop) is not None
                for row in input_ids
            ]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopOnText()


def _generate(
    model, tokenizer, input_ids, attention_mask, settings: dict, sampler=None, cache=None
) -> torch.Tensor:
    """Greedy continuations (batch, new tokens), or with `sampler` (a logits processor that draws each row's
    token and leaves it the only finite logit) sampled ones; `cache` holds a prefill of all but the last
    prompt token."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    config = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"],
        do_sample=False,
        num_beams=1,
        pad_token_id=settings["pad_id"],
        eos_token_id=sorted(settings["eos_ids"]) or None,
    )
    criteria = StoppingCriteriaList()
    if settings["stop"]:
        criteria.append(_stop_on_text(tokenizer, settings["stop"], input_ids.shape[1]))
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        generation_config=config,
        stopping_criteria=criteria,
        logits_processor=LogitsProcessorList([sampler] if sampler is not None else []),
        # transformers 5.2x renames this `cache` (and warns); older releases, the GPU image's 5.17 among
        # them, know only this name.
        **({"past_key_values": cache} if cache is not None else {}),
    )
    return output[:, input_ids.shape[1] :]


def nucleus_probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the smallest set of most likely tokens whose mass reaches
    top_p (the token that crosses it included), renormalised. logits (..., V) -> float64 (..., V)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = torch.where(mass_before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def _sample_seed(seed: int, sample: int, prompt_ids: Sequence[int]) -> int:
    tokens = np.asarray(prompt_ids, dtype=np.int64).tobytes()
    return zlib.crc32(f"{seed}:sample {sample}:".encode() + tokens)


def _seeded_sampler(generators: list[torch.Generator], temperature: float, top_p: float):
    """A transformers logits processor that draws row r's next token from `nucleus_probabilities` with its
    own generator (one uniform per step, inverse CDF) and makes it the row's only finite logit, so that greedy
    decoding emits it: a row's samples depend on its seed, never on the rows batched with it."""
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        def __call__(self, input_ids, scores):
            probs = nucleus_probabilities(scores, temperature, top_p).cpu()
            draws = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
            cdf = probs.cumsum(-1)
            tokens = torch.searchsorted(cdf, (draws * cdf[:, -1])[:, None]).clamp_max(probs.shape[-1] - 1)
            chosen = torch.full_like(scores, -math.inf)
            return chosen.scatter_(-1, tokens.to(scores.device), 0.0)

    return SeededSampler()


def _sample(model, tokenizer, prompt_ids, input_ids, prompt_mask, settings: dict) -> torch.Tensor:
    """`num_samples` sampled continuations per prompt, prompt-major ((batch · num_samples), new tokens). The
    prompt is prefilled once (all but its last token) and the cache repeated for its samples."""
    samples = settings["num_samples"]
    cache = None
    if input_ids.shape[1] > 1:
        prefix_mask = prompt_mask[:, :-1]
        cache = model(
            input_ids=input_ids[:, :-1],
            attention_mask=prefix_mask,
            position_ids=_position_ids(prefix_mask),
            use_cache=True,
        ).past_key_values
        cache.batch_repeat_interleave(samples)
    generators = [
        torch.Generator().manual_seed(_sample_seed(settings["seed"], sample, ids))
        for ids in prompt_ids
        for sample in range(samples)
    ]
    sampler = _seeded_sampler(generators, settings["temperature"], settings["top_p"])
    return _generate(
        model,
        tokenizer,
        input_ids.repeat_interleave(samples, 0),
        prompt_mask.repeat_interleave(samples, 0),
        settings,
        sampler,
        cache,
    )


def _answer_spans(generated: torch.Tensor, tokenizer, eos_ids: set[int], stop: Sequence[str]) -> list[tuple]:
    """(tokens, truncated, answer text) of each generated row: the span runs to its first end token (eos, or
    the token whose text completes a stop string), that token included; without one, to the row's end."""
    spans = []
    for row in generated.tolist():
        span = None
        for length, token in enumerate(row, start=1):
            if token in eos_ids:
                span = (length, False, tokenizer.decode(row[: length - 1], skip_special_tokens=True))
                break
            if stop:
                text = tokenizer.decode(row[:length])
                cut = _first_stop(text, stop)
                if cut is not None:
                    span = (length, False, text[:cut])
                    break
        spans.append(span or (len(row), True, tokenizer.decode(row, skip_special_tokens=True)))
    return spans


def _right_pad(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    padded = torch.full((len(sequences), max(len(ids) for ids in sequences)), pad_id, dtype=torch.long)
    for row, ids in enumerate(sequences):
        padded[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return padded


@torch.inference_mode()
def _score_batch(model, tokenizer, prompt_ids, settings: dict, supplied: tuple | None = None) -> list[dict]:
    """CDM of each prompt's greedy answer span, of its `num_samples` sampled ones (rows prompt-major), or of
    its supplied completion: `supplied` is (token ids, texts) per prompt."""
    device = next(model.parameters()).device
    pad_id = settings["pad_id"]
    input_ids, prompt_mask = _left_pad(prompt_ids, pad_id)
    input_ids, prompt_mask = input_ids.to(device), prompt_mask.to(device)
    if settings["num_samples"] is not None:
        generated = _sample(model, tokenizer, prompt_ids, input_ids, prompt_mask, settings).cpu()
        spans = _answer_spans(generated, tokenizer, settings["eos_ids"], settings["stop"])
        input_ids = input_ids.repeat_interleave(settings["num_samples"], 0)
        prompt_mask = prompt_mask.repeat_interleave(settings["num_samples"], 0)
    elif supplied is None:
        generated = _generate(model, tokenizer, input_ids, prompt_mask, settings).cpu()
        spans = _answer_spans(generated, tokenizer, settings["eos_ids"], settings["stop"])
    else:
        completion_ids, texts = supplied
        generated = _right_pad(completion_ids, pad_id)
        spans = [(len(ids), False, text) for ids, text in zip(completion_ids, texts, strict=True)]
    # A prompt's samples are generated together (one prefill) but scored batch_size rows at a time, rows of
    # similar span length together: one forward over every sample, padded to the longest, costs more on a
    # CPU than it saves.
    rows: list = [None] * len(spans)
    order = sorted(range(len(spans)), key=lambda row: spans[row][0])
    for start in range(0, len(order), settings["batch_size"]):
        chunk = order[start : start + settings["batch_size"]]
        first = prompt_mask[chunk].bool().any(0).nonzero()[0, 0]  # the chunk's all-padding columns go
        prompts = input_ids[chunk, first:], prompt_mask[chunk, first:]
        scored = _score_spans(model, *prompts, generated[chunk], [spans[row] for row in chunk], settings)
        for row, result in zip(chunk, scored, strict=True):
            rows[row] = result | {
                "sample": None if settings["num_samples"] is None else row % settings["num_samples"]
            }
    return rows


def _score_spans(model, input_ids, prompt_mask, generated, spans: list[tuple], settings: dict) -> list[dict]:
    """CDM of each row's span: `input_ids`/`prompt_mask` the left-padded prompts (on the model's device),
    `generated` the completion tokens (CPU, right-padded), `spans` (tokens, truncated, text) per row."""
    device = input_ids.device
    lengths = torch.tensor([span[0] for span in spans], dtype=torch.long)
    steps = int(lengths.max())
    generated = generated[:, :steps]
    # Scored position t (0 <= t < n) holds the last prompt token (t = 0) or generated token t - 1, so a
    # row's own last generated token is never fed: it is masked out like padding, which keeps the row's
    # real tokens, hence its noise seed and its numbers, the same whatever the batch's longest row is.
    window = torch.arange(steps)[None] < lengths[:, None]
    sequence = torch.cat([input_ids.cpu(), generated], dim=1)[:, :-1]
    mask = torch.cat([prompt_mask.cpu(), window[:, 1:].long()], dim=1)
    prompt_length = input_ids.shape[1]
    scored = torch.zeros_like(mask, dtype=torch.bool)
    scored[:, prompt_length - 1 :] = window
    inputs = {
        "input_ids": sequence.to(device),
        "attention_mask": mask.to(device),
        "position_ids": _position_ids(mask).to(device),
    }

    clean_logits, attention_sparsity, noise_block_output = _clean_pass(
        model, inputs, mask.to(device), scored.to(device), settings, steps
    )
    counts = window.sum(-1).double()
    entropy_collapse = ((1.0 - _normalized_entropy(clean_logits)).cpu() * window).sum(-1) / counts
    token_logprobs = torch.log_softmax(clean_logits.double(), dim=-1).cpu().gather(-1, generated[..., None])
    mean_logprob = (token_logprobs.squeeze(-1) * window).sum(-1) / counts
    attention_sparsity = attention_sparsity.cpu()

    blocks = _decoder_layers(model)
    hidden_size = model.config.hidden_size
    divergence = torch.zeros(sequence.shape[0], dtype=torch.float64)
    clean_probs = torch.softmax(clean_logits.double(), dim=-1)
    noisy_inputs = inputs | {"use_cache": False}
    with _logits_of_last(model, steps), _replaying(blocks[: settings["noise_layer"] + 1], noise_block_output):
        for sample in range(settings["noise_samples"]):
            directions = _noise_directions(sequence, mask, hidden_size, settings["seed"], sample).to(device)
            noisy_logits = _noisy_logits(
                model, blocks[settings["noise_layer"]], noisy_inputs, directions, settings["noise_scale"]
            )[:, -steps:]
            divergence += (_js_divergence(clean_probs, noisy_logits).cpu() * window).sum(-1) / counts
    basin_resistance = (1.0 - divergence / settings["noise_samples"] / math.log(2)).clamp(0.0, 1.0)

    rows = []
    for row in range(sequence.shape[0]):
        parts = (
            float(entropy_collapse[row].clamp(0.0, 1.0)),
            float(attention_sparsity[row].clamp(0.0, 1.0)),
            float(basin_resistance[row]),
        )
        length, truncated, text = spans[row]
        rows.append(
            {
                "completion": text,
                "cdm": 100.0 * (parts[0] * parts[1] * parts[2]) ** (1.0 / 3.0),
                "entropy_collapse": parts[0],
                "attention_sparsity": parts[1],
                "basin_resistance": parts[2],
                "n_tokens": length,
                "mean_logprob": float(mean_logprob[row]),
                "truncated": truncated,
            }
        )
    return rows


def score(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    seed: int = 0,
    noise_scale: float = 0.1,
    noise_layer: int | None = None,
    noise_samples: int = 4,
    attention_layers: str | Sequence[int] = "last_half",
    batch_size: int = 8,
    chat_template: bool = False,
    stop: Sequence[str] = (),
    completions: Sequence[str] | None = None,
    num_samples: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = True,
) -> list[CDMResult]:
    """CDM of each prompt under `model`, a Hugging Face causal LM loaded with attn_implementation="eager"
    (S from the attention weights) or "cdm_block_sparse" (S from the fused attention entropy; see
    `cdm_fast.patch.register_hf_attention`).

    prompts: raw text, or user messages put through the tokenizer's chat template when chat_template=True.
    stop: strings that end the answer (besides eos), e.g. `cdm_fast.logic.STOP["fewshot"]`; generation stops
        at the first, and only the answer span before it (plus its end token) is scored.
    completions: one completion per prompt to score teacher-forced, whole, instead of generating (another
        model's outputs, a dataset); `max_new_tokens` and `stop` then do not apply.
    num_samples: score that many completions per prompt sampled at `temperature` with nucleus `top_p`
        instead of the greedy one; results are prompt-major (prompt 0's samples first). Sample k of a prompt
        draws from a generator seeded by (seed, k, the prompt's tokens): the same samples alone or in any
        batch. The prompt is prefilled once for its samples.
    noise_layer: index of the block whose output gets the noise (default: the middle one, num_layers // 2).
    attention_layers: "last_half" (default), "all", or block indices for S.
    Returns one CDMResult per prompt, in order; `params` records everything that defines the numbers.
    """
    _validate(
        model, tokenizer, prompts, max_new_tokens, noise_scale, noise_samples, batch_size, stop, completions
    )
    _validate_sampling(num_samples, temperature, top_p, completions)
    num_layers = len(_decoder_layers(model))
    if noise_layer is None:
        noise_layer = num_layers // 2
    if (
        isinstance(noise_layer, bool)
        or not isinstance(noise_layer, int)
        or not -num_layers <= noise_layer < num_layers
    ):
        raise ValueError(
            f"noise_layer: expected an int in [-{num_layers}, {num_layers}), got {noise_layer!r}"
        )
    noise_layer %= num_layers
    layers = _resolve_attention_layers(attention_layers, num_layers)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = min(eos_ids) if eos_ids else 0
    settings = {
        "max_new_tokens": max_new_tokens,
        "seed": int(seed),
        "noise_scale": float(noise_scale),
        "noise_layer": noise_layer,
        "noise_samples": noise_samples,
        "attention_layers": layers,
        "eos_ids": eos_ids,
        "pad_id": pad_id,
        "stop": tuple(stop),
        "batch_size": batch_size,
        "num_samples": num_samples,
        "temperature": float(temperature),
        "top_p": float(top_p),
    }
    supplied = completions is not None
    decoding = "supplied" if supplied else "greedy" if num_samples is None else "sampled"
    params = {
        "definition": DEFINITION,
        "decoding": decoding,
        **(
            {"num_samples": num_samples, "temperature": float(temperature), "top_p": float(top_p)}
            if decoding == "sampled"
            else {}
        ),
        "max_new_tokens": None if supplied else max_new_tokens,
        "stop": [] if supplied else list(stop),
        "answer_span": "the whole supplied completion"
        if supplied
        else "to the first eos or stop string, its end token scored",
        "chat_template": bool(chat_template),
        "noise_scale": float(noise_scale),
        "noise_layer": noise_layer,
        "noise_samples": noise_samples,
        "seed": int(seed),
        "attention_layers": layers,
        "num_layers": num_layers,
        "weights": {"entropy_collapse": 1.0, "attention_sparsity": 1.0, "basin_resistance": 1.0},
        "aggregation": "100 * geometric mean",
    }

    was_training = model.training
    model.eval()
    results: list[CDMResult] = []
    try:
        with tqdm(total=len(prompts), desc="CDM", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                batch = list(prompts[start : start + batch_size])
                prompt_ids = _encode(tokenizer, batch, chat_template, offset=start)
                batch_supplied = None
                if supplied:
                    texts = list(completions[start : start + batch_size])
                    batch_supplied = (_encode_completions(tokenizer, texts, offset=start), texts)
                rows = _score_batch(model, tokenizer, prompt_ids, settings, batch_supplied)
                copies = num_samples or 1
                for prompt, row in zip((p for p in batch for _ in range(copies)), rows, strict=True):
                    results.append(CDMResult(prompt=prompt, params=dict(params), **row))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def fraction_deep(results: Sequence[CDMResult], threshold: float = DEFAULT_THRESHOLD) -> float:
    """Share of results with CDM >= threshold (the deep rate)."""
    if len(results) == 0:
        raise ValueError("results: expected at least one CDMResult, got none")
    return sum(result.cdm >= threshold for result in results) / len(results)


def top_fraction(results: Sequence[CDMResult], fraction: float = 0.25) -> float:
    """The CDM threshold that calls the top `fraction` of `results` deep: their (1 - fraction) quantile.

    Absolute CDM levels vary by model; `fraction_deep(results, top_fraction(results, f))` is about f
    (more with ties).
    """
    if len(results) == 0:
        raise ValueError("results: expected at least one CDMResult, got none")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction: expected a number in (0, 1], got {fraction!r}")
    return float(np.quantile([result.cdm for result in results], 1.0 - fraction))


def summarize(
    results: Sequence[CDMResult],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Means of CDM and its parts, deep rate, CDM quantiles and a 95% bootstrap interval of the mean CDM."""
    if len(results) == 0:
        raise ValueError("results: expected at least one CDMResult, got none")
    cdm = np.array([result.cdm for result in results], dtype=np.float64)
    resampled = np.random.default_rng(seed).choice(cdm, size=(n_bootstrap, cdm.size), replace=True).mean(1)
    quantiles = (0.1, 0.25, 0.5, 0.75, 0.9)
    return {
        "n": int(cdm.size),
        "cdm_mean": float(cdm.mean()),
        "cdm_mean_ci95": [float(np.quantile(resampled, 0.025)), float(np.quantile(resampled, 0.975))],
        "entropy_collapse_mean": float(np.mean([result.entropy_collapse for result in results])),
        "attention_sparsity_mean": float(np.mean([result.attention_sparsity for result in results])),
        "basin_resistance_mean": float(np.mean([result.basin_resistance for result in results])),
        "n_tokens_mean": float(np.mean([result.n_tokens for result in results])),
        "truncated_rate": float(np.mean([result.truncated for result in results])),
        "deep_threshold": float(threshold),
        "deep_rate": fraction_deep(results, threshold),
        "cdm_quantiles": {str(q): float(np.quantile(cdm, q)) for q in quantiles},
        "params": dict(results[0].params),
    }
