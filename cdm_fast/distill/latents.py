"""`cache-latents`: run a teacher once, store chosen layers' hidden states per token, stream them back.

Layout of a cache folder (`CacheLatentsConfig.out`):
- `data.jsonl`: the texts that were cached, one `{"text": ...}` per line. The default data is generated once
  and kept here (a resumed run reuses it): logic-suite prompts (split "train") with the teacher's greedy
  solutions, interleaved with a free-text set, the teacher's greedy continuations of
  `cdm_fast.freetext.prompts("train", default_freetext)` (no_repeat_ngram_size 4, so a small teacher does
  not loop). The free-text "eval" passages are never cached: latent-distill measures perplexity on them.
- `manifest.json`: teacher id, layers, dtype, d_model, tokenizer (name, vocab size, sha256 of the vocab),
  data hash (sha256 of data.jsonl), max_length, shard size, and once finished `complete: true` with the
  shards (file, first sequence, sequences, tokens). Written atomically (tmp + os.replace).
- `shard-NNNNN.safetensors`: whole sequences; `input_ids` (N,) int64 of the non-pad tokens, `offsets`
  (S+1,) int64 (sequence i is tokens offsets[i]:offsets[i+1]), and for each layer l `latent.l` (N, d):
  e4m3 codes with `scale.l` (N, 1) fp32 (one scale per token row: amax/448, `cdm_fast.float8`), or bf16.
  Shards are written to a temporary name and renamed, so a shard file that exists is complete; a resumed
  run skips them.

Scale-out: under `torchrun --nproc-per-node N` (`cdm_fast.distill.distributed`) the default data's generation
is sharded over the ranks and gathered in order, rank r writes the shards whose index ≡ r (mod N), and rank
0 alone writes data.jsonl and the manifest (after a barrier, once every shard exists). Resuming works the
same way: a rank skips its shards that exist.

Big teachers: `device_map` (e.g. "auto") is passed to `from_pretrained`, which places the layers over the
visible devices (accelerate); a single process only, since it already spans every device.

Layer index l is an index into HF `output_hidden_states`: 0 is the embedding output, l in 1..L the output
of block l (for HF Llama the last one, L, already has the final norm applied).

Storage error: fp8 e4m3 has 3 mantissa bits, so with row-wise scaling every element is within a relative
2^-4 of its value (round to nearest) unless it falls in e4m3's subnormal range (|x| < 2^-6 · scale), where
the absolute error is at most 2^-10 · scale; bf16 storage of a bf16 value is exact (of an fp32 one, a
relative 2^-9).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from cdm_fast.distill import distributed
from cdm_fast.distill.distributed import Context
from cdm_fast.float8 import dequantize_rowwise, quantize_rowwise

FORMAT = "cdm_fast.latents/1"
DTYPES = ("fp8", "bf16")
# Fields a reader compares against `expect`; the others (shards, counts) describe the data.
IDENTITY_FIELDS = ("format", "teacher", "layers", "dtype", "d_model", "tokenizer", "data_hash", "max_length")


@dataclass
class CacheLatentsConfig:
    teacher: str = "smollm2-135m"
    out: str = "runs/latent-cache"
    data: str | None = None  # JSONL with a "text" field (or "prompt" + optional "completion"); None: default
    layers: tuple[int, ...] | None = None  # hidden_states indices; None: 5 evenly spaced in 1..L-1
    dtype: str = "fp8"
    max_length: int = 320
    batch_size: int = 4
    shard_sequences: int = 64
    # Default data: logic-suite problems (split "train") with the teacher's greedy solutions.
    # Small on purpose: the bare `latent-distill` must run on 2 CPU cores in minutes (zero-shot prompts are
    # ~80 tokens; the few-shot ones ~370).
    default_problems_per_task: int = 2
    default_num_shots: int = 0
    default_max_new_tokens: int = 24
    default_freetext: int = 8  # free-text prompts the teacher continues (0: logic only)
    default_freetext_max_new_tokens: int = 48
    generation_batch_size: int = 8
    device_map: str | None = None  # e.g. "auto": passed to from_pretrained (big teachers over several GPUs)
    seed: int = 0
    progress: bool = True


# ---------------------------------------------------------------- small helpers


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def default_layers(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """`count` evenly spaced hidden_states indices in 1..L-1 (the last, normed one, left out)."""
    if num_layers < 2:
        return (num_layers,)
    count = min(count, num_layers - 1)
    return tuple(sorted({max(1, round(k * num_layers / (count + 1))) for k in range(1, count + 1)}))


def validate_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    layers = tuple(int(layer) for layer in layers)
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= layer <= num_layers for layer in layers):
        raise ValueError(
            f"layers: expected distinct hidden_states indices in 0..{num_layers} (0 = embeddings), "
            f"got {list(layers)}"
        )
    return tuple(sorted(layers))


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Name, vocab size and sha256 of the sorted (token, id) pairs: two tokenizers agree iff these do."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {
        "name": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(vocab),
        "vocab_sha256": digest,
    }


def teacher_id(name_or_path: str) -> str:
    """The embedded name as is; a folder by its resolved path's last component plus its config hash."""
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
        return f"{path.resolve().name}@{digest}"
    return str(name_or_path)


def read_texts(path: str | Path) -> list[str]:
    texts = []
    with Path(path).open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" in record:
                texts.append(record["text"])
            elif "prompt" in record:
                texts.append(record["prompt"] + record.get("completion", ""))
            else:
                raise ValueError(f"data: line {number} of {path} has neither 'text' nor 'prompt'")
    if not texts:
        raise ValueError(f"data: expected at least one text in {path}, got none")
    return texts


def load_teacher(config: CacheLatentsConfig, context: Context):
    """(model, tokenizer) from `cdm_fast.models.load`, on this rank's device or spread by `device_map`."""
    from cdm_fast import models

    distributed.check_device_map(config.device_map, context)
    return models.load(config.teacher, device=context.device, device_map=config.device_map)


def _interleave(first: list[str], second: list[str]) -> list[str]:
    """Both lists merged by relative position, so any contiguous slice (the held-out tail) mixes them."""
    keyed = [((i + 0.5) / len(first), 0, t) for i, t in enumerate(first)]
    keyed += [((i + 0.5) / len(second), 1, t) for i, t in enumerate(second)]
    return [t for _, _, t in sorted(keyed, key=lambda k: (k[0], k[1]))]


@torch.no_grad()
def freetext_continuations(model: Any, tokenizer: Any, prompts: list[str], config: CacheLatentsConfig):
    """Each prompt followed by the teacher's greedy continuation (no_repeat_ngram_size 4)."""
    device = model.get_input_embeddings().weight.device  # the first layer's, under a device_map
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts = []
    try:
        for start in range(0, len(prompts), config.generation_batch_size):
            chunk = prompts[start : start + config.generation_batch_size]
            encoded = tokenizer(chunk, return_tensors="pt", padding=True)
            output = model.generate(
                input_ids=encoded["input_ids"].to(device),
                attention_mask=encoded["attention_mask"].to(device),
                max_new_tokens=config.default_freetext_max_new_tokens,
                do_sample=False,
                no_repeat_ngram_size=4,
                pad_token_id=tokenizer.pad_token_id,
            )
            new = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            texts += [prompt + continuation for prompt, continuation in zip(chunk, new, strict=True)]
    finally:
        tokenizer.padding_side = padding_side
    return texts


def default_texts(model: Any, tokenizer: Any, config: CacheLatentsConfig, context: Context | None = None):
    """Logic-suite problems (split "train", every task, interleaved), each followed by the teacher's greedy
    solution (cut where it starts a new "Question:"), interleaved with `default_freetext` free-text prompts
    and their greedy continuations. Generation is sharded over the ranks; every rank returns all texts."""
    from cdm_fast import freetext
    from cdm_fast.logic import evaluate, generate

    context = context or Context()

    drawn = generate(
        config.default_problems_per_task, seed=config.seed, split="train", num_shots=config.default_num_shots
    )
    # Interleave the tasks (round robin) so any contiguous slice, e.g. the held-out tail, mixes them.
    position = {id(p): i for i, p in enumerate(drawn)}
    rank = {id(p): sum(q.task == p.task for q in drawn[: position[id(p)]]) for p in drawn}
    problems = sorted(drawn, key=lambda p: (rank[id(p)], position[id(p)]))
    mine = distributed.shard(problems, context)
    rows = []
    if mine:
        rows = evaluate(
            model,
            tokenizer,
            mine,
            batch_size=config.generation_batch_size,
            max_new_tokens=config.default_max_new_tokens,
            progress=config.progress and context.is_main,
        )["results"]
    logic = [
        problem.prompt(tokenizer) + re.split(r"\n\s*Question:", row["completion"], maxsplit=1)[0].rstrip()
        for problem, row in zip(mine, rows, strict=True)
    ]
    logic = distributed.gather(logic, len(problems), context)
    if config.default_freetext < 1:
        return logic
    prompts = freetext.prompts("train", config.default_freetext)
    free = freetext_continuations(model, tokenizer, distributed.shard(prompts, context), config)
    return _interleave(logic, distributed.gather(free, len(prompts), context))


def _data_file(config: CacheLatentsConfig, out: Path, model: Any, tokenizer: Any, context: Context) -> Path:
    """data.jsonl, written by rank 0 (generated by every rank) when missing."""
    path = out / "data.jsonl"
    if distributed.broadcast(path.exists(), context):
        return path
    texts = read_texts(config.data) if config.data else default_texts(model, tokenizer, config, context)
    if context.is_main:
        lines = "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts)
        atomic_write_bytes(path, lines.encode())
    distributed.barrier(context)
    return path


# ---------------------------------------------------------------- writer


def encode(hidden: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """(N, d) hidden states → {"latent": codes or bf16, "scale": (N, 1) fp32 for fp8}."""
    if dtype == "fp8":
        codes, scale = quantize_rowwise(hidden, dim=-1)
        return {"latent": codes.contiguous(), "scale": scale.float().contiguous()}
    return {"latent": hidden.to(torch.bfloat16).contiguous()}


def decode(latent: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if latent.dtype == torch.float8_e4m3fn:
        if scale is None:
            raise ValueError("scale: expected row scales for fp8 latents, got none")
        return dequantize_rowwise(latent, scale, torch.float32).to(dtype)
    return latent.to(dtype)


@torch.no_grad()
def _shard_tensors(model, tokenizer, texts, layers, config) -> dict[str, torch.Tensor]:
    ids, lengths = [], []
    parts: dict[int, list[dict[str, torch.Tensor]]] = {layer: [] for layer in layers}
    device = model.get_input_embeddings().weight.device  # the first layer's, under a device_map
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), config.batch_size):
            batch = tokenizer(
                texts[start : start + config.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=config.max_length,
            )
            mask = batch["attention_mask"].bool()
            output = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                output_hidden_states=True,
            )
            for row in range(mask.shape[0]):
                ids.append(batch["input_ids"][row][mask[row]])
                lengths.append(int(mask[row].sum()))
            for layer in layers:
                hidden = output.hidden_states[layer]
                parts[layer].append(encode(hidden[mask.to(hidden.device)].float().cpu(), config.dtype))
    finally:
        tokenizer.padding_side = padding_side
    tensors = {
        "input_ids": torch.cat(ids).long(),
        "offsets": torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long),
    }
    for layer in layers:
        tensors[f"latent.{layer}"] = torch.cat([p["latent"] for p in parts[layer]])
        if config.dtype == "fp8":
            tensors[f"scale.{layer}"] = torch.cat([p["scale"] for p in parts[layer]])
    return tensors


def _identity(key: str, value: Any) -> Any:
    """A manifest value as compared: a tokenizer by its vocabulary, not by its (path) name."""
    if key == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "name"}
    return value


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(config: CacheLatentsConfig) -> Path:
    """Write (or finish) the cache in `config.out`; returns the folder. Complete shards are skipped.

    Under torchrun every rank calls this; see the module docstring for who writes what."""
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {config.dtype!r}")
    for name in ("max_length", "batch_size", "shard_sequences"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected >= 1, got {getattr(config, name)}")
    context = distributed.setup()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_teacher(config, context)
    num_layers = model.config.num_hidden_layers
    layers = validate_layers(config.layers, num_layers) if config.layers else default_layers(num_layers)
    data_path = _data_file(config, out, model, tokenizer, context)
    texts = read_texts(data_path)
    identity = {
        "format": FORMAT,
        "teacher": teacher_id(config.teacher),
        "layers": list(layers),
        "dtype": config.dtype,
        "d_model": int(model.config.hidden_size),
        "num_layers": int(num_layers),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data_hash": hashlib.sha256(data_path.read_bytes()).hexdigest(),
        "max_length": config.max_length,
        "shard_sequences": config.shard_sequences,
        "num_sequences": len(texts),
    }
    manifest_path = out / "manifest.json"
    previous = distributed.broadcast(
        json.loads(manifest_path.read_text()) if manifest_path.exists() else None, context
    )
    if previous is not None:
        differing = sorted(k for k in identity if _identity(k, previous.get(k)) != _identity(k, identity[k]))
        if differing:
            raise ValueError(
                f"out: {out} holds a cache with different {differing}; choose another --out or delete it"
            )
        if previous.get("complete"):
            return out
    if context.is_main:
        atomic_write_json(manifest_path, {**identity, "complete": False, "config": asdict(config)})
    starts = list(range(0, len(texts), config.shard_sequences))
    mine = [index for index in range(len(starts)) if index % context.world_size == context.rank]
    total = sum(len(texts[starts[i] : starts[i] + config.shard_sequences]) for i in mine)
    bar = tqdm(
        total=total, desc="cache-latents", unit="seq", disable=not (config.progress and context.is_main)
    )
    with bar:
        for index in mine:
            chunk = texts[starts[index] : starts[index] + config.shard_sequences]
            path = out / shard_name(index)
            if not path.exists():
                _write_shard(path, _shard_tensors(model, tokenizer, chunk, layers, config))
            bar.update(len(chunk))
    distributed.barrier(context)
    if context.is_main:
        shards = []
        for index, start in enumerate(starts):
            with safe_open(out / shard_name(index), framework="pt") as handle:
                tokens = int(handle.get_tensor("offsets")[-1])
            shards.append(
                {
                    "file": shard_name(index),
                    "first_sequence": start,
                    "sequences": len(texts[start : start + config.shard_sequences]),
                    "tokens": tokens,
                }
            )
        manifest = {
            **identity,
            "complete": True,
            "config": asdict(config),
            "shards": shards,
            "num_tokens": sum(s["tokens"] for s in shards),
        }
        atomic_write_json(manifest_path, manifest)
    distributed.barrier(context)
    return out


# ---------------------------------------------------------------- reader


def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
    path = Path(cache_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"cache_dir: expected a latent cache with manifest.json, got {cache_dir}")
    return json.loads(path.read_text())


def check_manifest(manifest: Mapping[str, Any], expect: Mapping[str, Any] | None) -> None:
    """ValueError listing every field of `expect` the manifest disagrees with (expected vs found)."""
    if not manifest.get("complete"):
        raise ValueError("cache_dir: the cache is incomplete; run cache-latents again to finish it")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"cache_dir: expected format {FORMAT!r}, got {manifest.get('format')!r}")
    problems = []
    for key, wanted in (expect or {}).items():
        found = manifest.get(key)
        if key == "layers":
            missing = sorted(set(wanted) - set(found or []))
            if missing:
                problems.append(f"layers: expected {sorted(wanted)} among the cached, cache has {found}")
        elif key == "tokenizer":  # the name is informative (a path); the vocabulary decides
            fields = ("vocab_size", "vocab_sha256")
            if any((found or {}).get(f) != wanted.get(f) for f in fields):
                problems.append(
                    f"tokenizer: expected {[wanted.get(f) for f in fields]}, "
                    f"cache has {[(found or {}).get(f) for f in fields]} (vocab size, vocab sha256)"
                )
        elif found != wanted:
            problems.append(f"{key}: expected {wanted!r}, cache has {found!r}")
    if problems:
        raise ValueError("cache_dir: the latent cache does not match this run: " + "; ".join(problems))


class LatentReader:
    """Streams a cache as padded batches of whole sequences, one shard in memory (plus one prefetched).

    Each batch: `input_ids` (B, T) int64 (right-padded with `pad_id`), `attention_mask` (B, T) int64, and
    `latents` {layer: (B, T, d) in `dtype`, zeros at padding}. Sequences [start, stop) in cache order.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        expect: Mapping[str, Any] | None = None,
        *,
        batch_size: int = 4,
        layers: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        start: int = 0,
        stop: int | None = None,
        pad_id: int = 0,
        prefetch: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.manifest = read_manifest(cache_dir)
        check_manifest(self.manifest, expect)
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        cached = self.manifest["layers"]
        self.layers = tuple(cached if layers is None else layers)
        if any(layer not in cached for layer in self.layers):
            raise ValueError(f"layers: expected a subset of the cached {cached}, got {list(self.layers)}")
        total = self.manifest["num_sequences"]
        stop = total if stop is None else stop
        if not 0 <= start < stop <= total:
            raise ValueError(f"start, stop: expected 0 <= start < stop <= {total}, got {start}, {stop}")
        self.batch_size, self.dtype, self.start, self.stop = batch_size, dtype, start, stop
        self.pad_id, self.prefetch = pad_id, prefetch
        self.d_model = self.manifest["d_model"]

    @property
    def num_sequences(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        return -(-self.num_sequences // self.batch_size)

    def _shards(self) -> list[dict[str, Any]]:
        return [
            s
            for s in self.manifest["shards"]
            if s["first_sequence"] < self.stop and s["first_sequence"] + s["sequences"] > self.start
        ]

    def _load(self, shard: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return load_file(self.cache_dir / shard["file"])

    def _loaded(self) -> Iterator[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        shards = self._shards()
        if not self.prefetch:
            for shard in shards:
                yield shard, self._load(shard)
            return
        slot: dict[str, Any] = {}

        def fetch(shard):
            try:
                slot["data"] = self._load(shard)
            except BaseException as error:  # re-raised in the consumer
                slot["error"] = error

        thread = None
        for position, shard in enumerate(shards):
            if thread is None:
                fetch(shard)
            else:
                thread.join()
            if "error" in slot:
                raise slot.pop("error")
            data = slot.pop("data")
            thread = None
            if position + 1 < len(shards):
                thread = threading.Thread(target=fetch, args=(shards[position + 1],), daemon=True)
                thread.start()
            yield shard, data

    def sequences(self) -> Iterator[tuple[torch.Tensor, dict[int, torch.Tensor]]]:
        """(input_ids (T,), {layer: (T, d) in dtype}) for every sequence in [start, stop)."""
        for shard, data in self._loaded():
            offsets = data["offsets"].tolist()
            for local in range(shard["sequences"]):
                index = shard["first_sequence"] + local
                if not self.start <= index < self.stop:
                    continue
                a, b = offsets[local], offsets[local + 1]
                latents = {
                    layer: decode(
                        data[f"latent.{layer}"][a:b],
                        data[f"scale.{layer}"][a:b] if f"scale.{layer}" in data else None,
                        self.dtype,
                    )
                    for layer in self.layers
                }
                yield data["input_ids"][a:b], latents

    def collate(self, items: Sequence[tuple[torch.Tensor, dict[int, torch.Tensor]]]) -> dict[str, Any]:
        length = max(ids.shape[0] for ids, _ in items)
        input_ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        latents = {
            layer: torch.zeros(len(items), length, self.d_model, dtype=self.dtype) for layer in self.layers
        }
        for row, (ids, rows) in enumerate(items):
            n = ids.shape[0]
            input_ids[row, :n], mask[row, :n] = ids, 1
            for layer in self.layers:
                latents[layer][row, :n] = rows[layer]
        return {"input_ids": input_ids, "attention_mask": mask, "latents": latents}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        items = []
        for item in self.sequences():
            items.append(item)
            if len(items) == self.batch_size:
                yield self.collate(items)
                items = []
        if items:
            yield self.collate(items)
