// A request's fields as the cluster's messages carry them (cluster_protocol.h): the prompt, the
// token budget, every sampling parameter and the stop tokens. A structured-output constraint
// travels as the spec it was compiled from and is compiled again on the receiving rank.
#include "core/error.h"
#include "engine/cluster_protocol.h"

namespace moeserve::engine::cluster {

void put_request(wire::Writer& w, const Request& r) {
  const SamplingParams& s = r.sampling;
  w.put_vec(r.prompt).put(r.max_tokens).put(s.temperature).put(s.top_p);
  w.put(s.top_k).put(s.seed).put_vec(r.stop_ids).put(r.top_logprobs);
  w.put(s.presence_penalty).put(s.frequency_penalty).put(s.repetition_penalty);
  std::vector<int32_t> bias_ids;
  std::vector<float> biases;
  for (const auto& [id, b] : s.logit_bias) bias_ids.push_back(id), biases.push_back(b);
  w.put_vec(bias_ids).put_vec(biases).put(s.min_tokens).put_vec(s.min_tokens_stop_ids);
  w.put_str(s.constraint ? s.constraint->spec() : std::string());
}

void read_request(wire::Reader& rd, Request& r, const ConstraintCompiler& compile) {
  SamplingParams& s = r.sampling;
  r.prompt = rd.get_vec<int32_t>();
  r.max_tokens = rd.get<int64_t>();
  s.temperature = rd.get<float>();
  s.top_p = rd.get<float>();
  s.top_k = rd.get<int64_t>();
  s.seed = rd.get<uint64_t>();
  r.stop_ids = rd.get_vec<int32_t>();
  r.top_logprobs = rd.get<int>();
  s.presence_penalty = rd.get<float>();
  s.frequency_penalty = rd.get<float>();
  s.repetition_penalty = rd.get<float>();
  const std::vector<int32_t> bias_ids = rd.get_vec<int32_t>();
  const std::vector<float> biases = rd.get_vec<float>();
  MS_CHECK(bias_ids.size() == biases.size(), "message: logit_bias lists of different lengths");
  s.logit_bias.clear();
  for (size_t i = 0; i < bias_ids.size(); ++i) s.logit_bias.emplace_back(bias_ids[i], biases[i]);
  s.min_tokens = rd.get<int64_t>();
  s.min_tokens_stop_ids = rd.get_vec<int32_t>();
  const std::string spec = rd.get_str();
  s.constraint = nullptr;
  if (!spec.empty()) {
    MS_CHECK(compile, "a request with an output constraint reached a rank that cannot compile one");
    s.constraint = compile(spec);
  }
}

}  // namespace moeserve::engine::cluster
