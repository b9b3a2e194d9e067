// `moeserve quantize`: a bf16 or fp8 checkpoint rewritten with its routed experts
// (model.layers.L.mlp.experts.E.{gate,up,down}_proj) as compressed-tensors pack-quantized int4
// or int8, symmetric, one bf16 scale per group of a row -- the format Kimi-K2-Thinking is
// published in, which moeserve, compressed-tensors and the engines built on it read.
//
// Each group is quantized as compressed-tensors quantizes a bf16 weight (its minmax observer,
// calculate_qparams and quantize, in torch's bf16 arithmetic):
//   scale = bf16(max|w| / (2^(bits-1) - 0.5))    (0 becomes bf16's epsilon, 2^-7)
//   q     = round_half_even(clamp(bf16(w / scale), -2^(bits-1), 2^(bits-1) - 1))
// so the output holds the same integers and scales as the package's own quantization of the same
// weights. Weights that are not bf16 are first rounded to bf16 (fp8: float(fp8) * scale_inv).
//
// Everything else is written as it was. A bf16 input gives a compressed-tensors pack-quantized
// checkpoint with the layout of Kimi-K2-Thinking. An fp8 input (DeepSeek-V3/R1 as published)
// keeps its other fp8 matrices (attention, shared experts, dense layers) fp8 byte for byte,
// declared as compressed-tensors float-quantized 128x128 blocks in a second config group
// (format "mixed-precision"), their weight_scale_inv tensors renamed weight_scale (the same
// numbers: weight = float(fp8) * scale); Linear modules left unquantized (lm_head, ...) are
// named in `ignore`. With keep_fp8 false they become bf16 instead (float(fp8) * scale_inv,
// rounded) and their scales go: one pack-quantized config group, as for a bf16 input.
//
// The output is written shard by shard (model-0000i-of-0000n.safetensors and
// model.safetensors.index.json), one tensor in memory at a time, reading the input's mapped
// pages once and dropping them as it goes, so the model never has to fit in memory.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/thread_pool.h"

namespace moeserve::model {

struct QuantizeOptions {
  std::string model;  // input folder: config.json + safetensors
  std::string out;    // output folder: must not exist, or be empty
  int bits = 4;       // 4 or 8
  int64_t group_size = 32;
  uint64_t shard_bytes = uint64_t{5} << 30;  // a new shard starts past this many bytes
  bool keep_fp8 = true;  // fp8 input: non-expert fp8 matrices stay fp8 (else become bf16)
};

struct QuantizeResult {
  int64_t quantized = 0;  // matrices quantized
  int64_t converted = 0;  // fp8 matrices written as bf16
  int64_t kept_fp8 = 0;   // fp8 matrices written as they were (float-quantized)
  int64_t copied = 0;     // tensors copied as they were
  int64_t shards = 0;
  uint64_t bytes_in = 0, bytes_out = 0;
  std::vector<std::string> files_copied;  // tokenizer, generation config, ...
};

// The ignore list quantize writes: every Linear module of the architecture but the routed
// experts (attention, shared experts, dense MLPs, lm_head, the MTP layer's projections).
std::vector<std::string> quantize_ignore_list();

// fp8 input: the targets of the fp8 config group (those that name a kept matrix are written):
// attention projections, dense MLPs, shared experts, the MTP layer's eh_proj; and the int
// group's target, the routed experts.
std::vector<std::string> fp8_target_list();
std::string expert_target();

// Whether `name` is a routed expert's matrix:
// model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight.
bool is_routed_expert_weight(const std::string& name);

// Quantizes one bf16 row of `cols` weights in groups of `group_size`: out_q[c] is the integer
// (-2^(bits-1) .. 2^(bits-1) - 1), out_scale[g] the bf16 bits of group g's scale.
void quantize_row_bf16(const uint16_t* w, int64_t cols, int bits, int64_t group_size, int8_t* out_q,
                       uint16_t* out_scale);

// Packs one row of integers densely into little-endian int32 words as compressed-tensors does
// (value + 2^(bits-1), element i at bit i * bits of the row): ceil(cols * bits / 32) words.
void pack_row(const int8_t* q, int64_t cols, int bits, uint32_t* out);

// progress(line) gets a line now and then (the command prints it on stderr).
QuantizeResult quantize_checkpoint(const QuantizeOptions& opt, const ThreadPool& pool,
                                   const std::function<void(const std::string&)>& progress = {});

}  // namespace moeserve::model
