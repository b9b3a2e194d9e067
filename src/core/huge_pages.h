// Memory of the process's own on 2 MB boundaries, advised as transparent huge pages: for large
// regions read far apart (the resident weights, the KV cache), where 4 KB pages would cost a TLB
// miss every few rows.
#pragma once

#include <cstddef>

namespace moeserve {

class HugeBuffer {
 public:
  // At least `bytes` (rounded up to whole 2 MB pages, at least one); `what` names it in the
  // error when the memory cannot be had.
  HugeBuffer(size_t bytes, const char* what);
  ~HugeBuffer();
  HugeBuffer(const HugeBuffer&) = delete;
  HugeBuffer& operator=(const HugeBuffer&) = delete;
  std::byte* data() const { return base_; }

 private:
  std::byte* base_ = nullptr;
};

}  // namespace moeserve
