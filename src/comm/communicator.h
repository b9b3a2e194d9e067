// Communication between the ranks of one instance: collectives, all-to-all with gather/scatter
// lists (the MoE dispatch and combine), two-sided messages and one-sided windows (the KV
// transfer). Two backends: MPI (src/comm/mpi_comm.cpp, the only code that calls MPI) and a
// single-process one (local_comm.h) that needs no mpirun.
//
// Rules every caller keeps:
//  - A collective (everything but send/recv, Window::get and Window::flush) is entered by every
//    rank of the communicator, in the same order, also by ranks with nothing to contribute.
//  - Sizes are in bytes unless a parameter says elements; any size, also above INT_MAX, works.
//  - A wrong argument is a bug in the caller: it throws moeserve::Error on the rank that passed
//    it, before any exchange. Wrap code whose failure is expected (files, user input) in
//    check_all so that every rank learns about it instead of waiting for the failed one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace moeserve::comm {

enum class ReduceOp { Sum, Max };

// Memory exposed by every rank of a communicator for one-sided reads. Between creation and
// destruction all ranks hold a passive-target epoch on all others (lock_all), so get + flush
// need nothing from the target's compute loop.
class Window {
 public:
  virtual ~Window() = default;  // collective: every rank destroys its window
  // Bytes rank `rank` exposed.
  virtual size_t size(int rank) const = 0;
  // Starts reading [offset, offset + bytes) of `target`'s memory into dst; the data is there
  // once flush(target) returns. The target must not write that range meanwhile.
  virtual void get(int target, size_t offset, void* dst, size_t bytes) = 0;
  virtual void flush(int target) = 0;
  virtual void flush_all() = 0;
};

// Asynchronous tagged messages between the ranks of a communicator, for control traffic
// (requests, events, KV handoffs) that must never make the sender wait for the receiver's
// compute loop. Thread-safe: any thread may post and poll (a poller of one tag never sees
// another tag's messages). Messages from one rank with one tag arrive in the order posted.
class Mailbox {
 public:
  struct Message {
    int source = -1;
    int tag = 0;
    std::vector<std::byte> data;
  };
  virtual ~Mailbox() = default;  // call flush() first on every rank
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Queues `data` for rank `dest` and returns at once; the mailbox keeps it until delivered.
  // tag in [0, 32767].
  virtual void post(int dest, int tag, std::vector<std::byte> data) = 0;
  // The next message with `tag` from any rank, if one has arrived; never blocks.
  virtual std::optional<Message> poll(int tag) = 0;
  // Waits until every message this rank posted has been taken by its receiver (one small
  // enough to be buffered may count as taken once it left). Other threads may post and poll
  // meanwhile; a message to a rank that no longer polls its tag is waited for forever.
  virtual void flush() = 0;
  // Messages posted here and not yet taken.
  virtual size_t pending() = 0;
};

// Memory every rank of a communicator maps into its own address space (ranks on one node): a
// rank loads and stores other ranks' segments directly, no message. Between the writes of one
// rank and the reads of another there must be a sync() (a barrier that also orders memory).
class SharedMemory {
 public:
  virtual ~SharedMemory() = default;  // collective: every rank destroys its handle
  // Rank `rank`'s segment (at least the bytes it asked for, 64-byte aligned), in this process.
  virtual std::byte* base(int rank) = 0;
  // Collective: returns once every rank has entered; what any rank stored before its call is
  // visible to every rank after theirs.
  virtual void sync() = 0;
};

// A gather list (send side) or scatter list (receive side) of an all-to-all: the message for
// (or from) peer p is the concatenation of pieces [begin[p], begin[p + 1]) in order. Send and
// receive sides of a pair must agree on the total bytes, not on how they are cut.
class Segments {
 public:
  struct Piece {
    std::byte* ptr;
    size_t bytes;
  };
  // Starts an empty list (keeps the capacity).
  void reset() {
    pieces_.clear();
    begin_.assign(1, 0);
  }
  // Appends to the current peer's message; a piece that continues the previous one merges.
  void add(const void* ptr, size_t bytes) {
    if (!bytes) return;
    auto* p = static_cast<std::byte*>(const_cast<void*>(ptr));
    if (pieces_.size() > begin_.back() && pieces_.back().ptr + pieces_.back().bytes == p)
      pieces_.back().bytes += bytes;
    else
      pieces_.push_back({p, bytes});
  }
  // Appends a piece of its own, never merged with its neighbours (the cuts of
  // all_to_all_matched); an empty one is left out.
  void add_piece(const void* ptr, size_t bytes) {
    if (bytes) pieces_.push_back({static_cast<std::byte*>(const_cast<void*>(ptr)), bytes});
  }
  // Ends the current peer's message; call once per peer, in rank order.
  void next_peer() { begin_.push_back(pieces_.size()); }

  int n_peers() const { return static_cast<int>(begin_.size()) - 1; }
  std::span<const Piece> peer(int p) const {
    return {pieces_.data() + begin_[p], begin_[p + 1] - begin_[p]};
  }
  size_t peer_bytes(int p) const {
    size_t b = 0;
    for (const Piece& x : peer(p)) b += x.bytes;
    return b;
  }

 private:
  std::vector<Piece> pieces_;
  std::vector<size_t> begin_{0};
};

// An exchange started by Communicator::start_all_to_all_matched and still in flight. Until it
// is complete, the send side's memory must stay unchanged and the receive side's unread.
class PendingExchange {
 public:
  // An exchange still in flight is waited for (MPI must not write into freed memory).
  virtual ~PendingExchange() = default;
  // Lets the transport move data (Open MPI over TCP progresses only inside MPI calls: call
  // this now and then while computing) and returns true once the exchange is complete; then
  // the receive side holds its data. Never blocks.
  virtual bool test() = 0;
  // Blocks until complete.
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Collective. Ranks with the same color form a new communicator, ordered by (key, old rank);
  // a negative color takes part but gets nullptr.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  virtual void barrier() = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  // In place, element-wise over ranks: data [n] on every rank.
  virtual void all_reduce(float* data, size_t n, ReduceOp op) = 0;
  virtual void all_reduce(double* data, size_t n, ReduceOp op) = 0;
  virtual void all_reduce(int64_t* data, size_t n, ReduceOp op) = 0;
  // send [bytes] from each rank -> recv [size, bytes], in rank order.
  virtual void all_gather(const void* send, size_t bytes, void* recv) = 0;
  // send [bytes] -> rank r's bytes land at recv + displs[r]; counts[r] == rank r's bytes.
  // counts and displs ([size]) are the same on every rank.
  virtual void all_gather_v(const void* send, size_t bytes, void* recv,
                            std::span<const size_t> counts, std::span<const size_t> displs) = 0;
  // send [size, bytes] -> recv [size, bytes]: block p of send goes to rank p, block p of recv
  // comes from rank p.
  virtual void all_to_all(const void* send, size_t bytes, void* recv) = 0;
  // Per peer p ([size] each): send_counts[p] bytes at send + send_displs[p] go to p; recv_counts[p]
  // bytes from p land at recv + recv_displs[p]. send_counts[q] on p == recv_counts[p] on q.
  virtual void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                            std::span<const size_t> send_displs, void* recv,
                            std::span<const size_t> recv_counts,
                            std::span<const size_t> recv_displs) = 0;
  // The same exchange with gather/scatter lists (one list entry per peer, n_peers() == size()):
  // no packing copies; MPI moves the pieces itself.
  virtual void all_to_all_segments(const Segments& send, const Segments& recv) = 0;
  // The same exchange when the cuts match: for every pair of ranks (p, q), p's send pieces for q
  // and q's receive pieces from p have the same sizes in the same order (a piece's bytes may
  // then go from where they are straight to where they belong). The MPI backend sends each
  // large piece (MpiOptions::direct_bytes) and each peer's only piece as a message of its own,
  // from and into place, and packs a peer's small pieces into one message: no derived
  // datatypes, one copy of ours only for the small pieces. Unmatched cuts are a caller's bug
  // (MPI reports a message of the wrong size, as an error on the receiver).
  virtual void all_to_all_matched(const Segments& send, const Segments& recv) {
    all_to_all_segments(send, recv);
  }
  // Collective, non-blocking: all_to_all_matched started, returned before it completes (the
  // caller computes meanwhile, calling test() now and then, and waits at the end). Every rank
  // starts the same exchanges in the same order; several may be in flight at once, and they
  // may complete in any order. The lists themselves may be reused at once (the pieces they
  // name may not). Backends without non-blocking transfers run the exchange here and return
  // it complete.
  virtual std::unique_ptr<PendingExchange> start_all_to_all_matched(const Segments& send,
                                                                    const Segments& recv);

  // Two-sided, blocking, matched by (peer, tag); tag in [0, 32767]. Messages between one pair
  // with one tag arrive in order. recv's bytes must equal the matching send's.
  virtual void send(const void* data, size_t bytes, int dest, int tag) = 0;
  virtual void recv(void* data, size_t bytes, int source, int tag) = 0;

  // Collective. Exposes [base, base + bytes) of every rank (bytes may differ, and be 0) for
  // one-sided reads. The memory must outlive the window.
  virtual std::unique_ptr<Window> expose(void* base, size_t bytes) = 0;

  // Collective. A mailbox over the same ranks (its own message space: it never matches this
  // communicator's send/recv). Under MPI it needs MPI_THREAD_MULTIPLE.
  virtual std::unique_ptr<Mailbox> mailbox() = 0;

  // Collective. Allocates `bytes` (may differ per rank) of memory all ranks map, or returns
  // nullptr on every rank when they cannot (ranks on several nodes, no shared-memory support).
  virtual std::unique_ptr<SharedMemory> share(size_t bytes) = 0;

  // Ends the whole job (every rank of every communicator) after printing message with this
  // rank's number to stderr. For states no rank can recover from; prefer check_all.
  [[noreturn]] virtual void abort(const std::string& message) = 0;
};

// How the MPI backend moves a message cut into several pieces (all_to_all_segments).
enum class PiecesVia {
  // Described to MPI as one derived datatype: no copy of ours; Open MPI packs and unpacks
  // through its shared-memory fragments. The faster choice measured here (bench_alltoall
  // --pieces), and the default.
  Datatypes,
  // Copied into one contiguous staging buffer before sending (and out of one after
  // receiving): MPI then moves plain bytes (on one node with a single copy, CMA), at the cost
  // of our extra copy.
  Staging,
};

struct MpiOptions {
  PiecesVia pieces = PiecesVia::Datatypes;
  // all_to_all_matched: a piece of at least this many bytes travels as its own message.
  size_t direct_bytes = size_t(128) << 10;
};

// The communicator of all processes: MPI when launched by mpirun (OMPI_COMM_WORLD_SIZE or
// PMIX_RANK in the environment; then collective over all of them), else a LocalCommunicator.
std::unique_ptr<Communicator> world(const MpiOptions& options = {});
// The MPI world (initializes MPI once per process, finalized at exit). Needs mpirun, or a
// singleton run of an MPI program. Communicators split from it keep its options.
std::unique_ptr<Communicator> mpi_world(const MpiOptions& options = {});

// Collective. Runs fn on every rank; when fn throws on any rank (moeserve::Error or another
// std::exception), every rank throws moeserve::Error naming the failed ranks and the message of
// the lowest one, e.g. "rank 2 of 4 failed: missing shard x (also failed: 5)".
// On a communicator of one rank the error is rethrown with its own message.
void check_all(Communicator& comm, const std::function<void()>& fn);

}  // namespace moeserve::comm
