// Run-time choice of the CPU kernel copy (generic / avx2 / avx512 / avx512bf16) from what the CPU reports
// (CPUID) and what the OS saves on context switches (XCR0 via XGETBV): the build machine plays no part,
// so one binary runs on AVX2-only and AVX-512 CPUs alike.
//
// DEFORM_ATTN_CPU_ISA=generic|avx2|avx512|avx512bf16 (or auto) forces a copy; it is read at the first call
// (the Python package applies it at import, see deform_attn/ops.py). An unknown name or a copy the CPU
// lacks is an error naming the CPU's flags, never a silent fallback and never an illegal instruction.
// DEFORM_ATTN_TEST_HIDE_CPU_FLAGS=flag,flag (names as cpu_flags() prints them), read once at the first
// query, makes the detection ignore those flags: the tests use it to check the choice and the errors of a
// smaller CPU on any machine.
#include "../ms_deform_attn.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <utility>
#include <string>
#include <vector>

#include "ms_deform_attn_cpu_kernel.h"

#ifdef DEFORM_ATTN_X86
#include <cpuid.h>
#endif

namespace deform_attn {
namespace {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false, os_ymm = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, os_zmm = false;
  bool avx512_bf16 = false;
};

CpuFeatures detect() {
  CpuFeatures f;
#ifdef DEFORM_ATTN_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1u, avx = (c >> 28) & 1u;
  f.fma = (c >> 12) & 1u;
  f.f16c = (c >> 29) & 1u;
  unsigned long long xcr0 = 0;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  f.os_ymm = avx && (xcr0 & 0x6u) == 0x6u;      // XMM + YMM state
  f.os_zmm = f.os_ymm && (xcr0 & 0xe0u) == 0xe0u;  // + opmask, ZMM_Hi256, Hi16_ZMM state
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    f.avx2 = (b >> 5) & 1u;
    f.avx512f = (b >> 16) & 1u;
    f.avx512dq = (b >> 17) & 1u;
    f.avx512bw = (b >> 30) & 1u;
    f.avx512vl = (b >> 31) & 1u;
    if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = (a >> 5) & 1u;
  }
#endif
  if (const char* hide = std::getenv("DEFORM_ATTN_TEST_HIDE_CPU_FLAGS")) {
    const std::string h = std::string(",") + hide + ",";
    auto hidden = [&](const char* name) { return h.find(std::string(",") + name + ",") != std::string::npos; };
    std::pair<const char*, bool*> all[] = {{"avx2", &f.avx2},         {"fma", &f.fma},           {"f16c", &f.f16c},
                                           {"os_ymm", &f.os_ymm},     {"avx512f", &f.avx512f},   {"avx512bw", &f.avx512bw},
                                           {"avx512vl", &f.avx512vl}, {"avx512dq", &f.avx512dq}, {"os_zmm", &f.os_zmm},
                                           {"avx512_bf16", &f.avx512_bf16}};
    for (auto& kv : all) {
      if (hidden(kv.first)) *kv.second = false;
    }
  }
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

constexpr const char* kNames[] = {"generic", "avx2", "avx512", "avx512bf16"};

// The flags each copy needs, in order; empty when the CPU has them all.
std::vector<std::string> missing_flags(cpu::Isa isa) {
  const CpuFeatures& f = features();
  std::vector<std::string> miss;
  const int level = static_cast<int>(isa);
#ifndef DEFORM_ATTN_X86
  if (level > 0) miss.push_back("a GCC build on x86-64 (this build has only the generic copy)");
  return miss;
#endif
  if (level >= 1) {
    if (!f.avx2) miss.push_back("avx2");
    if (!f.fma) miss.push_back("fma");
    if (!f.f16c) miss.push_back("f16c");
    if (!f.os_ymm) miss.push_back("OS support of the YMM state (XCR0)");
  }
  if (level >= 2) {
    if (!f.avx512f) miss.push_back("avx512f");
    if (!f.avx512bw) miss.push_back("avx512bw");
    if (!f.avx512vl) miss.push_back("avx512vl");
    if (!f.avx512dq) miss.push_back("avx512dq");
    if (!f.os_zmm) miss.push_back("OS support of the ZMM state (XCR0)");
  }
  if (level >= 3 && !f.avx512_bf16) miss.push_back("avx512_bf16");
  return miss;
}

cpu::Isa best_isa() {
  for (int level = 3; level > 0; --level) {
    if (missing_flags(static_cast<cpu::Isa>(level)).empty()) return static_cast<cpu::Isa>(level);
  }
  return cpu::Isa::generic;
}

std::string join(const std::vector<std::string>& xs) {
  std::string s;
  for (const auto& x : xs) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// -1: not chosen yet (the first call reads DEFORM_ATTN_CPU_ISA).
std::atomic<int> g_isa{-1};

// Parses and validates a request; throws std::invalid_argument (unknown name) or std::runtime_error (the
// CPU lacks the copy).
cpu::Isa resolve(const std::string& name, const char* origin) {
  if (name.empty() || name == "auto") return best_isa();
  for (int level = 0; level < 4; ++level) {
    if (name != kNames[level]) continue;
    const auto miss = missing_flags(static_cast<cpu::Isa>(level));
    if (!miss.empty()) {
      throw std::runtime_error(std::string("deform_attn: ") + origin + " asks for the '" + name +
                               "' CPU kernels, but this CPU lacks " + join(miss) + " (CPU flags: " + cpu_flags() +
                               "; supported copies: " + join(cpu_isas_supported()) + ")");
    }
    return static_cast<cpu::Isa>(level);
  }
  throw std::invalid_argument(std::string("deform_attn: ") + origin + " = '" + name +
                              "' is not a CPU kernel copy; expected one of auto, generic, avx2, avx512, avx512bf16 "
                              "(supported here: " + join(cpu_isas_supported()) + ")");
}

}  // namespace

std::string cpu_flags() {
  const CpuFeatures& f = features();
  std::vector<std::string> on;
  const std::pair<const char*, bool> all[] = {
      {"avx2", f.avx2},         {"fma", f.fma},           {"f16c", f.f16c},         {"os_ymm", f.os_ymm},
      {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl}, {"avx512dq", f.avx512dq},
      {"os_zmm", f.os_zmm},     {"avx512_bf16", f.avx512_bf16}};
  for (const auto& kv : all) {
    if (kv.second) on.push_back(kv.first);
  }
  return on.empty() ? std::string("none of avx2/fma/f16c/avx512*") : join(on);
}

std::vector<std::string> cpu_isas_supported() {
  std::vector<std::string> out;
  for (int level = 0; level < 4; ++level) {
    if (missing_flags(static_cast<cpu::Isa>(level)).empty()) out.push_back(kNames[level]);
  }
  return out;
}

void set_cpu_isa(const std::string& name) { g_isa.store(static_cast<int>(resolve(name, "set_cpu_isa"))); }

std::string cpu_isa_name() { return kNames[static_cast<int>(cpu::active_isa())]; }

namespace cpu {

Isa active_isa() {
  const int cur = g_isa.load(std::memory_order_relaxed);
  if (cur >= 0) return static_cast<Isa>(cur);
  const char* env = std::getenv("DEFORM_ATTN_CPU_ISA");
  Isa isa = Isa::generic;
  try {
    isa = resolve(env == nullptr ? "" : env, "DEFORM_ATTN_CPU_ISA");
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
  int expected = -1;
  g_isa.compare_exchange_strong(expected, static_cast<int>(isa));
  return static_cast<Isa>(g_isa.load());
}

}  // namespace cpu
}  // namespace deform_attn
