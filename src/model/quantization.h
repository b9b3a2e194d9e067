// How config.json's quantization_config stores the linear layers' weights: fp8 e4m3 with block
// scales (DeepSeek-V3/R1 as published), or compressed-tensors' pack-quantized integers
// (Kimi-K2-Thinking: int4, symmetric, one scale per group of 32 weights of a row). Shared by the
// loader (ModelConfig), inspect and quantize.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <vector>

namespace moeserve::model {

struct Quantization {
  enum class Kind { None, Fp8Block, PackQuantized };
  Kind kind = Kind::None;
  int64_t block_rows = 128, block_cols = 128;  // fp8: one F32 scale_inv per block
  // pack-quantized: `num_bits` 4 or 8; one scale per `group_size` weights of a row, or per row
  // (the "channel" strategy: group_size 0).
  int64_t num_bits = 4;
  int64_t group_size = 32;
  bool symmetric = true;
  std::string scale_dtype = "BF16";  // dtype of weight_scale when no header says (inspect)
  std::vector<std::string> ignore;   // modules left unquantized: names and "re:" patterns
  // The "re:" rules of `ignore`, compiled once (by parse_quantization).
  std::shared_ptr<const std::vector<std::regex>> ignore_patterns;
  nlohmann::json config;  // pack-quantized: quantization_config as read (to_json writes it back)

  std::string describe() const;
  // Whether the linear module `module` (a tensor name without ".weight") is stored quantized:
  // fp8, every module; pack-quantized, every module its ignore list does not name. (The router
  // mlp.gate and the embedding are not Linear layers and never quantized.)
  bool quantizes(const std::string& module) const;
  // Scales per row of a [rows, cols] matrix: ceil(cols / group_size), or 1 per channel.
  int64_t scale_cols(int64_t cols) const {
    return group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  }
  // Words per row of weight_packed: ceil(cols * num_bits / 32).
  int64_t packed_cols(int64_t cols) const { return (cols * num_bits + 31) / 32; }
};

// Reads config.json's quantization_config (absent: None): quant_method fp8 with
// weight_block_size, or compressed-tensors pack-quantized int weights (4 or 8 bits, symmetric,
// group or channel strategy, one config group, no activation quantization). Anything else is
// one clear error.
Quantization parse_quantization(const nlohmann::json& config);

// quantization_config for pack-quantized int weights of `num_bits`, symmetric, in groups of
// `group_size`, of every Linear module but those `ignore` names (written by quantize).
nlohmann::json pack_quantized_config(int64_t num_bits, int64_t group_size,
                                     const std::vector<std::string>& ignore);

}  // namespace moeserve::model
