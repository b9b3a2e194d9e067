// Each subcommand of the moeserve binary registers itself on the top-level CLI::App.
#pragma once

#include <CLI/CLI.hpp>

namespace moeserve::cli {

// Each register_* adds one or more subcommands and their handlers to `app`.
void register_model_commands(CLI::App& app);  // generate, score, init-model (cmd_model.cpp)
void register_bench_command(CLI::App& app);   // bench (cmd_bench.cpp)
void register_text_commands(CLI::App& app);   // tokenize, detokenize, chat-template (cmd_text.cpp)
void register_serve_command(CLI::App& app);   // serve (cmd_serve.cpp)
void register_placement_command(CLI::App& app);   // plan-placement (cmd_placement.cpp)
void register_inspect_command(CLI::App& app);     // inspect (cmd_inspect.cpp)
void register_perplexity_command(CLI::App& app);  // perplexity (cmd_perplexity.cpp)
void register_quantize_command(CLI::App& app);    // quantize (cmd_quantize.cpp)

}  // namespace moeserve::cli
