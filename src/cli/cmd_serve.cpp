// serve: the OpenAI-compatible HTTP server over one model (src/server).
#include <pthread.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "cli/commands.h"
#include "cli/common.h"
#include "cli/parallel.h"
#include "core/error.h"
#include "core/thread_pool.h"
#include "engine/cluster.h"
#include "engine/engine.h"
#include "model/model.h"
#include "server/server.h"
#include "server/structured.h"

namespace moeserve::cli {

namespace fs = std::filesystem;

namespace {

struct ServeArgs {
  std::string model, host = "127.0.0.1", api_key, api_key_file, served_name, chat_template;
  bool disable_log_requests = false, disable_log_stats = false, no_prefix_caching = false;
  int max_connections = 0, max_connections_per_client = 0;
  int port = 8000;
  int64_t max_num_seqs = 16, max_model_len = 0, kv_cache_mb = 256, max_batch_tokens = 256;
  int64_t max_waiting = 256;
  int64_t prefill_ranks = 0, decode_ranks = 0;
  int64_t speculative_tokens = 0;
  std::string router = "least-loaded", kv_transfer = "one-sided";
  std::string kv_cache_dtype;  // add_kv_cache_dtype_option
  double kv_transfer_timeout_ms = 10000, kv_lease_ms = 60000, peer_timeout_ms = 5000;
  ParallelArgs par;
};

// The API key: --api-key, else --api-key-file's first line, else $MOESERVE_API_KEY; "" for none.
// A key must be printable ASCII without spaces: clients send it in a header as it is.
std::string api_key(const ServeArgs& a) {
  MS_CHECK(a.api_key.empty() || a.api_key_file.empty(),
           "give the API key with --api-key or --api-key-file, not both");
  std::string key = a.api_key, from = "--api-key";
  if (!a.api_key_file.empty()) {
    std::ifstream in(a.api_key_file);
    MS_CHECK(in, "--api-key-file ", a.api_key_file, " cannot be read");
    std::getline(in, key);
    if (!key.empty() && key.back() == '\r') key.pop_back();
    MS_CHECK(!key.empty(), "--api-key-file ", a.api_key_file,
             " is empty: its first line is the key");
    from = "--api-key-file";
  } else if (key.empty() && std::getenv("MOESERVE_API_KEY")) {
    key = std::getenv("MOESERVE_API_KEY");
    from = "MOESERVE_API_KEY";
  }
  for (char c : key)
    MS_CHECK(c > 0x20 && c < 0x7f, "the API key of ", from,
             " holds a space or a control character; use printable ASCII without spaces");
  return key;
}

// SIGINT / SIGTERM, waited for on a thread of its own from the start (`sigs` are blocked in
// every thread). Before the server runs, a signal ends the process at once: loading a large
// model takes minutes. While it runs, a signal stops the server.
class SignalWatch {
 public:
  explicit SignalWatch(sigset_t sigs) : sigs_(sigs), thread_([this] { wait(); }) {}
  ~SignalWatch() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      done_ = true;
    }
    pthread_kill(thread_.native_handle(), SIGTERM);  // wakes sigwait if no signal came
    thread_.join();
  }
  // The server a signal stops from now on; nullptr before it is destroyed.
  void attach(server::Server* srv) {
    std::lock_guard<std::mutex> lk(mu_);  // waits for a stop() in progress
    srv_ = srv;
  }

 private:
  void wait() {
    int sig = 0;
    sigwait(&sigs_, &sig);
    std::lock_guard<std::mutex> lk(mu_);
    if (done_) return;
    const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
    if (!srv_) {
      std::fprintf(stderr, "moeserve: %s received before serving; exiting\n", name);
      std::_Exit(128 + sig);
    }
    std::fprintf(stderr, "moeserve: %s received, shutting down\n", name);
    srv_->stop();  // a few seconds at most
  }

  sigset_t sigs_;
  std::mutex mu_;
  server::Server* srv_ = nullptr;
  bool done_ = false;
  std::thread thread_;
};

// The server on top of `svc`, until SIGINT / SIGTERM (`signals`). `listener`: the port, opened
// before the model was loaded.
void serve_http(engine::Service& svc, const ServeArgs& a, tokenizer::Tokenizer tok,
                std::optional<server::ChatFormat> chat, const model::ModelConfig& mc,
                const std::string& layout, int ranks, SignalWatch& signals,
                server::http::Listener listener, std::string key) {
  const fs::path dir(a.model);
  std::vector<int32_t> eos = server::default_eos_ids(tok, mc.eos_token_id);
  for (int32_t id : generation_config_eos_ids(a.model, mc.vocab_size))
    if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);

  server::ServerOptions so;
  so.host = a.host;
  so.port = a.port;
  so.api_key = std::move(key);
  const std::string precision = kernels::precision_name(parse_precision(a.par.precision));
  so.precision = precision;
  so.log_requests = !a.disable_log_requests;
  so.stats_interval_s = a.disable_log_stats ? 0 : 10;
  so.http.max_connections = a.max_connections;
  so.http.max_connections_per_client = a.max_connections_per_client;
  // A connection holds an HTTP thread while its request runs or waits, on any rank.
  so.http_threads = static_cast<int>(
      std::min<int64_t>((svc.config().max_num_seqs + svc.config().max_waiting) * ranks + 8, 2048));
  so.served_model_name = a.served_name;
  if (so.served_model_name.empty()) {
    const fs::path p = fs::weakly_canonical(fs::absolute(dir));
    so.served_model_name =
        p.filename().empty() ? p.parent_path().filename().string() : p.filename().string();
  }
  server::Server srv(svc, std::move(tok), std::move(chat), std::move(eos), so);
  srv.bind(std::move(listener));
  signals.attach(&srv);
  const engine::EngineConfig& ec = svc.config();
  const int64_t kv_tokens = engine::kv_blocks_for(mc, ec) * ec.block_size;
  std::printf(
      "moeserve: serving '%s' at %s (OpenAI API under /v1; max_model_len %lld, "
      "max_num_seqs %lld per rank, KV cache %lld tokens per rank in %s (%lld bytes per token), "
      "prefix caching %s, %s precision, %s)\n",
      so.served_model_name.c_str(), srv.url().c_str(), static_cast<long long>(ec.max_model_len),
      static_cast<long long>(ec.max_num_seqs), static_cast<long long>(kv_tokens),
      kv::kv_dtype_name(ec.kv_dtype),
      static_cast<long long>(mc.num_hidden_layers *
                             kv::kv_row_bytes(ec.kv_dtype, mc.kv_cache_dim())),
      ec.prefix_caching ? "on" : "off", precision.c_str(), layout.c_str());
  std::fflush(stdout);
  try {
    srv.run();
  } catch (...) {
    signals.attach(nullptr);
    throw;
  }
  srv.stop();
  signals.attach(nullptr);
}

void run_serve(const ServeArgs& a) {
  // Every thread started from here on inherits this mask, so SIGINT / SIGTERM reach only the
  // sigwait() of rank 0 and shutdown happens on an ordinary thread. Other ranks stop when
  // rank 0 tells them.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  signal(SIGPIPE, SIG_IGN);

  ParallelModel pm(a.par);
  comm::Communicator& world = pm.world();
  const bool root = pm.is_root();
  std::optional<SignalWatch> signals;  // rank 0's; mpirun ends the others
  if (root) signals.emplace(sigs);
  const fs::path dir(a.model);
  engine::ClusterConfig cc;
  std::optional<tokenizer::Tokenizer> tok;
  std::optional<server::ChatFormat> chat;
  server::http::Listener listener;
  std::string key;
  pm.check_all([&] {
    MS_CHECK(fs::is_regular_file(dir / "tokenizer.json"), a.model,
             " has no tokenizer.json: `moeserve serve` needs the model's tokenizer files "
             "(tokenizer.json, tokenizer_config.json) for its text endpoints; copy them from the "
             "original checkpoint (for a random-weight model: `moeserve init-model ... "
             "--tokenizer DIR`, or `--preset demo`, which has the DeepSeek-V3 tokenizer)");
    MS_CHECK(a.chat_template.empty() || fs::is_regular_file(a.chat_template), "--chat-template ",
             a.chat_template, " is not a file");
    MS_CHECK(a.max_num_seqs >= 1, "--max-num-seqs must be >= 1");
    MS_CHECK(a.max_model_len >= 0, "--max-model-len must be >= 2 (or 0 for the default)");
    MS_CHECK(a.kv_cache_mb >= 1, "--kv-cache-mb must be >= 1");
    cc.engine.kv_dtype = parse_kv_cache_dtype(a.kv_cache_dtype);
    MS_CHECK(a.max_batch_tokens >= 1, "--max-batch-tokens must be >= 1");
    MS_CHECK(a.max_waiting >= 1, "--max-waiting must be >= 1");
    MS_CHECK(a.max_connections >= 0 && a.max_connections_per_client >= 0,
             "--max-connections and --max-connections-per-client must be >= 0");
    MS_CHECK(a.router == "least-loaded" || a.router == "round-robin",
             "--router must be "
             "least-loaded or round-robin, not '",
             a.router, "'");
    MS_CHECK(a.kv_transfer == "one-sided" || a.kv_transfer == "two-sided",
             "--kv-transfer must be one-sided or two-sided, not '", a.kv_transfer, "'");
    MS_CHECK(world.size() > 1 || (a.prefill_ranks == 0 && a.decode_ranks == 0),
             "--prefill-ranks and --decode-ranks split the ranks of an mpirun launch, e.g. "
             "`mpirun -np 3 moeserve serve ... --prefill-ranks 1 --decode-ranks 2`");
    cc.prefill_ranks = a.prefill_ranks;
    cc.decode_ranks = a.decode_ranks;
    cc.route = a.router == "round-robin" ? engine::RoutePolicy::RoundRobin
                                         : engine::RoutePolicy::LeastLoaded;
    cc.transfer = a.kv_transfer == "two-sided" ? engine::KvTransferMode::TwoSided
                                               : engine::KvTransferMode::OneSided;
    cc.transfer_timeout_s = a.kv_transfer_timeout_ms / 1e3;
    cc.lease_s = a.kv_lease_ms / 1e3;
    cc.peer_timeout_s = a.peer_timeout_ms / 1e3;
    cc.validate(world.size());
    if (root) {
      key = api_key(a);
      // The port first, not after minutes of loading: a busy one fails at once.
      listener = server::http::Listener::open(a.host, a.port);
      tok = tokenizer::Tokenizer::load(dir);
      chat = server::ChatFormat::load(a.model, a.chat_template, *tok);
    }
  });
  if (root && !chat)
    std::fprintf(stderr,
                 "note: %s has no chat template; /v1/chat/completions will answer 400 (use "
                 "--chat-template FILE)\n",
                 a.model.c_str());
  if (cc.disaggregated()) pm.split_group(cc.group_of(world.rank()));
  pm.load(a.model);
  model::Model& m = pm.model();
  if (root && has_random_weights(a.model))
    std::fprintf(stderr,
                 "note: %s holds RANDOM weights (made by `moeserve init-model`); its output is "
                 "meaningless text, for demos and tests only.\n",
                 a.model.c_str());
  const int64_t max_pos = m.config().max_position_embeddings;
  engine::EngineConfig& ec = cc.engine;
  ec.max_num_seqs = a.max_num_seqs;
  ec.max_model_len = a.max_model_len > 0 ? a.max_model_len
                                         : (max_pos > 0 ? std::min<int64_t>(4096, max_pos) : 4096);
  ec.kv_cache_mb = a.kv_cache_mb;
  ec.max_batch_tokens = a.max_batch_tokens;
  ec.max_waiting = a.max_waiting;
  ec.prefix_caching = !a.no_prefix_caching;
  ec.speculative_tokens = a.speculative_tokens;
  if (ec.speculative_tokens > 0) m.load_mtp();  // before prefault, which copies it too
  // Structured output under mpirun: each rank compiles the constraints of its requests.
  ec.compile_constraint = server::lazy_constraint_compiler(a.model);
  pm.check_all([&] {
    MS_CHECK(max_pos <= 0 || ec.max_model_len <= max_pos, "--max-model-len ", ec.max_model_len,
             " is longer than the model's max_position_embeddings (", max_pos, ")");
  });
  m.prefault(/*progress=*/root, /*copy=*/!a.par.mmap);

  if (world.size() == 1) {
    engine::Engine engine(m, ec);
    const std::string layout =
        std::to_string(engine.stats().kv_blocks_total) + " KV blocks, one process";
    serve_http(engine, a, std::move(*tok), std::move(chat), m.config(), layout, 1, *signals,
               std::move(listener), std::move(key));
  } else {
    std::unique_ptr<comm::Mailbox> mb = world.mailbox();
    std::optional<engine::ClusterWorker> worker;
    pm.check_all([&] { worker.emplace(m, world, pm.comm(), *mb, cc); });
    if (root) {
      std::thread compute([&] { worker->run(); });
      std::optional<engine::ClusterFrontEnd> fe;
      fe.emplace(m.config(), *mb, cc);
      std::string layout = std::to_string(world.size()) + " ranks, ";
      layout += cc.disaggregated() ? std::to_string(cc.prefill_ranks) + " prefill + " +
                                         std::to_string(cc.decode_ranks) + " decode (" +
                                         a.kv_transfer + " KV transfer)"
                                   : "each prefilling and decoding";
      layout += ", " + a.router + " routing";
      // Stops every rank; when one of them cannot be stopped (it stopped answering), ends the
      // job instead, since the ranks cannot meet again.
      auto stop_ranks = [&] {
        fe->stop();
        const std::string problem = fe->shutdown_problem();
        if (!problem.empty()) world.abort(problem);
        fe.reset();
        compute.join();
      };
      try {
        serve_http(*fe, a, std::move(*tok), std::move(chat), m.config(), layout, world.size(),
                   *signals, std::move(listener), std::move(key));
      } catch (...) {
        stop_ranks();
        throw;
      }
      stop_ranks();
    } else {
      worker->run();
    }
    worker.reset();  // collective
    mb->flush();
    world.barrier();
  }
  pm.write_expert_load();
  if (root) std::fprintf(stderr, "moeserve: stopped\n");
}

}  // namespace

void register_serve_command(CLI::App& app) {
  auto a = std::make_shared<ServeArgs>();
  CLI::App* s = app.add_subcommand("serve", "Serve a model over an OpenAI-compatible HTTP API");
  s->add_option("--model", a->model, "Hugging Face model folder (with tokenizer files)")
      ->required()
      ->check(CLI::ExistingDirectory);
  s->add_option("--host", a->host, "Address to listen on")->capture_default_str();
  s->add_option("--port", a->port, "Port to listen on (0: any free port)")->capture_default_str();
  s->add_option("--api-key", a->api_key,
                "Require 'Authorization: Bearer KEY' (visible in ps: prefer --api-key-file or "
                "$MOESERVE_API_KEY)");
  s->add_option("--api-key-file", a->api_key_file,
                "Read the API key from the first line of FILE (default: $MOESERVE_API_KEY, else "
                "no key)");
  s->add_option("--served-model-name", a->served_name,
                "Model name in the API (default: the folder's name)");
  s->add_option("--max-num-seqs", a->max_num_seqs, "Sequences running at once")
      ->capture_default_str();
  s->add_option("--max-model-len", a->max_model_len,
                "Prompt + output tokens of one request (default: min(4096, the model's))");
  s->add_option("--kv-cache-mb", a->kv_cache_mb, "KV cache size in MiB")->capture_default_str();
  add_kv_cache_dtype_option(s, &a->kv_cache_dtype);
  s->add_option("--max-batch-tokens", a->max_batch_tokens, "Tokens per engine step")
      ->capture_default_str();
  s->add_option("--max-waiting", a->max_waiting, "Queued requests before answering 429")
      ->capture_default_str();
  s->add_flag("--no-prefix-caching", a->no_prefix_caching,
              "Compute every prompt in full: no KV blocks shared between requests that start "
              "with the same tokens");
  add_speculative_tokens_option(s, &a->speculative_tokens);
  s->add_option("--chat-template", a->chat_template,
                "Jinja chat template file (default: the model's tokenizer_config.json)");
  s->add_option("--max-connections", a->max_connections,
                "Open HTTP connections at most; more are answered 503 (0: 1024, or twice the "
                "HTTP workers if more, within the open-file limit)")
      ->capture_default_str();
  s->add_option("--max-connections-per-client", a->max_connections_per_client,
                "Open HTTP connections from one client address at most (0: a quarter of "
                "--max-connections; raise it behind a proxy)")
      ->capture_default_str();
  s->add_flag("--disable-log-requests", a->disable_log_requests,
              "No log line per request on stderr");
  s->add_flag("--disable-log-stats", a->disable_log_stats,
              "No throughput line every 10 s on stderr while requests run");
  add_parallel_flags(s, a->par);
  s->add_option("--prefill-ranks", a->prefill_ranks,
                "Under mpirun: ranks [0, P) prefill (an expert-parallel group of their own)");
  s->add_option("--decode-ranks", a->decode_ranks,
                "Under mpirun: the remaining D ranks decode; P + D = the number of ranks");
  s->add_option("--router", a->router,
                "How rank 0 spreads requests over ranks: least-loaded (KV blocks in use and "
                "unfinished requests) or round-robin")
      ->capture_default_str();
  s->add_option("--kv-transfer", a->kv_transfer,
                "Prefill-to-decode KV cache transfer: one-sided (the decode rank reads the "
                "prefill rank's registered blocks) or two-sided (sent through a staging copy)")
      ->capture_default_str();
  s->add_option("--kv-transfer-timeout-ms", a->kv_transfer_timeout_ms,
                "A KV transfer that takes longer fails its request")
      ->capture_default_str();
  s->add_option("--kv-lease-ms", a->kv_lease_ms,
                "A prefill rank frees handed-off blocks no decode rank acknowledged after this")
      ->capture_default_str();
  s->add_option("--peer-timeout-ms", a->peer_timeout_ms,
                "Under mpirun: a rank silent this long (every rank sends a heartbeat) makes "
                "/health answer 503 and fails the requests that need it, until it answers again")
      ->capture_default_str();
  s->callback([a] { run_serve(*a); });
}

}  // namespace moeserve::cli
