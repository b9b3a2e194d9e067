#include "comm/local_comm.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>

#include "core/error.h"

namespace moeserve::comm {

namespace {

void copy_bytes(void* dst, const void* src, size_t bytes) {
  if (bytes && dst != src) std::memmove(dst, src, bytes);
}

class LocalWindow final : public Window {
 public:
  LocalWindow(void* base, size_t bytes) : base_(static_cast<std::byte*>(base)), bytes_(bytes) {}
  size_t size(int rank) const override {
    MS_CHECK(rank == 0, "window: rank ", rank, " out of range [0, 1)");
    return bytes_;
  }
  void get(int target, size_t offset, void* dst, size_t bytes) override {
    MS_CHECK(target == 0, "window: rank ", target, " out of range [0, 1)");
    MS_CHECK(offset <= bytes_ && bytes <= bytes_ - offset, "window: read of [", offset, ", ",
             offset + bytes, ") past the ", bytes_, " bytes exposed");
    copy_bytes(dst, base_ + offset, bytes);
  }
  void flush(int target) override {}
  void flush_all() override {}

 private:
  std::byte* base_;
  size_t bytes_;
};

// Messages to self, queued per tag.
class LocalMailbox final : public Mailbox {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void post(int dest, int tag, std::vector<std::byte> data) override {
    MS_CHECK(dest == 0, "mailbox: rank ", dest, " out of range [0, 1)");
    MS_CHECK(tag >= 0 && tag <= 32767, "mailbox: tag ", tag, " out of range [0, 32767]");
    std::lock_guard<std::mutex> lk(mu_);
    queued_[tag].push_back({0, tag, std::move(data)});
  }
  std::optional<Message> poll(int tag) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = queued_.find(tag);
    if (it == queued_.end() || it->second.empty()) return std::nullopt;
    Message m = std::move(it->second.front());
    it->second.pop_front();
    return m;
  }
  void flush() override {}
  size_t pending() override {
    std::lock_guard<std::mutex> lk(mu_);
    size_t n = 0;
    for (const auto& [tag, q] : queued_) n += q.size();
    return n;
  }

 private:
  std::mutex mu_;
  std::map<int, std::deque<Message>> queued_;
};

class LocalSharedMemory final : public SharedMemory {
 public:
  explicit LocalSharedMemory(size_t bytes)
      : p_(static_cast<std::byte*>(::operator new(std::max<size_t>(bytes, 64), kAlign))) {}
  ~LocalSharedMemory() override { ::operator delete(p_, kAlign); }
  std::byte* base(int rank) override {
    MS_CHECK(rank == 0, "shared memory: rank ", rank, " out of range [0, 1)");
    return p_;
  }
  void sync() override {}

 private:
  static constexpr std::align_val_t kAlign{64};
  std::byte* p_;
};

void check_self(std::span<const size_t> v, const char* what) {
  MS_CHECK(v.size() == 1, what, ": ", v.size(), " entries for a communicator of size 1");
}

}  // namespace

std::unique_ptr<Communicator> LocalCommunicator::split(int color, int key) {
  if (color < 0) return nullptr;
  return std::make_unique<LocalCommunicator>();
}

void LocalCommunicator::broadcast(void* data, size_t bytes, int root) {
  MS_CHECK(root == 0, "broadcast: root ", root, " out of range [0, 1)");
}

void LocalCommunicator::all_gather(const void* send, size_t bytes, void* recv) {
  copy_bytes(recv, send, bytes);
}

void LocalCommunicator::all_gather_v(const void* send, size_t bytes, void* recv,
                                     std::span<const size_t> counts,
                                     std::span<const size_t> displs) {
  check_self(counts, "all_gather_v counts");
  check_self(displs, "all_gather_v displs");
  MS_CHECK(counts[0] == bytes, "all_gather_v: sends ", bytes, " bytes, counts say ", counts[0]);
  copy_bytes(static_cast<std::byte*>(recv) + displs[0], send, bytes);
}

void LocalCommunicator::all_to_all(const void* send, size_t bytes, void* recv) {
  copy_bytes(recv, send, bytes);
}

void LocalCommunicator::all_to_all_v(const void* send, std::span<const size_t> send_counts,
                                     std::span<const size_t> send_displs, void* recv,
                                     std::span<const size_t> recv_counts,
                                     std::span<const size_t> recv_displs) {
  check_self(send_counts, "all_to_all_v send_counts");
  check_self(send_displs, "all_to_all_v send_displs");
  check_self(recv_counts, "all_to_all_v recv_counts");
  check_self(recv_displs, "all_to_all_v recv_displs");
  MS_CHECK(send_counts[0] == recv_counts[0], "all_to_all_v: sends ", send_counts[0],
           " bytes to itself but receives ", recv_counts[0]);
  copy_bytes(static_cast<std::byte*>(recv) + recv_displs[0],
             static_cast<const std::byte*>(send) + send_displs[0], send_counts[0]);
}

void LocalCommunicator::all_to_all_segments(const Segments& send, const Segments& recv) {
  MS_CHECK(send.n_peers() == 1 && recv.n_peers() == 1, "all_to_all_segments: lists for ",
           send.n_peers(), " and ", recv.n_peers(), " peers on a communicator of size 1");
  MS_CHECK(send.peer_bytes(0) == recv.peer_bytes(0), "all_to_all_segments: sends ",
           send.peer_bytes(0), " bytes to itself but receives ", recv.peer_bytes(0));
  // Walk both lists at once: pieces need not be cut at the same places.
  auto s = send.peer(0), r = recv.peer(0);
  size_t si = 0, ri = 0, so = 0, ro = 0;
  while (si < s.size() && ri < r.size()) {
    const size_t n = std::min(s[si].bytes - so, r[ri].bytes - ro);
    copy_bytes(r[ri].ptr + ro, s[si].ptr + so, n);
    so += n, ro += n;
    if (so == s[si].bytes) ++si, so = 0;
    if (ro == r[ri].bytes) ++ri, ro = 0;
  }
}

void LocalCommunicator::send(const void* data, size_t bytes, int dest, int tag) {
  MS_CHECK(dest == 0, "send: rank ", dest, " out of range [0, 1)");
  MS_CHECK(tag >= 0 && tag <= 32767, "send: tag ", tag, " out of range [0, 32767]");
  const auto* p = static_cast<const std::byte*>(data);
  queued_[tag].emplace_back(p, p + bytes);
}

void LocalCommunicator::recv(void* data, size_t bytes, int source, int tag) {
  MS_CHECK(source == 0, "recv: rank ", source, " out of range [0, 1)");
  auto it = queued_.find(tag);
  MS_CHECK(it != queued_.end() && !it->second.empty(), "recv: no message with tag ", tag,
           " was sent to this single-process communicator");
  std::vector<std::byte> m = std::move(it->second.front());
  it->second.pop_front();
  MS_CHECK(m.size() == bytes, "recv: expects ", bytes, " bytes, the message has ", m.size());
  copy_bytes(data, m.data(), bytes);
}

std::unique_ptr<Window> local_window(void* base, size_t bytes) {
  return std::make_unique<LocalWindow>(base, bytes);
}

std::unique_ptr<SharedMemory> local_shared_memory(size_t bytes) {
  return std::make_unique<LocalSharedMemory>(bytes);
}

std::unique_ptr<SharedMemory> LocalCommunicator::share(size_t bytes) {
  return local_shared_memory(bytes);
}

std::unique_ptr<Window> LocalCommunicator::expose(void* base, size_t bytes) {
  return local_window(base, bytes);
}

std::unique_ptr<Mailbox> LocalCommunicator::mailbox() {
  return std::make_unique<LocalMailbox>();
}

void LocalCommunicator::abort(const std::string& message) {
  std::fprintf(stderr, "moeserve: aborting: %s\n", message.c_str());
  std::fflush(stderr);
  std::exit(1);
}

}  // namespace moeserve::comm
