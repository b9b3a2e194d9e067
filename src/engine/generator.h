// Running one sequence through a model: chunked prefill, then token-by-token decode with the
// latent KV cache; and scoring (the log-probability of every token given its prefix).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_pool.h"
#include "model/model.h"

namespace moeserve::engine {

struct GenerateOptions {
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // generation ends after emitting one of these
  int64_t prefill_chunk = 512;    // prompt tokens per forward
  // Speculative decoding with the model's MTP module (0: off): tokens drafted per step, verified
  // by one forward of the main model (engine::Scheduler).
  int64_t speculative_tokens = 0;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, output_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  double prefill_exchange_seconds = 0, decode_exchange_seconds = 0;  // inside MoE all-to-alls
  int64_t draft_tokens = 0, accepted_tokens = 0;                     // speculative decoding
};

// Under expert parallelism the ranks of the model's group step together: each step (a forward,
// and under speculative decoding the MTP module's k forwards after it) is preceded by an
// agreement round, and a rank that is done (or has nothing to run) calls drain(), running empty
// steps until every rank is done. The round also tells how many MTP forwards the step has: k
// where some rank speculates in it, else 0, so a draining rank follows either kind of step.
class Generator {
 public:
  explicit Generator(model::Model& m, int64_t block_size = 16,
                     kv::KvDtype kv_dtype = kv::kDefaultKvDtype)
      : m_(m), block_size_(block_size), kv_dtype_(kv_dtype) {}

  // Generates up to max_tokens after `prompt`, calling on_token(id) as each is produced.
  std::vector<int32_t> generate(const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                                const std::function<void(int32_t)>& on_token = {},
                                GenerateStats* stats = nullptr);

  // logprobs[i] = log P(ids[i] | ids[<i]) for i >= 1 (logprobs[0] is NaN: no prefix).
  std::vector<double> score(const std::vector<int32_t>& ids, int64_t chunk = 128);

  // Collective under expert parallelism (a no-op without): takes part in the other ranks'
  // forwards (and MTP forwards) with empty batches until all of them have called drain().
  void drain();

  // The agreement round before a step under expert parallelism (without: this rank's own
  // answer): whether any rank runs one (`mine`: this one does), and the most MTP forwards any
  // rank's step has (`mtp`: this one's). A caller running forwards of its own (perplexity)
  // calls agree(true, 0) before each, so that the ranks in drain() follow.
  struct Agreement {
    bool active = false;
    int64_t mtp_forwards = 0;
  };
  Agreement agree(bool mine, int64_t mtp);

 private:
  void forward(const model::Batch& b, kv::KvPool& kv, float* logits);
  std::vector<int32_t> generate_speculative(const std::vector<int32_t>& prompt,
                                            const GenerateOptions& opt,
                                            const std::function<void(int32_t)>& on_token,
                                            GenerateStats* stats);

  model::Model& m_;
  int64_t block_size_;
  kv::KvDtype kv_dtype_;  // of the cache each call builds
};

}  // namespace moeserve::engine
