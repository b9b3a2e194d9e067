#include "server/responses.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>

#include "server/api_error.h"

namespace moeserve::server {

using ojson = nlohmann::ordered_json;

namespace {

std::string random_hex(int n) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (int i = 0; i < n; ++i) s += digits[rng() & 15];
  return s;
}

// JSON has no -inf; OpenAI and vLLM report impossible tokens as -9999.
double clamp_lp(float lp) {
  return std::isnan(lp) || lp < -9999.0f ? -9999.0 : lp;
}

ojson bytes_of(std::string_view b) {
  ojson a = ojson::array();
  for (unsigned char c : b) a.push_back(static_cast<int>(c));
  return a;
}

}  // namespace

std::string to_wire(const ojson& j) {
  return j.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

std::string error_body(const std::string& message, const std::string& type,
                       const std::string& param, const std::string& code) {
  ojson e = {{"message", message},
             {"type", type},
             {"param", param.empty() ? ojson(nullptr) : ojson(param)},
             {"code", code.empty() ? ojson(nullptr) : ojson(code)}};
  return to_wire(ojson{{"error", e}});
}

ojson usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

ResponseBuilder::ResponseBuilder(Endpoint endpoint, std::string model,
                                 const tokenizer::Tokenizer& tok, bool reasoning, bool logprobs,
                                 bool usage_in_chunks)
    : endpoint_(endpoint),
      model_(std::move(model)),
      id_((endpoint == Endpoint::Chat ? "chatcmpl-" : "cmpl-") + random_hex(24)),
      created_(std::chrono::duration_cast<std::chrono::seconds>(
                   std::chrono::system_clock::now().time_since_epoch())
                   .count()),
      tok_(tok),
      reasoning_(reasoning),
      logprobs_(logprobs),
      usage_in_chunks_(usage_in_chunks) {}

ojson ResponseBuilder::base(const char* object) const {
  return {{"id", id_}, {"object", object}, {"created", created_}, {"model", model_}};
}

ojson ResponseBuilder::logprobs(const std::vector<TokenLogprob>& lps) const {
  if (endpoint_ == Endpoint::Chat) {
    ojson content = ojson::array();
    for (const auto& t : lps) {
      ojson top = ojson::array();
      for (const auto& [id, lp] : t.top)
        top.push_back({{"token", token_display(tok_, id)},
                       {"logprob", clamp_lp(lp)},
                       {"bytes", bytes_of(tok_.token_bytes(id))}});
      content.push_back({{"token", token_display(tok_, t.id)},
                         {"logprob", clamp_lp(t.logprob)},
                         {"bytes", bytes_of(tok_.token_bytes(t.id))},
                         {"top_logprobs", top}});
    }
    return {{"content", content}, {"refusal", nullptr}};
  }
  ojson tokens = ojson::array(), token_lps = ojson::array(), tops = ojson::array(),
        offsets = ojson::array();
  for (const auto& t : lps) {
    tokens.push_back(token_display(tok_, t.id));
    token_lps.push_back(clamp_lp(t.logprob));
    // The sampled token is always listed, so there may be logprobs + 1 entries.
    ojson top = ojson::object();
    for (const auto& [id, lp] : t.top) top[token_display(tok_, id)] = clamp_lp(lp);
    const std::string self = token_display(tok_, t.id);
    if (!top.contains(self)) top[self] = clamp_lp(t.logprob);
    tops.push_back(top);
    offsets.push_back(t.text_offset);
  }
  return {{"tokens", tokens},
          {"token_logprobs", token_lps},
          {"top_logprobs", tops},
          {"text_offset", offsets}};
}

ojson ResponseBuilder::role_chunk(int index) const {
  ojson c = base("chat.completion.chunk");
  c["choices"] = ojson::array({{{"index", index},
                                {"delta", {{"role", "assistant"}, {"content", ""}}},
                                {"logprobs", nullptr},
                                {"finish_reason", nullptr}}});
  if (usage_in_chunks_) c["usage"] = nullptr;
  return c;
}

ojson ResponseBuilder::chunk(const Delta& d, const char* finish_reason, int index) const {
  const bool want_lp = !d.logprobs.empty();
  ojson choice = {{"index", index}};
  ojson c;
  if (endpoint_ == Endpoint::Chat) {
    c = base("chat.completion.chunk");
    ojson delta = ojson::object();
    if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
    if (!d.content.empty() || (want_lp && d.reasoning.empty())) delta["content"] = d.content;
    if (!d.tool_calls.empty()) {
      ojson calls = ojson::array();
      for (const ToolCallDelta& t : d.tool_calls) {
        ojson c = {{"index", t.index}};
        ojson fn = ojson::object();
        if (!t.id.empty()) {
          c["id"] = t.id;
          c["type"] = "function";
          fn["name"] = t.name;
        }
        fn["arguments"] = t.arguments;
        c["function"] = fn;
        calls.push_back(std::move(c));
      }
      delta["tool_calls"] = std::move(calls);
    }
    choice["delta"] = delta;
  } else {
    c = base("text_completion");
    choice["text"] = d.content;
  }
  choice["logprobs"] = want_lp ? logprobs(d.logprobs) : ojson(nullptr);
  choice["finish_reason"] = finish_reason ? ojson(finish_reason) : ojson(nullptr);
  c["choices"] = ojson::array({choice});
  if (usage_in_chunks_) c["usage"] = nullptr;
  return c;
}

ojson ResponseBuilder::usage_chunk(const Usage& u) const {
  ojson c = base(endpoint_ == Endpoint::Chat ? "chat.completion.chunk" : "text_completion");
  c["choices"] = ojson::array();
  c["usage"] = usage_json(u);
  return c;
}

ojson ResponseBuilder::full(const std::vector<Choice>& choices, const Usage& u) const {
  ojson r = base(endpoint_ == Endpoint::Chat ? "chat.completion" : "text_completion");
  ojson list = ojson::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const Delta& all = *choices[i].all;
    ojson choice = {{"index", static_cast<int64_t>(i)}};
    if (endpoint_ == Endpoint::Chat) {
      ojson msg = {{"role", "assistant"}, {"content", all.content}};
      if (reasoning_) msg["reasoning_content"] = all.reasoning;
      if (!all.tool_calls.empty()) {
        // The streamed pieces, joined per call.
        ojson calls = ojson::array();
        for (const ToolCallDelta& t : all.tool_calls) {
          while (static_cast<int>(calls.size()) <= t.index)
            calls.push_back({{"id", ""},
                             {"type", "function"},
                             {"function", {{"name", ""}, {"arguments", ""}}}});
          ojson& c = calls[t.index];
          if (!t.id.empty()) {
            c["id"] = t.id;
            c["function"]["name"] = t.name;
          }
          c["function"]["arguments"] = c["function"]["arguments"].get<std::string>() + t.arguments;
        }
        msg["tool_calls"] = std::move(calls);
        if (all.content.empty()) msg["content"] = nullptr;
      }
      choice["message"] = msg;
    } else {
      choice["text"] = all.content;
    }
    choice["logprobs"] = logprobs_ ? logprobs(all.logprobs) : ojson(nullptr);
    choice["finish_reason"] = choices[i].finish_reason;
    list.push_back(std::move(choice));
  }
  r["choices"] = std::move(list);
  r["usage"] = usage_json(u);
  return r;
}

}  // namespace moeserve::server
