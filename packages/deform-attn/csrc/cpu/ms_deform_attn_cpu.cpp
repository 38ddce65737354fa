// CPU kernels of deform_attn::ms_deform_attn (float32, float64, bfloat16, float16, and bfloat16/float16
// values with float32 locations and weights): argument handling, threading and ISA dispatch. The kernel
// bodies and their design notes are in ms_deform_attn_cpu_kernel.h / _bodies.inc; this file also compiles
// the generic (portable) copy of them.
//
// Forward: parallel over (batch, query); each (n, q) writes its own output rows, and the consecutive
// queries of one task sample neighbouring positions (cache reuse of the value rows).
// Backward: parallel over (batch, head): the grad_value slices [n, :, m, :] of different tasks are
// disjoint and each (n, q, m) writes its own grad_locations / grad_weights, so there are no atomics and
// the result is deterministic (independent of the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_cpu_kernel.h"

#if defined(__SSE2__)
#include <emmintrin.h>  // baseline of x86-64: the generic copy widens 16-bit rows with it
#endif
#define DEFORM_ATTN_ISA 0
#include "ms_deform_attn_cpu_kernel_bodies.inc"
DEFORM_ATTN_DEFINE_ENTRY_POINTS(generic)

namespace deform_attn {
namespace {


cpu::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::DType::f32;
    case at::kDouble: return cpu::DType::f64;
    case at::kBFloat16: return cpu::DType::bf16;
    case at::kHalf: return cpu::DType::f16;
    default: TORCH_CHECK(false, "deform_attn: unsupported dtype ", t);
  }
}

void run_forward(cpu::Isa isa, const cpu::Problem& pr, const cpu::Tensors& t, void* buf, int64_t begin,
                 int64_t end) {
#ifdef DEFORM_ATTN_X86
  switch (isa) {
    case cpu::Isa::avx512bf16:
      if (pr.vt == cpu::DType::bf16) return cpu::forward_avx512bf16(pr, t, buf, begin, end);
      return cpu::forward_avx512(pr, t, buf, begin, end);
    case cpu::Isa::avx512: return cpu::forward_avx512(pr, t, buf, begin, end);
    case cpu::Isa::avx2: return cpu::forward_avx2(pr, t, buf, begin, end);
    case cpu::Isa::generic: break;
  }
#else
  (void)isa;
#endif
  cpu::forward_generic(pr, t, buf, begin, end);
}

void run_backward(cpu::Isa isa, const cpu::Problem& pr, const cpu::Tensors& t, void* buf, int64_t n, int64_t m) {
#ifdef DEFORM_ATTN_X86
  switch (isa) {
    case cpu::Isa::avx512bf16:
      if (pr.vt == cpu::DType::bf16) return cpu::backward_avx512bf16(pr, t, buf, n, m);
      return cpu::backward_avx512(pr, t, buf, n, m);
    case cpu::Isa::avx512: return cpu::backward_avx512(pr, t, buf, n, m);
    case cpu::Isa::avx2: return cpu::backward_avx2(pr, t, buf, n, m);
    case cpu::Isa::generic: break;
  }
#else
  (void)isa;
#endif
  cpu::backward_generic(pr, t, buf, n, m);
}

// A 64-byte aligned work buffer per task.
struct TaskBuffer {
  std::vector<char> bytes;
  explicit TaskBuffer(int64_t n) : bytes(static_cast<size_t>(n) + 64) {}
  void* get() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(bytes.data());
    return reinterpret_cast<void*>((p + 63) & ~static_cast<uintptr_t>(63));
  }
};

// Level table checks need the values; on CPU they are free to read.
void check_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t S) {
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(sh[2 * l] > 0 && sh[2 * l + 1] > 0, "deform_attn: level ", l, " has an empty shape");
    // Corner positions inside a level are 32-bit in the kernels.
    TORCH_CHECK(sh[2 * l] < (int64_t{1} << 31) / sh[2 * l + 1], "deform_attn: level ", l, " (", sh[2 * l], "x",
                sh[2 * l + 1], ") has 2^31 positions or more");
    TORCH_CHECK(st[l] >= 0 && st[l] + sh[2 * l] * sh[2 * l + 1] <= S, "deform_attn: level ", l,
                " (start ", st[l], ", shape ", sh[2 * l], "x", sh[2 * l + 1], ") exceeds value length S = ", S);
  }
}

cpu::Problem make_problem(const Sizes& s, const at::Tensor& shapes, const at::Tensor& starts, const at::Tensor& value,
                          const at::Tensor& loc) {
  cpu::Problem pr{shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), s.N, s.S, s.M, s.D, s.Q, s.L, s.P,
                      dtype_of(value.scalar_type()), dtype_of(loc.scalar_type())};
  return pr;
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes_in,
                                      const at::Tensor& level_start_index_in, const at::Tensor& sampling_locations_in,
                                      const at::Tensor& attention_weights_in, int64_t im2col_step) {
  // im2col_step only bounds the CUDA batch chunking of the original op; the CPU kernel needs no buffer.
  (void)im2col_step;
  const Sizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                               attention_weights_in);
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  check_levels(shapes, starts, s.S);
  at::Tensor out = at::empty({s.N, s.Q, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  if (value.numel() == 0) return out.zero_();
  const cpu::Isa isa = cpu::active_isa();
  const cpu::Problem pr = make_problem(s, shapes, starts, value, loc);
  const cpu::Tensors t{value.data_ptr(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(),
                       nullptr,          nullptr,        nullptr,         nullptr};
  // ~16 queries of work per task keeps scheduling overhead negligible.
  at::parallel_for(0, s.N * s.Q, 16, [&](int64_t begin, int64_t end) {
    TaskBuffer buf(cpu::task_buffer_bytes(pr));
    run_forward(isa, pr, t, buf.get(), begin, end);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value_in, const at::Tensor& spatial_shapes_in, const at::Tensor& level_start_index_in,
    const at::Tensor& sampling_locations_in, const at::Tensor& attention_weights_in,
    const at::Tensor& grad_output_in, int64_t im2col_step) {
  (void)im2col_step;
  const Sizes s = check_inputs(value_in, spatial_shapes_in, level_start_index_in, sampling_locations_in,
                               attention_weights_in);
  TORCH_CHECK(grad_output_in.dim() == 3 && grad_output_in.size(0) == s.N && grad_output_in.size(1) == s.Q &&
                  grad_output_in.size(2) == s.M * s.D,
              "deform_attn: grad_output must be (N, Q, M*D) = (", s.N, ", ", s.Q, ", ", s.M * s.D, "), got ",
              grad_output_in.sizes());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor shapes = spatial_shapes_in.contiguous();
  const at::Tensor starts = level_start_index_in.contiguous();
  const at::Tensor loc = sampling_locations_in.contiguous();
  const at::Tensor attn = attention_weights_in.contiguous();
  const at::Tensor grad_out = grad_output_in.contiguous().to(value.scalar_type());
  check_levels(shapes, starts, s.S);
  // grad_value accumulates in float32 for 16-bit values (cast once at the end) and in the value dtype
  // otherwise. It is zeroed by the tasks that own its slices (below): one parallel pass that also spreads
  // the page faults of the fresh allocation over the threads, instead of a serial memset before the kernel.
  const bool half_value = value.scalar_type() == at::kBFloat16 || value.scalar_type() == at::kHalf;
  at::Tensor grad_value = at::empty(value.sizes(), value.options().dtype(half_value ? at::kFloat : value.scalar_type()));
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_attn.numel() == 0 || value.numel() == 0) {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
  } else {
    const cpu::Isa isa = cpu::active_isa();
    const cpu::Problem pr = make_problem(s, shapes, starts, value, loc);
    const cpu::Tensors t{value.data_ptr(),      loc.data_ptr(),      attn.data_ptr(),     nullptr,
                         grad_out.data_ptr(),   grad_value.data_ptr(), grad_loc.data_ptr(), grad_attn.data_ptr()};
    const int64_t elem = static_cast<int64_t>(grad_value.element_size());
    char* gv = static_cast<char*>(grad_value.data_ptr());
    at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
      TaskBuffer buf(cpu::task_buffer_bytes(pr));
      for (int64_t nm = begin; nm < end; ++nm) {
        const int64_t n = nm / s.M, m = nm % s.M;
        char* slice = gv + ((n * s.S * s.M + m) * s.D) * elem;
        for (int64_t pos = 0; pos < s.S; ++pos) std::memset(slice + pos * s.M * s.D * elem, 0, s.D * elem);
        run_backward(isa, pr, t, buf.get(), n, m);
      }
    });
  }
  if (half_value) grad_value = grad_value.to(value.scalar_type());  // round to nearest even
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(deform_attn, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deform_attn
