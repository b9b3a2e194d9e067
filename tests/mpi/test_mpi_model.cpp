// The model's forward under expert parallelism with overlapped micro-batches (ExpertParallel::
// overlap): bit-identical to one process and to the plain exchange, for ranks with different
// batches (one without tokens), and the overlapped path is really the one taken.
#include <cstring>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "harness.h"
#include "kv/kv_pool.h"
#include "model/model.h"

using moeserve::comm::Communicator;
using moeserve::comm::ReduceOp;
using moeserve::mpitest::Checker;
namespace model = moeserve::model;
namespace kv = moeserve::kv;

namespace {

const std::string kModel = std::string(MOESERVE_SOURCE_DIR) + "/tests/fixtures/models/v3_tiny";

// Rank r's batch: n tokens, one sequence from position 0, logits for a few rows.
model::Batch batch_of(int rank, int64_t n, const std::vector<int32_t>& blocks) {
  model::Batch b;
  for (int64_t t = 0; t < n; ++t)
    b.tokens.push_back(static_cast<int32_t>((t * 37 + rank * 11) % 250));
  if (n) b.seqs = {{0, n, 0, blocks.data()}};
  for (int64_t r = 0; r < n; r += 9) b.logit_rows.push_back(r);
  return b;
}

struct Out {
  std::vector<float> hidden, logits;
  bool operator==(const Out& o) const {
    return hidden.size() == o.hidden.size() && logits.size() == o.logits.size() &&
           std::memcmp(hidden.data(), o.hidden.data(), hidden.size() * sizeof(float)) == 0 &&
           std::memcmp(logits.data(), o.logits.data(), logits.size() * sizeof(float)) == 0;
  }
};

// Two forwards (a prompt, then one more token after it) of rank r's batch on model m.
Out run(model::Model& m, int rank, int64_t n) {
  const model::ModelConfig& c = m.config();
  kv::KvPool pool(16, 16, c.num_hidden_layers, c.kv_cache_dim());
  std::vector<int32_t> blocks;
  pool.allocate(10, &blocks);
  Out o;
  for (int step = 0; step < 2; ++step) {
    model::Batch b = batch_of(rank, step ? (n ? 1 : 0) : n, blocks);
    if (step && n) b.seqs[0].n_past = n;
    const int64_t T = static_cast<int64_t>(b.tokens.size());
    std::vector<float> h(T * c.hidden_size), l(b.logit_rows.size() * c.vocab_size);
    m.forward(b, pool, l.data(), h.data());
    o.hidden.insert(o.hidden.end(), h.begin(), h.end());
    o.logits.insert(o.logits.end(), l.begin(), l.end());
  }
  return o;
}

void test_overlap(Communicator& c, Checker& ck) {
  const int me = c.rank(), R = c.size();
  moeserve::ThreadPool pool(1);
  // Token counts: rank 0 the most (over the overlap threshold), the last rank none (when there
  // are several), the others in between; and a round where every rank is below it.
  for (const bool big : {true, false}) {
    const int64_t n = R > 1 && me == R - 1 ? 0 : (big ? 100 - 13 * me : 5 + me);
    model::Model single(kModel, pool);
    const Out want = run(single, me, n);
    for (const auto transport :
         {moeserve::moe::Transport::Messages, moeserve::moe::Transport::Auto})
      for (const bool overlap : {true, false}) {
        model::ExpertParallel ep;
        ep.comm = &c;
        ep.transport = transport;
        ep.overlap = overlap;
        model::Model m(kModel, pool, &ep);
        const Out got = run(m, me, n);
        const std::string what =
            std::string(big ? "prefill" : "small batches") +
            (transport == moeserve::moe::Transport::Messages ? ", messages" : ", auto") +
            (overlap ? ", overlap on" : ", overlap off");
        CHECK_MSG(ck, got == want, what);
        // Overlapped: every MoE layer of the prompt's forward, nothing else. With shared memory
        // (auto on one node) there is nothing to overlap.
        const int64_t moe_layers = m.config().num_hidden_layers - m.config().first_k_dense_replace;
        const bool expect = overlap && big && transport == moeserve::moe::Transport::Messages;
        CHECK_MSG(ck, m.overlapped_layers() == (expect ? moe_layers : 0),
                  what + ": " + std::to_string(m.overlapped_layers()) + " overlapped layers");
      }
  }
}

}  // namespace

int main() {
  return moeserve::mpitest::run_all({
      {"forward with overlapped micro-batches", test_overlap},
  });
}
