// Helpers shared by the subcommands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "kernels/kernels.h"
#include "kv/kv_pool.h"

namespace moeserve::cli {

// --kv-cache-dtype, the same in every command that holds a KV cache: the option (its default
// the engine's, kv::kDefaultKvDtype) and its value.
void add_kv_cache_dtype_option(CLI::App* c, std::string* v);
// --speculative-tokens K (default 0: off).
void add_speculative_tokens_option(CLI::App* c, int64_t* v);
kv::KvDtype parse_kv_cache_dtype(const std::string& v);

// --precision, the same in every command that computes (add_parallel_flags adds it): how the
// weight products compute (kernels.h, Precision), exact or bf16; default kDefaultPrecision.
inline constexpr kernels::Precision kDefaultPrecision = kernels::Precision::Exact;
void add_precision_option(CLI::App* c, std::string* v);
kernels::Precision parse_precision(const std::string& v);

// "1,2,3" (spaces allowed) -> ids; a malformed list is an error naming the bad item.
std::vector<int32_t> parse_ids(const std::string& s, const char* flag);

// True when config.json of `dir` says init-model wrote it (random weights).
bool has_random_weights(const std::string& dir);

// The folder holding the DeepSeek-V3 tokenizer files shipped with moeserve, or "" if not found.
std::string bundled_tokenizer_dir();

// eos_token_id of `dir`/generation_config.json (a number or a list), ids outside [0, vocab_size)
// left out; empty when the file is absent or names none.
std::vector<int32_t> generation_config_eos_ids(const std::string& dir, int64_t vocab_size);

// A seed drawn from the system's entropy source, for sampling when the user gives none.
uint64_t random_seed();

// This process's rank in an MPI launch (mpirun sets it in the environment; MPI need not be
// initialized yet), or 0 outside one.
int launch_rank();

// Run once after every subcommand is registered. For each subcommand with --model: the model
// folder may also be given as the first positional argument (`moeserve serve models/demo`), and
// --model reads the same in every --help. Options shared by several subcommands get one label
// and description, and numeric options show their default unless the description gives it.
void finish_subcommands(CLI::App& app);

// What main prints for a flag error: one line naming the problem (with the model folder's two
// spellings when it is missing), and how to see the options.
std::string describe_parse_error(const CLI::ParseError& e, const CLI::App& app);

}  // namespace moeserve::cli
