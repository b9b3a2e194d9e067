// core/dtype.h's conversions against values computed another way (ml_dtypes and numpy, in
// tests/fixtures/dtypes/dtypes.json): every fp8 e4m3 code, the bf16 and f16 edge cases and whole
// tables, and the rounding of the encoders, bit for bit (NaN as NaN).
#include <gtest/gtest.h>

#include <cmath>

#include "core/dtype.h"
#include "dtype_fixture.h"

namespace moeserve {
namespace {

using testing::canonical_f32;
using testing::dtype_fixture;
using testing::f32_bits;
using testing::f32_from_bits;

std::string hex(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%x", v);
  return b;
}

TEST(DtypeFixture, IsPresentAndComplete) {
  const auto& j = dtype_fixture();
  ASSERT_TRUE(j.is_object()) << "tests/fixtures/dtypes/dtypes.json is missing or unreadable";
  EXPECT_EQ(j["fp8_e4m3fn_decode"].size(), 256u);
  EXPECT_GE(j["bf16_decode_edges"].size(), 15u);
  EXPECT_GE(j["f16_decode_edges"].size(), 15u);
  EXPECT_GE(j["bf16_encode"].size(), 300u);
  EXPECT_GE(j["f16_encode"].size(), 300u);
  EXPECT_GE(j["fp8_e4m3fn_encode"].size(), 300u);
}

TEST(Dtype, EveryFp8E4m3CodeDecodesAsMlDtypes) {
  const auto& want = dtype_fixture()["fp8_e4m3fn_decode"];
  ASSERT_EQ(want.size(), 256u);
  int nans = 0;
  for (int code = 0; code < 256; ++code) {
    const uint32_t w = want[code].get<uint32_t>();
    const float got = fp8e4m3_to_f32(static_cast<uint8_t>(code));
    if (std::isnan(f32_from_bits(w))) {
      ++nans;
      EXPECT_TRUE(std::isnan(got)) << "code " << hex(code) << " gives " << got << ", not NaN";
    } else {
      EXPECT_EQ(f32_bits(got), w) << "code " << hex(code) << ": " << got << " instead of "
                                  << f32_from_bits(w);
    }
  }
  EXPECT_EQ(nans, 2);  // 0x7f and 0xff only: e4m3fn has no infinities
}

void check_decode_edges(const char* key, float (*decode)(uint16_t)) {
  for (const auto& e : dtype_fixture()[key]) {
    const std::string name = e[0];
    const uint16_t code = e[1].get<uint16_t>();
    const uint32_t w = e[2].get<uint32_t>();
    const float got = decode(code);
    if (std::isnan(f32_from_bits(w)))
      EXPECT_TRUE(std::isnan(got)) << key << " " << name;
    else
      EXPECT_EQ(f32_bits(got), w) << key << " " << name << " (" << hex(code) << "): " << got
                                  << " instead of " << f32_from_bits(w);
  }
}

TEST(Dtype, Bf16AndF16EdgeCasesDecodeAsMlDtypes) {
  check_decode_edges("bf16_decode_edges", bf16_to_f32);
  check_decode_edges("f16_decode_edges", f16_to_f32);
}

TEST(Dtype, EveryBf16AndF16CodeDecodesAsMlDtypes) {
  testing::Fnv1a hb, hf;
  for (uint32_t c = 0; c < 65536; ++c) {
    hb.add(canonical_f32(bf16_to_f32(static_cast<uint16_t>(c))));
    hf.add(canonical_f32(f16_to_f32(static_cast<uint16_t>(c))));
  }
  const auto& s = dtype_fixture()["sweeps"];
  EXPECT_EQ(hb.hex(), s["bf16_decode"].get<std::string>()) << "bf16 decode table differs";
  EXPECT_EQ(hf.hex(), s["f16_decode"].get<std::string>()) << "f16 decode table differs";
}

// Encoders, with NaN results made canonical (their payload and sign are not part of the contract).
uint32_t enc_bf16(float f) {
  const uint16_t c = f32_to_bf16(f);
  return std::isnan(bf16_to_f32(c)) ? 0x7fc0u : c;
}
uint32_t enc_f16(float f) {
  const uint16_t c = f32_to_f16(f);
  return std::isnan(f16_to_f32(c)) ? 0x7e00u : c;
}
uint32_t enc_fp8(float f) {
  const uint8_t c = f32_to_fp8e4m3(f);
  return (c & 0x7f) == 0x7f ? 0x7fu : c;
}

void check_encode_cases(const char* key, uint32_t (*enc)(float)) {
  int failures = 0;
  for (const auto& p : dtype_fixture()[key]) {
    const uint32_t in = p[0].get<uint32_t>(), want = p[1].get<uint32_t>();
    const uint32_t got = enc(f32_from_bits(in));
    if (got != want && ++failures <= 20)
      ADD_FAILURE() << key << ": input " << hex(in) << " (" << f32_from_bits(in) << ") gives "
                    << hex(got) << ", ml_dtypes " << hex(want);
  }
  EXPECT_EQ(failures, 0) << key;
}

TEST(Dtype, EncodersRoundAsMlDtypesAtTiesSubnormalsAndOverflow) {
  check_encode_cases("bf16_encode", enc_bf16);
  check_encode_cases("f16_encode", enc_f16);
  check_encode_cases("fp8_e4m3fn_encode", enc_fp8);  // saturating at +-448
}

TEST(Dtype, EncodersAgreeWithMlDtypesOverAMillionInputs) {
  testing::Fnv1a hb, hf, h8;
  int64_t n = 0;
  testing::for_each_sweep_input([&](uint32_t u) {
    const float f = f32_from_bits(u);
    hb.add(enc_bf16(f));
    hf.add(enc_f16(f));
    h8.add(enc_fp8(f));
    ++n;
  });
  const auto& s = dtype_fixture()["sweeps"];
  EXPECT_EQ(n, s["count"].get<int64_t>());
  EXPECT_EQ(hb.hex(), s["bf16_encode"].get<std::string>()) << "f32 -> bf16 differs somewhere";
  EXPECT_EQ(hf.hex(), s["f16_encode"].get<std::string>()) << "f32 -> f16 differs somewhere";
  EXPECT_EQ(h8.hex(), s["fp8_e4m3fn_encode"].get<std::string>()) << "f32 -> fp8 differs somewhere";
}

// Every finite code survives decode -> encode unchanged (the encoders invert the decoders).
TEST(Dtype, FiniteCodesRoundTrip) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) continue;
    EXPECT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(static_cast<uint8_t>(c))), c) << hex(c);
  }
  for (uint32_t c = 0; c < 65536; ++c) {
    const uint16_t h = static_cast<uint16_t>(c);
    if ((c & 0x7f80) != 0x7f80) {
      ASSERT_EQ(f32_to_bf16(bf16_to_f32(h)), h) << hex(c);
    }
    if ((c & 0x7c00) != 0x7c00) {
      ASSERT_EQ(f32_to_f16(f16_to_f32(h)), h) << hex(c);
    }
  }
}

}  // namespace
}  // namespace moeserve
