// Which W8A16 code path this CPU can run (CPUID via the compiler's runtime, which also checks
// that the OS saves AVX-512 register state).
#include "kernels.h"

#include <array>
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
    std::array<bool, 5> t{};
    for (int i = 0; i < 5; ++i) t[i] = isa_missing(static_cast<CpuIsa>(i)).empty();
    return t;
  }();
  const int i = static_cast<int>(isa);
  return i >= 0 && i < 5 && table[i];
}

CpuIsa best_isa() {
  if (isa_supported(CpuIsa::amx)) return CpuIsa::amx;
  if (isa_supported(CpuIsa::avx512_vbmi)) return CpuIsa::avx512_vbmi;
  if (isa_supported(CpuIsa::avx512)) return CpuIsa::avx512;
  if (isa_supported(CpuIsa::avx2)) return CpuIsa::avx2;
  return CpuIsa::portable;
}

}  // namespace fp8_backend
