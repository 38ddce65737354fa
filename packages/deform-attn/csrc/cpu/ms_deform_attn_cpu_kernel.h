// The CPU kernel bodies of deform_attn::ms_deform_attn, on raw pointers.
//
// The bodies (ms_deform_attn_cpu_kernel_bodies.inc) are compiled once per instruction set, each copy in
// its own translation unit with DEFORM_ATTN_ISA set and, for the vector copies, under
// `#pragma GCC target(...)`:
//   ms_deform_attn_cpu.cpp          generic   portable x86-64 / any CPU (SSE2 on x86-64)
//   ms_deform_attn_cpu_avx2.cpp     avx2      AVX2 + FMA + F16C
//   ms_deform_attn_cpu_avx512.cpp   avx512    AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C)
//   ms_deform_attn_cpu_avx512bf16.cpp  avx512 + AVX512-BF16 instructions, bfloat16 entry points only
// The copy is picked at run time from CPUID/XGETBV (ms_deform_attn_cpu_isa.cpp), never from the build
// machine. Everything in the bodies lives in an anonymous namespace (internal linkage) and uses no library
// templates or inline library functions (only compiler builtins and the always-inline intrinsics):
// otherwise the linker could merge, say, an AVX-512 instantiation into the portable path (COMDAT folding)
// and crash CPUs without AVX-512.
//
// Sampling follows F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a location
// x in [0, 1] maps to pixel coordinate x * W - 0.5 and corners outside the map contribute zero.
//
// dtypes: value V and locations/weights T are float32, float64, bfloat16 or float16, either all the same
// or V in {bfloat16, float16} with T = float32 (checked by the caller). Accumulation is in A = float64 for
// float64 and float32 otherwise; outputs are rounded to nearest even when V (T for the location and weight
// gradients) is 16-bit. grad_value is accumulated in an A buffer (the caller casts it to V).
#pragma once

#include <cstdint>

// The vector copies need GCC's `#pragma GCC target` (Clang ignores it): with other compilers, or off
// x86-64, only the generic copy is built and the run-time choice knows it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DEFORM_ATTN_X86 1
#endif

namespace deform_attn {
namespace cpu {

enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// Instruction-set copies of the kernels, in increasing order of requirements.
enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

// Sizes and level table of one call (the level table is (H, W) pairs and start offsets, int64).
struct Problem {
  const int64_t* shapes;
  const int64_t* starts;
  int64_t N, S, M, D, Q, L, P;
  DType vt;  // value (and output, grad_output) dtype
  DType lt;  // sampling_locations / attention_weights (and their gradients) dtype
};

// Raw pointers of one call; element types as Problem::vt / lt, grad_value in the accumulation type.
struct Tensors {
  const void* value;
  const void* loc;
  const void* attn;
  void* out;             // forward
  const void* grad_out;  // backward
  void* grad_value;      // backward, accumulation type (float or double), zeroed by the kernel
  void* grad_loc;        // backward
  void* grad_attn;       // backward
};

// Bytes of the per-task work buffer: two queries of resolved samples (one in use, one being prefetched)
// plus small per-call tables and conversion rows. Generous upper bound, any dtype.
inline int64_t task_buffer_bytes(const Problem& pr) {
  const int64_t lp = pr.L * pr.P;
  const int64_t samples = 2 * pr.M * lp;  // forward: all heads of two queries; backward uses 2 * lp
  return samples * 96 + lp * 128 + pr.D * 8 * 16 + pr.M * 16 + 4096;
}

}  // namespace cpu
}  // namespace deform_attn

// Entry points, one set per instruction set (defined by the .cpp files that include the bodies).
// forward: output rows [begin, end) of the flattened (N * Q) queries, all heads.
// backward: the (batch n, head m) slice: zeroes and accumulates grad_value[n, :, m, :] and writes the
// location / weight gradients of every (n, q, m).
#define DEFORM_ATTN_DECLARE_ENTRY_POINTS(ISA)                                                               \
  namespace deform_attn {                                                                                  \
  namespace cpu {                                                                                          \
  void forward_##ISA(const Problem& pr, const Tensors& t, void* buf, int64_t begin, int64_t end);          \
  void backward_##ISA(const Problem& pr, const Tensors& t, void* buf, int64_t n, int64_t m);              \
  }                                                                                                        \
  }

DEFORM_ATTN_DECLARE_ENTRY_POINTS(generic)
DEFORM_ATTN_DECLARE_ENTRY_POINTS(avx2)
DEFORM_ATTN_DECLARE_ENTRY_POINTS(avx512)
DEFORM_ATTN_DECLARE_ENTRY_POINTS(avx512bf16)

namespace deform_attn {
namespace cpu {

// Run-time ISA selection (ms_deform_attn_cpu_isa.cpp).
// The copy the kernels use now: DEFORM_ATTN_CPU_ISA if set (checked at the first call), else the best one
// the CPU and OS support. Throws c10::Error (RuntimeError / ValueError in Python) for a bad request.
Isa active_isa();

}  // namespace cpu
}  // namespace deform_attn
