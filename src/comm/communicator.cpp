// The backend choice and check_all, written against the Communicator interface only.
#include "comm/communicator.h"

#include <cstdlib>
#include <exception>
#include <string>
#include <vector>

#include "comm/local_comm.h"
#include "core/error.h"

namespace moeserve::comm {

std::unique_ptr<Communicator> world(const MpiOptions& options) {
  const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK");
  if (under_mpirun) return mpi_world(options);
  return std::make_unique<LocalCommunicator>();
}

namespace {
class CompleteExchange final : public PendingExchange {
 public:
  bool test() override { return true; }
  void wait() override {}
};
}  // namespace

std::unique_ptr<PendingExchange> Communicator::start_all_to_all_matched(const Segments& send,
                                                                        const Segments& recv) {
  all_to_all_matched(send, recv);
  return std::make_unique<CompleteExchange>();
}

void check_all(Communicator& comm, const std::function<void()>& fn) {
  std::string msg;
  bool failed = false;
  if (comm.size() == 1) {  // nobody to tell; the message stays as it is
    try {
      fn();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      fail(e.what());
    }
    return;
  }
  try {
    fn();
  } catch (const std::exception& e) {
    failed = true;
    msg = e.what();
    if (msg.empty()) msg = "(an error without a message)";
  }
  // Round 1: who failed, and how long their messages are (0: did not fail).
  const int n = comm.size();
  const int64_t mine = failed ? static_cast<int64_t>(msg.size()) : 0;
  std::vector<int64_t> len(n);
  comm.all_gather(&mine, sizeof mine, len.data());
  int first = -1;
  std::vector<int> others;
  for (int r = 0; r < n; ++r) {
    if (!len[r]) continue;
    if (first < 0)
      first = r;
    else
      others.push_back(r);
  }
  if (first < 0) return;
  // Round 2: the lowest failed rank's message to everyone.
  std::string text(static_cast<size_t>(len[first]), '\0');
  if (comm.rank() == first) text = msg;
  comm.broadcast(text.data(), text.size(), first);
  std::string all = detail::concat("rank ", first, " of ", n, " failed: ", text);
  if (!others.empty()) {
    all += " (also failed:";
    for (size_t i = 0; i < others.size(); ++i) all += (i ? ", " : " ") + std::to_string(others[i]);
    all += ")";
  }
  throw Error(all);
}

}  // namespace moeserve::comm
