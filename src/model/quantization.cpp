#include "model/quantization.h"

#include "core/error.h"

namespace moeserve::model {

using nlohmann::json;

std::string printable(const std::string& s) {
  std::string out = s.size() > 200 ? s.substr(0, 200) + "..." : s;
  for (char& ch : out)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  return out;
}

namespace {

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
  MS_CHECK(format == "pack-quantized" || format == "float-quantized" || format == "mixed-precision",
           "config.json: compressed-tensors format \"", printable(format),
           "\" is not known (pack-quantized, float-quantized, mixed-precision)");
  const std::string status = c.value("quantization_status", "compressed");
  MS_CHECK(status == "compressed", "config.json: compressed-tensors quantization_status \"",
           printable(status), "\" is not supported (compressed: weights stored packed)");
  MS_CHECK(
      c.contains("config_groups") && c["config_groups"].is_object() && !c["config_groups"].empty(),
      "config.json: compressed-tensors needs at least one entry in config_groups");
  q.kind = Quantization::Kind::PackQuantized;
  bool have_int = false;
  for (const auto& [gname, g] : c["config_groups"].items()) {
    const std::string where = "config.json: compressed-tensors config group " + printable(gname);
    MS_CHECK(g.is_object() && g.contains("weights") && g["weights"].is_object(), where,
             " has no weights scheme");
    std::string gformat = format;
    if (g.contains("format") && !g["format"].is_null()) gformat = g["format"].get<std::string>();
    MS_CHECK(gformat == "pack-quantized" || gformat == "float-quantized", where, ": format \"",
             printable(gformat), "\" is not known (pack-quantized, float-quantized)");
    QuantScheme scheme;
    MS_CHECK(!g.contains("output_activations") || g["output_activations"].is_null(),
             "config.json: compressed-tensors output_activations quantization is not supported");
    const json& w = g["weights"];
    MS_CHECK(!w.value("dynamic", false),
             "config.json: dynamic weight quantization is not supported");
    if (gformat == "pack-quantized") {
      MS_CHECK(!g.contains("input_activations") || g["input_activations"].is_null(),
               "config.json: compressed-tensors input_activations quantization is not supported "
               "with int weights (weights only)");
      MS_CHECK(!have_int,
               "config.json: compressed-tensors: more than one pack-quantized config "
               "group is not supported");
      have_int = true;
      scheme.storage = Storage::Int;
      MS_CHECK(w.value("type", "int") == "int",
               "config.json: compressed-tensors weights must be of type int");
      const std::string strategy = w.value("strategy", "group");
      MS_CHECK(strategy == "group" || strategy == "channel",
               "config.json: compressed-tensors strategy \"", printable(strategy),
               "\" is not supported (group, channel)");
      MS_CHECK(!w.contains("actorder") || w["actorder"].is_null() || w["actorder"] == "weight",
               "config.json: compressed-tensors actorder ", printable(w["actorder"].dump()),
               " is not supported (the group order must be the column order)");
      q.num_bits = w.value("num_bits", int64_t{4});
      MS_CHECK(q.num_bits == 4 || q.num_bits == 8, "config.json: num_bits ", q.num_bits,
               " is not supported (4, 8)");
      q.symmetric = w.value("symmetric", true);
      MS_CHECK(q.symmetric,
               "config.json: asymmetric int weights (with zero points) are not "
               "supported (symmetric)");
      if (strategy == "group") {
        q.group_size = w.value("group_size", int64_t{32});
        MS_CHECK(q.group_size > 0, "config.json: group_size must be positive, got ", q.group_size);
      } else {
        q.group_size = 0;
      }
    } else {
      scheme.storage = Storage::Fp8;
      MS_CHECK(w.value("type", "float") == "float" && w.value("num_bits", int64_t{8}) == 8, where,
               ": float-quantized weights must be 8-bit floats (fp8 e4m3)");
      MS_CHECK(w.value("strategy", "block") == "block", where, ": fp8 strategy \"",
               printable(w.value("strategy", "")), "\" is not supported (block)");
      MS_CHECK(w.contains("block_structure") && w["block_structure"] == json::array({128, 128}),
               where, ": fp8 block_structure ",
               printable(w.contains("block_structure") ? w["block_structure"].dump() : "null"),
               " is not supported ([128, 128])");
      MS_CHECK(w.value("symmetric", true), where, ": asymmetric fp8 weights are not supported");
      // Activations: unquantized, or quantized on the fly (dynamic), which the engine does not
      // need to do: its fp8 path computes with the dequantized weights either way.
      if (g.contains("input_activations") && !g["input_activations"].is_null()) {
        const json& a = g["input_activations"];
        MS_CHECK(a.is_object() && a.value("dynamic", false) == true, where,
                 ": static input_activations quantization is not supported (dynamic or none)");
      }
    }
    MS_CHECK(g.contains("targets") && g["targets"].is_array() && !g["targets"].empty(), where,
             " names no targets");
    for (const json& t : g["targets"]) {
      MS_CHECK(t.is_string(), where, ": a target is not a string");
      scheme.targets.push_back(t.get<std::string>());
    }
    q.schemes.push_back(std::move(scheme));
  }
  // The package maps each target to one scheme; a target two groups name is ambiguous.
  for (size_t i = 0; i < q.schemes.size(); ++i)
    for (const std::string& t : q.schemes[i].targets) {
      for (const Quantization::Target& seen : q.targets)
        MS_CHECK(seen.text != t, "config.json: compressed-tensors target \"", printable(t),
                 "\" is named by more than one config group");
      Quantization::Target target{t, i, nullptr};
      if (t.rfind("re:", 0) == 0) {
        try {
          target.re = std::make_shared<const std::regex>(t.substr(3), std::regex::optimize);
        } catch (const std::regex_error&) {
          fail("config.json: target pattern \"", printable(t),
               "\" is not a valid regular expression");
        }
      }
      q.targets.push_back(std::move(target));
    }
  // Most specific first: exact names, then patterns, each sorted as strings, then classes.
  auto rank = [](const std::string& t) {
    return t == "Linear" ? 2 : t.rfind("re:", 0) == 0 ? 1 : 0;
  };
  std::stable_sort(q.targets.begin(), q.targets.end(),
                   [&](const Quantization::Target& a, const Quantization::Target& b) {
                     const int ra = rank(a.text), rb = rank(b.text);
                     return ra != rb ? ra < rb : a.text < b.text;
                   });
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
    case Kind::PackQuantized: {
      std::string s = "compressed-tensors";
      if (has(Storage::Int))
        s += " int" + std::to_string(num_bits) + " (pack-quantized), " +
             (group_size > 0 ? "group " + std::to_string(group_size) : std::string("per channel")) +
             " with " + scale_dtype + " scales";
      if (has(Storage::Fp8))
        s += std::string(has(Storage::Int) ? " +" : "") +
             " fp8 e4m3 (float-quantized), 128x128 blocks with F32 scales";
      return s + ", " + std::to_string(ignore.size()) + " ignore rules";
    }
  }
  return "?";
}

bool Quantization::has(Storage s) const {
  if (kind == Kind::Fp8Block) return s == Storage::Fp8;
  for (const QuantScheme& sc : schemes)
    if (sc.storage == s) return true;
  return false;
}

Storage Quantization::storage(const std::string& module) const {
  if (kind == Kind::None) return Storage::Plain;
  if (kind == Kind::Fp8Block) return Storage::Fp8;
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
      if (std::regex_search(module, *re, std::regex_constants::match_continuous))
        return Storage::Plain;
    } else if (module == rule || module.ends_with("." + rule)) {
      return Storage::Plain;
    }
  }
  // The first target that matches, in the package's order (every module asked about is a
  // Linear layer).
  for (const Target& t : targets) {
    const bool hit =
        t.text == "Linear" ||
        (t.re ? std::regex_search(module, *t.re, std::regex_constants::match_continuous)
              : module == t.text);
    if (hit) return schemes[t.scheme].storage;
  }
  return Storage::Plain;
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

namespace moeserve::model {

json mixed_config(int64_t num_bits, int64_t group_size, const std::vector<std::string>& int_targets,
                  const std::vector<std::string>& fp8_targets,
                  const std::vector<std::string>& ignore) {
  json c = pack_quantized_config(num_bits, group_size, ignore);
  c["format"] = "mixed-precision";
  c["config_groups"]["group_0"]["targets"] = int_targets;
  const json fp8_weights = {{"actorder", nullptr},
                            {"block_structure", {128, 128}},
                            {"dynamic", false},
                            {"group_size", nullptr},
                            {"num_bits", 8},
                            {"observer", "minmax"},
                            {"observer_kwargs", json::object()},
                            {"strategy", "block"},
                            {"symmetric", true},
                            {"type", "float"}};
  const json fp8_inputs = {{"actorder", nullptr},
                           {"block_structure", nullptr},
                           {"dynamic", true},
                           {"group_size", 128},
                           {"num_bits", 8},
                           {"observer", nullptr},
                           {"observer_kwargs", json::object()},
                           {"strategy", "group"},
                           {"symmetric", true},
                           {"type", "float"}};
  c["config_groups"]["group_1"] = {{"format", "float-quantized"},
                                   {"input_activations", fp8_inputs},
                                   {"output_activations", nullptr},
                                   {"targets", fp8_targets},
                                   {"weights", fp8_weights}};
  return c;
}

}  // namespace moeserve::model
