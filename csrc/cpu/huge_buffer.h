// Scratch memory in transparent huge pages where the kernel allows them (THP "madvise" mode),
// kept and reused between calls. The AMX GEMM's working buffers (packed activations, partial
// sums, decoded weights) then occupy contiguous physical memory, so they cannot evict each other
// from L2 by set conflicts. With 4 KiB pages their physical placement is random, and the GEMM's
// time at M = 512 varied by up to 25% from one process to the next (measured on Sapphire Rapids).
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdlib>
#include <new>

namespace fp8_backend {

class HugeBuffer {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      release();
      size_ = (bytes + kHuge - 1) / kHuge * kHuge;
      ptr_ = std::aligned_alloc(kHuge, size_);
      if (!ptr_) throw std::bad_alloc();
      madvise(ptr_, size_, MADV_HUGEPAGE);  // a hint: without THP this is ordinary memory
    }
    return ptr_;
  }
  ~HugeBuffer() { release(); }

 private:
  static constexpr size_t kHuge = 2 << 20;
  void release() {
    std::free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace fp8_backend
