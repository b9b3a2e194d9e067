// Reading safetensors checkpoints through mmap: one file, or the shards an
// model.safetensors.index.json names (which must lie inside the model folder).
// Every header is validated before any tensor is used, by the format's rules: a header of at
// most 100 MB starting with '{', dtypes known, shape * dtype size (without overflow) equal to
// each byte range, and the ranges covering the data section exactly (no overlap, hole or
// trailing bytes). A tensor not aligned for its dtype (an unpadded header) is copied into
// aligned memory; every other tensor is a view into the mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace moeserve::model {

// The largest safetensors header and model.safetensors.index.json (bytes) read.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
inline constexpr size_t kMaxIndexBytes = size_t{256} << 20;

struct TensorView {
  std::string name;
  std::string file;  // the file it lives in, for messages
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the mapping
  size_t nbytes = 0;

  int64_t numel() const;
  std::string shape_str() const;  // "[a, b]"
};

// One mapped .safetensors file.
class SafeTensorsFile {
 public:
  explicit SafeTensorsFile(const std::string& path);  // throws moeserve::Error
  ~SafeTensorsFile();
  SafeTensorsFile(const SafeTensorsFile&) = delete;
  SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  size_t size() const { return size_; }
  // Drops this process's mapped pages of the file (they come back from the page cache if read
  // again): whole pages inside [p, p + n), or, with p null, the whole file.
  void release(const void* p, size_t n) const;

 private:
  struct FreeBytes {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  std::map<std::string, TensorView> tensors_;
  std::unique_ptr<std::byte, FreeBytes> copies_;  // the unaligned tensors, copied (64-aligned)
};

// All tensors of a model folder: model.safetensors, or every shard of
// model.safetensors.index.json, or (with neither) every *.safetensors in the folder.
class WeightStore {
 public:
  explicit WeightStore(const std::string& dir);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // The tensor `name`; a missing one is an error that names it and the folder.
  const TensorView& get(const std::string& name) const;
  // Like get(), and also checks dtype membership and the shape.
  const TensorView& get(const std::string& name, const std::vector<int64_t>& shape) const;
  const std::map<std::string, const TensorView*>& all() const { return index_; }
  size_t total_bytes() const;
  // SafeTensorsFile::release of [p, p + n), inside tensor t, or of every file.
  void release(const TensorView& t, const void* p, size_t n) const;
  void release_all() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafeTensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// Writes tensors to one .safetensors file, streaming: add() the header entries first, then
// write each tensor's bytes in the same order with write_data().
class SafeTensorsWriter {
 public:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  SafeTensorsWriter(const std::string& path, std::vector<Entry> entries);
  ~SafeTensorsWriter();
  void write_data(const void* bytes, size_t n);  // appends to the current tensor
  void finish();                                 // checks every byte was written

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
  size_t expected_ = 0, written_ = 0;
};

}  // namespace moeserve::model
