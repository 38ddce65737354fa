// Autocast kernels of deform_attn::ms_deform_attn (like torchvision's csrc/ops/autocast/*): inside
// torch.autocast(device, dtype=bfloat16 / float16) the value (the gathered, bandwidth-heavy tensor) is cast
// to the autocast dtype and sampling_locations / attention_weights to float32, then the op runs with the
// Autocast key excluded; the output is in the autocast dtype. Outside autocast nothing is cast.
//
// bfloat16 locations would have only 8 mantissa bits (~0.3 px error on a 150-wide map), hence float32
// for them; the op accepts exactly this mixed form besides all-same dtypes (see ms_deform_attn.h).
// The casts go through the dispatcher (autograd records them), so gradients reach float32 leaves.
// float64 tensors are never cast (autocast's own eligibility rule, at::autocast::cached_cast).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace deform_attn {
namespace {

template <c10::DispatchKey AutocastKey, c10::DeviceType DeviceType>
at::Tensor ms_deform_attn_autocast(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights, int64_t im2col_step) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(AutocastKey);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("deform_attn::ms_deform_attn", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, int64_t)>();
  const at::ScalarType low = at::autocast::get_autocast_dtype(DeviceType);
  return op.call(at::autocast::cached_cast(low, value, DeviceType), spatial_shapes, level_start_index,
                 at::autocast::cached_cast(at::kFloat, sampling_locations, DeviceType),
                 at::autocast::cached_cast(at::kFloat, attention_weights, DeviceType), im2col_step);
}

}  // namespace

TORCH_LIBRARY_IMPL(deform_attn, AutocastCPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(deform_attn, AutocastCUDA, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace deform_attn
