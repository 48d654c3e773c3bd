// SPEC §8 tolerances, written down once. Norm-relative error ||out - ref|| / ||ref|| against
// a float64 reference.
#pragma once

namespace unshackle::tolerance {

// fp32 storage and arithmetic: rounding of a few thousand-term sums (unit roundoff 6e-8
// times sqrt(terms) times the cancellation of random data) stays well under this.
inline constexpr double kF32 = 1e-5;
// bf16 storage (8 bits of mantissa, unit roundoff 3.9e-3) with fp32 accumulation.
inline constexpr double kBF16 = 1e-2;
// Tensor-core chunk scores (kernels/cuda/score_mma.cuh), per element, not norm-relative:
// |s - s_ref| <= kSplitBF16Score * |k'_m| * |q'_c|. q' is split into bf16 hi + lo, which misses
// q by <= 2^-18 |q| per channel (two bf16 roundings, 2^-9 each); every product with the bf16 k'
// is exact; the fp32 accumulator takes d_c / 8 MMA steps (hi and lo, 16 channels each), whose
// alignment may truncate each of its 17 terms by < 2^-23 of the step's largest, which is at most
// sum_i |k_i q_i| <= |k| |q|. Signs are random, so those errors random-walk rather than add (all
// in one direction would be ~2^-14 at d_c = 256); a CPU emulation of that truncating
// accumulator on the test's own data reached 2^-19.1 (docs/kernels_notes.md). 2^-16 leaves
// 8x over it, and a dropped lo part (~2^-9 |q_i| per channel) lands far outside.
inline constexpr double kSplitBF16Score = 0x1p-16;
// bf16 tensor-core attention (CUDA attend over chunks, kernels/cuda/attend_mma.cuh): Q, the
// rotated K and the softmax weights P are rounded to bf16 for the MMAs (u = 2^-8), every sum is
// fp32. Each rounding moves a softmax weight by a relative ~u/sqrt(3) rms at random sign: P's
// own, and Q's and K's through the logit, in proportion to its size (rms 0.5 in the tests).
// The norm-relative error of o is then ~ u/sqrt(3) * sqrt(1 + 2 * 0.5^2) = 2.8e-3 for any
// number of keys (o itself and its error both shrink as 1/sqrt(keys)); lse moves by the mean
// logit error. Bound 2u on both, ~3x that estimate; one key of 6800 missing is 1.2e-2.
inline constexpr double kBF16Mma = 2.0 / 256;
// SPEC §7: P ranks merge partials in another order than one rank; float32 merge rounding.
inline constexpr double kDistributed = 1e-5;

}  // namespace unshackle::tolerance
