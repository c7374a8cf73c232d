// Which W8A16 code path this CPU can run (CPUID via the compiler's runtime, which also checks
// that the OS saves AVX-512 register state).
#include "kernels.h"

namespace fp8_backend {

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512_vbmi: return "avx512_vbmi";
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::portable: break;
  }
  return "portable";
}

bool isa_supported(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (isa) {
    case CpuIsa::avx512_vbmi: return avx512 && __builtin_cpu_supports("avx512vbmi");
    case CpuIsa::avx512: return avx512;
    case CpuIsa::portable: return true;
  }
  return false;
#else
  return isa == CpuIsa::portable;
#endif
}

CpuIsa best_isa() {
  if (isa_supported(CpuIsa::avx512_vbmi)) return CpuIsa::avx512_vbmi;
  if (isa_supported(CpuIsa::avx512)) return CpuIsa::avx512;
  return CpuIsa::portable;
}

}  // namespace fp8_backend
