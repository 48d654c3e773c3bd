// SPEC §8 tolerances, written down once. Norm-relative error ||out - ref|| / ||ref|| against
// a float64 reference.
#pragma once

namespace unshackle::tolerance {

// fp32 storage and arithmetic: rounding of a few thousand-term sums (unit roundoff 6e-8
// times sqrt(terms) times the cancellation of random data) stays well under this.
inline constexpr double kF32 = 1e-5;
// bf16 storage (8 bits of mantissa, unit roundoff 3.9e-3) with fp32 accumulation.
inline constexpr double kBF16 = 1e-2;
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
