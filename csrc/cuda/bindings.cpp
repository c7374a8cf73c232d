// Thin torch bindings of the torch-free CUDA kernels (act_quant.cu, kv_cache.cu) as
// torch.ops.fp8_backend_cuda.*. Built by setup.py only when torch has CUDA and nvcc is present.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

extern "C" int fp8_quant_per_token(int dtype, const void* x, void* q, float* scale, int64_t m, int64_t k,
                                   float scale_ub, int has_ub, void* stream);
extern "C" int fp8_quant_group(int dtype, const void* x, void* q, float* scale, int64_t m, int64_t k, int group,
                               void* stream);
extern "C" int fp8_quant_per_tensor(int dtype, const void* x, void* q, float* scale, float* workspace, int64_t n,
                                    void* stream);
extern "C" int fp8_kv_cache_write(int dtype, const void* key, const void* value, void* key_cache, void* value_cache,
                                  const int64_t* slot_mapping, const float* k_scale, const float* v_scale,
                                  int64_t tokens, int64_t key_stride, int64_t value_stride, int heads, int head_size,
                                  int block_size, int scale_per_head, void* stream);

namespace {

int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, name, ": expected fp32/fp16/bf16, found ", x.scalar_type());
  }
}

void check(int err, const char* what) { TORCH_CHECK(err == 0, what, ": CUDA error ", err); }

void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

std::tuple<at::Tensor, at::Tensor> quant_per_token(const at::Tensor& x_in, std::optional<double> scale_ub) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto sizes = x.sizes().vec();
  sizes.back() = 1;
  auto scale = at::empty(sizes, x.options().dtype(at::kFloat));
  check(fp8_quant_per_token(dtype_code(x, "quant_per_token: x"), x.data_ptr(), q.data_ptr(), scale.data_ptr<float>(),
                            m, k, static_cast<float>(scale_ub.value_or(0.0)), scale_ub.has_value(), stream()),
        "quant_per_token");
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quant_group(const at::Tensor& x_in, int64_t group) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto sizes = x.sizes().vec();
  sizes.back() = (k + group - 1) / group;
  auto scale = at::empty(sizes, x.options().dtype(at::kFloat));
  check(fp8_quant_group(dtype_code(x, "quant_group: x"), x.data_ptr(), q.data_ptr(), scale.data_ptr<float>(), m, k,
                        static_cast<int>(group), stream()),
        "quant_group (group must be a multiple of 32, <= 256)");
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor> quant_per_tensor(const at::Tensor& x_in, const std::optional<at::Tensor>& s) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto q = at::empty(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor scale, workspace;
  if (s.has_value()) {
    TORCH_CHECK(s->numel() == 1, "quant_per_tensor: expected a 1-element scale, found ", s->numel());
    scale = s->to(x.device(), at::kFloat).reshape({}).contiguous();
  } else {
    scale = at::empty({}, x.options().dtype(at::kFloat));
    workspace = at::empty({1024}, x.options().dtype(at::kFloat));
  }
  check(fp8_quant_per_tensor(dtype_code(x, "quant_per_tensor: x"), x.data_ptr(), q.data_ptr(), scale.data_ptr<float>(),
                             s.has_value() ? nullptr : workspace.data_ptr<float>(), x.numel(), stream()),
        "quant_per_tensor");
  return {q, scale};
}

void kv_cache_write(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping, const at::Tensor& k_scale, const at::Tensor& v_scale) {
  const c10::cuda::CUDAGuard guard(key.device());
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && key_cache.scalar_type() == at::kFloat8_e4m3fn,
              "key_cache: expected a contiguous float8_e4m3fn [blocks, block_size, H, D] tensor");
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes() && value_cache.is_contiguous(),
              "value_cache: expected the shape of key_cache");
  TORCH_CHECK(key.stride(-1) == 1 && key.stride(-2) == key.size(-1) && value.stride(-1) == 1 &&
                  value.stride(-2) == value.size(-1),
              "key/value: expected [T, H, D] with contiguous [H, D] rows");
  const int heads = key_cache.size(2), head_size = key_cache.size(3);
  TORCH_CHECK(k_scale.numel() == v_scale.numel() && (k_scale.numel() == 1 || k_scale.numel() == heads),
              "k_scale/v_scale: expected 1 or num_kv_heads scales each");
  const auto slots = slot_mapping.to(at::kLong).contiguous();
  const auto ks = k_scale.to(at::kFloat).contiguous(), vs = v_scale.to(at::kFloat).contiguous();
  check(fp8_kv_cache_write(dtype_code(key, "kv_cache_write: key"), key.data_ptr(), value.data_ptr(),
                           key_cache.data_ptr(), value_cache.data_ptr(), slots.data_ptr<int64_t>(),
                           ks.data_ptr<float>(), vs.data_ptr<float>(), key.size(0), key.stride(0), value.stride(0),
                           heads, head_size, key_cache.size(1), k_scale.numel() == heads && heads > 1, stream()),
        "kv_cache_write");
}

}  // namespace

TORCH_LIBRARY(fp8_backend_cuda, m) {
  m.def("quant_per_token(Tensor x, float? scale_ub) -> (Tensor, Tensor)");
  m.def("quant_group(Tensor x, int group) -> (Tensor, Tensor)");
  m.def("quant_per_tensor(Tensor x, Tensor? scale) -> (Tensor, Tensor)");
  m.def("kv_cache_write(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping, "
        "Tensor k_scale, Tensor v_scale) -> ()");
}

TORCH_LIBRARY_IMPL(fp8_backend_cuda, CUDA, m) {
  m.impl("quant_per_token", &quant_per_token);
  m.impl("quant_group", &quant_group);
  m.impl("quant_per_tensor", &quant_per_tensor);
  m.impl("kv_cache_write", &kv_cache_write);
}

// Python module stub so that `import fp8_backend._C_cuda` loads the library (and registers the ops).
#include <Python.h>
static struct PyModuleDef fp8_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&fp8_cuda_module); }
