// SPEC §7 placement of one context's tokens over P ranks: blocks of kv_block tokens, block b
// on rank b mod P (round-robin keeps ranks balanced as a context grows). A rank also keeps the
// scoring keys k' of its halo: other ranks' tokens within eps of a token it owns, so that
// proximity influence is exact at block edges.
//
// Ranges are half-open [begin, end), ascending, disjoint and never adjacent (touching ranges
// are merged), so P = 1 owns the single range [0, n).
#pragma once

#include <cstdint>
#include <vector>

namespace unshackle {

struct TokenRange {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
  bool contains(int64_t token) const { return token >= begin && token < end; }
  bool operator==(const TokenRange&) const = default;
};

struct Placement {
  int ranks = 1;
  int64_t kv_block = 256;  // tokens per block
  int64_t eps = 0;         // proximity reach in tokens (SPEC §3)

  // Throws Error(kInvalidArgument) unless ranks > 0, kv_block > 0, eps >= 0.
  void validate() const;

  int owner_rank(int64_t token) const { return static_cast<int>((token / kv_block) % ranks); }
  bool owns(int rank, int64_t token) const { return owner_rank(token) == rank; }

  // Tokens of [0, n) that `rank` owns.
  std::vector<TokenRange> owned_ranges(int rank, int64_t n) const;
  int64_t owned_count(int rank, int64_t n) const;

  // Tokens of [0, n) that other ranks own and that lie within eps of a token of [0, n) that
  // `rank` owns. While a context grows, halo_ranges(rank, n + eps) clipped to [0, n) is what
  // must be kept of the first n tokens (a later owned token reaches back eps).
  std::vector<TokenRange> halo_ranges(int rank, int64_t n) const;
  bool in_halo(int rank, int64_t token, int64_t n) const;
};

}  // namespace unshackle
