#include "moe/placement.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace moeserve::moe {

using nlohmann::json;

// ---- Placement ----

Placement::Placement(int32_t n_experts, std::vector<std::vector<int32_t>> rank_experts)
    : n_experts_(n_experts), ranks_(std::move(rank_experts)) {
  MS_CHECK(n_experts > 0, "placement: n_experts must be positive, got ", n_experts);
  MS_CHECK(!ranks_.empty(), "placement: no ranks");
  std::vector<int64_t> copies(n_experts, 0);
  std::vector<int32_t> seen_on(n_experts, -1);
  for (int32_t r = 0; r < n_ranks(); ++r) {
    max_slots_ = std::max(max_slots_, static_cast<int32_t>(ranks_[r].size()));
    for (int32_t e : ranks_[r]) {
      MS_CHECK(e >= 0 && e < n_experts, "placement: rank ", r, " holds expert ", e,
               ", out of range [0, ", n_experts, ")");
      MS_CHECK(seen_on[e] != r, "placement: rank ", r, " holds expert ", e, " twice");
      seen_on[e] = r;
      ++copies[e];
    }
  }
  replica_begin_.assign(n_experts + 1, 0);
  for (int32_t e = 0; e < n_experts; ++e) {
    MS_CHECK(copies[e] > 0, "placement: expert ", e, " is on no rank");
    replica_begin_[e + 1] = replica_begin_[e] + copies[e];
  }
  n_physical_ = replica_begin_[n_experts];
  replicas_.resize(n_physical_);
  std::vector<int64_t> fill(replica_begin_.begin(), replica_begin_.end() - 1);
  for (int32_t r = 0; r < n_ranks(); ++r)  // ascending rank within each expert
    for (int32_t j = 0; j < static_cast<int32_t>(ranks_[r].size()); ++j)
      replicas_[fill[ranks_[r][j]]++] = Replica{r, j};
}

Placement Placement::contiguous(int32_t n_experts, int32_t n_ranks) {
  MS_CHECK(n_ranks > 0, "placement: n_ranks must be positive, got ", n_ranks);
  std::vector<std::vector<int32_t>> ranks(n_ranks);
  int32_t e = 0;
  for (int32_t r = 0; r < n_ranks; ++r)
    for (int32_t j = 0; j < n_experts / n_ranks + (r < n_experts % n_ranks); ++j)
      ranks[r].push_back(e++);
  return Placement(n_experts, std::move(ranks));
}

Placement Placement::balanced(std::span<const double> load, int32_t n_ranks, int32_t n_redundant) {
  const auto E = static_cast<int32_t>(load.size());
  const int32_t R = n_ranks;
  MS_CHECK(E > 0 && R > 0, "placement: need experts and ranks, got ", E, " and ", R);
  MS_CHECK(n_redundant >= 0 && static_cast<int64_t>(n_redundant) <= int64_t{E} * (R - 1),
           "placement: ", n_redundant, " redundant copies do not fit ", E, " experts on ", R,
           " ranks without two copies on one rank (at most ", int64_t{E} * (R - 1), ")");
  for (int32_t e = 0; e < E; ++e)
    MS_CHECK(std::isfinite(load[e]) && load[e] >= 0, "placement: load of expert ", e, " is ",
             load[e]);

  // 1. Copies: each extra one to the expert with the highest load per copy.
  std::vector<int32_t> copies(E, 1);
  for (int32_t i = 0; i < n_redundant; ++i) {
    int32_t best = -1;
    for (int32_t e = 0; e < E; ++e) {
      if (copies[e] >= R) continue;
      if (best < 0 || load[e] * copies[best] > load[best] * copies[e]) best = e;
    }
    ++copies[best];
  }

  // 2. Pack copies largest first into the least-loaded rank with room and without that expert.
  struct Item {
    double load;
    int32_t expert;
  };
  std::vector<Item> items;
  for (int32_t e = 0; e < E; ++e)
    for (int32_t c = 0; c < copies[e]; ++c) items.push_back({load[e] / copies[e], e});
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.load > b.load; });
  const int64_t total = E + n_redundant;
  std::vector<int64_t> cap(R);
  for (int32_t r = 0; r < R; ++r) cap[r] = total / R + (r < total % R);
  std::vector<std::vector<int32_t>> ranks(R);
  std::vector<double> rank_load(R, 0.0);
  std::vector<char> held(static_cast<size_t>(R) * E, 0);  // [R, E]
  auto holds = [&](int32_t r, int32_t e) -> char& { return held[static_cast<size_t>(r) * E + e]; };
  auto put = [&](int32_t r, int32_t e, double l) {
    ranks[r].push_back(e);
    holds(r, e) = 1;
    rank_load[r] += l;
  };
  for (const Item& it : items) {
    int32_t best = -1;
    for (int32_t r = 0; r < R; ++r) {
      if (static_cast<int64_t>(ranks[r].size()) >= cap[r] || holds(r, it.expert)) continue;
      if (best < 0 || rank_load[r] < rank_load[best]) best = r;
    }
    if (best >= 0) {
      put(best, it.expert, it.load);
      continue;
    }
    // Every rank with room already holds this expert. Some full rank r2 lacks it and holds an
    // expert f the free rank lacks (r_free holds fewer than cap[r2] + 1 experts, one of them
    // this one): move f to r_free, this copy to r2.
    bool done = false;
    for (int32_t rf = 0; rf < R && !done; ++rf) {
      if (static_cast<int64_t>(ranks[rf].size()) >= cap[rf]) continue;
      for (int32_t r2 = 0; r2 < R && !done; ++r2) {
        if (r2 == rf || holds(r2, it.expert)) continue;
        for (int32_t& f : ranks[r2]) {
          if (holds(rf, f)) continue;
          const double lf = load[f] / copies[f];
          holds(r2, f) = 0;
          rank_load[r2] -= lf;
          put(rf, f, lf);
          f = it.expert;
          holds(r2, it.expert) = 1;
          rank_load[r2] += it.load;
          done = true;
          break;
        }
      }
    }
    MS_ASSERT(done);
  }
  for (auto& r : ranks) std::sort(r.begin(), r.end());
  return Placement(E, std::move(ranks));
}

Replica Placement::choose(int32_t expert, int32_t own_rank, int64_t token) const {
  const auto reps = replicas(expert);
  if (reps.size() == 1) return reps[0];
  for (const Replica& r : reps)
    if (r.rank == own_rank) return r;
  return reps[static_cast<size_t>((token + own_rank) % static_cast<int64_t>(reps.size()))];
}

uint64_t Placement::fingerprint() const {
  uint64_t h = 1469598103934665603ull;  // FNV-1a over (E, R, then each rank's slot list)
  auto mix = [&](int64_t v) {
    for (int i = 0; i < 8; ++i)
      h = (h ^ ((static_cast<uint64_t>(v) >> (8 * i)) & 0xff)) * 1099511628211ull;
  };
  mix(n_experts_);
  mix(n_ranks());
  for (const auto& r : ranks_) {
    mix(static_cast<int64_t>(r.size()));
    for (int32_t e : r) mix(e);
  }
  return h;
}

std::vector<double> Placement::rank_loads(std::span<const double> load) const {
  MS_CHECK(static_cast<int32_t>(load.size()) == n_experts_, "placement: ", load.size(),
           " loads for ", n_experts_, " experts");
  std::vector<double> out(n_ranks(), 0.0);
  for (int32_t e = 0; e < n_experts_; ++e)
    for (const Replica& r : replicas(e)) out[r.rank] += load[e] / replicas(e).size();
  return out;
}

json Placement::to_json() const {
  return json{{"n_experts", n_experts_}, {"ranks", ranks_}};
}

Placement Placement::from_json(const json& j) {
  MS_CHECK(j.is_object() && j.contains("n_experts") && j.contains("ranks"),
           "placement: expected {\"n_experts\": ..., \"ranks\": [[...], ...]}");
  return Placement(j.at("n_experts").get<int32_t>(),
                   j.at("ranks").get<std::vector<std::vector<int32_t>>>());
}

// ---- PlacementTable ----

namespace {

json read_json(const std::string& path, const char* what) {
  std::ifstream f(path);
  MS_CHECK(f, what, ": cannot open ", path);
  try {
    return json::parse(f);
  } catch (const json::exception& e) {
    fail(what, ": ", path, " is not valid JSON: ", e.what());
  }
}

void write_json(const std::string& path, const json& j, const char* what) {
  std::ofstream f(path);
  MS_CHECK(f, what, ": cannot write ", path);
  f << j.dump(1) << "\n";
  MS_CHECK(f.good(), what, ": writing ", path, " failed");
}

void check_format(const json& j, const char* format) {
  MS_CHECK(j.is_object() && j.value("format", "") == format, "expected a JSON object with ",
           "\"format\": \"", format, "\"");
  MS_CHECK(j.value("version", 0) == 1, format, ": unsupported version ", j.value("version", 0));
}

}  // namespace

void PlacementTable::check_shape(const Placement& p) const {
  const Placement* any = default_          ? &*default_
                         : layers_.empty() ? nullptr
                                           : &layers_.begin()->second;
  if (!any) return;
  MS_CHECK(p.n_experts() == any->n_experts() && p.n_ranks() == any->n_ranks(),
           "placement table: a placement of ", p.n_experts(), " experts on ", p.n_ranks(),
           " ranks next to one of ", any->n_experts(), " on ", any->n_ranks());
}

void PlacementTable::set(int64_t layer, Placement p) {
  check_shape(p);
  layers_[layer] = std::move(p);
}

void PlacementTable::set_default(Placement p) {
  check_shape(p);
  default_ = std::move(p);
}

const Placement& PlacementTable::at(int64_t layer) const {
  auto it = layers_.find(layer);
  if (it != layers_.end()) return it->second;
  MS_CHECK(default_, "placement table: no placement for layer ", layer, " and no default");
  return *default_;
}

void PlacementTable::validate(int32_t n_experts, int32_t n_ranks) const {
  const Placement* any = default_          ? &*default_
                         : layers_.empty() ? nullptr
                                           : &layers_.begin()->second;
  MS_CHECK(any, "placement table is empty");
  MS_CHECK(any->n_experts() == n_experts, "placement is for ", any->n_experts(),
           " experts, the model has ", n_experts);
  MS_CHECK(any->n_ranks() == n_ranks, "placement is for ", any->n_ranks(),
           " expert-parallel ranks, this instance has ", n_ranks);
}

json PlacementTable::to_json() const {
  const Placement* any = default_          ? &*default_
                         : layers_.empty() ? nullptr
                                           : &layers_.begin()->second;
  json j{{"format", "moeserve-placement"}, {"version", 1}};
  j["n_experts"] = any ? any->n_experts() : 0;
  j["n_ranks"] = any ? any->n_ranks() : 0;
  if (default_) j["default"] = default_->to_json()["ranks"];
  json layers = json::object();
  for (const auto& [l, p] : layers_) layers[std::to_string(l)] = p.to_json()["ranks"];
  j["layers"] = layers;
  return j;
}

PlacementTable PlacementTable::from_json(const json& j) {
  check_format(j, "moeserve-placement");
  const auto E = j.at("n_experts").get<int32_t>(), R = j.at("n_ranks").get<int32_t>();
  auto one = [&](const json& ranks, const std::string& where) {
    try {
      Placement p(E, ranks.get<std::vector<std::vector<int32_t>>>());
      MS_CHECK(p.n_ranks() == R, "it has ", p.n_ranks(), " ranks, the file says ", R);
      return p;
    } catch (const std::exception& e) {
      fail("placement file, ", where, ": ", e.what());
    }
  };
  PlacementTable t;
  if (j.contains("default")) t.set_default(one(j.at("default"), "default"));
  const json layers = j.value("layers", json::object());
  for (const auto& [key, ranks] : layers.items()) {
    int64_t layer = -1;
    try {
      layer = std::stoll(key);
    } catch (const std::exception&) {
    }
    MS_CHECK(layer >= 0, "placement file: layer key \"", key, "\" is not a layer number");
    t.set(layer, one(ranks, "layer " + key));
  }
  return t;
}

void PlacementTable::save(const std::string& path) const {
  write_json(path, to_json(), "placement file");
}

PlacementTable PlacementTable::load(const std::string& path) {
  const json j = read_json(path, "placement file");
  try {
    return from_json(j);
  } catch (const json::exception& e) {
    fail("placement file ", path, ": ", e.what());
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

// ---- ExpertCounts ----

ExpertCounts::ExpertCounts(int64_t n_layers, int32_t n_experts)
    : n_layers_(n_layers), n_experts_(n_experts), counts_(n_layers * n_experts, 0) {
  MS_CHECK(n_layers >= 0 && n_experts > 0, "expert counts: bad shape [", n_layers, ", ", n_experts,
           "]");
}

void ExpertCounts::record(int64_t layer, const int32_t* experts, int64_t n) {
  MS_ASSERT(layer >= 0 && layer < n_layers_);
  int64_t* c = counts_.data() + layer * n_experts_;
  for (int64_t i = 0; i < n; ++i) {
    MS_ASSERT(experts[i] >= 0 && experts[i] < n_experts_);
    ++c[experts[i]];
  }
}

void ExpertCounts::reduce(comm::Communicator& comm) {
  comm.all_reduce(counts_.data(), counts_.size(), comm::ReduceOp::Sum);
}

PlacementTable ExpertCounts::rebalance(int32_t n_ranks, int32_t n_redundant) const {
  PlacementTable t;
  t.set_default(Placement::contiguous(n_experts_, n_ranks));
  for (int64_t l = 0; l < n_layers_; ++l) {
    const auto c = layer(l);
    if (std::all_of(c.begin(), c.end(), [](int64_t v) { return v == 0; })) continue;
    const std::vector<double> load(c.begin(), c.end());
    t.set(l, Placement::balanced(load, n_ranks, n_redundant));
  }
  return t;
}

json ExpertCounts::to_json() const {
  json layers = json::object();
  for (int64_t l = 0; l < n_layers_; ++l) {
    const auto c = layer(l);
    if (std::any_of(c.begin(), c.end(), [](int64_t v) { return v != 0; }))
      layers[std::to_string(l)] = std::vector<int64_t>(c.begin(), c.end());
  }
  return json{{"format", "moeserve-expert-counts"},
              {"version", 1},
              {"n_experts", n_experts_},
              {"n_layers", n_layers_},
              {"layers", layers}};
}

ExpertCounts ExpertCounts::from_json(const json& j) {
  check_format(j, "moeserve-expert-counts");
  ExpertCounts c(j.at("n_layers").get<int64_t>(), j.at("n_experts").get<int32_t>());
  const json layers = j.value("layers", json::object());
  for (const auto& [key, v] : layers.items()) {
    int64_t l = -1;
    try {
      l = std::stoll(key);
    } catch (const std::exception&) {
    }
    MS_CHECK(l >= 0 && l < c.n_layers_, "expert counts: layer \"", key, "\" out of range [0, ",
             c.n_layers_, ")");
    const auto row = v.get<std::vector<int64_t>>();
    MS_CHECK(static_cast<int64_t>(row.size()) == c.n_experts_, "expert counts: layer ", l, " has ",
             row.size(), " counts for ", c.n_experts_, " experts");
    for (int64_t x : row) MS_CHECK(x >= 0, "expert counts: layer ", l, " has a negative count");
    std::copy(row.begin(), row.end(), c.counts_.begin() + l * c.n_experts_);
  }
  return c;
}

void ExpertCounts::save(const std::string& path) const {
  write_json(path, to_json(), "expert counts");
}

ExpertCounts ExpertCounts::load(const std::string& path) {
  const json j = read_json(path, "expert counts");
  try {
    return from_json(j);
  } catch (const json::exception& e) {
    fail("expert counts ", path, ": ", e.what());
  } catch (const Error& e) {
    fail(path, ": ", e.what());
  }
}

}  // namespace moeserve::moe
