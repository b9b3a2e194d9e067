// Deterministic random-weight checkpoints in the Hugging Face layout, for demos, tests and
// benchmarks at any scale (like a "dummy" load format, but written to disk so every path that
// reads real checkpoints is exercised).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/config.h"

namespace moeserve::model {

// Built-in configurations: "tiny" (tests), "demo" (DeepSeek-V3 vocabulary, small dims),
// "bench" (about 1.9 GB of bf16 weights, larger than any cache).
ModelConfig preset_config(const std::string& name);
std::vector<std::string> preset_names();

struct InitOptions {
  uint64_t seed = 0;
  bool fp8 = false;       // weights inside the layers as fp8 e4m3 with 128x128 block scales
  bool progress = false;  // print progress on stderr
};

// Writes <dir>/config.json and <dir>/model.safetensors.
void write_random_model(const ModelConfig& cfg, const std::string& dir, const InitOptions& opt);

}  // namespace moeserve::model
