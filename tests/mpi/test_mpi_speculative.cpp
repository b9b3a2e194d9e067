// Speculative decoding under expert parallelism, on the trained model (its MTP module's experts
// spread over the ranks like a main layer's): each rank decodes its own sequence with drafts,
// the ranks finishing at different steps (the done ones drain, following the others' MTP
// forwards), and gets one process's tokens and acceptance; schedulers stepping together, as the
// cluster's ranks do, run no MTP forward in a step where no rank speculates and the module's k
// in every other, with one process's tokens.
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "engine/generator.h"
#include "engine/scheduler.h"
#include "harness.h"
#include "kv/kv_pool.h"
#include "model/model.h"

using moeserve::comm::Communicator;
using moeserve::comm::ReduceOp;
using moeserve::mpitest::Checker;
namespace engine = moeserve::engine;
namespace model = moeserve::model;
namespace kv = moeserve::kv;

namespace {

const std::string kModel = std::string(MOESERVE_SOURCE_DIR) + "/data/models/shakespeare-v3-tiny";

// Starts of lines of the training text ("KING HENRY:\nNow, my good lords", "ROMEO:\nWhat light
// is", "First Citizen:\nBefore we proceed"), one per rank (cycling).
std::vector<int32_t> prompt_of(int r) {
  static const std::vector<std::vector<int32_t>> p = {{0, 471, 1141, 286, 817, 29, 329, 479, 1032},
                                                      {0, 843, 286, 495, 1307, 347},
                                                      {0, 668, 1151, 286, 2248, 353, 2673}};
  return p[r % p.size()];
}

engine::SamplingParams sampling_of(int r, bool sampled) {
  engine::SamplingParams sp;
  if (sampled) {
    sp.temperature = 0.8f;
    sp.top_p = 0.95f;
    sp.seed = 7 + r;
  }
  return sp;
}

struct Gen {
  std::vector<int32_t> out;
  int64_t drafts = 0, accepted = 0;
};

Gen generate(model::Model& m, int r, bool sampled, int64_t n) {
  engine::Generator g(m);
  engine::GenerateOptions o;
  o.max_tokens = n;
  o.sampling = sampling_of(r, sampled);
  o.speculative_tokens = 2;
  engine::GenerateStats st;
  Gen res;
  res.out = g.generate(prompt_of(r), o, {}, &st);
  g.drain();
  res.drafts = st.draft_tokens;
  res.accepted = st.accepted_tokens;
  return res;
}

void test_generate(Communicator& c, Checker& ck) {
  const int me = c.rank();
  moeserve::ThreadPool pool(1);
  model::Model single(kModel, pool);
  model::ExpertParallel ep;
  ep.comm = &c;
  model::Model m(kModel, pool, &ep);
  m.load_mtp();
  for (const bool sampled : {false, true}) {
    // Lengths differ by rank: the first to finish drains while the others still speculate.
    const int64_t n = 12 + 5 * me;
    const Gen want = generate(single, me, sampled, n);
    const Gen got = generate(m, me, sampled, n);
    const std::string what = sampled ? "sampled" : "greedy";
    CHECK_MSG(ck, got.out == want.out, what);
    CHECK_MSG(ck, got.drafts == want.drafts && got.accepted == want.accepted,
              what + ": " + std::to_string(got.accepted) + " of " + std::to_string(got.drafts) +
                  " drafts accepted, one process " + std::to_string(want.accepted) + " of " +
                  std::to_string(want.drafts));
    CHECK(ck, want.drafts > 0);
  }
}

// Requests of rank r: greedy ones with logprobs (which decode without speculation) and, where
// `spec_rank` is r, one greedy request that speculates.
struct Run {
  std::vector<std::vector<int32_t>> out;
  int64_t steps = 0, forwards = 0, drafts = 0;
};

Run run_schedulers(model::Model& m, Communicator* group, int r, int spec_rank) {
  engine::EngineConfig ec;
  ec.max_num_seqs = 4;
  ec.max_model_len = 64;
  ec.kv_blocks = 32;
  ec.speculative_tokens = 2;
  kv::KvPool pool(ec.kv_blocks, ec.block_size, engine::kv_layers_for(m.config(), ec),
                  m.config().kv_cache_dim(), ec.kv_dtype);
  engine::Scheduler sched(m, ec, pool);
  Run run;
  const int n_req = r == spec_rank ? 3 : 2;
  run.out.resize(n_req);
  for (int i = 0; i < n_req; ++i) {
    auto q = std::make_shared<engine::Request>();
    q->prompt = prompt_of(r + i);
    q->max_tokens = 8 + 3 * i + r;
    if (!(r == spec_rank && i == n_req - 1)) q->top_logprobs = 1;
    q->on_token = [&run, i](const engine::TokenEvent& e) { run.out[i].push_back(e.token); };
    sched.add(i + 1, q);
  }
  const int64_t before = m.forward_count();
  for (;;) {
    // The cluster worker's agreement: whether any rank steps, and whether any speculates.
    int64_t f[2] = {sched.has_work() ? 1 : 0, sched.may_speculate() ? 1 : 0};
    if (group) group->all_reduce(f, 2, ReduceOp::Max);
    if (!f[0]) break;
    sched.step(group != nullptr, f[1] != 0);
    ++run.steps;
  }
  run.forwards = m.forward_count() - before;
  run.drafts = sched.spec_draft_tokens();
  return run;
}

void test_schedulers(Communicator& c, Checker& ck) {
  const int me = c.rank(), R = c.size();
  moeserve::ThreadPool pool(1);
  model::Model single(kModel, pool);
  model::ExpertParallel ep;
  ep.comm = &c;
  model::Model m(kModel, pool, &ep);
  // Nobody speculates (spec_rank -1): one forward a step, none of the module. Then the last
  // rank has a speculating request: every rank's steps run the module too, while it is there.
  for (const int spec_rank : {-1, R - 1}) {
    const Run want = run_schedulers(single, nullptr, me, spec_rank);
    const Run got = run_schedulers(m, &c, me, spec_rank);
    const std::string what = "speculating rank " + std::to_string(spec_rank);
    CHECK_MSG(ck, got.out == want.out, what);
    CHECK_MSG(ck, got.drafts == want.drafts, what);
    if (spec_rank < 0) {
      CHECK_MSG(ck, got.forwards == got.steps,
                what + ": " + std::to_string(got.forwards) + " forwards in " +
                    std::to_string(got.steps) + " steps");
    } else {
      CHECK_MSG(ck, got.forwards > got.steps && got.forwards <= 3 * got.steps,
                what + ": " + std::to_string(got.forwards) + " forwards in " +
                    std::to_string(got.steps) + " steps");
      if (me == spec_rank) CHECK(ck, want.drafts > 0);
    }
  }
}

}  // namespace

int main() {
  return moeserve::mpitest::run_all({
      {"generate with drafts, ranks finishing apart", test_generate},
      {"schedulers skip the MTP forwards when nobody speculates", test_schedulers},
  });
}
