// Shared declarations and argument checks of the deform_attn kernels (op schemas: ms_deform_attn.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace deform_attn {

// One line naming the CUDA archs and toolkit the CUDA kernels were compiled for ("" without CUDA).
std::string cuda_build_info();

// CPU kernel copies (cpu/ms_deform_attn_cpu_isa.cpp). Names: generic, avx2, avx512, avx512bf16.
std::string cpu_isa_name();                     // the copy the CPU kernels run now
void set_cpu_isa(const std::string& name);      // "auto" or a name; std::invalid_argument / runtime_error
std::vector<std::string> cpu_isas_supported();  // the copies this CPU and OS can run
std::string cpu_flags();                        // the relevant CPU/OS flags present, comma separated

// The dtype rule of the op: value, sampling_locations and attention_weights all of one floating dtype
// (float32, float64, bfloat16, float16), or value bfloat16/float16 with float32 locations and weights.
inline bool dtypes_supported(at::ScalarType v, at::ScalarType l, at::ScalarType a) {
  const bool floating = v == at::kFloat || v == at::kDouble || v == at::kBFloat16 || v == at::kHalf;
  const bool same = l == v && a == v;
  const bool mixed = (v == at::kBFloat16 || v == at::kHalf) && l == at::kFloat && a == at::kFloat;
  return floating && (same || mixed);
}

// Sizes of one call, read from the tensor shapes after check_inputs.
struct Sizes {
  int64_t N, S, M, D, Q, L, P;
};

// The Python wrapper validates with friendly ValueErrors; these checks guard direct torch.ops calls so
// that a bad call fails cleanly instead of reading out of bounds.
inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "deform_attn: sampling_locations must be (N, Q, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "deform_attn: attention_weights must be (N, Q, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "deform_attn: spatial_shapes and level_start_index must be int64");
  Sizes s{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
          sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
              "deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "deform_attn: attention_weights ", attention_weights.sizes(), " does not match sampling_locations ",
              sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.size(0) == s.L && level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "deform_attn: spatial_shapes / level_start_index must have L = ", s.L, " rows");
  TORCH_CHECK(dtypes_supported(value.scalar_type(), sampling_locations.scalar_type(), attention_weights.scalar_type()),
              "deform_attn: unsupported dtypes: value ", value.scalar_type(), ", sampling_locations ",
              sampling_locations.scalar_type(), ", attention_weights ", attention_weights.scalar_type(),
              "; all three must be one of float32, float64, bfloat16, float16, or value bfloat16/float16 with "
              "float32 sampling_locations and attention_weights");
  for (const auto* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "deform_attn: all tensors must be on ", value.device());
  }
  return s;
}

}  // namespace deform_attn
