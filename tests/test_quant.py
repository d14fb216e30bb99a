"""cdm_fast.quant: the package's reading of a bitsandbytes 4-bit weight matches bitsandbytes bit for bit."""

from __future__ import annotations

import pytest
import torch

from cdm_fast import quant

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(53, 45), (1, 1), (7, 3), (64, 96), (3, 50)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    # bitsandbytes' torch fallback (odd in_features on the CPU) is wrapped in torch.compile; compiling it per
    # shape and dtype would take minutes and computes the same products, so run it eagerly.
    with torch.compiler.set_stance("force_eager"):
        yield


def _quantized(shape, dtype, quant_type, blocksize, double_quant):
    weight = torch.randn(shape, dtype=dtype) * 0.1
    return functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def _packed_with_state(codes, state):
    codes.quant_state = state
    return codes


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact_against_bitsandbytes_odd_shapes_all_dtypes(quant_type, blocksize, double_quant):
    torch.manual_seed(blocksize)
    for shape in SHAPES:
        for dtype in DTYPES:
            codes, state = _quantized(shape, dtype, quant_type, blocksize, double_quant)
            expected = functional.dequantize_4bit(codes, state)
            weight = quant.from_bitsandbytes(_packed_with_state(codes, state))
            assert weight.shape == shape and weight.dtype == dtype and weight.double_quant == double_quant
            got = quant.dequantize(weight)
            assert got.dtype == dtype and got.shape == shape
            assert torch.equal(got, expected), (shape, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_absmax_resolves_double_quant_bit_exact(quant_type):
    torch.manual_seed(1)
    codes, state = _quantized((300, 130), torch.bfloat16, quant_type, 64, True)
    expected = functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    weight = quant.from_bitsandbytes(_packed_with_state(codes, state))
    assert weight.absmax.dtype == torch.uint8 and weight.nested_code.shape == (256,)
    assert weight.nested_blocksize == 256 and weight.nested_absmax.numel() == -(-weight.num_blocks // 256)
    assert torch.equal(quant.dequantize_absmax(weight), expected)


def test_code_book_is_bitsandbytes_table():
    for quant_type in quant.QUANT_TYPES:
        assert torch.equal(quant.code_book(quant_type), functional.get_4bit_type(quant_type, device="cpu"))


def test_nibble_order_high_first_along_flat_row_major_index():
    # Codes set by hand: weight (3, 3) row-major, element f is the high nibble of byte f // 2 when f is even.
    codes, state = _quantized((3, 3), torch.float32, "nf4", 64, False)
    nibbles = torch.tensor([15, 0, 7, 1, 2, 3, 4, 5, 6])
    codes.view(-1).copy_(torch.tensor([15 << 4 | 0, 7 << 4 | 1, 2 << 4 | 3, 4 << 4 | 5, 6 << 4 | 0]))
    weight = quant.from_bitsandbytes(_packed_with_state(codes, state))
    expected = (quant.code_book("nf4")[nibbles] * state.absmax[0]).reshape(3, 3)
    assert torch.equal(quant.dequantize(weight), expected)
    assert torch.equal(functional.dequantize_4bit(codes, state), expected)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_params4bit_quantised_on_cpu(quant_type, double_quant):
    torch.manual_seed(2)
    dense = torch.randn(37, 70, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(
        70,
        37,
        bias=False,
        compute_dtype=torch.bfloat16,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.weight = bnb.nn.Params4bit(
        dense, requires_grad=False, quant_type=quant_type, blocksize=128, compress_statistics=double_quant
    )
    layer = layer.to("cpu")  # Params4bit.to quantises on first move to a device
    assert quant.is_4bit(layer.weight) and layer.weight.quant_state is not None
    weight = quant.from_bitsandbytes(layer.weight)
    assert (weight.out_features, weight.in_features, weight.blocksize) == (37, 70, 128)
    assert weight.device.type == "cpu" and weight.quant_type == quant_type
    expected = functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(quant.dequantize(weight), expected)
    assert (quant.dequantize(weight, torch.float32).to(torch.bfloat16) - dense).abs().max() < 0.5


def test_params4bit_with_non_uint8_quant_storage_reads_the_same_bytes():
    torch.manual_seed(3)
    dense = torch.randn(16, 64)
    param = bnb.nn.Params4bit(dense, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    assert param.dtype == torch.bfloat16 and quant.is_4bit(param)
    expected = functional.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(quant.dequantize(quant.from_bitsandbytes(param)), expected)


def test_is_4bit_false_for_plain_tensors():
    assert not quant.is_4bit(torch.zeros(4, 4))
    assert not quant.is_4bit(torch.zeros(4, dtype=torch.uint8))
    assert not quant.is_4bit(torch.nn.Parameter(torch.zeros(2, 2)))
    assert not quant.is_4bit(None)
    assert quant.is_4bit(bnb.nn.Params4bit(torch.zeros(2, 2)))


def _bad_weight(mutate):
    codes, state = _quantized((8, 64), torch.float32, "nf4", 64, True)
    return mutate(codes, state)


def _raises_naming_weight(weight, match):
    with pytest.raises(ValueError, match=f"^weight: .*{match}"):
        quant.from_bitsandbytes(weight)


def test_bad_inputs_raise_naming_weight():
    _raises_naming_weight(torch.zeros(4, dtype=torch.uint8), "quant_state")
    _raises_naming_weight(bnb.nn.Params4bit(torch.zeros(2, 2)), "quant_state")

    def set_state(**changes):
        def mutate(codes, state):
            for name, value in changes.items():
                setattr(state, name, value)
            return _packed_with_state(codes, state)

        return mutate

    _raises_naming_weight(_bad_weight(set_state(quant_type="int4")), "quant_type")
    _raises_naming_weight(_bad_weight(set_state(blocksize=48)), "blocksize")
    _raises_naming_weight(_bad_weight(set_state(packing_format_for_cpu=True)), "packing_format_for_cpu")
    _raises_naming_weight(_bad_weight(set_state(shape=torch.Size([8, 64, 1]))), "2-d")
    _raises_naming_weight(_bad_weight(set_state(shape=torch.Size([8, 66]))), "bytes of packed codes")
    _raises_naming_weight(_bad_weight(set_state(code=quant.code_book("fp4"))), "nf4 table")
    _raises_naming_weight(_bad_weight(lambda codes, state: _packed_with_state(codes[:-2], state)), "bytes")
    _raises_naming_weight(_bad_weight(set_state(absmax=torch.zeros(3, dtype=torch.uint8))), "absmax blocks")

    def nested_on_meta(codes, state):
        state.state2.absmax = state.state2.absmax.to("meta")
        return _packed_with_state(codes, state)

    _raises_naming_weight(_bad_weight(nested_on_meta), "meta")


def test_cpu_repacked_weight_refused():
    codes, state = _quantized((64, 128), torch.bfloat16, "nf4", 64, False)
    packed, packed_state = functional._convert_weight_packed_for_cpu(codes, state)
    _raises_naming_weight(_packed_with_state(packed, packed_state), "AVX512")
