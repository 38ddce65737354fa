// The CPU kernel bodies compiled for AVX2 + FMA + F16C (picked at run time, see ms_deform_attn_cpu_isa.cpp).
// Only <cstdint> and the intrinsics header are included before the target pragma and the bodies use no
// library templates, so nothing compiled here can leak into the portable path through COMDAT merging.
#include <cstdint>

#include "ms_deform_attn_cpu_kernel.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)  // see DEFORM_ATTN_X86 in ms_deform_attn_cpu_kernel.h
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define DEFORM_ATTN_ISA 1
#include "ms_deform_attn_cpu_kernel_bodies.inc"
DEFORM_ATTN_DEFINE_ENTRY_POINTS(avx2)
#pragma GCC pop_options
#endif
