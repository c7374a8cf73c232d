// Which W8A16 code path this CPU can run (CPUID via the compiler's runtime, which also checks
// that the OS saves AVX-512 register state).
#include "kernels.h"

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

bool isa_supported(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const bool vbmi = avx512 && __builtin_cpu_supports("avx512vbmi");
  switch (isa) {
    case CpuIsa::amx:
      return vbmi && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
             amx_permitted();
    case CpuIsa::avx512_vbmi: return vbmi;
    case CpuIsa::avx512: return avx512;
    case CpuIsa::portable: return true;
  }
  return false;
#else
  return isa == CpuIsa::portable;
#endif
}

CpuIsa best_isa() {
  if (isa_supported(CpuIsa::amx)) return CpuIsa::amx;
  if (isa_supported(CpuIsa::avx512_vbmi)) return CpuIsa::avx512_vbmi;
  if (isa_supported(CpuIsa::avx512)) return CpuIsa::avx512;
  return CpuIsa::portable;
}

}  // namespace fp8_backend
