// Structured output on the server's side: the vocabulary the JSON constraints mask (each
// token's bytes, special tokens left out), and a ConstraintCompiler for the ranks of an mpirun
// launch, which load the tokenizer the first time a constrained request reaches them.
#pragma once

#include <memory>
#include <string>

#include "engine/json_grammar.h"
#include "engine/request.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::server {

std::shared_ptr<const engine::TokenTrie> make_token_trie(const tokenizer::Tokenizer& tok);

// Compiles specs against the tokenizer of `model_dir` (loaded on first use).
engine::ConstraintCompiler lazy_constraint_compiler(std::string model_dir);

}  // namespace moeserve::server
