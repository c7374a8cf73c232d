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

constexpr size_t kHugePage = 2 << 20;

// bytes rounded up to whole huge pages: what huge_alloc(bytes) really provides.
inline size_t huge_size(size_t bytes) { return (bytes + kHugePage - 1) / kHugePage * kHugePage; }

// huge_size(bytes) of uninitialized memory, 2 MiB-aligned and advised to use transparent huge
// pages; release with std::free. Throws std::bad_alloc.
inline void* huge_alloc(size_t bytes) {
  const size_t size = huge_size(bytes);
  void* p = std::aligned_alloc(kHugePage, size);
  if (!p) throw std::bad_alloc();
  madvise(p, size, MADV_HUGEPAGE);  // a hint: without THP this is ordinary memory
  return p;
}

// A per-thread scratch buffer from huge_alloc that only grows.
class HugeBuffer {
 public:
  void* get(size_t bytes) {
    if (bytes > size_) {
      release();
      ptr_ = huge_alloc(bytes);
      size_ = huge_size(bytes);
    }
    return ptr_;
  }
  ~HugeBuffer() { release(); }

 private:
  void release() {
    std::free(ptr_);
    ptr_ = nullptr;
    size_ = 0;
  }
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

}  // namespace fp8_backend
