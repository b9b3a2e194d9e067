// How config.json's quantization_config stores the linear layers' weights: fp8 e4m3 with block
// scales (DeepSeek-V3/R1 as published), or compressed-tensors config groups: pack-quantized
// integers (Kimi-K2-Thinking: int4, symmetric, one scale per group of 32 weights of a row) and
// float-quantized fp8 e4m3 with 128x128 block scales, each group naming the Linear modules it
// takes (`moeserve quantize` of an fp8 checkpoint writes both: "mixed-precision"). Shared by the
// loader (ModelConfig), inspect and quantize.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

namespace moeserve::model {

// How one Linear module is stored.
enum class Storage {
  Plain,  // `weight` as bf16 / f16 / f32 (or fp8 with weight_scale_inv under quant_method fp8)
  Fp8,    // fp8 e4m3 `weight` with F32 block scales (`weight_scale_inv`, or under
          // compressed-tensors `weight_scale`: the same numbers, dequant = weight * scale)
  Int,    // compressed-tensors pack-quantized: weight_packed, weight_scale, weight_shape
};

// One compressed-tensors config group: its format and the modules it targets (the class
// "Linear", "re:" patterns matched from the start of the name, or exact module names).
struct QuantScheme {
  Storage storage = Storage::Int;  // Int: pack-quantized; Fp8: float-quantized 128x128 blocks
  std::vector<std::string> targets;
};

// s for an error message quoting config.json: at most 200 characters (then "..."), control
// characters shown as '?'.
std::string printable(const std::string& s);

struct Quantization {
  // PackQuantized: compressed-tensors, with an int (pack-quantized) group, an fp8
  // (float-quantized) group or both.
  enum class Kind { None, Fp8Block, PackQuantized };
  Kind kind = Kind::None;
  int64_t block_rows = 128, block_cols = 128;  // fp8: one F32 scale per block
  // compressed-tensors: the config groups in config order.
  std::vector<QuantScheme> schemes;
  // The int group's weights (when there is one): `num_bits` 4 or 8; one scale per `group_size`
  // weights of a row, or per row (the "channel" strategy: group_size 0).
  int64_t num_bits = 4;
  int64_t group_size = 32;
  bool symmetric = true;
  std::string scale_dtype = "BF16";  // dtype of weight_scale when no header says (inspect)
  std::vector<std::string> ignore;   // modules left unquantized: names and "re:" patterns
  // The "re:" rules of `ignore`, compiled once (by parse_quantization).
  std::shared_ptr<const std::vector<std::regex>> ignore_patterns;
  // Every group's targets, in the order compressed-tensors tries them (exact names, then "re:"
  // patterns sorted as strings, then the class "Linear"), with the scheme each selects and the
  // compiled pattern. Built by parse_quantization.
  struct Target {
    std::string text;
    size_t scheme = 0;
    std::shared_ptr<const std::regex> re;  // "re:" targets
  };
  std::vector<Target> targets;
  nlohmann::json config;  // pack-quantized: quantization_config as read (to_json writes it back)

  std::string describe() const;
  // How the Linear module `module` (a tensor name without ".weight") is stored: fp8, every
  // module Fp8; compressed-tensors, the storage of the scheme whose target matches it first (as
  // the package picks among several), Plain when none does or the ignore list names it. (The
  // router mlp.gate and the embedding are not Linear layers and never quantized.)
  Storage storage(const std::string& module) const;
  // Whether `module` is stored quantized (storage() is not Plain).
  bool quantizes(const std::string& module) const { return storage(module) != Storage::Plain; }
  bool has(Storage s) const;  // whether a scheme (or quant_method fp8) stores modules as s
  // Scales per row of a [rows, cols] matrix: ceil(cols / group_size), or 1 per channel.
  int64_t scale_cols(int64_t cols) const {
    return group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  }
  // Words per row of weight_packed: ceil(cols * num_bits / 32).
  int64_t packed_cols(int64_t cols) const { return (cols * num_bits + 31) / 32; }
};

// Reads config.json's quantization_config (absent: None): quant_method fp8 with
// weight_block_size, or compressed-tensors config groups of format pack-quantized (int weights,
// 4 or 8 bits, symmetric, group or channel strategy, no activation quantization; at most one
// such group) or float-quantized (fp8 e4m3 weights, symmetric, 128x128 blocks; activations
// unquantized or dynamic fp8). Anything else, and a target named by two groups, is one clear
// error.
Quantization parse_quantization(const nlohmann::json& config);

// quantization_config for pack-quantized int weights of `num_bits`, symmetric, in groups of
// `group_size`, of every Linear module but those `ignore` names (written by quantize).
nlohmann::json pack_quantized_config(int64_t num_bits, int64_t group_size,
                                     const std::vector<std::string>& ignore);

// quantization_config "mixed-precision": group_0 pack-quantized int weights as above for the
// modules `int_targets` names, group_1 fp8 e4m3 128x128 blocks (float-quantized, activations
// dynamic fp8 per token group of 128, as DeepSeek-V3/R1's fp8 declares) for `fp8_targets`.
nlohmann::json mixed_config(int64_t num_bits, int64_t group_size,
                            const std::vector<std::string>& int_targets,
                            const std::vector<std::string>& fp8_targets,
                            const std::vector<std::string>& ignore);

}  // namespace moeserve::model
