"""cdm_fast.quant: the package's reading of a bitsandbytes 4-bit weight matches bitsandbytes bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import absmax_float32, dequantize_4bit_float64, rel_error

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
def test_dequantize_bit_exact_against_float64_from_the_codes_odd_shapes_all_dtypes(
    quant_type, blocksize, double_quant
):
    torch.manual_seed(blocksize)
    for shape in SHAPES:
        for dtype in DTYPES:
            codes, state = _quantized(shape, dtype, quant_type, blocksize, double_quant)
            expected = dequantize_4bit_float64(codes, state).float().to(dtype)
            weight = quant.from_bitsandbytes(_packed_with_state(codes, state))
            assert weight.shape == shape and weight.dtype == dtype and weight.double_quant == double_quant
            got = quant.dequantize(weight)
            assert got.dtype == dtype and got.shape == shape
            assert torch.equal(got, expected), (shape, dtype)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact_against_bitsandbytes_where_blocksize_divides_in(quant_type, double_quant):
    torch.manual_seed(5)
    for blocksize in (32, 64, 128):
        for shape in [(3, 4 * blocksize), (33, blocksize), (5, 2 * blocksize)]:
            for dtype in DTYPES:
                codes, state = _quantized(shape, dtype, quant_type, blocksize, double_quant)
                expected = functional.dequantize_4bit(codes, state)
                got = quant.dequantize(quant.from_bitsandbytes(_packed_with_state(codes, state)))
                assert torch.equal(got, expected), (blocksize, shape, dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_cpu_dequantize_is_ours_or_misplaces_blocks_that_cross_a_row_end(quant_type):
    # bitsandbytes 0.50's C kernel on AVX512 CPUs reads element (row, col) with absmax[row · (in // blocksize)
    # + col // blocksize]: right only when blocksize divides in (README). Elsewhere it agrees with us.
    torch.manual_seed(6)
    for shape, blocksize in [((64, 96), 64), ((3, 32), 64), ((6, 160), 64), ((5, 128), 256)]:
        codes, state = _quantized(shape, torch.float32, quant_type, blocksize, False)
        got = functional.dequantize_4bit(codes, state)
        ours = quant.dequantize(quant.from_bitsandbytes(_packed_with_state(codes, state)))
        if torch.equal(got, ours):
            continue
        rows, cols = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
        misread_block = rows * (shape[1] // blocksize) + cols // blocksize
        packed = codes.view(torch.uint8).reshape(-1).long()
        nibbles = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[: rows.numel()].reshape(shape)
        misread = functional.get_4bit_type(quant_type, device="cpu")[nibbles] * state.absmax[misread_block]
        assert torch.equal(got, misread), (shape, blocksize)


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


def _cpu_repacked(codes, state):
    """bitsandbytes' own CPU repack (plain torch, so it runs on any CPU) of copies of codes and state."""
    return functional._convert_weight_packed_for_cpu(codes.clone(), copy.deepcopy(state))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cpu_repacked_weight_reads_as_its_codes_with_bf16_rounded_scales(quant_type, double_quant):
    torch.manual_seed(7)
    for shape, blocksize in [((32, 64), 64), ((64, 128), 32), ((96, 256), 128)]:
        codes, state = _quantized(shape, torch.float32, quant_type, blocksize, double_quant)
        packed, packed_state = _cpu_repacked(codes, state)
        assert packed_state.packing_format_for_cpu and packed.shape == (shape[0], shape[1] // 2)
        weight = quant.from_bitsandbytes(_packed_with_state(packed, packed_state))
        assert torch.equal(weight.codes, codes.view(torch.uint8).reshape(-1))
        assert weight.dtype == torch.bfloat16 and not weight.double_quant
        # The same codes in the standard layout with the scales rounded to bf16, as the repack stores them.
        standard = copy.deepcopy(state)
        standard.absmax, standard.nested = absmax_float32(state).bfloat16().float(), False
        expected = dequantize_4bit_float64(codes, standard).float()
        assert torch.equal(quant.dequantize(weight, torch.float32), expected), (shape, blocksize)
        assert torch.equal(quant.dequantize(weight), expected.bfloat16())


def test_cpu_repacked_codes_equal_bitsandbytes_own_inverse():
    # bitsandbytes' inverse restores a double-quantised absmax but leaves a plain one bf16 and transposed
    # (README), so only the codes are compared, for both.
    torch.manual_seed(8)
    for double_quant in (False, True):
        codes, state = _quantized((64, 192), torch.float32, "nf4", 64, double_quant)
        packed, packed_state = _cpu_repacked(codes, state)
        weight = quant.from_bitsandbytes(_packed_with_state(packed, packed_state))
        inverse, _ = functional._convert_weight_packed_for_cpu_inverse(packed, copy.deepcopy(packed_state))
        assert torch.equal(weight.codes, inverse.reshape(-1))


def test_cpu_repacked_weight_outside_its_layout_raises_naming_weight():
    codes, state = _quantized((64, 128), torch.bfloat16, "nf4", 64, False)
    packed, packed_state = _cpu_repacked(codes, state)
    packed_state.absmax = packed_state.absmax.float()
    _raises_naming_weight(_packed_with_state(packed, packed_state), "CPU-repacked absmax bfloat16")
    packed, packed_state = _cpu_repacked(codes, state)
    _raises_naming_weight(_packed_with_state(packed.reshape(-1), packed_state), "CPU-repacked codes")


@pytest.mark.skipif(
    not functional.has_avx512bf16(), reason="bitsandbytes repacks in its forward only on AVX512-BF16 CPUs"
)
def test_linear4bit_eval_forward_repacks_on_this_cpu_and_keep_standard_layout_stops_it():
    torch.manual_seed(9)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    dense = quant.dequantize(quant.from_bitsandbytes(layer.weight), torch.float32)
    x = torch.randn(5, 128)
    repacked, kept = copy.deepcopy(layer), copy.deepcopy(layer)
    assert quant.keep_standard_layout(torch.nn.Sequential(kept)) == 1
    with torch.no_grad():
        y_repacked, y_kept = repacked(x), kept(x)
    assert repacked.weight.quant_state.packing_format_for_cpu
    assert not getattr(kept.weight.quant_state, "packing_format_for_cpu", False)
    assert rel_error(y_kept, x @ dense.t()) <= 1e-6
    # After the repack bitsandbytes computes in bf16 with bf16 scales; the layout read back is what it uses.
    read_back = quant.dequantize(quant.from_bitsandbytes(repacked.weight), torch.float32)
    assert rel_error(read_back, dense) <= 1e-2 and rel_error(y_repacked, x @ read_back.t()) <= 1e-2
