#include "unshackle/cluster/placement.h"

#include <algorithm>

#include "unshackle/common/check.h"

namespace unshackle {
namespace {

// Appends [begin, end) to sorted `out`, merging with the last range when they touch.
void append_merged(std::vector<TokenRange>& out, int64_t begin, int64_t end) {
  if (begin >= end) return;
  if (!out.empty() && begin <= out.back().end) {
    out.back().end = std::max(out.back().end, end);
    return;
  }
  out.push_back({begin, end});
}

}  // namespace

void Placement::validate() const {
  UNS_CHECK(ranks > 0, "placement: ranks must be > 0 (got {})", ranks);
  UNS_CHECK(kv_block > 0, "placement: kv_block must be > 0 (got {})", kv_block);
  UNS_CHECK(eps >= 0, "placement: eps must be >= 0 (got {})", eps);
}

std::vector<TokenRange> Placement::owned_ranges(int rank, int64_t n) const {
  validate();
  UNS_CHECK(rank >= 0 && rank < ranks, "placement: rank {} of {}", rank, ranks);
  std::vector<TokenRange> out;
  for (int64_t block = rank; block * kv_block < n; block += ranks)
    append_merged(out, block * kv_block, std::min((block + 1) * kv_block, n));
  return out;
}

int64_t Placement::owned_count(int rank, int64_t n) const {
  int64_t count = 0;
  for (const TokenRange& range : owned_ranges(rank, n)) count += range.size();
  return count;
}

std::vector<TokenRange> Placement::halo_ranges(int rank, int64_t n) const {
  const std::vector<TokenRange> owned = owned_ranges(rank, n);
  // Reach of every owned range, merged; then remove the owned ranges themselves.
  std::vector<TokenRange> reach;
  for (const TokenRange& range : owned)
    append_merged(reach, std::max<int64_t>(range.begin - eps, 0), std::min(range.end + eps, n));
  std::vector<TokenRange> out;
  size_t next = 0;  // first owned range not yet passed
  for (const TokenRange& span : reach) {
    int64_t cursor = span.begin;
    for (; next < owned.size() && owned[next].begin < span.end; ++next) {
      append_merged(out, cursor, owned[next].begin);
      cursor = owned[next].end;
    }
    append_merged(out, cursor, span.end);
  }
  return out;
}

bool Placement::in_halo(int rank, int64_t token, int64_t n) const {
  validate();
  if (token < 0 || token >= n || owns(rank, token)) return false;
  // Ownership repeats every ranks * kv_block tokens: no larger distance can find a new owner.
  const int64_t reach = std::min(eps, static_cast<int64_t>(ranks) * kv_block);
  for (int64_t e = 1; e <= reach; ++e)
    if ((token - e >= 0 && owns(rank, token - e)) || (token + e < n && owns(rank, token + e))) return true;
  return false;
}

}  // namespace unshackle
