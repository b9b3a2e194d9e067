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
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "core/checked.h"
#include "core/error.h"
#include "core/json_file.h"

namespace moeserve::model {

namespace fs = std::filesystem;
using nlohmann::json;

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) {
    const auto r = checked_mul(n, d);
    MS_CHECK(d >= 0 && r, "tensor ", name, " has shape ", shape_str(),
             ", whose element count does not fit in 64 bits");
    n = *r;
  }
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

namespace {

// The format's limit on the JSON header (as the reference implementation enforces it).
// An index lists every tensor once; DeepSeek-V3's is about 9 MB.

// A name from a header for a message: cut when long, control bytes shown as '?'.
std::string printable(const std::string& s) {
  std::string out = s.size() > 200 ? s.substr(0, 200) + "..." : s;
  for (char& ch : out)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  return out;
}

}  // namespace

SafeTensorsFile::SafeTensorsFile(const std::string& path) : path_(path) {
  // O_NONBLOCK: a FIFO named like a shard must not block the open; only regular files are read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  MS_CHECK(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat ", path);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, " is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(path, " is not a safetensors file: ", size_, " bytes, shorter than its 8-byte header");
  }
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail("cannot mmap ", path, ": ", std::strerror(errno));
  }
  const auto* bytes = static_cast<const uint8_t*>(map_);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes, 8);  // little-endian, as x86 is
  try {
    // The length is not printed: in a file that is not safetensors, it is the file's first bytes.
    MS_CHECK(header_len <= size_ - 8, path,
             " is truncated or not a safetensors file: its header claims more bytes than the file "
             "has (",
             size_, ")");
    MS_CHECK(header_len <= kMaxHeaderBytes, path,
             " is not a safetensors file: its header claims more than the format's 100 MB");
    MS_CHECK(header_len >= 2 && bytes[8] == '{', path,
             ": safetensors header is not valid JSON: it does not start with '{'");
    json header;
    try {
      header = json::parse(bytes + 8, bytes + 8 + header_len);
    } catch (const json::parse_error& e) {
      fail(path, ": safetensors header is not valid JSON (syntax error at byte ", e.byte + 8, ")");
    } catch (const json::exception&) {
      fail(path, ": safetensors header is not valid JSON (a value out of range)");
    }
    MS_CHECK(header.is_object(), path, ": safetensors header is not a JSON object");
    const uint8_t* data = bytes + 8 + header_len;
    const size_t data_size = size_ - 8 - header_len;
    struct Range {
      size_t b, e;
      const std::string* name;
      bool operator<(const Range& o) const { return b != o.b ? b < o.b : e < o.e; }
    };
    std::vector<Range> ranges;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string name = printable(it.key());
      if (it.key() == "__metadata__") {
        const json& m = it.value();
        MS_CHECK(m.is_object() &&
                     std::all_of(m.begin(), m.end(), [](const json& v) { return v.is_string(); }),
                 path, ": __metadata__ must be an object of strings");
        continue;
      }
      const json& e = it.value();
      MS_CHECK(e.is_object() && e.contains("dtype") && e.contains("shape") &&
                   e.contains("data_offsets") && e["dtype"].is_string() && e["shape"].is_array() &&
                   e["data_offsets"].is_array() && e["data_offsets"].size() == 2,
               path, ": header entry for tensor ", name, " is malformed");
      TensorView v;
      v.name = it.key();
      v.file = path;
      const std::string dt = e["dtype"];
      MS_CHECK(parse_dtype(dt, &v.dtype), path, ": tensor ", name, " has unsupported dtype ",
               printable(dt));
      for (const auto& d : e["shape"]) {
        MS_CHECK(d.is_number_integer() &&
                     !(d.is_number_unsigned() && d.get<uint64_t>() > INT64_MAX) &&
                     d.get<int64_t>() >= 0,
                 path, ": tensor ", name, " has an invalid shape");
        v.shape.push_back(d.get<int64_t>());
      }
      const auto& off = e["data_offsets"];
      MS_CHECK(off[0].is_number_unsigned() && off[1].is_number_unsigned(), path, ": tensor ", name,
               " has invalid data_offsets");
      const uint64_t b = off[0].get<uint64_t>(), en = off[1].get<uint64_t>();
      MS_CHECK(b <= en && en <= data_size, path, " is truncated or its header is wrong: tensor ",
               name, " claims bytes [", b, ", ", en, ") but the data section has ", data_size);
      // Element count and byte size without overflow: a shape can claim more than 2^64 bytes.
      uint64_t want = dtype_size(v.dtype);
      for (int64_t d : v.shape) {
        const auto r = checked_mul(want, static_cast<uint64_t>(d));
        MS_CHECK(r, path, ": tensor ", name, " has shape ", v.shape_str(), " of ", dt,
                 ", more bytes than fit in 64 bits");
        want = *r;
      }
      MS_CHECK(en - b == want, path, ": tensor ", name, " has ", en - b, " bytes but shape ",
               v.shape_str(), " of ", dt, " needs ", want);
      v.data = data + b;
      v.nbytes = want;
      auto [pos, fresh] = tensors_.emplace(it.key(), std::move(v));
      ranges.push_back({b, en, &pos->first});
    }
    // As the format requires: the tensors, in offset order, cover the data section exactly,
    // without overlaps, holes or trailing bytes.
    std::sort(ranges.begin(), ranges.end());
    size_t at = 0;
    for (const Range& r : ranges) {
      MS_CHECK(r.b >= at, path, ": header is wrong: two tensors share bytes at offset ", r.b,
               " (tensor ", printable(*r.name), ")");
      MS_CHECK(r.b == at, path, ": header is wrong: bytes [", at, ", ", r.b,
               ") of the data section belong to no tensor");
      at = r.e;
    }
    MS_CHECK(at == data_size, path, ": header is wrong: the last ", data_size - at,
             " bytes of the data section belong to no tensor");
    // A header not padded to 8 bytes (or odd offsets) leaves tensors unaligned for their
    // element type; those are copied into aligned memory of the file's own.
    size_t copy_bytes = 0;
    auto misaligned = [](const TensorView& t) {
      return t.nbytes && reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) != 0;
    };
    for (const auto& [name, t] : tensors_)
      if (misaligned(t)) copy_bytes += (t.nbytes + 63) / 64 * 64;
    if (copy_bytes) {
      copies_.reset(static_cast<std::byte*>(std::aligned_alloc(64, copy_bytes)));
      MS_CHECK(copies_, "out of memory copying the unaligned tensors of ", path);
      size_t o = 0;
      for (auto& [name, t] : tensors_) {
        if (!misaligned(t)) continue;
        std::memcpy(copies_.get() + o, t.data, t.nbytes);
        t.data = copies_.get() + o;
        o += (t.nbytes + 63) / 64 * 64;
      }
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

namespace {

// Whether `p` (absolute, normalized) lies inside folder `root` (absolute, normalized).
bool inside(const fs::path& p, const fs::path& root) {
  auto pi = p.begin();
  for (auto ri = root.begin(); ri != root.end(); ++ri, ++pi) {
    if (ri->empty()) continue;  // a trailing separator
    if (pi == p.end() || *pi != *ri) return false;
  }
  return true;
}

// The file `name` (relative to the model folder `dir`) as a path to open, after checking that
// it stays inside the folder: no absolute path, no "..", and no symbolic link that leads out.
// A Hugging Face cache snapshot (<repo>/snapshots/<revision>) may link into <repo>/blobs.
std::string confined(const fs::path& dir, const std::string& name, const std::string& named_by) {
  const std::string shown = printable(name);
  MS_CHECK(!name.empty() && name.find('\0') == std::string::npos, "shard name \"", shown, "\" in ",
           named_by, " is not a file name");
  const fs::path rel(name);
  MS_CHECK(rel.is_relative() && !rel.has_root_name() && !rel.has_root_directory(), "shard ", shown,
           " named by ", named_by, " is an absolute path; shards must be inside the model folder");
  for (const auto& part : rel)
    MS_CHECK(part != "..", "shard ", shown, " named by ", named_by,
             " leads out of the model folder (\"..\"); shards must be inside it");
  const fs::path p = dir / rel;
  std::error_code ec;
  MS_CHECK(fs::exists(p, ec), "shard ", shown, " named by ", named_by, " is missing");
  const fs::path root = fs::canonical(dir, ec);
  MS_CHECK(!ec, "cannot resolve model folder ", dir.string(), ": ", ec.message());
  const fs::path real = fs::canonical(p, ec);
  MS_CHECK(!ec, "cannot resolve shard ", shown, " in ", dir.string(), ": ", ec.message());
  const bool hf_blob = root.parent_path().filename() == "snapshots" &&
                       inside(real, root.parent_path().parent_path() / "blobs");
  MS_CHECK(inside(real, root) || hf_blob, "shard ", shown, " named by ", named_by,
           " is a link that leads out of the model folder (to ", real.string(),
           "); shards must be inside it");
  return p.string();
}

}  // namespace

WeightStore::WeightStore(const std::string& dir) : dir_(dir) {
  std::error_code ec;  // (the non-throwing forms: a permission error is an Error like others)
  MS_CHECK(fs::is_directory(dir, ec), "model folder ", dir, " does not exist");
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  std::vector<std::string> paths;
  std::vector<std::pair<std::string, std::string>> listed;  // (tensor, shard path) of the index
  if (fs::exists(index, ec)) {
    json j = read_json_file(index.string(), kMaxIndexBytes);
    MS_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
             index.string(), " has no weight_map object");
    std::map<std::string, std::string> shards;  // name in the index -> path to open
    for (auto& [name, file] : j["weight_map"].items()) {
      MS_CHECK(file.is_string(), index.string(), ": weight_map entry ", printable(name),
               " is not a string");
      const std::string s = file.get<std::string>();
      auto it = shards.find(s);
      if (it == shards.end())
        it = shards.emplace(s, confined(fs::path(dir), s, index.string())).first;
      listed.emplace_back(name, it->second);
    }
    for (const auto& [s, p] : shards) paths.push_back(p);
  } else if (fs::exists(fs::path(dir) / "model.safetensors", ec)) {
    paths.push_back(confined(fs::path(dir), "model.safetensors", "the model folder"));
  } else {
    fs::directory_iterator it(dir, ec), end;
    MS_CHECK(!ec, "cannot list model folder ", dir, ": ", ec.message());
    for (; it != end; it.increment(ec)) {
      if (it->path().extension() == ".safetensors")
        paths.push_back(
            confined(fs::path(dir), it->path().filename().string(), "the model folder"));
    }
    MS_CHECK(!ec, "cannot list model folder ", dir, ": ", ec.message());
    std::sort(paths.begin(), paths.end());
  }
  MS_CHECK(!paths.empty(), "model folder ", dir, " has no .safetensors files");
  for (const auto& p : paths) {
    files_.push_back(std::make_unique<SafeTensorsFile>(p));
    for (const auto& [name, view] : files_.back()->tensors()) {
      MS_CHECK(index_.emplace(name, &view).second, "tensor ", printable(name),
               " appears in two files (", index_[name]->file, " and ", p, ")");
    }
  }
  for (const auto& [name, p] : listed) {
    auto it = index_.find(name);
    MS_CHECK(
        it != index_.end() && it->second->file == p, index.string(), " places tensor ",
        printable(name), " in ", p, ", but ",
        it == index_.end() ? std::string("no shard holds it") : "it is in " + it->second->file);
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
  // Only the mapping's pages: dropping those of a copy (an unaligned tensor's) would zero them.
  const auto* m = static_cast<const std::byte*>(map_);
  if (p && (static_cast<const std::byte*>(p) < m || static_cast<const std::byte*>(p) >= m + size_))
    return;
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
