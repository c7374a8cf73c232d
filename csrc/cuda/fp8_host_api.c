/* Host build of fp8_math.cuh for tests (ctypes): the device functions' arithmetic on the CPU. */
#include <math.h>
#include "fp8_math.cuh"

void fp8_host_encode(const float* x, uint8_t* q, long n) {
  for (long i = 0; i < n; ++i) q[i] = fp8_e4m3_encode(x[i]);
}

void fp8_host_decode(const uint8_t* q, float* y, long n) {
  for (long i = 0; i < n; ++i) y[i] = fp8_e4m3_decode(q[i]);
}

void fp8_host_quantize_row(const float* x, uint8_t* q, float* scale, long k, float scale_ub, int has_ub) {
  float amax = 0.0f;
  for (long i = 0; i < k; ++i) amax = fp8_nan_max(amax, fabsf(x[i]));
  if (has_ub && !(amax != amax) && amax > scale_ub) amax = scale_ub;
  const float s = fp8_scale_of(amax, FP8_SCALE_FLOOR);
  *scale = s;
  for (long i = 0; i < k; ++i) q[i] = fp8_e4m3_encode(x[i] / s);
}
