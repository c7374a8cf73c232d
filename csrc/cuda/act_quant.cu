// FP8 e4m3 activation quantization (torch-free; C ABI launchers at the bottom).
// Same semantics as numerics.quantize_per_token / quantize_group / quantize_per_tensor:
// scale = max(amax / 448, 1/(448*512)), q = saturate(round_half_even(x / scale)); NaN in the
// reduced range makes the scale NaN (torch.amax semantics). Output q as e4m3 bit patterns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "fp8_math.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Block-wide NaN-propagating max; every thread gets the result.
__device__ float block_amax(float v) {
  __shared__ float red[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v = fp8_nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x / 32) ? red[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v = fp8_nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  return v;
}

// One block per row: pass 1 amax, pass 2 quantize.
template <typename T>
__global__ void per_token_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                 int64_t k, float scale_ub, int has_ub) {
  const T* row = x + blockIdx.x * k;
  uint8_t* qrow = q + blockIdx.x * k;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) amax = fp8_nan_max(amax, fabsf(to_f32(row[i])));
  amax = block_amax(amax);
  if (has_ub && !(amax != amax) && amax > scale_ub) amax = scale_ub;
  const float s = fp8_scale_of(amax, FP8_SCALE_FLOOR);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  for (int64_t i = threadIdx.x; i < k; i += blockDim.x) qrow[i] = fp8_e4m3_encode(to_f32(row[i]) / s);
}

// One block per (row, group); group <= kThreads, the last group may be partial.
template <typename T>
__global__ void group_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                             int64_t k, int group) {
  const int64_t n_groups = (k + group - 1) / group;
  const int64_t col = blockIdx.y * (int64_t)group + threadIdx.x;
  const bool ok = threadIdx.x < group && col < k;
  const float v = ok ? to_f32(x[blockIdx.x * k + col]) : 0.0f;
  const float s = fp8_scale_of(block_amax(fabsf(v)), FP8_SCALE_FLOOR);
  if (threadIdx.x == 0) scale[blockIdx.x * n_groups + blockIdx.y] = s;
  if (ok) q[blockIdx.x * k + col] = fp8_e4m3_encode(v / s);
}

// Dynamic per-tensor, pass 1: amax of each block's grid-stride share.
template <typename T>
__global__ void partial_amax_kernel(const T* __restrict__ x, float* __restrict__ partial, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    amax = fp8_nan_max(amax, fabsf(to_f32(x[i])));
  amax = block_amax(amax);
  if (threadIdx.x == 0) partial[blockIdx.x] = amax;
}

// Pass 2 (dynamic: reduce the partials, block 0 writes the scale) or static scale; quantize.
template <typename T>
__global__ void per_tensor_kernel(const T* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scale,
                                  const float* __restrict__ partial, int n_partial, int64_t n) {
  float s;
  if (partial != nullptr) {
    float amax = 0.0f;
    for (int i = threadIdx.x; i < n_partial; i += blockDim.x) amax = fp8_nan_max(amax, partial[i]);
    s = fp8_scale_of(block_amax(amax), FP8_SCALE_FLOOR);
    if (blockIdx.x == 0 && threadIdx.x == 0) *scale = s;
  } else {
    s = *scale;
  }
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    q[i] = fp8_e4m3_encode(to_f32(x[i]) / s);
}

template <typename T>
int launch_per_token(const void* x, void* q, float* scale, int64_t m, int64_t k, float ub, int has_ub,
                     cudaStream_t st) {
  if (m > 0) per_token_kernel<T><<<(unsigned)m, kThreads, 0, st>>>((const T*)x, (uint8_t*)q, scale, k, ub, has_ub);
  return (int)cudaGetLastError();
}

template <typename T>
int launch_group(const void* x, void* q, float* scale, int64_t m, int64_t k, int group, cudaStream_t st) {
  if (group <= 0 || group > kThreads || group % 32) return (int)cudaErrorInvalidValue;
  if (m > 0 && k > 0)
    group_kernel<T><<<dim3((unsigned)m, (unsigned)((k + group - 1) / group)), group, 0, st>>>(
        (const T*)x, (uint8_t*)q, scale, k, group);
  return (int)cudaGetLastError();
}

// partial: workspace of >= 1024 floats (dynamic) or nullptr (static: *scale is read).
template <typename T>
int launch_per_tensor(const void* x, void* q, float* scale, float* partial, int64_t n, cudaStream_t st) {
  const int blocks = (int)(n / kThreads + 1 < 1024 ? n / kThreads + 1 : 1024);
  if (partial != nullptr) partial_amax_kernel<T><<<blocks, kThreads, 0, st>>>((const T*)x, partial, n);
  per_tensor_kernel<T><<<blocks, kThreads, 0, st>>>((const T*)x, (uint8_t*)q, scale, partial, blocks, n);
  return (int)cudaGetLastError();
}

}  // namespace

// dtype: 0 = fp32, 1 = fp16, 2 = bf16. Return value: cudaError_t.
#define FP8_DISPATCH(dtype, CALL)                                  \
  switch (dtype) {                                                 \
    case 0: { using T = float; return CALL; }                      \
    case 1: { using T = __half; return CALL; }                     \
    case 2: { using T = __nv_bfloat16; return CALL; }              \
    default: return (int)cudaErrorInvalidValue;                    \
  }

extern "C" int fp8_quant_per_token(int dtype, const void* x, void* q, float* scale, int64_t m, int64_t k,
                                   float scale_ub, int has_ub, void* stream) {
  FP8_DISPATCH(dtype, launch_per_token<T>(x, q, scale, m, k, scale_ub, has_ub, (cudaStream_t)stream))
}

extern "C" int fp8_quant_group(int dtype, const void* x, void* q, float* scale, int64_t m, int64_t k, int group,
                               void* stream) {
  FP8_DISPATCH(dtype, launch_group<T>(x, q, scale, m, k, group, (cudaStream_t)stream))
}

extern "C" int fp8_quant_per_tensor(int dtype, const void* x, void* q, float* scale, float* workspace, int64_t n,
                                    void* stream) {
  FP8_DISPATCH(dtype, launch_per_tensor<T>(x, q, scale, workspace, n, (cudaStream_t)stream))
}
