// The CPU path registry (isa.h): which paths this CPU can run (CPUID via the compiler's runtime,
// which also checks that the OS saves AVX-512 register state) and which one is selected.
#include "isa.h"

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fp8_backend {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::amx: return "amx";
    case CpuIsa::avx512_vbmi: return "avx512_vbmi";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::portable: break;
  }
  return "portable";
}

CpuIsa parse_isa(const std::string& name) {
  for (int i = 0; i < kNumCpuIsas; ++i)
    if (name == isa_name(static_cast<CpuIsa>(i))) return static_cast<CpuIsa>(i);
  TORCH_CHECK(false, "fp8_backend: unknown CPU kernel path '", name,
              "'; expected one of auto, amx, avx512_vbmi, avx512, avx2, portable");
}

namespace {
// AMX tile data is off for a Linux process until it asks (arch_prctl ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA); the first tile instruction without it raises SIGILL. Asked once.
bool amx_permitted() {
#if defined(__linux__) && defined(__x86_64__)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18) == 0;
  return ok;
#else
  return false;
#endif
}
}  // namespace

std::string isa_missing(CpuIsa isa) {
  std::string missing;
  auto need = [&](bool have, const char* what) {
    if (!have) missing += missing.empty() ? what : std::string(" ") + what;
  };
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const int level = static_cast<int>(isa);
  if (level >= static_cast<int>(CpuIsa::avx2)) {
    need(__builtin_cpu_supports("avx2"), "avx2");
    need(__builtin_cpu_supports("fma"), "fma");
    need(__builtin_cpu_supports("f16c"), "f16c");
  }
  if (level >= static_cast<int>(CpuIsa::avx512)) {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
    need(__builtin_cpu_supports("avx512dq"), "avx512dq");
  }
  if (level >= static_cast<int>(CpuIsa::avx512_vbmi)) need(__builtin_cpu_supports("avx512vbmi"), "avx512vbmi");
  if (isa == CpuIsa::amx) {
    const bool tile = __builtin_cpu_supports("amx-tile"), bf16 = __builtin_cpu_supports("amx-bf16");
    need(tile, "amx-tile");
    need(bf16, "amx-bf16");
    need(__builtin_cpu_supports("avx512bf16"), "avx512-bf16");  // attention's fp32 -> bf16 splits
    if (tile && bf16) need(amx_permitted(), "amx tile data permission from the OS (arch_prctl)");
  }
#else
  if (isa != CpuIsa::portable) missing = "x86-64";
#endif
  return missing;
}

bool isa_supported(CpuIsa isa) {
  // Asked on every op call: the answers are computed once.
  static const auto table = [] {
    std::array<bool, kNumCpuIsas> t{};
    for (int i = 0; i < kNumCpuIsas; ++i) t[i] = isa_missing(static_cast<CpuIsa>(i)).empty();
    return t;
  }();
  const int i = static_cast<int>(isa);
  return i >= 0 && i < kNumCpuIsas && table[i];
}

CpuIsa best_isa() {
  if (isa_supported(CpuIsa::amx)) return CpuIsa::amx;
  if (isa_supported(CpuIsa::avx512_vbmi)) return CpuIsa::avx512_vbmi;
  if (isa_supported(CpuIsa::avx512)) return CpuIsa::avx512;
  if (isa_supported(CpuIsa::avx2)) return CpuIsa::avx2;
  return CpuIsa::portable;
}

namespace {
std::atomic<int> g_isa{-1};  // -1: not chosen yet (FP8_BACKEND_CPU_ISA or the best, on first use)

CpuIsa checked_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  const CpuIsa isa = parse_isa(name);
  TORCH_CHECK(isa_supported(isa), "fp8_backend: CPU kernel path '", name, "' needs ", isa_missing(isa),
              ", which this CPU lacks (best available path: ", isa_name(best_isa()), ")");
  return isa;
}
}  // namespace

CpuIsa selected_cpu_isa() {
  int v = g_isa.load();
  if (v < 0) {
    const char* env = std::getenv(kCpuIsaEnv);
    std::string name = env ? env : "";
    const auto first = name.find_first_not_of(" \t\n"), last = name.find_last_not_of(" \t\n");
    name = first == std::string::npos ? "auto" : name.substr(first, last - first + 1);
    try {
      v = static_cast<int>(checked_isa(name));
    } catch (const c10::Error& e) {  // say which variable asked for it
      TORCH_CHECK(false, kCpuIsaEnv, "='", name, "': ", e.what_without_backtrace());
    }
    g_isa.store(v);
  }
  return static_cast<CpuIsa>(v);
}

CpuIsa select_cpu_isa(const std::string& name) {
  const CpuIsa isa = checked_isa(name);
  g_isa.store(static_cast<int>(isa));
  return isa;
}

}  // namespace fp8_backend
