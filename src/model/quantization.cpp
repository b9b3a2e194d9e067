#include "model/quantization.h"

#include "core/error.h"

namespace moeserve::model {

using nlohmann::json;

namespace {

std::string printable(const std::string& s) {
  std::string out = s.size() > 200 ? s.substr(0, 200) + "..." : s;
  for (char& ch : out)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  return out;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Keys the pack-quantized weights scheme may hold with other than their neutral value.
Quantization parse_fields(const json& j) {
  Quantization q;
  if (!j.contains("quantization_config") || j["quantization_config"].is_null()) return q;
  const json& c = j["quantization_config"];
  MS_CHECK(c.is_object(), "config.json: quantization_config must be an object");
  const std::string method = c.value("quant_method", "");
  if (method == "fp8") {
    q.kind = Quantization::Kind::Fp8Block;
    if (c.contains("weight_block_size")) {
      const json& b = c["weight_block_size"];
      MS_CHECK(b.is_array() && b.size() == 2 && b[0].is_number_integer() &&
                   b[1].is_number_integer() && b[0].get<int64_t>() > 0 && b[1].get<int64_t>() > 0,
               "config.json: weight_block_size must be two positive integers");
      q.block_rows = b[0].get<int64_t>();
      q.block_cols = b[1].get<int64_t>();
    }
    return q;
  }
  MS_CHECK(method == "compressed-tensors", "config.json: quantization method \"", printable(method),
           "\" is not known (fp8, compressed-tensors)");
  const std::string format = c.value("format", "");
  MS_CHECK(format == "pack-quantized", "config.json: compressed-tensors format \"",
           printable(format), "\" is not known (pack-quantized)");
  const std::string status = c.value("quantization_status", "compressed");
  MS_CHECK(status == "compressed", "config.json: compressed-tensors quantization_status \"",
           printable(status), "\" is not supported (compressed: weights stored packed)");
  MS_CHECK(c.contains("config_groups") && c["config_groups"].is_object() &&
               c["config_groups"].size() == 1,
           "config.json: compressed-tensors needs one entry in config_groups");
  const json& g = c["config_groups"].begin().value();
  MS_CHECK(g.is_object() && g.contains("weights") && g["weights"].is_object(),
           "config.json: compressed-tensors config group has no weights scheme");
  for (const char* k : {"input_activations", "output_activations"})
    MS_CHECK(!g.contains(k) || g[k].is_null(), "config.json: compressed-tensors ", k,
             " quantization is not supported (weights only)");
  if (g.contains("format") && !g["format"].is_null())
    MS_CHECK(g["format"] == "pack-quantized",
             "config.json: compressed-tensors config group format ", printable(g["format"].dump()),
             " is not known (pack-quantized)");
  const json& w = g["weights"];
  MS_CHECK(w.value("type", "int") == "int",
           "config.json: compressed-tensors weights must be of type int");
  const std::string strategy = w.value("strategy", "group");
  MS_CHECK(strategy == "group" || strategy == "channel",
           "config.json: compressed-tensors strategy \"", printable(strategy),
           "\" is not supported (group, channel)");
  MS_CHECK(!w.contains("actorder") || w["actorder"].is_null() || w["actorder"] == "weight",
           "config.json: compressed-tensors actorder ", printable(w["actorder"].dump()),
           " is not supported (the group order must be the column order)");
  MS_CHECK(!w.value("dynamic", false), "config.json: dynamic weight quantization is not supported");
  q.kind = Quantization::Kind::PackQuantized;
  q.num_bits = w.value("num_bits", int64_t{4});
  MS_CHECK(q.num_bits == 4 || q.num_bits == 8, "config.json: num_bits ", q.num_bits,
           " is not supported (4, 8)");
  q.symmetric = w.value("symmetric", true);
  MS_CHECK(q.symmetric,
           "config.json: asymmetric int weights (with zero points) are not supported (symmetric)");
  if (strategy == "group") {
    q.group_size = w.value("group_size", int64_t{32});
    MS_CHECK(q.group_size > 0, "config.json: group_size must be positive, got ", q.group_size);
  } else {
    q.group_size = 0;
  }
  if (c.contains("ignore") && c["ignore"].is_array())
    for (const json& r : c["ignore"])
      if (r.is_string()) q.ignore.push_back(r.get<std::string>());
  auto patterns = std::make_shared<std::vector<std::regex>>();
  for (const std::string& r : q.ignore) {
    if (r.rfind("re:", 0) != 0) continue;
    try {
      patterns->emplace_back(r.substr(3), std::regex::optimize);
    } catch (const std::regex_error&) {
      fail("config.json: ignore pattern \"", printable(r), "\" is not a valid regular expression");
    }
  }
  q.ignore_patterns = std::move(patterns);
  q.config = c;
  return q;
}

}  // namespace

std::string Quantization::describe() const {
  switch (kind) {
    case Kind::None:
      return "none";
    case Kind::Fp8Block:
      return "fp8 e4m3, " + std::to_string(block_rows) + "x" + std::to_string(block_cols) +
             " blocks with F32 scales";
    case Kind::PackQuantized:
      return "compressed-tensors int" + std::to_string(num_bits) + " (pack-quantized), " +
             (group_size > 0 ? "group " + std::to_string(group_size) : std::string("per channel")) +
             " with " + scale_dtype + " scales, " + std::to_string(ignore.size()) + " ignore rules";
  }
  return "?";
}

bool Quantization::quantizes(const std::string& module) const {
  if (kind == Kind::None) return false;
  if (kind == Kind::Fp8Block) return true;
  size_t next_pattern = 0;
  for (const std::string& rule : ignore) {
    if (rule.rfind("re:", 0) == 0) {
      // As compressed-tensors matches its patterns: from the start of the name.
      std::regex own;
      const std::regex* re = &own;
      if (ignore_patterns && next_pattern < ignore_patterns->size())
        re = &(*ignore_patterns)[next_pattern];
      else
        own = std::regex(rule.substr(3));
      ++next_pattern;
      if (std::regex_search(module, *re, std::regex_constants::match_continuous)) return false;
    } else if (module == rule || ends_with(module, "." + rule)) {
      return false;
    }
  }
  return true;
}

Quantization parse_quantization(const json& j) {
  try {
    return parse_fields(j);
  } catch (const json::exception&) {  // a field of the wrong type
    fail("config.json: quantization_config is malformed (a field has the wrong type)");
  }
}

json pack_quantized_config(int64_t num_bits, int64_t group_size,
                           const std::vector<std::string>& ignore) {
  const json weights = {{"actorder", nullptr},
                        {"block_structure", nullptr},
                        {"dynamic", false},
                        {"group_size", group_size},
                        {"num_bits", num_bits},
                        {"observer", "minmax"},
                        {"observer_kwargs", json::object()},
                        {"strategy", "group"},
                        {"symmetric", true},
                        {"type", "int"}};
  return {{"config_groups",
           {{"group_0",
             {{"format", "pack-quantized"},
              {"input_activations", nullptr},
              {"output_activations", nullptr},
              {"targets", {"Linear"}},
              {"weights", weights}}}}},
          {"format", "pack-quantized"},
          {"ignore", ignore},
          {"kv_cache_scheme", nullptr},
          {"quant_method", "compressed-tensors"},
          {"quantization_status", "compressed"}};
}

}  // namespace moeserve::model
