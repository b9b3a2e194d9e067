#include "server/server.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/error.h"
#include "server/api_error.h"
#include "server/generate.h"
#include "server/responses.h"
#include "server/structured.h"
#include "server/tokenize.h"

namespace moeserve::server {

using ojson = nlohmann::ordered_json;

namespace {

// Compares without an early exit: the time taken depends on the length of what was sent, never
// on how much of the key it matches.
bool same_secret(std::string_view given, std::string_view key) {
  unsigned char diff = given.size() != key.size();
  for (size_t i = 0; i < given.size(); ++i)
    diff |= static_cast<unsigned char>(given[i] ^ (key.empty() ? 0 : key[i % key.size()]));
  return diff == 0;
}

void check_auth(const ServerContext& ctx, const http::Request& req) {
  if (ctx.opt.api_key.empty()) return;
  const http::Header* h = req.find("Authorization");
  if (!h || h->raw.empty())
    throw ApiError(401,
                   "You didn't provide an API key. Provide it in an Authorization header using "
                   "Bearer auth (Authorization: Bearer YOUR_KEY).",
                   "", "invalid_api_key", "invalid_request_error");
  // Exactly "Bearer " and the key: trailing whitespace is part of what was sent.
  constexpr std::string_view kBearer = "Bearer ";
  const std::string_view raw = h->raw;
  const std::string_view given =
      raw.size() > kBearer.size() && raw.substr(0, kBearer.size()) == kBearer
          ? raw.substr(kBearer.size())
          : std::string_view();
  if (!same_secret(given, ctx.opt.api_key))
    throw ApiError(401, "Incorrect API key provided.", "", "invalid_api_key",
                   "invalid_request_error");
}

void send_error(http::Exchange& ex, const ApiError& e) {
  if (!ex.responded()) ex.respond(e.status, "application/json", error_body(e));
}

ojson model_card(const ServerContext& ctx) {
  return {{"id", ctx.opt.served_model_name},
          {"object", "model"},
          {"created", ctx.started},
          {"owned_by", "moeserve"},
          {"root", ctx.opt.served_model_name},
          {"parent", nullptr},
          {"max_model_len", ctx.engine.config().max_model_len}};
}

std::string error_code(int status) {
  switch (status) {
    case 400:
      return "bad_request";
    case 408:
      return "request_timeout";
    case 411:
      return "length_required";
    case 413:
      return "request_too_large";
    case 414:
      return "uri_too_long";
    case 415:
      return "unsupported_media_type";
    case 417:
      return "expectation_failed";
    case 431:
      return "headers_too_large";
    case 501:
      return "not_implemented";
    case 503:
      return "service_unavailable";
    case 505:
      return "http_version_not_supported";
    default:
      return "";
  }
}

// The percent-decoded form of a URL path segment ("%2F" -> "/"); malformed escapes stay as sent.
std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '%' && i + 2 < s.size() && std::isxdigit(static_cast<unsigned char>(s[i + 1])) &&
        std::isxdigit(static_cast<unsigned char>(s[i + 2]))) {
      out += static_cast<char>(std::stoi(std::string(s.substr(i + 1, 2)), nullptr, 16));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

// 1024, or twice the workers when there are more, but never more than the process may open.
int default_max_connections(int workers) {
  rlimit r{};
  int64_t files = 1 << 20;
  if (getrlimit(RLIMIT_NOFILE, &r) == 0 && r.rlim_cur != RLIM_INFINITY)
    files = static_cast<int64_t>(r.rlim_cur);
  return static_cast<int>(
      std::clamp<int64_t>(files - 64, 16, std::max<int64_t>(1024, 2 * int64_t{workers})));
}

}  // namespace

std::shared_ptr<const engine::TokenTrie> ServerContext::token_trie() {
  std::call_once(trie_once_, [&] { trie_ = make_token_trie(tok); });
  return trie_;
}

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
                                           std::move(eos_ids))) {
  MS_CHECK(!ctx_->opt.served_model_name.empty(), "the served model name must not be empty");
  int threads = ctx_->opt.http_threads;
  if (threads <= 0) {
    const auto& ec = engine.config();
    threads = static_cast<int>(std::min<int64_t>(ec.max_num_seqs + ec.max_waiting + 8, 2048));
  }
  http::Options ho = ctx_->opt.http;
  ho.workers = threads;
  ho.max_body_bytes = ctx_->opt.max_body_bytes;
  if (ho.max_connections <= 0) ho.max_connections = default_max_connections(threads);
  if (ho.max_connections_per_client <= 0)
    ho.max_connections_per_client = std::max(1, ho.max_connections / 4);
  http::Callbacks cb;
  cb.lane = [](const http::Request& r) {
    return r.path == "/health" || r.path == "/metrics" ? http::Lane::Control : http::Lane::Work;
  };
  cb.handle = [this](http::Exchange& ex) { handle(ex); };
  cb.error_body = [](int status, const std::string& message) {
    return error_body(message, ApiError::default_type(status), "", error_code(status));
  };
  cb.done = [this](const http::Request& r, int status, double seconds, const std::string& note) {
    request_done(r, status, seconds, note);
  };
  http_ = std::make_unique<http::Server>(std::move(ho), std::move(cb));
}

Server::~Server() {
  stop();
}

void Server::handle(http::Exchange& ex) {
  ServerContext& ctx = *ctx_;
  const http::Request& req = ex.request();
  const std::string& path = req.path;
  const std::string& m = req.method;
  const bool get = m == "GET" || m == "HEAD";
  auto not_allowed = [&] {
    throw ApiError(405, "Method " + m + " is not allowed for " + path + ".", "",
                   "method_not_allowed");
  };
  try {
    if (path == "/health") {  // never needs the key
      if (!get) not_allowed();
      if (ctx.stopping) throw ApiError(503, "The server is shutting down.", "", "shutting_down");
      if (std::string problem = ctx.engine.health_problem(); !problem.empty())
        throw ApiError(503, problem, "", "unhealthy");
      ex.respond(200, "application/json", "{\"status\":\"ok\"}");
      return;
    }
    check_auth(ctx, req);  // before routing: without the key, every path is 401
    if (path == "/metrics") {
      if (!get) not_allowed();
      const auto& mc = ctx.engine.model_config();
      std::vector<bool> moe(mc.num_hidden_layers);
      for (int64_t l = 0; l < mc.num_hidden_layers; ++l) moe[l] = mc.is_moe_layer(l);
      std::string page = ctx.metrics.render(ctx.engine.stats(), mc.n_routed_experts, moe);
      page +=
          "# HELP moeserve_precision The precision of the weight products (the label).\n"
          "# TYPE moeserve_precision gauge\n"
          "moeserve_precision{precision=\"" +
          ctx.opt.precision + "\"} 1\n";
      ex.respond(200, "text/plain; version=0.0.4; charset=utf-8", page);
      return;
    }
    if (path == "/v1/models") {
      if (!get) not_allowed();
      ojson j = {{"object", "list"}, {"data", ojson::array({model_card(ctx)})}};
      ex.respond(200, "application/json", to_wire(j));
      return;
    }
    constexpr std::string_view kModels = "/v1/models/";
    if (path.size() > kModels.size() && path.compare(0, kModels.size(), kModels) == 0) {
      if (!get) not_allowed();
      const std::string name = percent_decode(std::string_view(path).substr(kModels.size()));
      if (name != ctx.opt.served_model_name)
        throw ApiError(404, "The model '" + name + "' does not exist.", "model", "model_not_found");
      ex.respond(200, "application/json", to_wire(model_card(ctx)));
      return;
    }
    if (path == "/v1/chat/completions" || path == "/v1/completions") {
      if (m != "POST") not_allowed();
      handle_generate(ctx, path == "/v1/chat/completions" ? Endpoint::Chat : Endpoint::Completions,
                      ex);
      return;
    }
    if (path == "/tokenize" || path == "/detokenize") {
      if (m != "POST") not_allowed();
      if (path == "/tokenize")
        handle_tokenize(ctx, ex);
      else
        handle_detokenize(ctx, ex);
      return;
    }
    throw ApiError(404, "Invalid URL (" + m + " " + path + ").", "", "not_found");
  } catch (const ApiError& e) {
    send_error(ex, e);
  } catch (const std::exception& e) {
    send_error(ex, ApiError(500, std::string("Internal error: ") + e.what(), "", "internal_error"));
  }
}

void Server::request_done(const http::Request& req, int status, double seconds,
                          const std::string& note) {
  ctx_->metrics.record_http_status(status);
  if (req.path == "/v1/chat/completions" || req.path == "/v1/completions") ++finished_requests_;
  if (!ctx_->opt.log_requests) return;
  // One line, like an access log: client, request line, status, time, and what the handler noted.
  std::string target = req.target.size() > 200 ? req.target.substr(0, 200) + "..." : req.target;
  for (char& c : target)
    if (static_cast<unsigned char>(c) < 0x20 || c == '"' || c == 0x7f) c = '?';
  std::fprintf(stderr, "moeserve: %s:%d \"%s %s\" %d %.3f s%s%s\n", req.remote_addr.c_str(),
               req.remote_port, req.method.empty() ? "-" : req.method.c_str(),
               target.empty() ? "-" : target.c_str(), status, seconds, note.empty() ? "" : ", ",
               note.c_str());
}

void Server::stats_loop() {
  const auto interval = std::chrono::duration<double>(ctx_->opt.stats_interval_s);
  engine::EngineStats last = ctx_->engine.stats();
  int64_t last_requests = finished_requests_;
  auto last_time = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lk(stats_mu_);
  while (!ctx_->stopping) {
    stats_cv_.wait_for(lk, interval);
    if (ctx_->stopping) break;
    const engine::EngineStats st = ctx_->engine.stats();
    const int64_t requests = finished_requests_;
    const auto now = std::chrono::steady_clock::now();
    const double dt = std::chrono::duration<double>(now - last_time).count();
    const int64_t prompt = st.prompt_tokens - last.prompt_tokens,
                  gen = st.generated_tokens - last.generated_tokens;
    // Quiet while idle: a line when something ran or waits.
    if (prompt > 0 || gen > 0 || requests != last_requests || st.running > 0 || st.waiting > 0)
      std::fprintf(stderr,
                   "moeserve: %lld requests finished, prompt %.1f tokens/s, generation %.1f "
                   "tokens/s (last %.0f s); running %lld, waiting %lld, KV cache %.1f%% used, "
                   "%lld preemptions\n",
                   static_cast<long long>(requests - last_requests), prompt / dt, gen / dt, dt,
                   static_cast<long long>(st.running), static_cast<long long>(st.waiting),
                   st.kv_blocks_total > 0 ? 100.0 * st.kv_blocks_used / st.kv_blocks_total : 0.0,
                   static_cast<long long>(st.preemptions));
    last = st;
    last_requests = requests;
    last_time = now;
  }
}

int Server::bind() {
  const auto& o = ctx_->opt;
  MS_CHECK(o.port >= 0 && o.port < 65536, "--port must be in 0..65535, got ", o.port);
  return bind(http::Listener::open(o.host, o.port));
}

int Server::bind(http::Listener l) {
  port_ = l.port();
  http_->listen(std::move(l));
  return port_;
}

void Server::run() {
  MS_CHECK(port_ > 0, "Server::run before bind");
  if (ctx_->opt.stats_interval_s > 0 && !stats_thread_.joinable() && !ctx_->stopping)
    stats_thread_ = std::thread([this] { stats_loop(); });
  http_->run();
}

void Server::start() {
  if (port_ <= 0) bind();
  // The socket listens already: connections wait in its backlog until the loop runs.
  thread_ = std::thread([this] { run(); });
}

void Server::stop() {
  if (!stopped_.exchange(true)) {
    ctx_->stopping = true;  // in-flight handlers cancel their generation and return
    { std::lock_guard<std::mutex> lk(stats_mu_); }
    stats_cv_.notify_all();
    http_->stop();
  }
  std::lock_guard<std::mutex> lk(join_mu_);  // stop() may run on two threads at once
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  if (stats_thread_.joinable() && stats_thread_.get_id() != std::this_thread::get_id())
    stats_thread_.join();
}

std::string Server::url() const {
  const std::string& h = ctx_->opt.host;
  const bool v6 = h.find(':') != std::string::npos;
  return "http://" + (v6 ? "[" + h + "]" : h) + ":" + std::to_string(port_);
}

}  // namespace moeserve::server
