// Structured output: a JSON schema (or "any JSON object") compiled into a byte-level matcher,
// and the token constraint that masks, at every step, each token whose bytes the matcher would
// not accept next.
//
// The matcher is a pushdown automaton over compact JSON (no whitespace between tokens): a stack
// of frames (object, array, string, number, literal alternatives) per alternative parse, so
// anyOf and enums whose texts share a prefix are followed side by side until the input tells
// them apart. Objects with listed properties write them in the schema's order, each optional
// one skippable, the required ones present (so additionalProperties is false, as OpenAI's
// strict mode has it); objects without listed properties take any keys. Numbers have at most 15
// integer digits and 6 fraction digits and no exponent (any JSON number parser reads them).
//
// Supported keywords: type (one or a list), properties, required, additionalProperties (false,
// or true / absent with no properties), items, minItems, maxItems, minLength, maxLength, enum,
// const, anyOf / oneOf (matched as anyOf), $ref to "#/$defs/..." or "#/definitions/...".
// Annotations (title, description, default, examples, $schema, $id, strict) are ignored; any
// other keyword (pattern, format, minimum, ...) is refused, naming it.
//
// The mask walks a trie of the vocabulary's token bytes from the current state, pruning a
// subtree as soon as its prefix is refused, so each step costs the number of trie nodes whose
// prefix the grammar can still take. Special tokens are never allowed inside the JSON; once the
// value is complete only the end tokens are.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/sampler.h"

namespace moeserve::engine {

// The vocabulary as bytes (special tokens as ""), in a trie, shared by every constraint.
class TokenTrie {
 public:
  explicit TokenTrie(const std::vector<std::string>& token_bytes);
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;  // sorted by byte
    std::vector<int32_t> tokens;                              // tokens whose bytes end here
  };
  const std::vector<Node>& nodes() const { return nodes_; }
  const std::string& bytes(int32_t id) const { return bytes_[id]; }
  int64_t vocab() const { return static_cast<int64_t>(bytes_.size()); }
  // Plain string text: the characters of a token that a JSON string takes as they are (no
  // quote, backslash or control byte, whole UTF-8 characters), or -1.
  int32_t plain_chars(int32_t id) const { return plain_[id]; }
  // Whether a node's subtree holds a token that is not plain string text.
  bool has_other(int32_t node) const { return other_[node] != 0; }

 private:
  std::vector<Node> nodes_;  // [0] is the root
  std::vector<std::string> bytes_;
  std::vector<int32_t> plain_;
  std::vector<uint8_t> other_;
};

// The spec a JSON constraint is compiled from: {"schema": SCHEMA or null (any JSON object),
// "end": [token ids allowed once the value is complete]}. Or, for a tool call: {"prefix":
// [token ids forced first], "choices": [{"text": raw text, "schema": SCHEMA, "after": raw
// text}, ...] (one of them: the text, a value of its schema, the text after), "suffix": [token
// ids forced after], "end": [...]}.
std::string json_constraint_spec(const nlohmann::ordered_json* schema,
                                 const std::vector<int32_t>& end_ids);

// Compiles a spec; throws moeserve::Error naming what is wrong or unsupported in the schema.
std::shared_ptr<const TokenConstraint> compile_json_constraint(
    const std::string& spec, std::shared_ptr<const TokenTrie> trie);

// A byte-level check without tokens (for tests): whether `text` is a complete value of the
// spec's schema as the matcher accepts it, or a prefix of one (complete = false).
bool json_grammar_accepts(const std::string& spec, const std::string& text, bool complete);

}  // namespace moeserve::engine
