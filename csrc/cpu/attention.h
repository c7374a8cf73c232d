// Internal interface between the paged-attention op layer (attention_ops.cpp) and the per-ISA
// attention kernels (attention_portable.cpp, attention_avx2.cpp, attention_avx512.cpp,
// attention_amx*.cpp).
//
// One task = one sequence x one kv head x a run of query rows (all query heads of that kv head,
// GQA). The op layer stages the query rows in fp32 already multiplied by softmax_scale * k_scale,
// and applies v_scale and the output rounding; the kernel computes, per row r,
//     out[r] = sum_t softmax_t(q[r] . k_fp8[t]) * v_fp8[t]
// over the keys t the row may see (causal, optional sliding window), reading the cache bytes
// directly and decoding them to fp32 a tile at a time (online softmax, fp32).
#pragma once

#include <cstdint>
#include <string>

#include "isa.h"

namespace fp8_backend {

enum class KvKind : int { e4m3 = 0, e5m2 = 1, bf16 = 2, f16 = 3, f32 = 4 };

// The attention kernels, one per attend_* function below.
enum class AttnPath : int { portable = 0, avx2 = 1, avx512 = 2, amx = 3 };

// THE attention path rule: the kernel a task of head size D over a cache of `kind` runs on CPU
// path `isa` (isa.h). amx: AMX CPUs, FP8 / bf16 caches (values exact in bf16), D a multiple of 32
// up to 256; avx512: AVX-512 CPUs, D a multiple of 16; avx2: AVX2 CPUs, D a multiple of 8; else
// portable.
AttnPath attention_path(CpuIsa isa, int64_t D, KvKind kind);
const char* attention_path_name(AttnPath path);
// attention_path on the selected CPU path for a cache of torch dtype `cache_dtype` (uint8 and the
// float8 dtypes hold FP8; bfloat16, float16, float32), by name: for Python (_C.attention_path).
std::string selected_attention_path(int64_t head_size, const std::string& cache_dtype);

struct AttnTask {
  const float* q = nullptr;       // [R, D] staged query rows
  const int64_t* pos = nullptr;   // [R] token position of each row, non-decreasing
  int64_t R = 0, D = 0;
  const uint8_t* kc = nullptr;    // key cache at block 0 of this kv head
  const uint8_t* vc = nullptr;    // value cache at block 0 of this kv head
  int64_t k_blk = 0, k_tok = 0;   // byte strides: between blocks, between tokens of a block
  int64_t v_blk = 0, v_tok = 0;
  const int32_t* blocks = nullptr;  // this sequence's block table row
  int64_t block_size = 0;
  int64_t window = 0;             // > 0: row at p sees keys t with p - t < window
  KvKind kind = KvKind::e4m3;
  float* out = nullptr;           // [R, D]
  float* work = nullptr;          // attn_work_floats(R, D) floats
  // attend_amx only: q holds the unscaled query (exact fp32 of the query dtype), scores are
  // (q . k) * qk_scale, and q is exact as a sum of q_parts bf16 values (bf16 1, fp16 2, fp32 3).
  float qk_scale = 1.f;
  int q_parts = 3;
  // Prefetch hint (attend_amx decode path): K / V rows of the first cache block of the task this
  // thread runs next (null if none), next_n of them; read near the end of this task.
  const uint8_t* next_k = nullptr;
  const uint8_t* next_v = nullptr;
  int64_t next_n = 0;
};

constexpr int64_t kKeyTile = 32;  // keys decoded per tile (never crossing a cache block)

inline int64_t attn_work_floats(int64_t R, int64_t D) {
  return 2 * kKeyTile * D + R * kKeyTile + 2 * R + 64;
}

void attend_portable(const AttnTask& t);
// Needs AVX2 + FMA + F16C and D % 8 == 0 (attention_avx2.cpp): the decode kernel for FP8 tasks of
// up to 8 rows with D % 16 == 0, else the general online-softmax driver.
void attend_avx2(const AttnTask& t);
void attend_avx512(const AttnTask& t);  // needs AVX-512F/BW/VL/DQ + F16C and D % 16 == 0
// Needs AMX-BF16 + AVX512-BF16/VBMI with tile permission, an e4m3 / e5m2 / bf16 cache,
// D % 32 == 0 and D <= 256 (attention_amx.cpp).
void attend_amx(const AttnTask& t);
// attend_amx's kernel for decode tasks (attention_amx_decode.cpp): runs the task and returns true
// if it fits (FP8 cache, D % 64 == 0, one row group with every probability part in one P tile).
bool attend_amx_decode(const AttnTask& t);
// After a thread's attend_amx calls of one op call: releases the tiles (they stay configured
// between tasks of the call).
void attend_amx_release();

}  // namespace fp8_backend
