// Shared declarations and argument checks of the deform_attn kernels (op schemas: ms_deform_attn.cpp).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace deform_attn {

// One line naming the CUDA archs and toolkit the CUDA kernels were compiled for ("" without CUDA).
std::string cuda_build_info();

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
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "deform_attn: value, sampling_locations and attention_weights must share one dtype");
  for (const auto* t : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(t->device() == value.device(), "deform_attn: all tensors must be on ", value.device());
  }
  return s;
}

}  // namespace deform_attn
