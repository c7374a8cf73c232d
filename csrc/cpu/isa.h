// The one registry of CPU code paths for every op: W8A16 linear (ops.cpp), the fused mixture of
// experts (moe_w8a16.cpp) and paged attention (attention_ops.cpp). It names the paths, says which
// ones this CPU (and OS) can run, and which one is selected: FP8_BACKEND_CPU_ISA when set (read on
// first use), else the best supported, until select_cpu_isa changes it. Each op maps the
// selected path to its own kernels (attention: attention_path in attention.h).
#pragma once

#include <string>

namespace fp8_backend {

// Ordered by capability: each path needs every instruction set of the ones before it
// (avx2 = AVX2 + FMA + F16C; avx512 = F/BW/VL/DQ on top; avx512_vbmi adds VBMI; amx adds
// AMX-TILE/AMX-BF16, AVX512-BF16 and the OS permission for tile data).
enum class CpuIsa : int { portable = 0, avx2 = 1, avx512 = 2, avx512_vbmi = 3, amx = 4 };
constexpr int kNumCpuIsas = 5;

// The environment variable that forces a path ("auto" or empty: the best supported).
constexpr const char* kCpuIsaEnv = "FP8_BACKEND_CPU_ISA";

const char* isa_name(CpuIsa isa);
// A path by name (not "auto"); an unknown name is an error listing the accepted ones.
CpuIsa parse_isa(const std::string& name);
bool isa_supported(CpuIsa isa);
// The CPU features `isa` needs that this CPU (or OS) lacks, space-separated; "" if none.
std::string isa_missing(CpuIsa isa);
CpuIsa best_isa();

// The path every op runs now.
CpuIsa selected_cpu_isa();
// Select "auto" (the best supported) or a path by name; a path this CPU lacks is an error
// naming it and the missing features, and leaves the selection unchanged.
CpuIsa select_cpu_isa(const std::string& name);

}  // namespace fp8_backend
