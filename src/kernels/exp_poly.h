// The constants of the softmax's exp (kernels::softmax, reference::exp_lanes): exp(t) =
// p(r) * 2^n with n = round(t / ln 2) and r = t - n * ln 2 (ln 2 in two parts), p Cephes'
// degree-7 polynomial. One table, so the kernel and its reference compute the same function.
#pragma once

namespace moeserve::kernels::exp_poly {

inline constexpr float kMin = -87.33654f;     // ~ln(FLT_MIN): 2^n stays a normal float
inline constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
inline constexpr float kLog2e = 1.44269504f;
inline constexpr float kLn2Hi = -0.693359375f, kLn2Lo = 2.12194440e-4f;  // -ln 2, split
inline constexpr float kC[8] = {1.0f,
                                1.0f,
                                5.0000001201e-1f,
                                1.6666665459e-1f,
                                4.1665795894e-2f,
                                8.3334519073e-3f,
                                1.3981999507e-3f,
                                1.9875691500e-4f};

}  // namespace moeserve::kernels::exp_poly
