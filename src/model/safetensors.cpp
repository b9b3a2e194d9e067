#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.h"

namespace moeserve::model {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

static std::string shape_string(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string TensorView::shape_str() const {
  return shape_string(shape);
}

SafeTensorsFile::SafeTensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  MS_CHECK(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat ", path);
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(path, " is not a safetensors file: ", size_, " bytes, shorter than its 8-byte header");
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MS_CHECK(map_ != MAP_FAILED, "cannot mmap ", path, ": ", std::strerror(errno));
  const auto* bytes = static_cast<const uint8_t*>(map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian, as x86 is
  try {
    MS_CHECK(header_len <= size_ - 8, path, " is truncated or not safetensors: header claims ",
             header_len, " bytes, file has ", size_ - 8, " after the length");
    json header;
    try {
      header = json::parse(bytes + 8, bytes + 8 + header_len);
    } catch (const json::exception& e) {
      fail(path, ": safetensors header is not valid JSON (", e.what(), ")");
    }
    MS_CHECK(header.is_object(), path, ": safetensors header is not a JSON object");
    const uint8_t* data = bytes + 8 + header_len;
    const size_t data_size = size_ - 8 - header_len;
    std::vector<std::pair<size_t, size_t>> ranges;
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") continue;
      const json& e = it.value();
      const std::string& name = it.key();
      MS_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") &&
                   e.contains("data_offsets") && e["dtype"].is_string() && e["shape"].is_array() &&
                   e["data_offsets"].is_array() && e["data_offsets"].size() == 2,
               path, ": header entry for tensor ", name, " is malformed");
      TensorView v;
      v.name = name;
      v.file = path;
      const std::string dt = e["dtype"];
      MS_CHECK(parse_dtype(dt, &v.dtype), path, ": tensor ", name, " has unsupported dtype ", dt);
      for (const auto& d : e["shape"]) {
        MS_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0, path, ": tensor ", name,
                 " has an invalid shape");
        v.shape.push_back(d.get<int64_t>());
      }
      const auto& off = e["data_offsets"];
      MS_CHECK(off[0].is_number_unsigned() && off[1].is_number_unsigned(), path, ": tensor ", name,
               " has invalid data_offsets");
      const size_t b = off[0].get<size_t>(), en = off[1].get<size_t>();
      MS_CHECK(b <= en && en <= data_size, path, " is truncated or its header is wrong: tensor ",
               name, " claims bytes [", b, ", ", en, ") but the data section has ", data_size);
      const size_t want = static_cast<size_t>(v.numel()) * dtype_size(v.dtype);
      MS_CHECK(en - b == want, path, ": tensor ", name, " has ", en - b, " bytes but shape ",
               v.shape_str(), " of ", dt, " needs ", want);
      v.data = data + b;
      v.nbytes = want;
      if (want) ranges.push_back({b, en});
      tensors_.emplace(name, std::move(v));
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) {
      MS_CHECK(ranges[i].first >= ranges[i - 1].second, path,
               ": header is wrong: two tensors share bytes at offset ", ranges[i].first);
    }
  } catch (...) {
    ::munmap(map_, size_);
    map_ = nullptr;
    throw;
  }
}

SafeTensorsFile::~SafeTensorsFile() {
  if (map_) ::munmap(map_, size_);
}

WeightStore::WeightStore(const std::string& dir) : dir_(dir) {
  MS_CHECK(fs::is_directory(dir), "model folder ", dir, " does not exist");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> paths;
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      j = json::parse(in);
    } catch (const json::exception& e) {
      fail(index.string(), " is not valid JSON (", e.what(), ")");
    }
    MS_CHECK(j.contains("weight_map") && j["weight_map"].is_object(), index.string(),
             " has no weight_map object");
    std::set<std::string> shards;
    for (auto& [name, file] : j["weight_map"].items()) {
      MS_CHECK(file.is_string(), index.string(), ": weight_map entry ", name, " is not a string");
      shards.insert(file.get<std::string>());
    }
    for (const auto& s : shards) {
      const fs::path p = fs::path(dir) / s;
      MS_CHECK(fs::exists(p), "shard ", s, " named by ", index.string(), " is missing");
      paths.push_back(p.string());
    }
  } else if (fs::exists(fs::path(dir) / "model.safetensors")) {
    paths.push_back((fs::path(dir) / "model.safetensors").string());
  } else {
    for (const auto& e : fs::directory_iterator(dir)) {
      if (e.path().extension() == ".safetensors") paths.push_back(e.path().string());
    }
    std::sort(paths.begin(), paths.end());
  }
  MS_CHECK(!paths.empty(), "model folder ", dir, " has no .safetensors files");
  for (const auto& p : paths) {
    files_.push_back(std::make_unique<SafeTensorsFile>(p));
    for (const auto& [name, view] : files_.back()->tensors()) {
      MS_CHECK(index_.emplace(name, &view).second, "tensor ", name, " appears in two files (",
               index_[name]->file, " and ", p, ")");
    }
  }
}

const TensorView& WeightStore::get(const std::string& name) const {
  auto it = index_.find(name);
  MS_CHECK(it != index_.end(), "tensor ", name, " is missing from the checkpoint in ", dir_);
  return *it->second;
}

const TensorView& WeightStore::get(const std::string& name,
                                   const std::vector<int64_t>& shape) const {
  const TensorView& v = get(name);
  MS_CHECK(v.shape == shape, "tensor ", name, " has shape ", v.shape_str(), ", expected ",
           shape_string(shape));
  return v;
}

void SafeTensorsFile::release(const void* p, size_t n) const {
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  auto b = reinterpret_cast<uintptr_t>(p ? p : map_), e = b + (p ? n : size_);
  b = (b + page - 1) / page * page;
  e = e / page * page;
  if (e > b) ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);  // advice: no error
}

void WeightStore::release(const TensorView& t, const void* p, size_t n) const {
  for (const auto& f : files_)
    if (f->path() == t.file) return f->release(p, n);
}

void WeightStore::release_all() const {
  for (const auto& f : files_) f->release(nullptr, 0);
}

size_t WeightStore::total_bytes() const {
  size_t n = 0;
  for (const auto& [name, v] : index_) n += v->nbytes;
  return n;
}

SafeTensorsWriter::SafeTensorsWriter(const std::string& path, std::vector<Entry> entries)
    : path_(path) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};
  size_t off = 0;
  for (const auto& e : entries) {
    size_t n = dtype_size(e.dtype);
    for (int64_t d : e.shape) n *= static_cast<size_t>(d);
    header[e.name] = {
        {"dtype", dtype_name(e.dtype)}, {"shape", e.shape}, {"data_offsets", {off, off + n}}};
    off += n;
  }
  expected_ = off;
  // nlohmann orders keys alphabetically; offsets follow `entries` order, which is fine.
  std::string h = header.dump();
  while ((h.size() + 8) % 8) h.push_back(' ');
  f_ = std::fopen(path.c_str(), "wb");
  MS_CHECK(f_, "cannot create ", path, ": ", std::strerror(errno));
  const uint64_t len = h.size();
  std::fwrite(&len, 8, 1, f_);
  std::fwrite(h.data(), 1, h.size(), f_);
}

SafeTensorsWriter::~SafeTensorsWriter() {
  if (f_) std::fclose(f_);
}

void SafeTensorsWriter::write_data(const void* bytes, size_t n) {
  MS_CHECK(written_ + n <= expected_, "internal error: writing past the end of ", path_);
  MS_CHECK(std::fwrite(bytes, 1, n, f_) == n, "write to ", path_, " failed");
  written_ += n;
}

void SafeTensorsWriter::finish() {
  MS_CHECK(written_ == expected_, "internal error: ", path_, " got ", written_, " of ", expected_,
           " bytes");
  MS_CHECK(std::fclose(f_) == 0, "closing ", path_, " failed");
  f_ = nullptr;
}

}  // namespace moeserve::model
