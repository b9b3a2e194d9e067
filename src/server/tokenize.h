// POST /tokenize and /detokenize, as vLLM serves them:
//   {"model", "prompt", "add_special_tokens": true}                      -> {"count",
//   "max_model_len", "tokens"}
//   {"model", "messages", "add_generation_prompt": true, "chat_template_kwargs"} -> the same
//   {"model", "tokens": [ids]}                                            -> {"prompt": text}
#pragma once

namespace moeserve::server::http {
class Exchange;
}

namespace moeserve::server {

struct ServerContext;

// Throw ApiError for everything the client gets wrong.
void handle_tokenize(ServerContext& ctx, http::Exchange& ex);
void handle_detokenize(ServerContext& ctx, http::Exchange& ex);

}  // namespace moeserve::server
