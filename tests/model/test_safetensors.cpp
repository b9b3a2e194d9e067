#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "model/weights.h"

using moeserve::DType;
using moeserve::model::SafeTensorsFile;
using moeserve::model::SafeTensorsWriter;
using moeserve::model::WeightStore;
using moeserve::testing::expect_error;
using moeserve::testing::TempDir;

namespace {

// Writes a file made of an explicit header and `data_bytes` bytes of data.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes,
               int64_t claimed_len = -1) {
  std::ofstream f(path, std::ios::binary);
  const uint64_t len = claimed_len >= 0 ? static_cast<uint64_t>(claimed_len) : header.size();
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << header;
  std::string data(data_bytes, '\0');
  f << data;
}

}  // namespace

TEST(SafeTensors, WriteThenReadRoundTrip) {
  TempDir d;
  const std::string p = d / "model.safetensors";
  {
    SafeTensorsWriter w(p, {{"a", DType::BF16, {2, 3}}, {"b", DType::F32, {4}}});
    uint16_t a[6] = {1, 2, 3, 4, 5, 6};
    float b[4] = {1.5f, -2.0f, 0.0f, 7.0f};
    w.write_data(a, sizeof a);
    w.write_data(b, sizeof b);
    w.finish();
  }
  SafeTensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), 2u);
  const auto& a = f.tensors().at("a");
  EXPECT_EQ(a.dtype, DType::BF16);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(static_cast<const uint16_t*>(a.data)[5], 6);
  const auto& b = f.tensors().at("b");
  EXPECT_EQ(static_cast<const float*>(b.data)[3], 7.0f);
}

TEST(SafeTensors, TruncatedFileIsAnError) {
  TempDir d;
  write_raw(d / "x.safetensors", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_error([&] { SafeTensorsFile f(d / "x.safetensors"); }, {"truncated", "w", "[0, 16)"});
}

TEST(SafeTensors, ShorterThanHeaderLength) {
  TempDir d;
  write_raw(d / "x.safetensors", "{}", 0, 1000);
  // The claimed length (the first 8 bytes of whatever file this is) is not echoed.
  expect_error([&] { SafeTensorsFile f(d / "x.safetensors"); },
               {"truncated", "header claims more bytes than the file has (10)"});
  try {
    SafeTensorsFile f(d / "x.safetensors");
  } catch (const moeserve::Error& e) {
    EXPECT_EQ(std::string(e.what()).find("1000"), std::string::npos) << e.what();
  }
  std::ofstream(d / "tiny.safetensors") << "abc";
  expect_error([&] { SafeTensorsFile f(d / "tiny.safetensors"); }, {"not a safetensors file"});
}

TEST(SafeTensors, HeaderThatLiesAboutSize) {
  TempDir d;
  write_raw(d / "x.safetensors", R"({"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}})", 8);
  expect_error([&] { SafeTensorsFile f(d / "x.safetensors"); }, {"w", "has 4 bytes", "needs 8"});
}

TEST(SafeTensors, OverlappingTensors) {
  TempDir d;
  write_raw(d / "x.safetensors",
            R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
            R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
            12);
  expect_error([&] { SafeTensorsFile f(d / "x.safetensors"); }, {"share bytes"});
}

TEST(SafeTensors, BadHeaderJsonAndDtype) {
  TempDir d;
  write_raw(d / "x.safetensors", "{not json", 0);
  expect_error([&] { SafeTensorsFile f(d / "x.safetensors"); }, {"not valid JSON"});
  write_raw(d / "y.safetensors", R"({"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8);
  expect_error([&] { SafeTensorsFile f(d / "y.safetensors"); }, {"w", "unsupported dtype C64"});
  write_raw(d / "z.safetensors", R"({"w":{"dtype":"F32","shape":[1]}})", 8);
  expect_error([&] { SafeTensorsFile f(d / "z.safetensors"); }, {"w", "malformed"});
}

TEST(SafeTensors, StoreNamesMissingTensorAndWrongShape) {
  TempDir d;
  {
    SafeTensorsWriter w(d / "model.safetensors", {{"x.weight", DType::F32, {2, 2}}});
    float v[4] = {};
    w.write_data(v, sizeof v);
    w.finish();
  }
  WeightStore s(d.path());
  expect_error([&] { s.get("y.weight"); }, {"y.weight", "missing"});
  expect_error([&] { s.get("x.weight", {2, 3}); }, {"x.weight", "[2, 2]", "expected [2, 3]"});
}

TEST(SafeTensors, ShardedIndex) {
  TempDir d;
  for (int i = 0; i < 2; ++i) {
    SafeTensorsWriter w(d / ("part" + std::to_string(i) + ".safetensors"),
                        {{"t" + std::to_string(i), DType::F32, {1}}});
    float v = static_cast<float>(i + 1);
    w.write_data(&v, 4);
    w.finish();
  }
  nlohmann::json idx = {{"weight_map", {{"t0", "part0.safetensors"}, {"t1", "part1.safetensors"}}}};
  std::ofstream(d / "model.safetensors.index.json") << idx.dump();
  WeightStore s(d.path());
  EXPECT_EQ(*static_cast<const float*>(s.get("t1").data), 2.0f);
  idx["weight_map"]["t2"] = "part9.safetensors";
  std::ofstream(d / "model.safetensors.index.json") << idx.dump();
  expect_error([&] { WeightStore s2(d.path()); }, {"part9.safetensors", "missing"});
}

TEST(SafeTensors, EmptyFolder) {
  TempDir d;
  expect_error([&] { WeightStore s(d.path()); }, {"no .safetensors"});
  expect_error([&] { WeightStore s(d / "nope"); }, {"does not exist"});
}

TEST(SafeTensors, FormatRules) {
  TempDir d;
  auto check = [&](const std::string& header, size_t data, std::initializer_list<std::string> f) {
    write_raw(d / "x.safetensors", header, data);
    expect_error([&] { SafeTensorsFile s(d / "x.safetensors"); }, f);
  };
  // The element count overflows: [2^62 + 1, 256] of BF16 wrapped to 512 bytes.
  check(R"({"w":{"dtype":"BF16","shape":[4611686018427387905,256],"data_offsets":[0,512]}})", 512,
        {"w", "64 bits"});
  check(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12,
        {"bytes [0, 4)", "belong to no tensor"});
  check(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12,
        {"last 4 bytes", "belong to no tensor"});
  check(R"({"__metadata__":["a"],"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4,
        {"__metadata__", "object of strings"});
  check(R"(  {"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4, {"start with '{'"});
  check(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4, {"w", "invalid shape"});
  check(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}})", 4,
        {"not valid JSON", "out of range"});
}

TEST(SafeTensors, UnalignedTensorsAreCopiedAligned) {
  // A header of 59 bytes, not padded: the data section starts at byte 67 of the file.
  TempDir d;
  const std::string h = R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  ASSERT_NE((8 + h.size()) % 4, 0u);
  {
    std::ofstream f(d / "x.safetensors", std::ios::binary);
    const uint64_t len = h.size();
    f.write(reinterpret_cast<const char*>(&len), 8);
    f << h;
    const float v[3] = {1.5f, -2.0f, 3.25f};
    f.write(reinterpret_cast<const char*>(v), sizeof v);
  }
  SafeTensorsFile f(d / "x.safetensors");
  const auto& a = f.tensors().at("a");
  ASSERT_EQ(reinterpret_cast<uintptr_t>(a.data) % 4, 0u);
  const float* p = static_cast<const float*>(a.data);
  EXPECT_EQ(p[0], 1.5f);
  EXPECT_EQ(p[1], -2.0f);
  EXPECT_EQ(p[2], 3.25f);
}

TEST(SafeTensors, ShardsStayInsideTheFolder) {
  TempDir d;
  std::filesystem::create_directory(d / "m");
  {
    SafeTensorsWriter w(d / "outside.safetensors", {{"t", DType::F32, {1}}});
    float v = 1;
    w.write_data(&v, 4);
    w.finish();
  }
  for (const std::string& shard :
       {std::string("../outside.safetensors"), d / "outside.safetensors"}) {
    nlohmann::json idx = {{"weight_map", {{"t", shard}}}};
    std::ofstream(d / "m/model.safetensors.index.json") << idx.dump();
    expect_error([&] { WeightStore s(d / "m"); }, {"shard", "model folder"});
  }
  std::filesystem::remove(d / "m/model.safetensors.index.json");
  std::filesystem::create_symlink(d / "outside.safetensors", d / "m/model.safetensors");
  expect_error([&] { WeightStore s(d / "m"); }, {"link", "leads out of the model folder"});
}
