// POST /v1/chat/completions and /v1/completions: validate, render and tokenize the prompt,
// submit to the engine, then answer with one JSON object or a stream of server-sent events.
#pragma once

#include "server/generation.h"
#include "server/protocol.h"

namespace moeserve::server::http {
class Exchange;
}

namespace moeserve::server {

struct ServerContext;

// Handles one generation request. Throws ApiError for everything the client gets wrong.
void handle_generate(ServerContext& ctx, Endpoint endpoint, http::Exchange& ex);

// The request in engine terms: prompt ids, token budget, sampling, stop conditions. Throws
// ApiError(400) (unknown model, no chat template, prompt too long, token ids out of range).
Prepared prepare(ServerContext& ctx, const GenRequest& g);

// Streams `gen` as server-sent events: "data: {chunk}\n\n" ... "data: [DONE]\n\n".
void stream_response(ServerContext& ctx, Generation& gen, http::Exchange& ex);

// The request log's note on a generation: "prompt N + completion M tokens".
std::string usage_note(const Generation& gen);

}  // namespace moeserve::server
