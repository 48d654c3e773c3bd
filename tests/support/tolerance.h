// SPEC §8 tolerances, written down once. Norm-relative error ||out - ref|| / ||ref|| against
// a float64 reference.
#pragma once

namespace unshackle::tolerance {

// fp32 storage and arithmetic: rounding of a few thousand-term sums (unit roundoff 6e-8
// times sqrt(terms) times the cancellation of random data) stays well under this.
inline constexpr double kF32 = 1e-5;
// bf16 storage (8 bits of mantissa, unit roundoff 3.9e-3) with fp32 accumulation.
inline constexpr double kBF16 = 1e-2;
// SPEC §7: P ranks merge partials in another order than one rank; float32 merge rounding.
inline constexpr double kDistributed = 1e-5;

}  // namespace unshackle::tolerance
