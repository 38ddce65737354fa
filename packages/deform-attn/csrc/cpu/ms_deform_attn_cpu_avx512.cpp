// The CPU kernel bodies compiled for AVX-512 (F, BW, VL, DQ; Skylake-SP, Ice Lake, Sapphire Rapids, Zen 4
// and later), picked at run time when the CPU and the OS (ZMM state in XCR0) support them, see
// ms_deform_attn_cpu_isa.cpp. Same rules as ms_deform_attn_cpu_avx2.cpp: nothing but <cstdint> and the
// intrinsics header before the target pragma, no library templates in the bodies.
#include <cstdint>

#include "ms_deform_attn_cpu_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // see DEFORM_ATTN_X86 in ms_deform_attn_cpu_kernel.h
// GCC 12 reports a false -Wmaybe-uninitialized inside its own AVX-512 conversion intrinsics
// (_mm256_undefined_si256 as the pass-through operand).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#define DEFORM_ATTN_ISA 2
#include "ms_deform_attn_cpu_kernel_bodies.inc"
DEFORM_ATTN_DEFINE_ENTRY_POINTS(avx512)
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif
