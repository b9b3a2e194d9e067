// The single-process communicator: rank 0 of size 1, no MPI, no mpirun. Every collective is a
// copy from the send to the receive buffer; send/recv to self queue the message.
#pragma once

#include <deque>
#include <map>
#include <vector>

#include "comm/communicator.h"

namespace moeserve::comm {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::unique_ptr<Communicator> split(int color, int key) override;

  void barrier() override {}
  void broadcast(void* data, size_t bytes, int root) override;
  void all_reduce(float* data, size_t n, ReduceOp op) override {}
  void all_reduce(double* data, size_t n, ReduceOp op) override {}
  void all_reduce(int64_t* data, size_t n, ReduceOp op) override {}
  void all_gather(const void* send, size_t bytes, void* recv) override;
  void all_gather_v(const void* send, size_t bytes, void* recv, std::span<const size_t> counts,
                    std::span<const size_t> displs) override;
  void all_to_all(const void* send, size_t bytes, void* recv) override;
  void all_to_all_v(const void* send, std::span<const size_t> send_counts,
                    std::span<const size_t> send_displs, void* recv,
                    std::span<const size_t> recv_counts,
                    std::span<const size_t> recv_displs) override;
  void all_to_all_segments(const Segments& send, const Segments& recv) override;

  // A send to self is queued; the recv with the same tag takes it (a recv without one throws:
  // it would wait forever).
  void send(const void* data, size_t bytes, int dest, int tag) override;
  void recv(void* data, size_t bytes, int source, int tag) override;

  std::unique_ptr<Window> expose(void* base, size_t bytes) override;
  std::unique_ptr<Mailbox> mailbox() override;
  std::unique_ptr<SharedMemory> share(size_t bytes) override;

  [[noreturn]] void abort(const std::string& message) override;

 private:
  std::map<int, std::deque<std::vector<std::byte>>> queued_;  // tag -> messages to self
};

// A window over this process's memory alone (reads are copies); also what the MPI backend uses
// on a communicator of one rank, where Open MPI may have no one-sided transport.
std::unique_ptr<Window> local_window(void* base, size_t bytes);
// Plain memory of this process alone (sync() does nothing).
std::unique_ptr<SharedMemory> local_shared_memory(size_t bytes);

}  // namespace moeserve::comm
