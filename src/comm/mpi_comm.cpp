// The MPI backend: the only file of moeserve that includes mpi.h.
//
// MPI is initialized once per process (MPI_THREAD_MULTIPLE where the library has it, at least
// MPI_THREAD_SERIALIZED: any thread may call, one at a time; mailboxes need MULTIPLE) by the first
// mpi_world() and finalized at exit. Counts above INT_MAX: every call moves at most kChunk bytes
// per MPI message, or describes larger blocks with derived datatypes, so the caller never sees
// MPI's int counts.
//
// All-to-all exchanges go through MPI_Alltoallw on every rank (also all_to_all_v), because the
// datatype each rank needs (plain bytes, or a derived type for scattered or huge blocks) depends
// on its own sizes only; a rank choosing MPI_Alltoallv while another chose MPI_Alltoallw would
// not match. A message in several pieces goes as one derived datatype by default, or through a
// contiguous staging copy (PiecesVia::Staging), which lets Open MPI use its single-copy path
// on one node but costs a copy of ours; measured, the derived types were faster.
// The C API only: Open MPI's mpi.h otherwise pulls in its C++ bindings (libmpi_cxx).
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/local_comm.h"
#include "core/error.h"

namespace moeserve::comm {

namespace {

constexpr size_t kChunk = size_t(1) << 30;  // bytes of one MPI message or datatype block

#define MS_MPI(call)                              \
  do {                                            \
    const int rc_ = (call);                       \
    if (rc_ != MPI_SUCCESS) mpi_fail(rc_, #call); \
  } while (0)

[[noreturn]] void mpi_fail(int rc, const char* call) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  fail("MPI error in ", call, ": ", std::string(text, len));
}

// MPI_Init_thread on first use, MPI_Finalize at exit (unless someone else initialized MPI).
class Runtime {
 public:
  Runtime() {
    int initialized = 0, provided = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      MS_MPI(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
      owned_ = true;
    } else {
      MPI_Query_thread(&provided);
    }
    MS_CHECK(provided >= MPI_THREAD_SERIALIZED, "MPI provides thread level ", provided,
             ", moeserve needs MPI_THREAD_SERIALIZED");
    provided_ = provided;
  }
  int provided() const { return provided_; }
  ~Runtime() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Finalize();
  }

 private:
  bool owned_ = false;
  int provided_ = 0;
};

Runtime& ensure_runtime() {
  static Runtime runtime;
  return runtime;
}

bool finalized() {
  int f = 0;
  MPI_Finalized(&f);
  return f;
}

bool fits_int(size_t v) {
  return v <= static_cast<size_t>(INT_MAX);
}

// Pieces may lie in different allocations: compare and subtract them as integers.
uintptr_t address(const std::byte* p) {
  return reinterpret_cast<uintptr_t>(p);
}

// Owns the derived datatypes made for one call.
class Types {
 public:
  ~Types() {
    for (MPI_Datatype& t : owned_) MPI_Type_free(&t);
  }
  MPI_Datatype keep(MPI_Datatype t) {
    MS_MPI(MPI_Type_commit(&t));
    owned_.push_back(t);
    return t;
  }
  // A type of `bytes` contiguous bytes (size and extent == bytes), for blocks above INT_MAX.
  MPI_Datatype bytes(size_t n) {
    MPI_Datatype chunk, body, t;
    MS_MPI(MPI_Type_contiguous(static_cast<int>(kChunk), MPI_BYTE, &chunk));
    MS_MPI(MPI_Type_contiguous(static_cast<int>(n / kChunk), chunk, &body));
    const int lens[2] = {1, static_cast<int>(n % kChunk)};
    const MPI_Aint displs[2] = {0, static_cast<MPI_Aint>(n - n % kChunk)};
    const MPI_Datatype parts[2] = {body, MPI_BYTE};
    MS_MPI(MPI_Type_create_struct(lens[1] ? 2 : 1, lens, displs, parts, &t));
    MPI_Type_free(&chunk);
    MPI_Type_free(&body);
    return keep(t);
  }
  // The pieces as one type, displacements from base; blocks of at most kChunk bytes.
  MPI_Datatype pieces(std::span<const Segments::Piece> ps, const std::byte* base) {
    lens_.clear();
    displs_.clear();
    for (const auto& p : ps)
      for (size_t o = 0; o < p.bytes; o += kChunk) {
        lens_.push_back(static_cast<int>(std::min(kChunk, p.bytes - o)));
        displs_.push_back(static_cast<MPI_Aint>(address(p.ptr) + o - address(base)));
      }
    MPI_Datatype t;
    MS_CHECK(fits_int(lens_.size()), "all_to_all: too many pieces for one peer");
    MS_MPI(MPI_Type_create_hindexed(static_cast<int>(lens_.size()), lens_.data(), displs_.data(),
                                    MPI_BYTE, &t));
    return keep(t);
  }

 private:
  std::vector<MPI_Datatype> owned_;
  std::vector<int> lens_;
  std::vector<MPI_Aint> displs_;
};

// The Alltoallw arguments of one side of an exchange.
struct Side {
  std::byte* base = nullptr;
  std::vector<int> counts, displs;
  std::vector<MPI_Datatype> types;

  void build(const Segments& s, int n, Types& types_out) {
    base = nullptr;
    for (int p = 0; p < n; ++p)
      for (const auto& x : s.peer(p))
        if (!base || address(x.ptr) < address(base)) base = x.ptr;
    counts.assign(n, 0);
    displs.assign(n, 0);
    types.assign(n, MPI_BYTE);
    for (int p = 0; p < n; ++p) {
      const auto ps = s.peer(p);
      if (ps.empty()) continue;
      const size_t off = address(ps[0].ptr) - address(base);
      if (ps.size() == 1 && fits_int(ps[0].bytes) && fits_int(off)) {
        counts[p] = static_cast<int>(ps[0].bytes);
        displs[p] = static_cast<int>(off);
      } else {
        types[p] = types_out.pieces(ps, base);
        counts[p] = 1;
      }
    }
  }
};

// Reads of node-local targets bypass MPI: the kernel copies straight from the target's pages
// (process_vm_readv, what Open MPI's single-copy path uses underneath), with the reads queued
// by get() split over several threads at flush. One such copy runs at about half the speed of
// a memcpy (the kernel pins the target's pages as it goes); a few in parallel make up for it.
// Where the kernel refuses (no permission, no such call) the window falls back to MPI_Get for
// that target. Ranks on other nodes always go through MPI_Get.
class MpiWindow final : public Window {
 public:
  static constexpr int kMaxReadThreads = 4;
  static constexpr size_t kBytesPerThread = size_t(16) << 20;  // below this, fewer threads

  MpiWindow(MPI_Comm comm, void* base, size_t bytes) {
    int n = 0, me = 0;
    MPI_Comm_size(comm, &n);
    MPI_Comm_rank(comm, &me);
    create(comm, base, bytes);
    // Per rank: size, process id, base address; then who shares this node.
    std::vector<uint64_t> all(3 * n);
    const uint64_t mine[3] = {bytes, static_cast<uint64_t>(getpid()),
                              static_cast<uint64_t>(reinterpret_cast<uintptr_t>(base))};
    MS_MPI(MPI_Allgather(mine, 3, MPI_UINT64_T, all.data(), 3, MPI_UINT64_T, comm));
    peers_.resize(n);
    for (int r = 0; r < n; ++r) {
      peers_[r].size = all[3 * r];
      peers_[r].pid = static_cast<pid_t>(all[3 * r + 1]);
      peers_[r].base = all[3 * r + 2];
    }
    MPI_Comm node = MPI_COMM_NULL;
    MS_MPI(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
    MPI_Group g_node, g_all;
    MPI_Comm_group(node, &g_node);
    MPI_Comm_group(comm, &g_all);
    int local = 0;
    MPI_Comm_size(node, &local);
    std::vector<int> in_node(local), in_all(local);
    for (int i = 0; i < local; ++i) in_node[i] = i;
    MS_MPI(MPI_Group_translate_ranks(g_node, local, in_node.data(), g_all, in_all.data()));
    for (int r : in_all)
      if (r != MPI_UNDEFINED && r != me) peers_[r].direct = true;
    MPI_Group_free(&g_node);
    MPI_Group_free(&g_all);
    MPI_Comm_free(&node);
    if (const char* e = std::getenv("MOESERVE_WINDOW_MPI_GET"); e && *e == '1')
      for (Peer& p : peers_) p.direct = false;
    MS_MPI(MPI_Win_lock_all(MPI_MODE_NOCHECK, win_));
  }
  // MPI_Win_create with errors returned rather than fatal: where no one-sided component works
  // between the ranks (Open MPI across nodes over TCP has osc/rdma only with an RDMA network and
  // osc/pt2pt only without MPI_THREAD_MULTIPLE), every rank throws one clear error instead of
  // MPI aborting the job. Whether it worked is agreed on by all ranks, so none waits for another.
  void create(MPI_Comm comm, void* base, size_t bytes) {
    MPI_Errhandler prev;
    MS_MPI(MPI_Comm_get_errhandler(comm, &prev));
    MS_MPI(MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN));
    const int rc =
        MPI_Win_create(base, static_cast<MPI_Aint>(bytes), 1, MPI_INFO_NULL, comm, &win_);
    int failed = rc != MPI_SUCCESS, any = 0;
    const int arc = MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, comm);
    MPI_Comm_set_errhandler(comm, prev);
    MPI_Errhandler_free(&prev);
    if (arc != MPI_SUCCESS) mpi_fail(arc, "MPI_Allreduce");
    if (!any) return;
    if (!failed) MPI_Win_free(&win_);
    std::string why = "on another rank";
    if (failed) {
      char text[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, text, &len);
      why = std::string(text, len);
    }
    fail("MPI cannot open a one-sided window between these ranks (MPI_Win_create: ", why,
         "); across nodes without an RDMA network use two-sided transfers (serve: "
         "--kv-transfer two-sided), or Open MPI's osc/ucx (mpirun --mca osc ucx)");
  }

  ~MpiWindow() override {
    if (finalized()) return;
    MPI_Win_unlock_all(win_);
    MPI_Win_free(&win_);
  }
  size_t size(int rank) const override {
    MS_CHECK(rank >= 0 && rank < static_cast<int>(peers_.size()), "window: rank ", rank,
             " out of range [0, ", peers_.size(), ")");
    return peers_[rank].size;
  }
  void get(int target, size_t offset, void* dst, size_t bytes) override {
    const size_t have = size(target);
    MS_CHECK(offset <= have && bytes <= have - offset, "window: read of [", offset, ", ",
             offset + bytes, ") past the ", have, " bytes rank ", target, " exposed");
    if (!bytes) return;
    Peer& p = peers_[target];
    if (p.direct) {
      p.pending.push_back({static_cast<std::byte*>(dst), offset, bytes});
      return;
    }
    mpi_get(target, offset, dst, bytes);
  }
  void flush(int target) override {
    size(target);  // checks the rank
    read_direct(target);
    MS_MPI(MPI_Win_flush(target, win_));
  }
  void flush_all() override {
    for (int r = 0; r < static_cast<int>(peers_.size()); ++r) read_direct(r);
    MS_MPI(MPI_Win_flush_all(win_));
  }

 private:
  struct Read {
    std::byte* dst;
    size_t offset, bytes;
  };
  struct Peer {
    size_t size = 0;
    pid_t pid = 0;
    uint64_t base = 0;
    bool direct = false;  // same node: read with process_vm_readv
    std::vector<Read> pending;
  };

  void mpi_get(int target, size_t offset, void* dst, size_t bytes) {
    for (size_t o = 0; o < bytes; o += kChunk) {
      const int n = static_cast<int>(std::min(kChunk, bytes - o));
      MS_MPI(MPI_Get(static_cast<std::byte*>(dst) + o, n, MPI_BYTE, target,
                     static_cast<MPI_Aint>(offset + o), n, MPI_BYTE, win_));
    }
  }

  // Reads [from, to) of reads (cut at byte offsets: a read may be split between threads).
  // Returns 0, or the errno of a refused read.
  static int copy(pid_t pid, uint64_t base, const std::vector<Read>& reads, size_t from,
                  size_t to) {
    constexpr size_t kIov = 512;
    iovec local[kIov], remote[kIov];
    size_t at = 0, i = 0;  // byte position of reads[i]'s start
    while (i < reads.size() && at + reads[i].bytes <= from) at += reads[i++].bytes;
    size_t pos = from;
    while (pos < to) {
      size_t n = 0, want = 0, p = pos, a = at, k = i;
      while (n < kIov && p < to) {
        const Read& r = reads[k];
        const size_t skip = p - a, len = std::min(r.bytes - skip, to - p);
        local[n] = {r.dst + skip, len};
        remote[n] = {reinterpret_cast<void*>(base + r.offset + skip), len};
        ++n, want += len, p += len;
        if (skip + len == r.bytes) a += r.bytes, ++k;
      }
      const ssize_t got = process_vm_readv(pid, local, n, remote, n, 0);
      if (got <= 0) return got < 0 ? errno : EIO;
      pos += static_cast<size_t>(got);  // a short read resumes where it stopped
      while (i < reads.size() && at + reads[i].bytes <= pos) at += reads[i++].bytes;
    }
    return 0;
  }

  void read_direct(int target) {
    Peer& p = peers_[target];
    if (p.pending.empty()) return;
    std::vector<Read> reads;
    reads.swap(p.pending);
    size_t total = 0;
    for (const Read& r : reads) total += r.bytes;
    const int threads = static_cast<int>(
        std::clamp<size_t>(total / kBytesPerThread, 1, static_cast<size_t>(kMaxReadThreads)));
    std::vector<int> err(threads, 0);
    {
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t)
        pool.emplace_back([&, t] {
          err[t] = copy(p.pid, p.base, reads, total * t / threads, total * (t + 1) / threads);
        });
      err[0] = copy(p.pid, p.base, reads, 0, total / threads);
      for (auto& th : pool) th.join();
    }
    if (std::all_of(err.begin(), err.end(), [](int e) { return e == 0; })) return;
    // Refused (no permission to read another process, no such call): MPI from now on.
    p.direct = false;
    for (const Read& r : reads) mpi_get(target, r.offset, r.dst, r.bytes);
  }

  MPI_Win win_ = MPI_WIN_NULL;
  std::vector<Peer> peers_;
};

// Nonblocking sends kept until complete; receives by matched probe, so two threads polling
// different tags never take each other's messages. No call holds the lock while it waits.
class MpiMailbox final : public Mailbox {
 public:
  explicit MpiMailbox(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiMailbox() override {
    if (finalized()) return;
    std::lock_guard<std::mutex> lk(mu_);
    for (Pending& p : pending_) MPI_Request_free(&p.req);  // left to complete on their own
    MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void post(int dest, int tag, std::vector<std::byte> data) override {
    MS_CHECK(dest >= 0 && dest < size_, "mailbox: rank ", dest, " out of range [0, ", size_, ")");
    MS_CHECK(tag >= 0 && tag <= 32767, "mailbox: tag ", tag, " out of range [0, 32767]");
    MS_CHECK(fits_int(data.size()), "mailbox: a message of ", data.size(),
             " bytes is over the 2 GiB limit of one message");
    std::lock_guard<std::mutex> lk(mu_);
    reap();
    pending_.push_back({std::move(data), MPI_REQUEST_NULL});
    Pending& p = pending_.back();
    MS_MPI(MPI_Isend(p.data.data(), static_cast<int>(p.data.size()), MPI_BYTE, dest, tag, comm_,
                     &p.req));
  }

  std::optional<Message> poll(int tag) override {
    {
      // Reaping is housekeeping: another thread that holds the lock does it meanwhile.
      std::unique_lock<std::mutex> lk(mu_, std::try_to_lock);
      if (lk.owns_lock()) reap();
    }
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    MS_MPI(MPI_Improbe(MPI_ANY_SOURCE, tag, comm_, &flag, &msg, &st));
    if (!flag) return std::nullopt;
    int n = 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    Message m;
    m.source = st.MPI_SOURCE;
    m.tag = tag;
    m.data.resize(static_cast<size_t>(n));
    MS_MPI(MPI_Mrecv(m.data.data(), n, MPI_BYTE, &msg, MPI_STATUS_IGNORE));
    return m;
  }

  // Tests the sends without holding the lock in between: a send to this very process is taken
  // by another thread's poll, which must not wait for us meanwhile.
  void flush() override {
    for (;;) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        reap();
        if (pending_.empty()) return;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  size_t pending() override {
    std::lock_guard<std::mutex> lk(mu_);
    reap();
    return pending_.size();
  }

 private:
  struct Pending {
    std::vector<std::byte> data;
    MPI_Request req;
  };
  void reap() {  // under mu_
    for (auto it = pending_.begin(); it != pending_.end();) {
      int done = 0;
      MS_MPI(MPI_Test(&it->req, &done, MPI_STATUS_IGNORE));
      it = done ? pending_.erase(it) : std::next(it);
    }
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  std::mutex mu_;
  std::list<Pending> pending_;  // stable addresses: MPI holds pointers into them
};

// MPI_Win_allocate_shared over a communicator whose ranks all share a node; one passive-target
// epoch (lock_all) for the window's life, so loads and stores need no MPI call, and sync() is
// MPI_Win_sync + MPI_Barrier + MPI_Win_sync (the memory model's "unified" window recipe).
class MpiSharedMemory final : public SharedMemory {
 public:
  MpiSharedMemory(MPI_Comm comm, size_t bytes) : comm_(comm) {
    int n = 0;
    MPI_Comm_size(comm, &n);
    MPI_Info info;
    MPI_Info_create(&info);
    MPI_Info_set(info, "alloc_shared_noncontig", "true");  // each segment on its own pages
    void* mine = nullptr;
    const size_t rounded = (std::max<size_t>(bytes, 64) + 63) / 64 * 64;
    const int rc =
        MPI_Win_allocate_shared(static_cast<MPI_Aint>(rounded), 1, info, comm, &mine, &win_);
    MPI_Info_free(&info);
    if (rc != MPI_SUCCESS) mpi_fail(rc, "MPI_Win_allocate_shared");
    MS_MPI(MPI_Win_lock_all(MPI_MODE_NOCHECK, win_));
    bases_.resize(n);
    for (int r = 0; r < n; ++r) {
      MPI_Aint size = 0;
      int unit = 0;
      void* p = nullptr;
      MS_MPI(MPI_Win_shared_query(win_, r, &size, &unit, &p));
      bases_[r] = static_cast<std::byte*>(p);
    }
  }
  ~MpiSharedMemory() override {
    if (finalized()) return;
    MPI_Win_unlock_all(win_);
    MPI_Win_free(&win_);
  }
  std::byte* base(int rank) override {
    MS_CHECK(rank >= 0 && rank < static_cast<int>(bases_.size()), "shared memory: rank ", rank,
             " out of range [0, ", bases_.size(), ")");
    return bases_[rank];
  }
  void sync() override {
    MS_MPI(MPI_Win_sync(win_));
    MS_MPI(MPI_Barrier(comm_));
    MS_MPI(MPI_Win_sync(win_));
  }

 private:
  MPI_Comm comm_;
  MPI_Win win_ = MPI_WIN_NULL;
  std::vector<std::byte*> bases_;
};

// A grow-only byte buffer, never initialized.
struct Stage {
  std::unique_ptr<std::byte[]> p;
  size_t n = 0;
  std::byte* get(size_t want) {
    if (want > n) p.reset(new std::byte[want]), n = want;
    return p.get();
  }
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, const MpiOptions& options) : comm_(comm), options_(options) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    if (finalized()) return;
    if (matched_ != MPI_COMM_NULL) MPI_Comm_free(&matched_);
    MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm c = MPI_COMM_NULL;
    MS_MPI(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &c));
    if (c == MPI_COMM_NULL) return nullptr;
    return std::make_unique<MpiCommunicator>(c, options_);
  }

  void barrier() override { MS_MPI(MPI_Barrier(comm_)); }

  void broadcast(void* data, size_t bytes, int root) override {
    check_rank(root, "broadcast root");
    for (size_t o = 0; o < bytes; o += kChunk)
      MS_MPI(MPI_Bcast(static_cast<std::byte*>(data) + o,
                       static_cast<int>(std::min(kChunk, bytes - o)), MPI_BYTE, root, comm_));
  }

  void all_reduce(float* d, size_t n, ReduceOp op) override { reduce(d, n, MPI_FLOAT, op); }
  void all_reduce(double* d, size_t n, ReduceOp op) override { reduce(d, n, MPI_DOUBLE, op); }
  void all_reduce(int64_t* d, size_t n, ReduceOp op) override { reduce(d, n, MPI_INT64_T, op); }

  void all_gather(const void* send, size_t bytes, void* recv) override {
    if (fits_int(bytes)) {
      const int n = static_cast<int>(bytes);
      MS_MPI(MPI_Allgather(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_));
      return;
    }
    Types types;
    const MPI_Datatype t = types.bytes(bytes);
    MS_MPI(MPI_Allgather(send, 1, t, recv, 1, t, comm_));
  }

  void all_gather_v(const void* send, size_t bytes, void* recv, std::span<const size_t> counts,
                    std::span<const size_t> displs) override {
    check_per_rank(counts, "all_gather_v counts");
    check_per_rank(displs, "all_gather_v displs");
    MS_CHECK(counts[rank_] == bytes, "all_gather_v: rank ", rank_, " sends ", bytes,
             " bytes, counts say ", counts[rank_]);
    // counts and displs are the same everywhere, so every rank takes the same branch.
    const bool small = std::all_of(counts.begin(), counts.end(), fits_int) &&
                       std::all_of(displs.begin(), displs.end(), fits_int);
    auto* out = static_cast<std::byte*>(recv);
    if (small) {
      const std::vector<int> c(counts.begin(), counts.end()), d(displs.begin(), displs.end());
      MS_MPI(MPI_Allgatherv(send, static_cast<int>(bytes), MPI_BYTE, recv, c.data(), d.data(),
                            MPI_BYTE, comm_));
      return;
    }
    if (bytes) std::copy_n(static_cast<const std::byte*>(send), bytes, out + displs[rank_]);
    for (int r = 0; r < size_; ++r) broadcast(out + displs[r], counts[r], r);
  }

  void all_to_all(const void* send, size_t bytes, void* recv) override {
    if (fits_int(bytes)) {
      const int n = static_cast<int>(bytes);
      MS_MPI(MPI_Alltoall(send, n, MPI_BYTE, recv, n, MPI_BYTE, comm_));
      return;
    }
    Types types;
    const MPI_Datatype t = types.bytes(bytes);
    MS_MPI(MPI_Alltoall(send, 1, t, recv, 1, t, comm_));
  }

  void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                    std::span<const size_t> send_displs, void* recv,
                    std::span<const size_t> recv_counts,
                    std::span<const size_t> recv_displs) override {
    check_per_rank(send_counts, "all_to_all_v send_counts");
    check_per_rank(send_displs, "all_to_all_v send_displs");
    check_per_rank(recv_counts, "all_to_all_v recv_counts");
    check_per_rank(recv_displs, "all_to_all_v recv_displs");
    Segments s, r;
    for (int p = 0; p < size_; ++p) {
      s.add(static_cast<const std::byte*>(send) + send_displs[p], send_counts[p]);
      s.next_peer();
      r.add(static_cast<std::byte*>(recv) + recv_displs[p], recv_counts[p]);
      r.next_peer();
    }
    all_to_all_segments(s, r);
  }

  void all_to_all_segments(const Segments& send, const Segments& recv) override {
    MS_CHECK(send.n_peers() == size_ && recv.n_peers() == size_, "all_to_all_segments: lists for ",
             send.n_peers(), " and ", recv.n_peers(), " peers on a communicator of size ", size_);
    if (options_.pieces == PiecesVia::Datatypes) return exchange(send, recv);
    // Staging: every peer's message becomes one piece.
    size_t sb = 0, rb = 0;
    for (int p = 0; p < size_; ++p) {
      if (send.peer(p).size() > 1) sb += send.peer_bytes(p);
      if (recv.peer(p).size() > 1) rb += recv.peer_bytes(p);
    }
    std::byte* ss = send_stage_.get(sb);
    std::byte* rs = recv_stage_.get(rb);
    staged_send_.reset();
    staged_recv_.reset();
    for (int p = 0; p < size_; ++p) {
      const auto sp = send.peer(p), rp = recv.peer(p);
      if (sp.size() > 1) {
        std::byte* start = ss;
        for (const auto& x : sp) std::memcpy(ss, x.ptr, x.bytes), ss += x.bytes;
        staged_send_.add(start, ss - start);
      } else {
        for (const auto& x : sp) staged_send_.add(x.ptr, x.bytes);
      }
      staged_send_.next_peer();
      if (rp.size() > 1) {
        staged_recv_.add(rs, recv.peer_bytes(p));
        rs += recv.peer_bytes(p);
      } else {
        for (const auto& x : rp) staged_recv_.add(x.ptr, x.bytes);
      }
      staged_recv_.next_peer();
    }
    exchange(staged_send_, staged_recv_);
    rs = recv_stage_.p.get();
    for (int p = 0; p < size_; ++p) {
      const auto rp = recv.peer(p);
      if (rp.size() > 1)
        for (const auto& x : rp) std::memcpy(x.ptr, rs, x.bytes), rs += x.bytes;
    }
  }

  void all_to_all_matched(const Segments& send, const Segments& recv) override {
    start_matched(send, recv)->wait();
  }

  std::unique_ptr<PendingExchange> start_all_to_all_matched(const Segments& send,
                                                            const Segments& recv) override {
    return start_matched(send, recv);
  }

  void send(const void* data, size_t bytes, int dest, int tag) override {
    check_rank(dest, "send destination");
    check_tag(tag);
    size_t o = 0;
    do {  // an empty message is still one message
      const int n = static_cast<int>(std::min(kChunk, bytes - o));
      MS_MPI(MPI_Send(static_cast<const std::byte*>(data) + o, n, MPI_BYTE, dest, tag, comm_));
      o += n;
    } while (o < bytes);
  }

  void recv(void* data, size_t bytes, int source, int tag) override {
    check_rank(source, "recv source");
    check_tag(tag);
    size_t o = 0;
    do {
      const int n = static_cast<int>(std::min(kChunk, bytes - o));
      MPI_Status st;
      MS_MPI(MPI_Recv(static_cast<std::byte*>(data) + o, n, MPI_BYTE, source, tag, comm_, &st));
      int got = 0;
      MPI_Get_count(&st, MPI_BYTE, &got);
      MS_CHECK(got == n, "recv: expected ", bytes, " bytes from rank ", source, " tag ", tag,
               ", the message is shorter");
      o += n;
    } while (o < bytes);
  }

  std::unique_ptr<Window> expose(void* base, size_t bytes) override {
    // One rank reads only itself; Open MPI may have no one-sided component for a lone process
    // (osc/rdma needs a shared-memory or network transport, which a single process lacks).
    if (size_ == 1) return local_window(base, bytes);
    return std::make_unique<MpiWindow>(comm_, base, bytes);
  }

  std::unique_ptr<Mailbox> mailbox() override {
    MS_CHECK(ensure_runtime().provided() >= MPI_THREAD_MULTIPLE,
             "this MPI library does not provide MPI_THREAD_MULTIPLE, which serving under mpirun "
             "needs (Open MPI built with thread support does)");
    MPI_Comm c;
    MS_MPI(MPI_Comm_dup(comm_, &c));
    return std::make_unique<MpiMailbox>(c);
  }

  std::unique_ptr<SharedMemory> share(size_t bytes) override {
    if (size_ == 1) return local_shared_memory(bytes);
    if (one_node_ < 0) {  // once per communicator: do all ranks share a node?
      MPI_Comm node = MPI_COMM_NULL;
      MS_MPI(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node));
      int n = 0;
      MPI_Comm_size(node, &n);
      MPI_Comm_free(&node);
      one_node_ = n == size_ ? 1 : 0;  // the same answer on every rank
    }
    if (!one_node_) return nullptr;
    return std::make_unique<MpiSharedMemory>(comm_, bytes);
  }

  void abort(const std::string& message) override {
    std::fprintf(stderr, "moeserve: rank %d of %d: aborting the job: %s\n", rank_, size_,
                 message.c_str());
    std::fflush(stderr);
    MPI_Abort(comm_, 1);
    std::abort();
  }

 private:
  void reduce(void* data, size_t n, MPI_Datatype type, ReduceOp op) {
    int elem = 0;
    MPI_Type_size(type, &elem);
    const size_t step = kChunk / elem;
    const MPI_Op mop = op == ReduceOp::Sum ? MPI_SUM : MPI_MAX;
    for (size_t o = 0; o < n; o += step)
      MS_MPI(MPI_Allreduce(MPI_IN_PLACE, static_cast<std::byte*>(data) + o * elem,
                           static_cast<int>(std::min(step, n - o)), type, mop, comm_));
  }
  void check_rank(int r, const char* what) const {
    MS_CHECK(r >= 0 && r < size_, what, " ", r, " out of range [0, ", size_, ")");
  }
  void check_tag(int tag) const {
    MS_CHECK(tag >= 0 && tag <= 32767, "tag ", tag, " out of range [0, 32767]");
  }
  void check_per_rank(std::span<const size_t> v, const char* what) const {
    MS_CHECK(static_cast<int>(v.size()) == size_, what, ": ", v.size(),
             " entries for a communicator of size ", size_);
  }

  // One all_to_all_matched in flight: its requests (receives first, then sends), the sizes
  // the receives must have, its staging buffers (borrowed from the communicator's pool) and
  // where the packed receives are copied out to once complete.
  class Matched final : public PendingExchange {
   public:
    explicit Matched(MpiCommunicator& c) : c_(c), send_(c.take_stage()), recv_(c.take_stage()) {}
    ~Matched() override {
      if (!done_ && !finalized()) {
        try {
          wait();
        } catch (...) {  // a size mismatch was already reported by whoever waited
        }
      }
      c_.give_stage(std::move(send_));
      c_.give_stage(std::move(recv_));
    }
    bool test() override {
      if (done_) return true;
      int flag = 0;
      stats_.resize(reqs_.size());
      MS_MPI(MPI_Testall(static_cast<int>(reqs_.size()), reqs_.data(), &flag, stats_.data()));
      if (flag) finish();
      return done_;
    }
    void wait() override {
      if (done_) return;
      stats_.resize(reqs_.size());
      MS_MPI(MPI_Waitall(static_cast<int>(reqs_.size()), reqs_.data(), stats_.data()));
      finish();
    }

   private:
    friend class MpiCommunicator;
    // A nonblocking send or receive of [ptr, ptr + bytes) on the exchanges' communicator, in
    // messages of at most kChunk bytes.
    void post(std::byte* ptr, size_t bytes, int peer, int tag, bool is_send) {
      for (size_t o = 0; o < bytes; o += kChunk) {
        const int n = static_cast<int>(std::min(kChunk, bytes - o));
        reqs_.push_back(MPI_REQUEST_NULL);
        if (is_send) {
          MS_MPI(MPI_Isend(ptr + o, n, MPI_BYTE, peer, tag, c_.matched_, &reqs_.back()));
        } else {
          MS_MPI(MPI_Irecv(ptr + o, n, MPI_BYTE, peer, tag, c_.matched_, &reqs_.back()));
          want_.push_back(n);
        }
      }
    }
    void finish() {
      done_ = true;
      for (size_t i = 0; i < want_.size(); ++i) {
        int got = 0;
        MPI_Get_count(&stats_[i], MPI_BYTE, &got);
        MS_CHECK(static_cast<size_t>(got) == want_[i], "all_to_all_matched: ", got,
                 " bytes arrived from rank ", stats_[i].MPI_SOURCE, " where ", want_[i],
                 " were expected (the two sides' pieces differ)");
      }
      const std::byte* rs = recv_->p.get();
      for (const Segments::Piece& x : unpack_) std::memcpy(x.ptr, rs, x.bytes), rs += x.bytes;
    }

    MpiCommunicator& c_;
    std::unique_ptr<Stage> send_, recv_;
    std::vector<MPI_Request> reqs_;
    std::vector<MPI_Status> stats_;
    std::vector<size_t> want_;             // bytes of each receive
    std::vector<Segments::Piece> unpack_;  // where the packed receives go, in order
    bool done_ = false;
  };

  std::unique_ptr<Stage> take_stage() {
    if (stages_.empty()) return std::make_unique<Stage>();
    std::unique_ptr<Stage> s = std::move(stages_.back());
    stages_.pop_back();
    return s;
  }
  void give_stage(std::unique_ptr<Stage> s) {
    if (s) stages_.push_back(std::move(s));
  }

  // all_to_all_matched, started: on its own duplicated communicator, all receives posted
  // first, then per peer (from the next rank on) the sends. A piece goes by itself when it is
  // large or its peer's only one; the others of a peer share one packed message. Both sides
  // see the same sizes, so they decide alike. Each exchange has its own pair of tags (the
  // ranks start exchanges in the same order, so they number them alike), so that several in
  // flight never match each other's messages.
  std::unique_ptr<PendingExchange> start_matched(const Segments& send, const Segments& recv) {
    MS_CHECK(send.n_peers() == size_ && recv.n_peers() == size_, "all_to_all_matched: lists for ",
             send.n_peers(), " and ", recv.n_peers(), " peers on a communicator of size ", size_);
    if (matched_ == MPI_COMM_NULL) MS_MPI(MPI_Comm_dup(comm_, &matched_));  // collective
    const int direct_tag = 1 + 2 * static_cast<int>(exchanges_++ % 16383);
    const int packed_tag = direct_tag + 1;
    const size_t direct = std::max<size_t>(options_.direct_bytes, 1);
    auto alone = [&](std::span<const Segments::Piece> ps, const Segments::Piece& x) {
      return ps.size() == 1 || x.bytes >= direct;
    };
    size_t sb = 0, rb = 0;
    for (int p = 0; p < size_; ++p) {
      if (p == rank_) continue;
      for (const auto& x : send.peer(p)) sb += alone(send.peer(p), x) ? 0 : x.bytes;
      for (const auto& x : recv.peer(p)) rb += alone(recv.peer(p), x) ? 0 : x.bytes;
    }
    auto m = std::make_unique<Matched>(*this);
    std::byte* ss = m->send_->get(sb);
    std::byte* rs = m->recv_->get(rb);
    size_t ro = 0;
    for (int i = 1; i < size_; ++i) {
      const int p = (rank_ + size_ - i) % size_;
      const auto ps = recv.peer(p);
      size_t packed = 0;
      for (const auto& x : ps)
        if (alone(ps, x))
          m->post(x.ptr, x.bytes, p, direct_tag, false);
        else
          packed += x.bytes, m->unpack_.push_back(x);
      if (packed) m->post(rs + ro, packed, p, packed_tag, false), ro += packed;
    }
    for (int i = 1; i < size_; ++i) {
      const int p = (rank_ + i) % size_;
      const auto ps = send.peer(p);
      std::byte* start = ss;
      for (const auto& x : ps)
        if (alone(ps, x))
          m->post(x.ptr, x.bytes, p, direct_tag, true);
        else
          std::memcpy(ss, x.ptr, x.bytes), ss += x.bytes;
      if (ss != start) m->post(start, ss - start, p, packed_tag, true);
    }
    copy_self(send.peer(rank_), recv.peer(rank_));
    return m;
  }

  // A rank's pieces to itself: the two lists walked at once.
  static void copy_self(std::span<const Segments::Piece> s, std::span<const Segments::Piece> r) {
    size_t si = 0, ri = 0, so = 0, ro = 0, sent = 0, got = 0;
    for (const auto& x : s) sent += x.bytes;
    for (const auto& x : r) got += x.bytes;
    MS_CHECK(sent == got, "all_to_all: a rank sends itself ", sent, " bytes but receives ", got);
    while (si < s.size() && ri < r.size()) {
      const size_t n = std::min(s[si].bytes - so, r[ri].bytes - ro);
      std::memcpy(r[ri].ptr + ro, s[si].ptr + so, n);
      so += n, ro += n;
      if (so == s[si].bytes) ++si, so = 0;
      if (ro == r[ri].bytes) ++ri, ro = 0;
    }
  }

  // One MPI_Alltoallw: plain bytes for a peer of one piece, a derived type otherwise.
  void exchange(const Segments& send, const Segments& recv) {
    Types types;
    Side s, r;
    s.build(send, size_, types);
    r.build(recv, size_, types);
    MS_MPI(MPI_Alltoallw(s.base, s.counts.data(), s.displs.data(), s.types.data(), r.base,
                         r.counts.data(), r.displs.data(), r.types.data(), comm_));
  }

  MPI_Comm comm_;
  MpiOptions options_;
  int rank_ = 0, size_ = 1;
  int one_node_ = -1;                   // share(): all ranks on one node (-1: not asked yet)
  Stage send_stage_, recv_stage_;       // Staging: contiguous copies of multi-piece messages
  Segments staged_send_, staged_recv_;  // the lists MPI sees
  MPI_Comm matched_ = MPI_COMM_NULL;    // all_to_all_matched's own message space
  uint64_t exchanges_ = 0;              // all_to_all_matched calls so far (their tags)
  std::vector<std::unique_ptr<Stage>> stages_;  // staging buffers of finished exchanges
};

}  // namespace

std::unique_ptr<Communicator> mpi_world(const MpiOptions& options) {
  ensure_runtime();
  MPI_Comm c;
  MS_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &c));
  return std::make_unique<MpiCommunicator>(c, options);
}

}  // namespace moeserve::comm
