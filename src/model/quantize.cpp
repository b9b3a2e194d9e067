#include "model/quantize.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "core/dtype.h"
#include "core/error.h"
#include "core/json_file.h"
#include "kernels/kernels.h"
#include "model/config.h"
#include "model/inspect.h"
#include "model/quantization.h"
#include "model/safetensors.h"

namespace moeserve::model {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kChunkElems = int64_t{1} << 20;  // rows converted at a time, about

// How one input tensor goes to the output.
enum class Action { Copy, Quantize, ToBf16, KeepFp8, Drop };

struct Item {
  const TensorView* t = nullptr;
  Action action = Action::Copy;
  const TensorView* scale_inv = nullptr;  // fp8 input: its block scales
  std::string module;                     // Quantize: the name without ".weight"
  std::string out_name;                   // the output tensor's name, when not the input's
  uint64_t out_bytes = 0;
};

// Element (r, c) of a matrix as bf16 bits: bf16 as stored, other floats rounded, fp8 as
// float(fp8) * scale_inv (its 128x128 block's) rounded.
void row_to_bf16(const TensorView& t, const TensorView* scale_inv, int64_t r, int64_t cols,
                 uint16_t* out) {
  const auto* p = static_cast<const std::byte*>(t.data);
  switch (t.dtype) {
    case DType::BF16:
      std::memcpy(out, p + 2 * r * cols, 2 * cols);
      return;
    case DType::F16:
      for (int64_t c = 0; c < cols; ++c) {
        uint16_t h;
        std::memcpy(&h, p + 2 * (r * cols + c), 2);
        out[c] = f32_to_bf16(f16_to_f32(h));
      }
      return;
    case DType::F32:
      for (int64_t c = 0; c < cols; ++c) {
        float f;
        std::memcpy(&f, p + 4 * (r * cols + c), 4);
        out[c] = f32_to_bf16(f);
      }
      return;
    case DType::F8_E4M3: {
      const int64_t bc = (cols + 127) / 128;
      const auto* s = static_cast<const float*>(scale_inv->data) + (r / 128) * bc;
      const auto* b = reinterpret_cast<const uint8_t*>(p) + r * cols;
      for (int64_t c = 0; c < cols; ++c) out[c] = f32_to_bf16(fp8e4m3_to_f32(b[c]) * s[c / 128]);
      return;
    }
    default:
      fail("tensor ", t.name, " has dtype ", dtype_name(t.dtype), ", expected a float dtype");
  }
}

std::vector<std::string> copyable_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    const std::string n = e.path().filename().string();
    if (n.ends_with(".safetensors") || n == "model.safetensors.index.json" || n == "config.json")
      continue;
    out.push_back(n);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

std::vector<std::string> quantize_ignore_list() {
  return {"lm_head",
          "re:.*self_attn.*",
          "re:.*shared_experts.*",
          "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
          "re:.*eh_proj.*",
          "re:.*shared_head.*"};
}

std::vector<std::string> fp8_target_list() {
  return {"re:.*self_attn\\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)$",
          "re:.*mlp\\.(gate_proj|up_proj|down_proj)$",
          "re:.*mlp\\.shared_experts\\.(gate_proj|up_proj|down_proj)$", "re:.*eh_proj$"};
}

std::string expert_target() {
  return "re:.*mlp\\.experts\\.\\d+\\.(gate_proj|up_proj|down_proj)$";
}

bool is_routed_expert_weight(const std::string& name) {
  static const std::regex re(
      R"(model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight)");
  return std::regex_match(name, re);
}

void quantize_row_bf16(const uint16_t* w, int64_t cols, int bits, int64_t group_size, int8_t* out_q,
                       uint16_t* out_scale) {
  const int qmax = (1 << (bits - 1)) - 1, qmin = -(1 << (bits - 1));
  // calculate_qparams: max(|min(w, 0)|, max(w, 0)) / (bit_range / 2), in bf16 (a float
  // division rounded to bf16); bit_range / 2 = 7.5 or 127.5, exact in bf16.
  const float half_range = static_cast<float>(qmax - qmin) / 2.0f;
  const uint16_t eps = f32_to_bf16(0.0078125f);  // torch.finfo(bfloat16).eps
  for (int64_t g0 = 0, g = 0; g0 < cols; g0 += group_size, ++g) {
    const int64_t g1 = std::min(cols, g0 + group_size);
    float amax = 0;
    for (int64_t c = g0; c < g1; ++c) amax = std::max(amax, std::fabs(bf16_to_f32(w[c])));
    uint16_t s = f32_to_bf16(amax / half_range);
    if (bf16_to_f32(s) == 0.0f) s = eps;
    out_scale[g] = s;
    const float sf = bf16_to_f32(s);
    for (int64_t c = g0; c < g1; ++c) {
      // quantize: bf16(w / scale), clamped, rounded half to even (torch.round).
      float t = bf16_to_f32(f32_to_bf16(bf16_to_f32(w[c]) / sf));
      t = std::min(std::max(t, static_cast<float>(qmin)), static_cast<float>(qmax));
      out_q[c] = static_cast<int8_t>(std::nearbyint(t));
    }
  }
}

void pack_row(const int8_t* q, int64_t cols, int bits, uint32_t* out) {
  const int64_t words = (cols * bits + 31) / 32;
  std::fill(out, out + words, 0u);
  const int offset = 1 << (bits - 1);
  for (int64_t i = 0; i < cols; ++i) {
    const uint64_t v = static_cast<uint32_t>(q[i] + offset);
    const int64_t bit = i * bits;
    out[bit / 32] |= static_cast<uint32_t>(v << (bit % 32));
    if (bit % 32 + bits > 32) out[bit / 32 + 1] |= static_cast<uint32_t>(v >> (32 - bit % 32));
  }
}

namespace {
// quantize_checkpoint; `*writing` is set once the output folder is ours to fill.
QuantizeResult quantize_into(const QuantizeOptions& opt, const ThreadPool& pool,
                             const std::function<void(const std::string&)>& progress,
                             bool* writing) {
  MS_CHECK(opt.bits == 4 || opt.bits == 8, "--experts must be int4 or int8");
  const int64_t align = opt.bits == 4 ? 32 : 16;
  MS_CHECK(opt.group_size > 0 && opt.group_size % align == 0, "--group-size ", opt.group_size,
           " is not supported for int", opt.bits, " (a positive multiple of ", align, ")");
  MS_CHECK(opt.shard_bytes > 0, "--shard-size must be positive");
  std::error_code ec;
  MS_CHECK(fs::is_directory(opt.model, ec), "model folder ", opt.model, " does not exist");
  const fs::path cfg_path = fs::path(opt.model) / "config.json";
  MS_CHECK(fs::exists(cfg_path, ec), "no config.json in model folder ", opt.model);
  json config = read_json_file(cfg_path.string(), kMaxConfigBytes);
  const ModelConfig cfg = ModelConfig::from_json(config);
  MS_CHECK(cfg.quant.kind != Quantization::Kind::PackQuantized, "model ", opt.model,
           " is already quantized (compressed-tensors); quantize takes a bf16 or fp8 checkpoint");
  MS_CHECK(cfg.n_routed_experts > 0, "model ", opt.model, " has no routed experts to quantize");
  for (const auto& [what, cols] : {std::pair{"hidden_size", cfg.hidden_size},
                                   std::pair{"moe_intermediate_size", cfg.moe_intermediate_size}})
    MS_CHECK(cols % opt.group_size == 0 && cols % align == 0, "--group-size ", opt.group_size,
             ": the experts' ", what, " (", cols, ") must be a multiple of it and of ", align);
  MS_CHECK(fs::weakly_canonical(opt.model, ec) != fs::weakly_canonical(opt.out, ec),
           "--out must not be the model folder");
  if (fs::exists(opt.out, ec)) {
    MS_CHECK(fs::is_directory(opt.out, ec), "--out ", opt.out, " exists and is not a folder");
    MS_CHECK(fs::is_empty(opt.out, ec), "--out ", opt.out,
             " exists and is not empty (quantize writes a new folder)");
  }

  const WeightStore store(opt.model);
  // The input's tensors in file order, so that each shard is read front to back.
  std::vector<const TensorView*> order;
  for (const auto& [name, t] : store.all()) order.push_back(t);
  std::sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    return a->file != b->file ? a->file < b->file : a->data < b->data;
  });
  // fp8 input: which fp8 matrices stay fp8 (compressed-tensors float-quantized): the Linear
  // modules outside the routed experts that one of fp8_target_list() names.
  std::vector<std::regex> fp8_res;
  for (const std::string& t : fp8_target_list()) fp8_res.emplace_back(t.substr(3));
  std::vector<bool> fp8_target_used(fp8_res.size(), false);
  auto fp8_target = [&](const std::string& module) -> int {
    for (size_t i = 0; i < fp8_res.size(); ++i)
      if (std::regex_search(module, fp8_res[i], std::regex_constants::match_continuous))
        return static_cast<int>(i);
    return -1;
  };
  auto keeps_fp8 = [&](const std::string& name) {
    if (!opt.keep_fp8 || !name.ends_with(".weight") || is_routed_expert_weight(name) ||
        !store.has(name))
      return false;
    const TensorView& t = store.get(name);
    return t.dtype == DType::F8_E4M3 && t.shape.size() == 2 &&
           fp8_target(name.substr(0, name.size() - 7)) >= 0;
  };
  std::vector<Item> items;
  QuantizeResult res;
  for (const TensorView* t : order) {
    Item it;
    it.t = t;
    const std::string& n = t->name;
    res.bytes_in += t->nbytes;
    if (n.ends_with("_scale_inv")) {
      const std::string base = n.substr(0, n.size() - std::string("_scale_inv").size());
      // (dropped when its matrix is fp8 and becomes bf16 or int; renamed weight_scale when it
      // stays fp8, as compressed-tensors names block scales)
      if (keeps_fp8(base)) {
        it.out_name = n.substr(0, n.size() - 4);
      } else if (store.has(base) && store.get(base).dtype == DType::F8_E4M3) {
        it.action = Action::Drop;
      }
    } else if (is_routed_expert_weight(n)) {
      MS_CHECK(t->shape.size() == 2, "tensor ", n, " has shape ", t->shape_str(),
               ", expected a matrix");
      const int64_t cols = t->shape[1];
      MS_CHECK(cols % opt.group_size == 0 && cols % align == 0, "tensor ", n, " has ", cols,
               " columns, not a multiple of --group-size ", opt.group_size);
      MS_CHECK(t->dtype == DType::BF16 || t->dtype == DType::F16 || t->dtype == DType::F32 ||
                   t->dtype == DType::F8_E4M3,
               "tensor ", n, " has dtype ", dtype_name(t->dtype),
               ", supported: BF16, F16, F32, F8_E4M3");
      it.action = Action::Quantize;
      it.module = n.substr(0, n.size() - std::string(".weight").size());
    } else if (t->dtype == DType::F8_E4M3) {
      MS_CHECK(t->shape.size() == 2, "tensor ", n, " is F8_E4M3 with shape ", t->shape_str(),
               ", expected a matrix");
      if (keeps_fp8(n)) {
        it.action = Action::KeepFp8;
        fp8_target_used[fp8_target(n.substr(0, n.size() - 7))] = true;
      } else {
        it.action = Action::ToBf16;
      }
    }
    if (t->dtype == DType::F8_E4M3) {
      const std::string sname = n + "_scale_inv";
      MS_CHECK(store.has(sname), "tensor ", n, " is F8_E4M3 but its scale ", sname, " is missing");
      const TensorView& s = store.get(sname);
      const std::vector<int64_t> want = {(t->shape[0] + 127) / 128, (t->shape[1] + 127) / 128};
      MS_CHECK(s.dtype == DType::F32 && s.shape == want, "tensor ", sname, " must be F32 [",
               want[0], ", ", want[1], "], got ", dtype_name(s.dtype), " ", s.shape_str());
      if (it.action != Action::KeepFp8) it.scale_inv = &s;
    }
    if (it.action == Action::Quantize) {
      const int64_t rows = t->shape[0], cols = t->shape[1];
      it.out_bytes = static_cast<uint64_t>(rows * ((cols * opt.bits + 31) / 32) * 4 +
                                           rows * (cols / opt.group_size) * 2 + 16);
    } else if (it.action == Action::ToBf16) {
      it.out_bytes = static_cast<uint64_t>(t->numel()) * 2;
    } else if (it.action == Action::Copy || it.action == Action::KeepFp8) {
      it.out_bytes = t->nbytes;
    }
    items.push_back(it);
  }
  res.quantized = std::count_if(items.begin(), items.end(),
                                [](const Item& i) { return i.action == Action::Quantize; });
  MS_CHECK(res.quantized > 0,
           "no routed expert matrices (model.layers.L.mlp.experts.E.*_proj)"
           " found in ",
           opt.model);

  // The quantization_config, and the check that it tells every reader what was done: a Linear
  // module is quantized exactly when the config quantizes it.
  res.kept_fp8 = std::count_if(items.begin(), items.end(),
                               [](const Item& i) { return i.action == Action::KeepFp8; });
  auto is_linear_weight = [](const Item& it) {
    const std::string& n = it.t->name;
    return it.action != Action::Drop && it.t->shape.size() == 2 && n.ends_with(".weight") &&
           !n.ends_with("embed_tokens.weight") && !n.ends_with("mlp.gate.weight");
  };
  json qc;
  if (res.kept_fp8 == 0) {
    qc = pack_quantized_config(opt.bits, opt.group_size, quantize_ignore_list());
  } else {
    // "mixed-precision": the experts int, the kept fp8 matrices fp8, and every other Linear
    // module named in `ignore` (readers such as vLLM want each Linear module targeted or
    // ignored).
    std::vector<std::string> fp8_targets, ignore;
    for (size_t i = 0; i < fp8_res.size(); ++i)
      if (fp8_target_used[i]) fp8_targets.push_back(fp8_target_list()[i]);
    for (const Item& it : items)
      if (is_linear_weight(it) && it.action != Action::Quantize && it.action != Action::KeepFp8)
        ignore.push_back(it.t->name.substr(0, it.t->name.size() - 7));
    std::sort(ignore.begin(), ignore.end());
    qc = mixed_config(opt.bits, opt.group_size, {expert_target()}, fp8_targets, ignore);
  }
  json cfg_out = config;
  cfg_out["quantization_config"] = qc;
  const Quantization q = parse_quantization(cfg_out);
  for (const Item& it : items) {
    const std::string& n = it.t->name;
    if (!is_linear_weight(it)) continue;
    const std::string module = n.substr(0, n.size() - std::string(".weight").size());
    const Storage want = it.action == Action::Quantize  ? Storage::Int
                         : it.action == Action::KeepFp8 ? Storage::Fp8
                                                        : Storage::Plain;
    auto word = [](Storage s) {
      return s == Storage::Int ? "int" : s == Storage::Fp8 ? "fp8" : "unquantized";
    };
    MS_CHECK(q.storage(module) == want, "tensor ", n, ": the quantization_config would read it as ",
             word(q.storage(module)), ", but quantize writes it ", word(want),
             " (a tensor name quantize does not know)");
  }

  // Shards: consecutive items up to shard_bytes each.
  std::vector<std::vector<const Item*>> shards(1);
  uint64_t in_shard = 0;
  for (const Item& it : items) {
    if (it.action == Action::Drop) continue;
    if (in_shard > 0 && in_shard + it.out_bytes > opt.shard_bytes)
      shards.emplace_back(), in_shard = 0;
    shards.back().push_back(&it);
    in_shard += it.out_bytes;
  }
  const int64_t ns = static_cast<int64_t>(shards.size());
  auto shard_name = [&](int64_t i) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "model-%05lld-of-%05lld.safetensors",
                  static_cast<long long>(i + 1), static_cast<long long>(ns));
    return std::string(buf);
  };

  *writing = true;
  fs::create_directories(opt.out, ec);
  MS_CHECK(!ec, "cannot create ", opt.out, ": ", ec.message());
  json weight_map = json::object();
  uint64_t total = 0, done_in = 0;
  auto last = std::chrono::steady_clock::now();
  const auto start = last;
  for (int64_t si = 0; si < ns; ++si) {
    const std::string file = shard_name(si);
    std::vector<SafeTensorsWriter::Entry> entries;
    for (const Item* it : shards[si]) {
      const TensorView& t = *it->t;
      if (it->action == Action::Quantize) {
        const int64_t rows = t.shape[0], cols = t.shape[1];
        entries.push_back(
            {it->module + ".weight_packed", DType::I32, {rows, (cols * opt.bits + 31) / 32}});
        entries.push_back(
            {it->module + ".weight_scale", DType::BF16, {rows, cols / opt.group_size}});
        entries.push_back({it->module + ".weight_shape", DType::I64, {2}});
      } else {
        entries.push_back({it->out_name.empty() ? t.name : it->out_name,
                           it->action == Action::ToBf16 ? DType::BF16 : t.dtype, t.shape});
      }
    }
    for (const auto& e : entries) {
      weight_map[e.name] = file;
      uint64_t n = dtype_size(e.dtype);
      for (int64_t x : e.shape) n *= static_cast<uint64_t>(x);
      total += n;  // the index's total_size: tensor bytes, without the headers
    }
    SafeTensorsWriter w((fs::path(opt.out) / file).string(), entries);
    for (const Item* it : shards[si]) {
      const TensorView& t = *it->t;
      if (it->action == Action::Copy || it->action == Action::KeepFp8) {
        w.write_data(t.data, t.nbytes);
        if (it->action == Action::Copy) ++res.copied;
      } else if (it->action == Action::ToBf16) {
        const int64_t rows = t.shape[0], cols = t.shape[1];
        const int64_t chunk = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(cols, 1));
        std::vector<uint16_t> buf(static_cast<size_t>(std::min(rows, chunk) * cols));
        for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
          const int64_t n = std::min(chunk, rows - r0);
          pool.parallel_for(n, [&](int64_t b, int64_t e, int) {
            for (int64_t r = b; r < e; ++r)
              row_to_bf16(t, it->scale_inv, r0 + r, cols, buf.data() + r * cols);
          });
          w.write_data(buf.data(), static_cast<size_t>(n * cols) * 2);
        }
        ++res.converted;
      } else {  // Quantize
        const int64_t rows = t.shape[0], cols = t.shape[1];
        const int64_t words = (cols * opt.bits + 31) / 32, groups = cols / opt.group_size;
        std::vector<uint32_t> packed(static_cast<size_t>(rows * words));
        std::vector<uint16_t> scales(static_cast<size_t>(rows * groups));
        pool.parallel_for(rows, [&](int64_t b, int64_t e, int) {
          std::vector<uint16_t> row(cols);
          std::vector<int8_t> qs(cols);
          for (int64_t r = b; r < e; ++r) {
            row_to_bf16(t, it->scale_inv, r, cols, row.data());
            quantize_row_bf16(row.data(), cols, opt.bits, opt.group_size, qs.data(),
                              scales.data() + r * groups);
            pack_row(qs.data(), cols, opt.bits, packed.data() + r * words);
          }
        });
        const int64_t shape[2] = {rows, cols};
        w.write_data(packed.data(), packed.size() * 4);
        w.write_data(scales.data(), scales.size() * 2);
        w.write_data(shape, sizeof shape);
      }
      store.release(t, t.data, t.nbytes);
      if (it->scale_inv) store.release(*it->scale_inv, it->scale_inv->data, it->scale_inv->nbytes);
      done_in += t.nbytes;
      const auto now = std::chrono::steady_clock::now();
      if (progress && now - last > std::chrono::seconds(2)) {
        last = now;
        progress("quantize: shard " + std::to_string(si + 1) + " of " + std::to_string(ns) + ", " +
                 format_bytes(done_in) + " of " + format_bytes(res.bytes_in) + " read");
      }
    }
    w.finish();
    res.bytes_out += static_cast<uint64_t>(fs::file_size(fs::path(opt.out) / file, ec));
    if (progress)
      progress("quantize: wrote " + file + " (" + std::to_string(si + 1) + " of " +
               std::to_string(ns) + ")");
  }
  res.shards = ns;

  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  std::ofstream(fs::path(opt.out) / "model.safetensors.index.json") << index.dump(2) << "\n";
  if (res.converted > 0 && cfg_out.contains("torch_dtype")) cfg_out["torch_dtype"] = "bfloat16";
  {
    std::ofstream f(fs::path(opt.out) / "config.json");
    f << cfg_out.dump(2) << "\n";
    MS_CHECK(f.good(), "cannot write ", (fs::path(opt.out) / "config.json").string());
  }
  for (const std::string& n : copyable_files(opt.model)) {
    fs::copy_file(fs::path(opt.model) / n, fs::path(opt.out) / n, ec);
    MS_CHECK(!ec, "cannot copy ", n, " to ", opt.out, ": ", ec.message());
    res.files_copied.push_back(n);
  }
  if (progress) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.1f s", s);
    progress("quantize: done in " + std::string(buf));
  }
  return res;
}

}  // namespace

QuantizeResult quantize_checkpoint(const QuantizeOptions& opt, const ThreadPool& pool,
                                   const std::function<void(const std::string&)>& progress) {
  bool writing = false;
  try {
    return quantize_into(opt, pool, progress, &writing);
  } catch (...) {
    // The folder was missing or empty before: what it holds now is a partial output.
    if (writing) {
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(opt.out, ec)) fs::remove_all(e.path(), ec);
    }
    throw;
  }
}

}  // namespace moeserve::model
