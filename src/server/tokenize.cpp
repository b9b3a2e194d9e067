#include "server/tokenize.h"

#include <limits>

#include "core/error.h"
#include "server/api_error.h"
#include "server/http_server.h"
#include "server/responses.h"
#include "server/server.h"

namespace moeserve::server {

using nlohmann::json;

namespace {

void check_model(const ServerContext& ctx, const json& obj) {
  auto it = obj.find("model");
  if (it == obj.end() || it->is_null()) return;
  if (!it->is_string() || (*it != ctx.opt.served_model_name))
    throw ApiError(400,
                   "The model '" + (it->is_string() ? it->get<std::string>() : it->dump()) +
                       "' does not exist; this server serves '" + ctx.opt.served_model_name + "'.",
                   "model", "model_not_found");
}

bool flag(const json& obj, const char* key, bool dflt) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return dflt;
  if (!it->is_boolean())
    bad_request(key, std::string("Invalid type for '") + key + "': expected a boolean.");
  return it->get<bool>();
}

}  // namespace

void handle_tokenize(ServerContext& ctx, http::Exchange& ex) {
  const json obj = parse_json_object(ex.request().body, ctx.opt.limits.max_json_depth);
  check_model(ctx, obj);
  std::vector<int32_t> ids;
  const bool chat = obj.contains("messages") && !obj["messages"].is_null();
  try {
    if (chat) {
      if (!ctx.chat)
        throw ApiError(400, "This model has no chat template; tokenize a 'prompt' instead.",
                       "messages", "no_chat_template");
      nlohmann::ordered_json kwargs = nlohmann::ordered_json::object();
      if (auto kw = obj.find("chat_template_kwargs"); kw != obj.end() && !kw->is_null()) {
        if (!kw->is_object())
          bad_request("chat_template_kwargs", "'chat_template_kwargs' must be an object.");
        kwargs = nlohmann::ordered_json::parse(kw->dump());
      }
      const std::string text =
          ctx.chat->render(parse_messages(obj), flag(obj, "add_generation_prompt", true), kwargs);
      ids = ctx.tok.encode(text, flag(obj, "add_special_tokens", false), /*parse_special=*/true);
    } else {
      auto p = obj.find("prompt");
      if (p == obj.end() || !p->is_string())
        bad_request("prompt", "Give 'prompt' (a string) or 'messages'.");
      ids = ctx.tok.encode(p->get<std::string>(), flag(obj, "add_special_tokens", true),
                           /*parse_special=*/true);
    }
  } catch (const moeserve::Error& e) {
    bad_request(chat ? "messages" : "prompt", e.what());
  }
  nlohmann::ordered_json r = {{"count", static_cast<int64_t>(ids.size())},
                              {"max_model_len", ctx.engine.config().max_model_len},
                              {"tokens", ids}};
  if (flag(obj, "return_token_strs", false)) {
    json strs = json::array();
    for (int32_t id : ids) strs.push_back(std::string(ctx.tok.token_bytes(id)));
    r["token_strs"] = strs;
  } else {
    r["token_strs"] = nullptr;
  }
  ex.respond(200, "application/json", to_wire(r));
}

void handle_detokenize(ServerContext& ctx, http::Exchange& ex) {
  const json obj = parse_json_object(ex.request().body, ctx.opt.limits.max_json_depth);
  check_model(ctx, obj);
  auto t = obj.find("tokens");
  if (t == obj.end() || !t->is_array())
    bad_request("tokens", "'tokens' must be an array of token ids.");
  const int64_t vocab = ctx.engine.model_config().vocab_size;
  std::vector<int32_t> ids;
  for (const json& v : *t) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= vocab)
      bad_request("tokens", "Token id " + v.dump() + " in 'tokens' is out of range [0, " +
                                std::to_string(vocab) + ").");
    ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
  }
  ex.respond(200, "application/json",
             to_wire(nlohmann::ordered_json{{"prompt", ctx.tok.decode(ids)}}));
}

}  // namespace moeserve::server
