// Seeded inputs that cannot pass by accident: never zeros, never from random_device, and
// built from (seed, global index) so that any rank count sees the same data (nccl-tests'
// verifiable/ idea).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace unshackle::testing {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1) from (seed, index).
inline double hashed_uniform(uint64_t seed, uint64_t index) {
  const uint64_t bits = splitmix64(splitmix64(seed) ^ (index * 0xd1b54a32d192ed03ull));
  return (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

// Standard normal from (seed, index) by Box-Muller.
inline float hashed_normal(uint64_t seed, uint64_t index) {
  const double u1 = hashed_uniform(seed, 2 * index), u2 = hashed_uniform(seed, 2 * index + 1);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

inline std::vector<float> normal_vector(size_t n, uint64_t seed, float scale = 1.0f, uint64_t first_index = 0) {
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = scale * hashed_normal(seed, first_index + i);
  return out;
}

// ||out - ref|| / ||ref|| in double; NaN anywhere gives +inf.
template <typename A, typename B>
double relative_error(const A& out, const B& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = static_cast<double>(out[i]), r = static_cast<double>(ref[i]);
    if (std::isnan(o) || std::isnan(r)) return INFINITY;
    num += (o - r) * (o - r);
    den += r * r;
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename V>
double norm(const V& values) {
  double s = 0;
  for (auto v : values) s += static_cast<double>(v) * static_cast<double>(v);
  return std::sqrt(s);
}

// The first `limit` elements whose difference exceeds `abs_tol + rel_tol * |ref|`, as text.
template <typename A, typename B>
std::string first_offenders(const A& out, const B& ref, double rel_tol, size_t limit = 10) {
  std::string text;
  size_t shown = 0;
  for (size_t i = 0; i < ref.size() && shown < limit; ++i) {
    const double o = static_cast<double>(out[i]), r = static_cast<double>(ref[i]);
    if (!(std::fabs(o - r) <= rel_tol * (std::fabs(r) + 1e-6))) {
      char line[128];
      std::snprintf(line, sizeof line, "  [%zu] out=%.9g ref=%.9g\n", i, o, r);
      text += line;
      ++shown;
    }
  }
  return text;
}

}  // namespace unshackle::testing
