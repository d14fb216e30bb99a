// pybind11 module cdm_fast._C. No torch headers: every tensor arrives as a device address (int), its
// sizes and strides, and the CUDA stream as an int (`torch.cuda.current_stream().cuda_stream`).
// cdm_fast/_extension.py is the Python side; the kernels are in projection.cu and lora.cu.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#ifndef CDM_FAST_CUDA_ARCHS
#error "setup.py passes -DCDM_FAST_CUDA_ARCHS=\"...\" (the targets this build compiled)"
#endif
#ifndef CDM_FAST_VERSION
#error "setup.py passes -DCDM_FAST_VERSION=\"...\""
#endif

namespace cdm_fast {

// Defined in projection.cu. They launch asynchronously on `stream` and throw std::invalid_argument
// (ValueError) for bad arguments, std::runtime_error (RuntimeError) for CUDA errors.
void quantize_rowwise(uintptr_t src, const std::string& dtype, int64_t outer, int64_t inner, int64_t stride_outer,
                      int64_t stride_inner, uintptr_t codes, uintptr_t scales, uintptr_t stream);
void quantize_mx(uintptr_t src, const std::string& dtype, int64_t outer, int64_t inner, int64_t stride_outer,
                 int64_t stride_inner, uintptr_t codes, uintptr_t scales, int64_t scales_ld, uintptr_t stream);
void projection_features_fp8(uintptr_t x_codes, uintptr_t x_scales, uintptr_t freq_codes, uintptr_t freq_scales,
                             uintptr_t features, int64_t n, int64_t d_in, int64_t m, uintptr_t stream);
void projection_features_mxfp8(uintptr_t x_codes, uintptr_t x_scales, int64_t x_scales_ld, uintptr_t freq_codes,
                               uintptr_t freq_scales, int64_t freq_scales_ld, uintptr_t features, int64_t n,
                               int64_t d_in, int64_t m, uintptr_t stream);
void projection_output_fp8(uintptr_t features, uintptr_t weight_codes, uintptr_t weight_scales, uintptr_t bias,
                           uintptr_t y, const std::string& y_dtype, int64_t n, int64_t m, int64_t d_out,
                           int64_t y_row_stride, uintptr_t stream);
void projection_output_mxfp8(uintptr_t features, uintptr_t weight_codes, uintptr_t weight_scales,
                             int64_t weight_scales_ld, uintptr_t bias, uintptr_t y, const std::string& y_dtype,
                             int64_t n, int64_t m, int64_t d_out, int64_t y_row_stride, uintptr_t stream);

// Defined in lora.cu, with the same error conventions.
int64_t lora_max_rank();
int64_t lora_shared_bytes(int64_t rank);
void lora_forward(uintptr_t x, int64_t x_row_stride, uintptr_t weight, int64_t weight_row_stride, uintptr_t lora_a,
                  uintptr_t lora_b, int64_t lora_b_row_stride, uintptr_t bias, uintptr_t y, uintptr_t u,
                  const std::string& dtype, int64_t m, int64_t n, int64_t k, int64_t rank, double scaling,
                  double dropout_p, int64_t dropout_threshold, int64_t dropout_seed, uintptr_t stream);

namespace {

std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::istringstream list(CDM_FAST_CUDA_ARCHS);
  std::string arch;
  while (std::getline(list, arch, ';'))
    if (!arch.empty()) archs.push_back(arch);
  return archs;
}

// 0 when no driver is installed.
int cuda_driver_version() {
  int version = 0;
  return cudaDriverGetVersion(&version) == cudaSuccess ? version : 0;
}

}  // namespace
}  // namespace cdm_fast

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "cdm_fast CUDA kernels over raw device pointers (see cdm_fast/_extension.py). Codes are e4m3 bytes; "
      "scales are float32 (rowwise) or ue8m0 bytes stored block-major with a leading dim (mx).";
  const auto release = py::call_guard<py::gil_scoped_release>();

  m.def("built_archs", &cdm_fast::built_archs, "CUDA targets compiled into this build, e.g. ['89', '90a', '120a'].");
  m.def("version", []() { return std::string(CDM_FAST_VERSION); }, "cdm-fast version this extension was built from.");
  m.def("cuda_runtime_version", []() { return CUDART_VERSION; },
        "CUDA runtime linked (statically) into this build, e.g. 13000 for 13.0.");
  m.def("cuda_driver_version", &cdm_fast::cuda_driver_version,
        "CUDA version the installed driver supports, e.g. 13000; 0 without a driver.");

  m.def("quantize_rowwise", &cdm_fast::quantize_rowwise, release,
        "e4m3 codes (outer, inner) inner-contiguous and one float32 scale per slice (amax over inner / 448).",
        py::arg("src"), py::arg("dtype"), py::arg("outer"), py::arg("inner"), py::arg("stride_outer"),
        py::arg("stride_inner"), py::arg("codes"), py::arg("scales"), py::arg("stream"));
  m.def("quantize_mx", &cdm_fast::quantize_mx, release,
        "e4m3 codes (outer, inner) inner-contiguous and ue8m0 scales per 32 of inner at "
        "scales[block * scales_ld + outer_index].",
        py::arg("src"), py::arg("dtype"), py::arg("outer"), py::arg("inner"), py::arg("stride_outer"),
        py::arg("stride_inner"), py::arg("codes"), py::arg("scales"), py::arg("scales_ld"), py::arg("stream"));
  m.def("projection_features_fp8", &cdm_fast::projection_features_fp8, release,
        "features (n, 2m) = e4m3(256 [sin 2πP, cos 2πP]), P = x @ freqs from row-wise scaled codes "
        "(x codes (n, d_in), freqs codes (m, d_in)).",
        py::arg("x_codes"), py::arg("x_scales"), py::arg("freq_codes"), py::arg("freq_scales"), py::arg("features"),
        py::arg("n"), py::arg("d_in"), py::arg("m"), py::arg("stream"));
  m.def("projection_features_mxfp8", &cdm_fast::projection_features_mxfp8, release,
        "projection_features_fp8 with MX codes and block-major ue8m0 scales (compute capability 12.x).",
        py::arg("x_codes"), py::arg("x_scales"), py::arg("x_scales_ld"), py::arg("freq_codes"),
        py::arg("freq_scales"), py::arg("freq_scales_ld"), py::arg("features"), py::arg("n"), py::arg("d_in"),
        py::arg("m"), py::arg("stream"));
  m.def("projection_output_fp8", &cdm_fast::projection_output_fp8, release,
        "y (n, d_out) = features @ weight · 2^-8 · weight_scales / sqrt(m) + bias (float32 or 0), "
        "weight codes (d_out, 2m).",
        py::arg("features"), py::arg("weight_codes"), py::arg("weight_scales"), py::arg("bias"), py::arg("y"),
        py::arg("y_dtype"), py::arg("n"), py::arg("m"), py::arg("d_out"), py::arg("y_row_stride"),
        py::arg("stream"));
  m.def("projection_output_mxfp8", &cdm_fast::projection_output_mxfp8, release,
        "projection_output_fp8 with MX weight codes and block-major ue8m0 scales (compute capability 12.x).",
        py::arg("features"), py::arg("weight_codes"), py::arg("weight_scales"), py::arg("weight_scales_ld"),
        py::arg("bias"), py::arg("y"), py::arg("y_dtype"), py::arg("n"), py::arg("m"), py::arg("d_out"),
        py::arg("y_row_stride"), py::arg("stream"));

  m.def("lora_max_rank", &cdm_fast::lora_max_rank, "Largest LoRA rank lora_forward serves.");
  m.def("lora_shared_bytes", &cdm_fast::lora_shared_bytes,
        "Dynamic shared memory (bytes per block) of the lora_forward kernel serving `rank`.", py::arg("rank"));
  m.def("lora_forward", &cdm_fast::lora_forward, release,
        "y (m, n) = x @ weightᵀ + bias + scaling · u @ lora_Bᵀ and u (m, rank) = dropout(x) @ lora_Aᵀ, all in "
        "`dtype` (float16/bfloat16) with fp32 accumulation. x (m, k) and weight (n, k) K-contiguous with row "
        "strides; lora_A (rank, k) contiguous; lora_B (n, rank) with a row stride that is a multiple of 8 (its "
        "padding columns finite); bias (n,) or 0; y and u contiguous. Dropout keeps x[i, j] when "
        "hash32(hash32(i ^ seed) + j) >> 8 >= dropout_threshold and scales u by 1 / (1 - dropout_p).",
        py::arg("x"), py::arg("x_row_stride"), py::arg("weight"), py::arg("weight_row_stride"), py::arg("lora_a"),
        py::arg("lora_b"), py::arg("lora_b_row_stride"), py::arg("bias"), py::arg("y"), py::arg("u"),
        py::arg("dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("rank"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("dropout_threshold"), py::arg("dropout_seed"), py::arg("stream"));
}
