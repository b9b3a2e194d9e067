// Each subcommand of the moeserve binary registers itself on the top-level CLI::App.
#pragma once

#include <CLI/CLI.hpp>

namespace moeserve::cli {

// Each register_* adds one or more subcommands and their handlers to `app`.
void register_model_commands(CLI::App& app);  // generate, score, init-model (cmd_model.cpp)
void register_bench_command(CLI::App& app);   // bench (cmd_bench.cpp)
void register_text_commands(CLI::App& app);   // tokenize, detokenize, chat-template (cmd_text.cpp)

}  // namespace moeserve::cli
