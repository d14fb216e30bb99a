"""cache-latents and latent-distill mechanics on a tiny random Llama teacher with a byte-level tokenizer."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cdm_fast.distill import latent, latents
from cdm_fast.nn.projector import FourierProjector

TEXTS = [
    f"Question: what is {a} + {b}?\nAnswer: {a + b}" + " pad" * (a % 5)
    for a, b in zip(range(11), range(3, 14), strict=True)
]


@pytest.fixture(autouse=True)
def _model_cache(monkeypatch, embedded_model_cache):
    monkeypatch.setenv("CDM_FAST_CACHE", str(embedded_model_cache))


@pytest.fixture(autouse=True, scope="module")
def _torch_backend():
    """The loop's mechanics are under test here, not the kernels (they have their own tests): the ops run on
    the torch backend even under TRITON_INTERPRET=1, where the interpreter would take minutes per step."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDM_FAST_BACKEND", "torch")
        yield


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def _teacher(folder: Path, seed: int = 0, hidden: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=hidden,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_latent")
    teacher = _teacher(root / "teacher")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"teacher": str(teacher), "data": str(data), "root": root}


def _cache(tiny, out, **kwargs):
    config = latents.CacheLatentsConfig(
        teacher=tiny["teacher"],
        out=str(out),
        data=tiny["data"],
        layers=(1, 2, 3),
        batch_size=1,
        shard_sequences=4,
        progress=False,
    )
    return latents.run(replace(config, **kwargs))


def _reference_hidden(teacher: str):
    from cdm_fast import models

    model, tokenizer = models.load(teacher)
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            yield ids[0], model(input_ids=ids, output_hidden_states=True).hidden_states


def test_cache_round_trip_fp8_within_e4m3_bound_and_bf16_exact(tiny, tmp_path):
    fp8 = latents.LatentReader(_cache(tiny, tmp_path / "fp8"), prefetch=True)
    bf16 = latents.LatentReader(_cache(tiny, tmp_path / "bf16", dtype="bf16"), prefetch=False)
    seen = 0
    for (ids, hidden), (ids8, rows8), (ids16, rows16) in zip(
        _reference_hidden(tiny["teacher"]), fp8.sequences(), bf16.sequences(), strict=True
    ):
        assert torch.equal(ids, ids8) and torch.equal(ids, ids16)
        for layer in (1, 2, 3):
            ref = hidden[layer][0].float()
            assert torch.equal(rows16[layer], ref.to(torch.bfloat16).float())
            # e4m3, row scale s = amax/448: |err| <= 2^-4 |x| (normal range) + 2^-10 s (subnormal range).
            scale = ref.abs().amax(dim=-1, keepdim=True) / 448
            err = (rows8[layer] - ref).abs()
            assert (err <= ref.abs() * 2**-4 + scale * 2**-10 + 1e-7).all()
            assert err.max() > 0  # really quantised
        seen += 1
    assert seen == len(TEXTS)
    manifest = fp8.manifest
    assert manifest["complete"] and manifest["layers"] == [1, 2, 3] and manifest["dtype"] == "fp8"
    assert len(manifest["shards"]) == 3 and manifest["num_sequences"] == len(TEXTS)
    assert {"teacher", "tokenizer", "data_hash", "d_model", "max_length"} <= set(manifest)


def test_cache_resume_skips_complete_shards_and_rewrites_missing(tiny, tmp_path):
    out = _cache(tiny, tmp_path / "c")
    first = (out / latents.shard_name(0)).stat().st_mtime_ns
    before = (out / latents.shard_name(1)).read_bytes()
    (out / latents.shard_name(1)).unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    latents.atomic_write_json(out / "manifest.json", manifest)
    with pytest.raises(ValueError, match="incomplete"):
        latents.LatentReader(out)
    _cache(tiny, out)
    assert (out / latents.shard_name(0)).stat().st_mtime_ns == first
    assert (out / latents.shard_name(1)).read_bytes() == before
    assert not list(out.glob(".*"))


def test_manifest_mismatch_is_a_clear_error(tiny, tmp_path):
    out = _cache(tiny, tmp_path / "c")
    with pytest.raises(ValueError, match="teacher: expected 'other'"):
        latents.LatentReader(out, expect={"teacher": "other"})
    with pytest.raises(ValueError, match="layers"):
        latents.LatentReader(out, expect={"layers": [4]})
    fingerprint = dict(latents.read_manifest(out)["tokenizer"], vocab_sha256="0" * 64)
    with pytest.raises(ValueError, match="tokenizer"):
        latents.LatentReader(out, expect={"tokenizer": fingerprint})
    other = _teacher(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="different"):
        _cache({**tiny, "teacher": str(other)}, out)
    with pytest.raises(ValueError, match="layers"):
        _cache(tiny, tmp_path / "bad", layers=(0, 9))


def test_streaming_reader_batches(tiny, tmp_path):
    out = _cache(tiny, tmp_path / "c")
    reader = latents.LatentReader(out, batch_size=3, layers=[2], start=2, stop=10, pad_id=0)
    batches = list(reader)
    assert len(batches) == len(reader) == 3
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]
    for batch in batches:
        b, t = batch["input_ids"].shape
        assert batch["attention_mask"].shape == (b, t) and set(batch["latents"]) == {2}
        assert batch["latents"][2].shape == (b, t, 32) and batch["latents"][2].dtype == torch.float32
        pad = batch["attention_mask"] == 0
        assert (batch["latents"][2][pad] == 0).all() and (batch["input_ids"][pad] == 0).all()
        assert batch["attention_mask"].sum(1).max() == t
    with pytest.raises(ValueError, match="layers"):
        latents.LatentReader(out, layers=[4])
    with pytest.raises(ValueError, match="start, stop"):
        latents.LatentReader(out, start=5, stop=5)


def test_layer_map_default_and_validation():
    assert latent.parse_layer_map(None, [5, 10, 15, 20, 25], 6) == [
        (5, 1),
        (10, 2),
        (15, 3),
        (20, 4),
        (25, 5),
    ]
    pairs = latent.parse_layer_map(None, [1, 2, 3], 6)
    assert [t for t, _ in pairs] == [1, 2, 3] and all(0 < s < 6 for _, s in pairs)
    assert latent.parse_layer_map("10:2, 20:4", [10, 20], 6) == [(10, 2), (20, 4)]
    for bad, match in [
        ("10-2", "teacher:student"),
        ("11:2", "not cached"),
        ("10:6", "out of range"),
        ("10:2,20:2", "at most once"),
        ("", "teacher:student"),
    ]:
        with pytest.raises(ValueError, match=match):
            latent.parse_layer_map(bad, [10, 20], 6)


def _distill_config(tiny, out, **kwargs):
    config = latent.LatentDistillConfig(
        out=str(out),
        teacher=tiny["teacher"],
        data=tiny["data"],
        cache=str(tiny["root"] / "shared_cache"),
        cache_layers=(1, 2, 3),
        student_hidden=16,
        student_layers=3,
        student_heads=2,
        student_kv_heads=1,
        student_intermediate=32,
        num_frequencies=8,
        batch_size=3,
        max_steps=4,
        heldout_sequences=2,
        eval_problems_per_task=0,
        eval_freetext_passages=2,
        bootstrap_samples=50,
        progress=False,
    )
    return replace(config, **kwargs)


@pytest.mark.parametrize("projection", ["fourier", "linear"])
def test_resume_gives_the_same_weights(tiny, tmp_path, projection):
    straight = _distill_config(tiny, tmp_path / "straight", projection=projection)
    latent.run(straight)
    latent.run(_distill_config(tiny, tmp_path / "split", projection=projection, max_steps=2))
    latent.run(_distill_config(tiny, tmp_path / "split", projection=projection, resume=True))
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for part in ("student", "projectors"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [s for s in steps if s] == [1, 2, 3, 4, 4]  # 4 train records and the eval record


@pytest.mark.parametrize("projection", ["fourier", "linear"])
def test_projector_gradients_reach_the_student(tiny, projection):
    from transformers import AutoConfig

    config = _distill_config(tiny, "unused", projection=projection, ce_weight=0.0)
    teacher_config = AutoConfig.from_pretrained(tiny["teacher"])
    student = latent.build_student(config, teacher_config, None)
    pairs = [(2, 1), (3, 2)]
    projectors = latent.build_projectors(config, pairs, 32, 16, {2: 0.1, 3: 0.1})
    torch.manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 100, (2, 7)),
        "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
        "latents": {2: torch.randn(2, 7, 32), 3: torch.randn(2, 7, 32)},
    }
    losses = latent.step_losses(student, projectors, batch, pairs, config)
    losses["loss"].backward()
    assert losses["ce"] > 0 and losses["mse"] > 0
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0
    assert student.model.layers[2].mlp.down_proj.weight.grad is None  # no mapped layer above block 2
    for module in projectors.values():
        assert module.weight.grad.abs().sum() > 0
    if projection == "fourier":
        assert isinstance(projectors["2"], FourierProjector) and projectors["2"].sigma == 0.1


def test_report_schema_overwrite_guard_and_control(tiny, tmp_path):
    config = _distill_config(tiny, tmp_path / "run", eval_problems_per_task=1, eval_max_new_tokens=3)
    report = latent.run(config)
    out = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "report.json", "report.md", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "student" / "config.json").is_file() and (out / "student" / "projectors.pt").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {
        "projection",
        "steps",
        "layer_map",
        "sigmas",
        "final",
        "tokens_per_s_median",
        "heldout_perplexity",
        "heldout_nll_ci95",
        "freetext_perplexity",
        "freetext_nll_ci95",
        "logic",
        "peak_memory",
        "config",
    } <= set(saved)
    assert saved["steps"] == 4 and saved["heldout_perplexity"] > 1
    assert saved["freetext_perplexity"] > 1 and saved["freetext_passages"] == 2
    assert "free-text perplexity" in (out / "report.md").read_text()
    assert saved["logic"]["n"] >= 1 and 0 <= saved["logic"]["overall"] <= 1
    sigmas = saved["sigmas"]
    assert all(v["sigma"] == pytest.approx(1.0 / v["median_norm"]) for v in sigmas.values())
    assert all(v["linear_input_scale"] == pytest.approx(32**0.5 / v["median_norm"]) for v in sigmas.values())
    with pytest.raises(FileExistsError, match="--overwrite"):
        latent.run(config)
    control = latent.run(replace(config, projection="none", overwrite=True, eval_problems_per_task=0))
    assert control["final"]["mse"] == 0 and control["projection"] == "none"
    with pytest.raises(ValueError, match="projection"):
        latent.run(replace(config, projection="cubic", overwrite=True))


def test_latent_memory_bench_arithmetic(tmp_path):
    from bench import latent_memory

    a = latent_memory.arithmetic(latent_memory.SEED_SHAPE, 8192)
    assert 1.4e9 < a["params"] < 1.7e9
    assert a["total_gib"] == pytest.approx(sum(a["parts_gib"].values()))
    out = tmp_path / "latent_memory.jsonl"
    latent_memory.main(["--out", str(out)])
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["kind"] == ("arithmetic, not measured" if not torch.cuda.is_available() else row["kind"])
    assert row["shape"]["teacher_d"] == 8192 and row["shape"]["student_d"] == 1536


def test_tokenizer_name_alone_is_not_a_mismatch(tiny, tmp_path):
    out = _cache(tiny, tmp_path / "c")
    fingerprint = dict(latents.read_manifest(out)["tokenizer"], name="/elsewhere/same-tokenizer")
    latents.LatentReader(out, expect={"tokenizer": fingerprint})


def test_default_data_mixes_logic_solutions_and_freetext_continuations(tiny, tmp_path):
    from cdm_fast import freetext
    from cdm_fast.logic import suite

    out = _cache(
        tiny,
        tmp_path / "c",
        data=None,
        default_problems_per_task=1,
        default_max_new_tokens=2,
        default_freetext=3,
        default_freetext_max_new_tokens=5,
        max_length=64,
        shard_sequences=16,
    )
    texts = latents.read_texts(out / "data.jsonl")
    prompts = freetext.prompts("train", 3)
    free = [t for t in texts if any(t.startswith(p) for p in prompts)]
    assert len(texts) == len(suite.DEFAULT_TASKS) + 3 and len(free) == 3
    assert all(len(t) > len(p) for t, p in zip(free, prompts, strict=True))  # a continuation was added
    positions = [texts.index(t) for t in free]
    assert positions[0] > 0 and positions[-1] < len(texts) - 1  # interleaved, not appended
    assert not any(passage[:80] in text for passage in freetext.passages("eval") for text in texts)
    assert latents.read_manifest(out)["num_sequences"] == len(texts)


def test_device_map_reaches_the_teacher_loader(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    with_map = latents.LatentReader(_cache(tiny, tmp_path / "auto", device_map="auto"))
    assert seen == ["auto"]
    plain = latents.LatentReader(_cache(tiny, tmp_path / "plain"))
    for (ids_a, rows_a), (ids_b, rows_b) in zip(with_map.sequences(), plain.sequences(), strict=True):
        assert torch.equal(ids_a, ids_b)
        assert all(torch.equal(rows_a[layer], rows_b[layer]) for layer in rows_a)
    with pytest.raises(ValueError, match="device_map"):
        latents.load_teacher(
            replace(latents.CacheLatentsConfig(), device_map="auto"), latent.Context(rank=0, world_size=2)
        )


def test_lora_student_changes_only_lora_and_projector_params(tiny, tmp_path):
    from cdm_fast import models

    config = _distill_config(tiny, tmp_path / "lora", max_steps=2, student_lora_rank=4)
    report = latent.run(config)
    teacher, _ = models.load(tiny["teacher"])
    base = latent.build_student(config, teacher.config, teacher.get_input_embeddings().weight.detach())
    state = torch.load(tmp_path / "lora" / "checkpoint.pt", weights_only=False)
    lora_keys = [k for k in state["student"] if "lora_" in k]
    assert lora_keys and any("mlp.down_proj" in k for k in lora_keys)
    assert not any("lm_head.lora" in k or "embed_tokens.lora" in k for k in lora_keys)
    initial = {k: v for k, v in base.state_dict().items()}
    for key, value in state["student"].items():
        if "lora_" in key:
            continue
        name = key.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, initial[name]), key
    assert any(state["student"][k].abs().sum() > 0 for k in lora_keys if "lora_B" in k)  # B starts at 0
    assert report["trainable_parameters"] < sum(v.numel() for v in initial.values())
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "student" / "config.json").is_file()
    setup = json.loads((tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()[0])
    assert "patched" in setup["patch_peft"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, cache_config, distill_config) -> None:
    import os

    from cdm_fast.distill import distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    try:
        latents.run(cache_config)
        report = latent.run(distill_config)
        assert report["steps"] == distill_config.max_steps  # every rank gets rank 0's report
    finally:
        distributed.shutdown()


def test_two_process_gloo_run_equals_one_process_with_the_same_global_batch(tiny, tmp_path):
    import torch.multiprocessing as mp

    cache_config = latents.CacheLatentsConfig(
        teacher=tiny["teacher"],
        out=str(tmp_path / "cache2"),
        data=tiny["data"],
        layers=(1, 2, 3),
        batch_size=1,
        shard_sequences=2,  # 6 shards: ranks 0 and 1 write 3 each
        progress=False,
    )
    # 9 training sequences in global batches of 4: steps see 4, 4 and 1 rows (rank 1 has none in step 3).
    # The evaluation is sharded too: 3 free-text passages and 7 logic problems over 2 ranks.
    distill_config = _distill_config(
        tiny,
        tmp_path / "two",
        cache=cache_config.out,
        batch_size=4,
        max_steps=3,
        eval_freetext_passages=3,
        eval_problems_per_task=1,
        eval_max_new_tokens=4,
    )
    mp.spawn(_ddp_worker, args=(2, _free_port(), cache_config, distill_config), nprocs=2, join=True)

    two, one = tmp_path / "two", tmp_path / "one"
    for name in ("report.json", "report.md", "metrics.jsonl", "checkpoint.pt", "loss.png"):
        assert (two / name).is_file(), name
    single_cache = latents.run(replace(cache_config, out=str(tmp_path / "cache1")))
    a, b = latents.LatentReader(cache_config.out), latents.LatentReader(single_cache)
    assert a.manifest["shards"] == b.manifest["shards"] and len(a.manifest["shards"]) == 6
    for (ids_a, rows_a), (ids_b, rows_b) in zip(a.sequences(), b.sequences(), strict=True):
        assert torch.equal(ids_a, ids_b) and all(torch.equal(rows_a[k], rows_b[k]) for k in rows_a)

    latent.run(replace(distill_config, out=str(one)))
    state_two = torch.load(two / "checkpoint.pt", weights_only=False)
    state_one = torch.load(one / "checkpoint.pt", weights_only=False)
    start = latent.build_student(distill_config, _teacher_config(tiny), None).state_dict()
    for part in ("student", "projectors"):
        for key, value in state_one[part].items():
            # fp32 summation order differs (per-rank sums + all-reduce); AdamW's first steps move each
            # weight by about lr = 1e-3, so 1e-5 is a hundredth of a step.
            assert torch.allclose(state_two[part][key], value, rtol=1e-4, atol=1e-5), (part, key)
    moved = max(
        (state_one["student"][k] - start[k]).abs().max()
        for k in start
        if "embed" not in k and "lm_head" not in k
    )
    assert moved > 1e-4  # the comparison is not between two untrained students
    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["world_size"] == 2 and rows_one[0]["world_size"] == 1
    train_two = [r for r in rows if r["event"] == "train"]
    train_one = [r for r in rows_one if r["event"] == "train"]
    assert [sorted(r) for r in train_two] == [sorted(r) for r in train_one]
    for r2, r1 in zip(train_two, train_one, strict=True):
        assert r2["tokens"] == r1["tokens"]
        for key in ("loss", "ce", "mse"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    (eval_two,) = [r for r in rows if r["event"] == "eval"]
    (eval_one,) = [r for r in rows_one if r["event"] == "eval"]
    for part, key in (("heldout", "per_sequence_nll"), ("freetext", "per_passage_nll")):
        assert len(eval_two[part][key]) == len(eval_one[part][key]) > 0, part
        assert eval_two[part][key] == pytest.approx(eval_one[part][key], rel=1e-4), part
    assert eval_two["freetext"]["tokens"] == eval_one["freetext"]["tokens"]
    # Greedy decoding of two students equal to ~1e-5 may still part on a near tie: compare what was scored.
    assert eval_two["logic"]["n"] == eval_one["logic"]["n"] == 7
    assert list(eval_two["logic"]["accuracy"]) == list(eval_one["logic"]["accuracy"])


def _teacher_config(tiny):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny["teacher"])
