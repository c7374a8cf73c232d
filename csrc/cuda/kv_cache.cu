// FP8 e4m3 KV-cache write (torch-free; C ABI). Cache layout [num_blocks, block_size, H, D] bytes;
// slot s -> block s / block_size, offset s % block_size; slot < 0 (padding) is skipped.
// q = saturate(round_half_even(x / scale)), scale per tensor or per KV head (scale_per_head).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fp8_math.cuh"

namespace {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void kv_write_kernel(const T* __restrict__ key, const T* __restrict__ value, uint8_t* __restrict__ kc,
                                uint8_t* __restrict__ vc, const int64_t* __restrict__ slots,
                                const float* __restrict__ k_scale, const float* __restrict__ v_scale,
                                int64_t key_stride, int64_t value_stride, int heads, int head_size, int block_size,
                                int scale_per_head) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0) return;
  const int64_t base = (slot / block_size) * (int64_t)block_size * heads * head_size +
                       (slot % block_size) * (int64_t)heads * head_size;
  for (int i = threadIdx.x; i < heads * head_size; i += blockDim.x) {
    const int h = scale_per_head ? i / head_size : 0;
    kc[base + i] = fp8_e4m3_encode(to_f32(key[t * key_stride + i]) / k_scale[h]);
    vc[base + i] = fp8_e4m3_encode(to_f32(value[t * value_stride + i]) / v_scale[h]);
  }
}

template <typename T>
int launch(const void* k, const void* v, void* kc, void* vc, const int64_t* slots, const float* ks, const float* vs,
           int64_t tokens, int64_t ks_stride, int64_t vs_stride, int heads, int head_size, int block_size,
           int per_head, cudaStream_t st) {
  if (tokens > 0)
    kv_write_kernel<T><<<(unsigned)tokens, 128, 0, st>>>((const T*)k, (const T*)v, (uint8_t*)kc, (uint8_t*)vc, slots,
                                                        ks, vs, ks_stride, vs_stride, heads, head_size, block_size,
                                                        per_head);
  return (int)cudaGetLastError();
}

}  // namespace

// dtype: 0 = fp32, 1 = fp16, 2 = bf16; key/value rows [tokens, H*D] with row strides. Returns cudaError_t.
extern "C" int fp8_kv_cache_write(int dtype, const void* key, const void* value, void* key_cache, void* value_cache,
                                  const int64_t* slot_mapping, const float* k_scale, const float* v_scale,
                                  int64_t tokens, int64_t key_stride, int64_t value_stride, int heads, int head_size,
                                  int block_size, int scale_per_head, void* stream) {
  cudaStream_t st = (cudaStream_t)stream;
  switch (dtype) {
    case 0: return launch<float>(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, tokens,
                                 key_stride, value_stride, heads, head_size, block_size, scale_per_head, st);
    case 1: return launch<__half>(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, tokens,
                                  key_stride, value_stride, heads, head_size, block_size, scale_per_head, st);
    case 2: return launch<__nv_bfloat16>(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, tokens,
                                         key_stride, value_stride, heads, head_size, block_size, scale_per_head, st);
    default: return (int)cudaErrorInvalidValue;
  }
}
