// The bfloat16 kernels of the AVX-512 copy, compiled again with the AVX512-BF16 instructions (Cooper Lake,
// Sapphire Rapids, Zen 4 and later): VCVTNEPS2BF16 for the rounding of the outputs and VDPBF16PS for the
// dot products of the backward (bf16 x bf16 products are exact in float32). Only the bfloat16 dtype pairs
// are instantiated here; every other dtype runs the plain AVX-512 copy. Same rules as the other copies.
#include <cstdint>

#include "ms_deform_attn_cpu_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // see DEFORM_ATTN_X86 in ms_deform_attn_cpu_kernel.h
// GCC 12 reports a false -Wmaybe-uninitialized inside its own AVX-512 conversion intrinsics
// (_mm256_undefined_si256 as the pass-through operand).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#define DEFORM_ATTN_ISA 3
#define DEFORM_ATTN_BF16_ONLY
#include "ms_deform_attn_cpu_kernel_bodies.inc"
DEFORM_ATTN_DEFINE_ENTRY_POINTS(avx512bf16)
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif
