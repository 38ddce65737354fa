// The CPU kernel bodies of deform_attn::ms_deform_attn, on raw pointers.
//
// The bodies (ms_deform_attn_cpu_kernel_bodies.inc) are compiled twice: by ms_deform_attn_cpu.cpp with the default (portable) flags, and by
// ms_deform_attn_cpu_avx2.cpp under `#pragma GCC target("avx2,fma")`; the op picks the AVX2 copy at run
// time when the CPU has it. Everything here therefore lives in an anonymous namespace (internal linkage)
// and uses no library templates or inline library functions: otherwise the linker could merge an AVX2
// instantiation into the portable path and crash CPUs without AVX2.
//
// Sampling follows F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a location
// x in [0, 1] maps to pixel coordinate x * W - 0.5 and corners outside the map contribute zero.
//
// value (N, S, M, D) keeps the D channels of one head at one position contiguous, so every bilinear corner
// is one contiguous row. Corner weights (times the attention weight) are computed once per sample, then a
// single fused loop over the D channels of the four corners runs; it has no branches (missing corners
// read a row of zeros / write a scratch row with weight 0) so the compiler vectorises it. For the common
// head sizes D is a compile-time constant: the accumulator then stays in vector registers and the loop
// is fully unrolled.
#pragma once

#include <cstdint>

namespace deform_attn {
namespace cpu {

// Sizes and level table of one call (the level table is (H, W) pairs and start offsets, int64).
// Bytes of the per-task sample buffer the kernels need: two queries of resolved samples (one being used,
// one being prefetched); generous upper bound of sizeof(Sample<double>).
inline int64_t sample_buffer_bytes(int64_t samples_per_query) { return 2 * samples_per_query * 128; }

struct Problem {
  const int64_t* shapes;
  const int64_t* starts;
  int64_t N, S, M, D, Q, L, P;
};

}  // namespace cpu
}  // namespace deform_attn


// Entry points, one set per instruction set (defined by the .cpp files that include the bodies).
#define DEFORM_ATTN_DECLARE_ENTRY_POINTS(ISA)                                                                 \
  namespace deform_attn {                                                                                    \
  namespace cpu {                                                                                            \
  void forward_##ISA(const Problem& pr, const float* value, const float* loc, const float* attn, float* out, \
                     const float* zeros, void* buf, int64_t begin, int64_t end);                                        \
  void forward_##ISA(const Problem& pr, const double* value, const double* loc, const double* attn,          \
                     double* out, const double* zeros, void* buf, int64_t begin, int64_t end);                          \
  void backward_##ISA(const Problem& pr, const float* value, const float* loc, const float* attn,            \
                      const float* grad_out, float* grad_value, float* grad_loc, float* grad_attn,           \
                      const float* zeros, float* scratch, void* buf, int64_t n, int64_t m);                             \
  void backward_##ISA(const Problem& pr, const double* value, const double* loc, const double* attn,         \
                      const double* grad_out, double* grad_value, double* grad_loc, double* grad_attn,       \
                      const double* zeros, double* scratch, void* buf, int64_t n, int64_t m);                           \
  }                                                                                                          \
  }

#define DEFORM_ATTN_DEFINE_ENTRY_POINTS(ISA)                                                                  \
  namespace deform_attn {                                                                                    \
  namespace cpu {                                                                                            \
  void forward_##ISA(const Problem& pr, const float* value, const float* loc, const float* attn, float* out, \
                     const float* zeros, void* buf, int64_t begin, int64_t end) {                                       \
    forward_rows_any<float>(pr, value, loc, attn, out, zeros, buf, begin, end);                                   \
  }                                                                                                          \
  void forward_##ISA(const Problem& pr, const double* value, const double* loc, const double* attn,          \
                     double* out, const double* zeros, void* buf, int64_t begin, int64_t end) {                         \
    forward_rows_any<double>(pr, value, loc, attn, out, zeros, buf, begin, end);                                  \
  }                                                                                                          \
  void backward_##ISA(const Problem& pr, const float* value, const float* loc, const float* attn,            \
                      const float* grad_out, float* grad_value, float* grad_loc, float* grad_attn,           \
                      const float* zeros, float* scratch, void* buf, int64_t n, int64_t m) {                            \
    backward_head_any<float>(pr, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, zeros, scratch, \
                             buf, n, m);                                                                          \
  }                                                                                                          \
  void backward_##ISA(const Problem& pr, const double* value, const double* loc, const double* attn,         \
                      const double* grad_out, double* grad_value, double* grad_loc, double* grad_attn,       \
                      const double* zeros, double* scratch, void* buf, int64_t n, int64_t m) {                          \
    backward_head_any<double>(pr, value, loc, attn, grad_out, grad_value, grad_loc, grad_attn, zeros,        \
                              scratch, buf, n, m);                                                                \
  }                                                                                                          \
  }                                                                                                          \
  }

DEFORM_ATTN_DECLARE_ENTRY_POINTS(generic)
DEFORM_ATTN_DECLARE_ENTRY_POINTS(avx2)
