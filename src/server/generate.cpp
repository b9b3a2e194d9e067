#include "server/generate.h"

#include <random>

#include "core/error.h"
#include "server/api_error.h"
#include "server/chat_format.h"
#include "server/http_server.h"
#include "server/server.h"
#include "server/structured.h"

namespace moeserve::server {

namespace {

[[noreturn]] void too_long(const std::string& message, const std::string& param) {
  throw ApiError(400, message, param, "context_length_exceeded");
}

std::vector<int32_t> prompt_ids(ServerContext& ctx, const GenRequest& g, bool* starts_in_think) {
  const int64_t vocab = ctx.engine.model_config().vocab_size;
  try {
    if (g.endpoint == Endpoint::Chat) {
      if (!ctx.chat)
        throw ApiError(400,
                       "This model has no chat template (its tokenizer_config.json has no "
                       "chat_template); start the server with --chat-template FILE, or use "
                       "/v1/completions.",
                       "messages", "no_chat_template");
      const std::string text =
          ctx.chat->render(g.messages, g.add_generation_prompt, g.template_kwargs, g.tools_json);
      *starts_in_think = opens_think(text);
      // The template writes the special tokens (bos included) itself.
      return ctx.tok.encode(text, /*add_special=*/false, /*parse_special=*/true);
    }
    if (g.prompt_is_ids) {
      for (int32_t id : g.prompt_ids)
        if (id >= vocab)
          bad_request("prompt", "Token id " + std::to_string(id) +
                                    " in 'prompt' is out of range [0, " + std::to_string(vocab) +
                                    ").");
      return g.prompt_ids;
    }
    return ctx.tok.encode(g.prompt_text, /*add_special=*/true, /*parse_special=*/true);
  } catch (const moeserve::Error& e) {
    bad_request(g.endpoint == Endpoint::Chat ? "messages" : "prompt", e.what());
  }
}

}  // namespace

Prepared prepare(ServerContext& ctx, const GenRequest& g) {
  if (!g.model.empty() && g.model != ctx.opt.served_model_name)
    throw ApiError(400,
                   "The model '" + g.model + "' does not exist; this server serves '" +
                       ctx.opt.served_model_name + "'.",
                   "model", "model_not_found");
  Prepared p;
  bool starts_in_think = false;
  p.prompt = prompt_ids(ctx, g, &starts_in_think);
  const std::string prompt_param = g.endpoint == Endpoint::Chat ? "messages" : "prompt";
  if (p.prompt.empty()) bad_request(prompt_param, "The prompt is empty.");

  const int64_t n = static_cast<int64_t>(p.prompt.size());
  const int64_t limit = ctx.engine.config().max_model_len;
  if (n + 1 > limit)
    too_long("This model's maximum context length is " + std::to_string(limit) +
                 " tokens. However, your " + prompt_param + " resulted in " + std::to_string(n) +
                 " tokens, which leaves no room for the completion. Please reduce the length "
                 "of the " +
                 prompt_param + ".",
             prompt_param);
  if (g.max_tokens && n + *g.max_tokens > limit)
    too_long("This model's maximum context length is " + std::to_string(limit) +
                 " tokens. However, you requested " + std::to_string(n + *g.max_tokens) +
                 " tokens (" + std::to_string(n) + " in the " + prompt_param + ", " +
                 std::to_string(*g.max_tokens) +
                 " in the completion). Please reduce the length of the " + prompt_param +
                 " or completion.",
             "max_tokens");
  p.max_tokens = g.max_tokens.value_or(limit - n);

  if (g.min_tokens > p.max_tokens)
    bad_request("min_tokens", "'min_tokens' (" + std::to_string(g.min_tokens) +
                                  ") is more than the tokens left for the completion (" +
                                  std::to_string(p.max_tokens) + ").");

  const int64_t vocab = ctx.engine.model_config().vocab_size;
  engine::SamplingParams& sp = p.sampling;
  sp.temperature = static_cast<float>(g.temperature);
  sp.top_p = static_cast<float>(g.top_p);
  sp.top_k = g.top_k;
  sp.seed = g.seed ? *g.seed : std::random_device{}() * 0x100000001ull;
  sp.presence_penalty = static_cast<float>(g.presence_penalty);
  sp.frequency_penalty = static_cast<float>(g.frequency_penalty);
  sp.repetition_penalty = static_cast<float>(g.repetition_penalty);
  for (const auto& [id, bias] : g.logit_bias) {
    if (id >= vocab)
      bad_request("logit_bias", "Token id " + std::to_string(id) +
                                    " in 'logit_bias' is out of range [0, " +
                                    std::to_string(vocab) + ").");
    sp.logit_bias.emplace_back(id, bias);
  }
  sp.min_tokens = g.min_tokens;

  if (!g.ignore_eos) p.output.stop_ids = ctx.eos_ids;
  for (int32_t id : g.stop_token_ids) {
    if (id >= vocab)
      bad_request("stop_token_ids", "Token id " + std::to_string(id) +
                                        " in 'stop_token_ids' is out of range [0, " +
                                        std::to_string(vocab) + ").");
    p.output.stop_ids.push_back(id);
  }
  if (g.min_tokens > 0) sp.min_tokens_stop_ids = p.output.stop_ids;
  if (!g.tools.empty() && g.tool_choice != "none") {
    p.output.tool_calls = true;
    p.output.tool_tokens = ToolTokens::of(ctx.tok);
    if (!p.output.tool_tokens.found())
      bad_request("tools",
                  "Tool calling needs the tool-call tokens of DeepSeek-V3/R1 "
                  "(<｜tool▁calls▁begin｜> ...), which this model's tokenizer lacks.");
    if (g.tool_choice == "required" || g.tool_choice == "function") {
      try {
        sp.constraint = tool_call_constraint(ctx.tok, ctx.token_trie(), g.tools,
                                             g.tool_choice == "function" ? g.tool_choice_name : "",
                                             p.output.stop_ids);
      } catch (const moeserve::Error& e) {
        bad_request("tools", std::string("Invalid parameters schema: ") + e.what());
      }
    }
  }
  if (g.json_output) {
    // The value's end allows only the end tokens (eos, stop_token_ids).
    if (p.output.stop_ids.empty())
      bad_request("response_format",
                  "A JSON response_format needs an end token, and this model "
                  "has none (give 'stop_token_ids').");
    try {
      sp.constraint = engine::compile_json_constraint(
          engine::json_constraint_spec(g.json_schema ? &*g.json_schema : nullptr,
                                       p.output.stop_ids),
          ctx.token_trie());
    } catch (const moeserve::Error& e) {
      bad_request("response_format", std::string("Invalid JSON schema: ") + e.what());
    }
  }
  p.output.min_tokens = g.min_tokens;
  p.output.stop = g.stop;
  p.output.skip_special = g.skip_special_tokens;
  p.output.reasoning = g.endpoint == Endpoint::Chat && ctx.chat && ctx.chat->reasoning();
  p.output.starts_in_think = starts_in_think;
  p.output.logprobs = g.top_logprobs >= 0;
  p.top_logprobs = g.top_logprobs;
  return p;
}

std::string usage_note(const Usage& u) {
  return "prompt " + std::to_string(u.prompt_tokens) + " + completion " +
         std::to_string(u.completion_tokens) + " tokens";
}

void Choices::add(ServerContext& ctx, const GenRequest& g, const Prepared& p,
                  Clock::time_point arrival) {
  Prepared mine = p;
  const uint64_t i = gens_.size();
  if (i > 0) mine.sampling.seed = g.seed ? *g.seed + i : std::random_device{}() * 0x100000001ull;
  gens_.push_back(std::make_unique<Generation>(ctx, g, std::move(mine), arrival, wake_));
}

void Choices::submit(bool share_prompt) {
  rest_pending_ = share_prompt && gens_.size() > 1;
  try {
    for (size_t i = 0; i < (rest_pending_ ? 1 : gens_.size()); ++i) gens_[i]->submit();
  } catch (...) {
    abort();
    throw;
  }
}

void Choices::submit_rest() {
  rest_pending_ = false;
  const Generation& first = *gens_.front();
  for (size_t i = 1; i < gens_.size(); ++i) {
    if (first.failed()) {
      gens_[i]->fail(first.error());
      continue;
    }
    try {
      gens_[i]->submit();
    } catch (const ApiError& e) {  // the response has begun: the choice fails with the reason
      gens_[i]->fail(e.what());
    }
  }
  wake_->notify();  // the loop steps the new choices at once
}

void Choices::step(std::vector<Delta>& out) {
  out.resize(gens_.size());
  for (size_t i = 0; i < gens_.size(); ++i) {
    if (i > 0 && rest_pending_) break;
    if (!gens_[i]->done()) gens_[i]->step(out[i], std::chrono::milliseconds(0));
    if (i == 0 && rest_pending_ && (gens_[0]->started() || gens_[0]->done())) submit_rest();
  }
}

void Choices::abort() {
  for (auto& gen : gens_) gen->abort();
}

bool Choices::done() const {
  for (const auto& gen : gens_)
    if (!gen->done()) return false;
  return true;
}

const Generation* Choices::failed() const {
  for (const auto& gen : gens_)
    if (gen->failed()) return gen.get();
  return nullptr;
}

Usage Choices::usage() const {
  Usage u;
  for (const auto& gen : gens_) {
    u.prompt_tokens = gen->usage().prompt_tokens;
    u.completion_tokens += gen->usage().completion_tokens;
  }
  // The prompt counts once, as the first choice read it (the others may find it cached).
  if (!gens_.empty()) u.cached_tokens = gens_.front()->usage().cached_tokens;
  return u;
}

void handle_generate(ServerContext& ctx, Endpoint endpoint, http::Exchange& ex) {
  const auto arrival = Clock::now();
  if (ctx.stopping) throw ApiError(503, "The server is shutting down.", "", "shutting_down");
  GenRequest g;
  Prepared p;
  try {
    g = parse_request(endpoint, ex.request().body, ctx.opt.limits);
    p = prepare(ctx, g);
  } catch (const ApiError&) {
    ctx.metrics.record_request(endpoint == Endpoint::Chat ? "chat" : "completions",
                               Outcome::Invalid);
    throw;
  }
  const ResponseBuilder builder(g.endpoint, ctx.opt.served_model_name, ctx.tok, p.output.reasoning,
                                p.top_logprobs >= 0, g.stream && g.include_usage);
  Choices choices;
  for (int64_t i = 0; i < g.n; ++i) choices.add(ctx, g, p, arrival);
  choices.submit(ctx.engine.config().prefix_caching);
  if (g.stream) {
    stream_response(ctx, choices, builder, g.include_usage, ex);
    ex.note(usage_note(choices.usage()));
    return;
  }

  // Not streamed: wait for the whole output, watching the client and the server meanwhile.
  std::vector<Delta> all(choices.size());
  while (true) {
    if (ctx.stopping) {
      choices.abort();
      throw ApiError(503, "The server is shutting down.", "", "shutting_down");
    }
    const uint64_t seen = choices.count();
    std::vector<Delta> d;
    choices.step(d);
    for (size_t i = 0; i < d.size(); ++i) all[i].append(std::move(d[i]));
    if (choices.done()) break;
    if (ex.client_gone()) {
      choices.abort();  // nobody is left to answer
      ex.abandon();
      ex.note("client gone, " + usage_note(choices.usage()));
      return;
    }
    choices.wait(seen, kPoll);
  }
  ex.note(usage_note(choices.usage()));
  if (const Generation* f = choices.failed())
    throw ApiError(500, f->error(), "", "generation_failed");
  std::vector<ResponseBuilder::Choice> list;
  for (size_t i = 0; i < choices.size(); ++i) list.push_back({&all[i], choices[i].finish_reason()});
  ex.respond(200, "application/json", to_wire(builder.full(list, choices.usage())));
}

}  // namespace moeserve::server
