#include "core/huge_pages.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>

#include "core/error.h"

namespace moeserve {

HugeBuffer::HugeBuffer(size_t bytes, const char* what) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t size = std::max(kHuge, (bytes + kHuge - 1) / kHuge * kHuge);
  base_ = static_cast<std::byte*>(std::aligned_alloc(kHuge, size));
  MS_CHECK(base_ != nullptr, "cannot allocate ", size, " bytes of memory for ", what);
  ::madvise(base_, size, MADV_HUGEPAGE);  // advice: the memory works without it
}

HugeBuffer::~HugeBuffer() {
  std::free(base_);
}

}  // namespace moeserve
