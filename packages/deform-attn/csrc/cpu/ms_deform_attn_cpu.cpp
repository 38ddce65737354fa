// CPU kernels of deform_attn::ms_deform_attn (float32, float64): argument handling, threading and ISA
// dispatch. The kernel bodies and their design notes are in ms_deform_attn_cpu_kernel.h / _bodies.inc.
//
// Forward: parallel over (batch, query); each (n, q) writes its own output rows, and the consecutive
// queries of one task sample neighbouring positions (cache reuse of the value rows).
// Backward: parallel over (batch, head): the grad_value slices [n, :, m, :] of different tasks are
// disjoint and each (n, q, m) writes its own grad_locations / grad_weights, so there are no atomics and
// the result is deterministic (independent of the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "../ms_deform_attn.h"
#include "ms_deform_attn_cpu_kernel.h"
#include "ms_deform_attn_cpu_kernel_bodies.inc"

DEFORM_ATTN_DEFINE_ENTRY_POINTS(generic)

namespace deform_attn {
namespace {

// The AVX2 + FMA copy of the kernels when the CPU has it; DEFORM_ATTN_CPU_ISA=generic forces the portable
// copy (used by the tests to check both).
bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = [] {
    const char* isa = std::getenv("DEFORM_ATTN_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "generic") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return ok;
#else
  return false;
#endif
}

template <typename T>
void run_forward(const cpu::Problem& pr, const T* value, const T* loc, const T* attn, T* out, const T* zeros,
                 void* buf, int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) return cpu::forward_avx2(pr, value, loc, attn, out, zeros, buf, begin, end);
#endif
  cpu::forward_generic(pr, value, loc, attn, out, zeros, buf, begin, end);
}

template <typename T>
void run_backward(const cpu::Problem& pr, const T* value, const T* loc, const T* attn, const T* grad_out,
                  T* grad_value, T* grad_loc, T* grad_attn, const T* zeros, T* scratch, void* buf, int64_t n,
                  int64_t m) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (use_avx2()) {
    return cpu::backward_avx2(pr, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, zeros, scratch, buf, n,
                              m);
  }
#endif
  cpu::backward_generic(pr, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, zeros, scratch, buf, n, m);
}

// Level table checks need the values; on CPU they are free to read.
void check_levels(const at::Tensor& shapes, const at::Tensor& starts, int64_t S) {
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(sh[2 * l] > 0 && sh[2 * l + 1] > 0, "deform_attn: level ", l, " has an empty shape");
    TORCH_CHECK(st[l] >= 0 && st[l] + sh[2 * l] * sh[2 * l + 1] <= S, "deform_attn: level ", l,
                " (start ", st[l], ", shape ", sh[2 * l], "x", sh[2 * l + 1], ") exceeds value length S = ", S);
  }
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
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    const cpu::Problem pr{shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), s.N, s.S, s.M, s.D, s.Q, s.L, s.P};
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* lp = loc.data_ptr<scalar_t>();
    const scalar_t* ap = attn.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros(s.D, scalar_t(0));
    // ~16 queries of work per task keeps scheduling overhead negligible.
    at::parallel_for(0, s.N * s.Q, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> buf(cpu::sample_buffer_bytes(s.M * s.L * s.P) / 8);
      run_forward<scalar_t>(pr, v, lp, ap, op, zeros.data(), buf.data(), begin, end);
    });
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
  // Zeroed by the tasks that own its slices (below): one parallel pass that also spreads the page faults
  // of the fresh allocation over the threads, instead of a serial memset before the kernel.
  at::Tensor grad_value = at::empty_like(value);
  at::Tensor grad_loc = at::empty_like(loc);
  at::Tensor grad_attn = at::empty_like(attn);
  if (grad_attn.numel() == 0 || value.numel() == 0) {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    const cpu::Problem pr{shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), s.N, s.S, s.M, s.D, s.Q, s.L, s.P};
    const scalar_t* v = value.data_ptr<scalar_t>();
    const scalar_t* lp = loc.data_ptr<scalar_t>();
    const scalar_t* ap = attn.data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    scalar_t* gvp = grad_value.data_ptr<scalar_t>();
    scalar_t* glp = grad_loc.data_ptr<scalar_t>();
    scalar_t* gap = grad_attn.data_ptr<scalar_t>();
    const std::vector<scalar_t> zeros(s.D, scalar_t(0));
    at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(4 * s.D);  // per task: the garbage sink of missing corners
      std::vector<int64_t> buf(cpu::sample_buffer_bytes(s.L * s.P) / 8);
      for (int64_t nm = begin; nm < end; ++nm) {
        scalar_t* slice = gvp + (nm / s.M) * s.S * s.M * s.D + (nm % s.M) * s.D;
        for (int64_t pos = 0; pos < s.S; ++pos) {
          std::memset(slice + pos * s.M * s.D, 0, s.D * sizeof(scalar_t));
        }
        run_backward<scalar_t>(pr, v, lp, ap, gp, gvp, glp, gap, zeros.data(), scratch.data(), buf.data(), nm / s.M,
                               nm % s.M);
      }
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(deform_attn, CPU, m) {
  m.impl("ms_deform_attn", &ms_deform_attn_forward_cpu);
  m.impl("_ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace deform_attn
