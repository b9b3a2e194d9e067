// Structured output on the server's side: the vocabulary the JSON constraints mask (each
// token's bytes, special tokens left out), and a ConstraintCompiler for the ranks of an mpirun
// launch, which load the tokenizer the first time a constrained request reaches them.
#pragma once

#include <memory>
#include <string>

#include "engine/json_grammar.h"
#include "engine/request.h"
#include "server/protocol.h"
#include "tokenizer/tokenizer.h"

namespace moeserve::server {

std::shared_ptr<const engine::TokenTrie> make_token_trie(const tokenizer::Tokenizer& tok);

// A required tool call (DeepSeek-V3/R1 tokens): the opening tokens forced, then one of the
// functions (only the one named `only`, unless "") by name with arguments valid for its
// parameters, the closing tokens forced, then one of `end_ids`. Throws moeserve::Error for a
// parameters schema the matcher does not support.
std::shared_ptr<const engine::TokenConstraint> tool_call_constraint(
    const tokenizer::Tokenizer& tok, std::shared_ptr<const engine::TokenTrie> trie,
    const std::vector<ToolDef>& tools, const std::string& only,
    const std::vector<int32_t>& end_ids);

// Compiles specs against the tokenizer of `model_dir` (loaded on first use).
engine::ConstraintCompiler lazy_constraint_compiler(std::string model_dir);

}  // namespace moeserve::server
