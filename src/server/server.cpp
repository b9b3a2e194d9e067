#include "server/server.h"

#include "server/connection.h"

#include <algorithm>
#include <chrono>

#include "server/http.h"

#include "core/error.h"
#include "server/api_error.h"
#include "server/generate.h"
#include "server/responses.h"

namespace moeserve::server {

using json = nlohmann::ordered_json;

namespace {

// Compares without an early exit, so response time says nothing about the key.
bool same_secret(std::string_view a, std::string_view b) {
  unsigned char diff = a.size() != b.size();
  for (size_t i = 0; i < a.size(); ++i) diff |= a[i] ^ (i < b.size() ? b[i] : 0);
  return diff == 0;
}

void check_auth(const ServerContext& ctx, const httplib::Request& req) {
  if (ctx.opt.api_key.empty()) return;
  const std::string h = req.get_header_value("Authorization");
  if (h.empty())
    throw ApiError(401,
                   "You didn't provide an API key. Provide it in an Authorization header using "
                   "Bearer auth (Authorization: Bearer YOUR_KEY).",
                   "", "invalid_api_key", "invalid_request_error");
  constexpr std::string_view kBearer = "Bearer ";
  const std::string_view given =
      h.size() > kBearer.size() && std::string_view(h).substr(0, kBearer.size()) == kBearer
          ? std::string_view(h).substr(kBearer.size())
          : std::string_view();
  if (!same_secret(given, ctx.opt.api_key))
    throw ApiError(401, "Incorrect API key provided.", "", "invalid_api_key",
                   "invalid_request_error");
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(error_body(e), "application/json");
}

// Wraps a route: authentication, then the handler; every error becomes OpenAI's error object.
httplib::Server::Handler guarded(
    ServerContext& ctx, bool needs_auth,
    std::function<void(const httplib::Request&, httplib::Response&)> h) {
  return [&ctx, needs_auth, h = std::move(h)](const httplib::Request& req, httplib::Response& res) {
    try {
      if (needs_auth) check_auth(ctx, req);
      h(req, res);
    } catch (const ApiError& e) {
      send_error(res, e);
    } catch (const std::exception& e) {
      send_error(res,
                 ApiError(500, std::string("Internal error: ") + e.what(), "", "internal_error"));
    }
  };
}

json model_card(const ServerContext& ctx) {
  return {{"id", ctx.opt.served_model_name},
          {"object", "model"},
          {"created", ctx.started},
          {"owned_by", "moeserve"},
          {"root", ctx.opt.served_model_name},
          {"parent", nullptr},
          {"max_model_len", ctx.engine.config().max_model_len}};
}

const char* default_message(int status) {
  switch (status) {
    case 400:
      return "The request could not be parsed.";
    case 404:
      return "Not found.";
    case 405:
      return "Method not allowed.";
    case 413:
      return "The request body is too large.";
    case 414:
      return "The request URI is too long.";
    case 500:
      return "Internal server error.";
    case 503:
      return "The server is not available.";
    default:
      return "The request failed.";
  }
}

}  // namespace

std::vector<int32_t> default_eos_ids(const tokenizer::Tokenizer& tok, int64_t model_eos) {
  std::vector<int32_t> ids;
  auto add = [&](int64_t id) {
    if (id >= 0 && id < tok.vocab_size() &&
        std::find(ids.begin(), ids.end(), static_cast<int32_t>(id)) == ids.end())
      ids.push_back(static_cast<int32_t>(id));
  };
  add(tok.eos_id());
  add(model_eos);
  // End-of-turn tokens of common chat formats, when the vocabulary has them as special tokens.
  for (const char* t :
       {"<|im_end|>", "<|eot_id|>", "<|EOT|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"})
    if (auto id = tok.token_to_id(t); id && tok.is_special(*id)) add(*id);
  return ids;
}

Server::Server(engine::Service& engine, tokenizer::Tokenizer tok, std::optional<ChatFormat> chat,
               std::vector<int32_t> eos_ids, ServerOptions opt)
    : ctx_(std::make_unique<ServerContext>(engine, std::move(tok), std::move(chat), std::move(opt),
                                           std::move(eos_ids))),
      http_(std::make_unique<httplib::Server>()) {
  MS_CHECK(!ctx_->opt.served_model_name.empty(), "the served model name must not be empty");
  int threads = ctx_->opt.http_threads;
  if (threads <= 0) {
    const auto& ec = engine.config();
    threads = static_cast<int>(std::min<int64_t>(ec.max_num_seqs + ec.max_waiting + 8, 2048));
  }
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  http_->set_payload_max_length(ctx_->opt.max_body_bytes);
  http_->set_keep_alive_max_count(1000);
  http_->set_keep_alive_timeout(2);
  http_->set_read_timeout(30);
  http_->set_write_timeout(30);
  http_->set_tcp_nodelay(true);
  install_routes();
}

Server::~Server() {
  stop();
}

void Server::install_routes() {
  ServerContext& ctx = *ctx_;
  httplib::Server& s = *http_;

  s.Get("/health", guarded(ctx, false, [&ctx](const httplib::Request&, httplib::Response& res) {
          if (ctx.stopping)
            throw ApiError(503, "The server is shutting down.", "", "shutting_down");
          const std::string problem = ctx.engine.health_problem();
          if (!problem.empty()) throw ApiError(503, problem, "", "unhealthy");
          res.set_content("{\"status\":\"ok\"}", "application/json");
        }));
  s.Get("/metrics", guarded(ctx, true, [&ctx](const httplib::Request&, httplib::Response& res) {
          const auto& mc = ctx.engine.model_config();
          std::vector<bool> moe(mc.num_hidden_layers);
          for (int64_t l = 0; l < mc.num_hidden_layers; ++l) moe[l] = mc.is_moe_layer(l);
          res.set_content(ctx.metrics.render(ctx.engine.stats(), mc.n_routed_experts, moe),
                          "text/plain; version=0.0.4; charset=utf-8");
        }));
  s.Get("/v1/models", guarded(ctx, true, [&ctx](const httplib::Request&, httplib::Response& res) {
          json j = {{"object", "list"}, {"data", json::array({model_card(ctx)})}};
          res.set_content(to_wire(j), "application/json");
        }));
  s.Get(R"(/v1/models/(.+))",
        guarded(ctx, true, [&ctx](const httplib::Request& req, httplib::Response& res) {
          if (req.matches[1] != ctx.opt.served_model_name)
            throw ApiError(404, "The model '" + std::string(req.matches[1]) + "' does not exist.",
                           "model", "model_not_found");
          res.set_content(to_wire(model_card(ctx)), "application/json");
        }));
  s.Post("/v1/chat/completions",
         guarded(ctx, true, [&ctx](const httplib::Request& req, httplib::Response& res) {
           handle_generate(ctx, Endpoint::Chat, req, res);
         }));
  s.Post("/v1/completions",
         guarded(ctx, true, [&ctx](const httplib::Request& req, httplib::Response& res) {
           handle_generate(ctx, Endpoint::Completions, req, res);
         }));
  // A known path with the wrong method is 405, not 404.
  auto not_allowed = [](const httplib::Request& req, httplib::Response& res) {
    send_error(res, ApiError(405, "Method " + req.method + " is not allowed for " + req.path + ".",
                             "", "method_not_allowed"));
  };
  for (const char* p : {"/v1/chat/completions", "/v1/completions"}) s.Get(p, not_allowed);
  for (const char* p : {"/health", "/metrics", "/v1/models"}) s.Post(p, not_allowed);

  // httplib 0.11 enforces the body size limit only on bodies with a Content-Length; a chunked
  // body would be read whole, however large. Refuse those before reading them.
  s.set_pre_routing_handler([](const httplib::Request& req, httplib::Response& res) {
    if (req.get_header_value("Transfer-Encoding").find("chunked") == std::string::npos)
      return httplib::Server::HandlerResponse::Unhandled;
    send_error(res, ApiError(411, "Chunked request bodies are not accepted; send Content-Length.",
                             "", "length_required"));
    return httplib::Server::HandlerResponse::Handled;
  });

  // Responses httplib makes itself (unknown route, body too large, malformed HTTP) get the same
  // error object as ours. Responses that already have a body are left alone.
  s.set_error_handler([&ctx](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty() || res.content_provider_) return;
    std::string msg = default_message(res.status);
    std::string code;
    if (res.status == 404) {
      msg = "Invalid URL (" + req.method + " " + req.path + ").";
      code = "not_found";
    } else if (res.status == 413) {
      msg = "The request body is larger than the limit of " +
            std::to_string(ctx.opt.max_body_bytes) + " bytes.";
      code = "request_too_large";
    }
    res.set_content(error_body(msg, ApiError::default_type(res.status), "", code),
                    "application/json");
  });
  s.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    res.status = 500;
    res.set_content(error_body("Internal server error.", "server_error", "", "internal_error"),
                    "application/json");
  });
  s.set_logger([&ctx](const httplib::Request&, const httplib::Response& res) {
    ctx.metrics.record_http_status(res.status);
  });
}

int Server::bind() {
  const auto& o = ctx_->opt;
  if (o.port == 0) {
    port_ = http_->bind_to_any_port(o.host);
    MS_CHECK(port_ > 0, "cannot listen on ", o.host, " (any port)");
  } else {
    MS_CHECK(o.port > 0 && o.port < 65536, "--port must be in 1..65535, got ", o.port);
    MS_CHECK(http_->bind_to_port(o.host, o.port), "cannot listen on ", o.host, ":", o.port,
             " (address in use, or not an address of this machine)");
    port_ = o.port;
  }
  deepen_listen_backlog(port_);
  return port_;
}

void Server::run() {
  MS_CHECK(port_ > 0, "Server::run before bind");
  in_run_ = true;  // before reading `stopping` (see stop())
  if (!ctx_->stopping) http_->listen_after_bind();
  in_run_ = false;
}

void Server::start() {
  bind();
  thread_ = std::thread([this] {
    run();
    run_returned_ = true;
  });
  while (!http_->is_running() && !run_returned_)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

void Server::stop() {
  if (!stopped_.exchange(true)) {
    ctx_->stopping = true;  // in-flight handlers cancel their generation and return
    // httplib's stop() only acts on a running listener (and must run once): wait until run()
    // either listens or has returned.
    while (in_run_ && !http_->is_running())
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    if (in_run_) http_->stop();
  }
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

std::string Server::url() const {
  const std::string& h = ctx_->opt.host;
  const bool v6 = h.find(':') != std::string::npos;
  return "http://" + (v6 ? "[" + h + "]" : h) + ":" + std::to_string(port_);
}

}  // namespace moeserve::server
