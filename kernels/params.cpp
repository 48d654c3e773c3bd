#include "unshackle/kernels/params.h"

#include "unshackle/common/check.h"

namespace unshackle {

void CompressQueryParams::check() const {
  UNS_CHECK(q && inv_freq && q_out, "compress_query: null pointer");
  UNS_CHECK(l_C >= 0 && H > 0 && G > 0 && H % G == 0 && d > 0 && d % 2 == 0, "compress_query: bad shape");
  UNS_CHECK(wq ? d_c > 0 : d_c == G * d, "compress_query: d_c {} (exact fold needs G*d = {})", d_c, G * d);
}

void CompressKeysParams::check() const {
  UNS_CHECK(n == 0 || (k && wk && kc_out), "compress_keys: null pointer");
  UNS_CHECK(n >= 0 && G > 0 && d > 0 && d_c > 0, "compress_keys: bad shape");
}

void ScoreParams::check() const {
  UNS_CHECK(qc && (n == 0 || kc), "score: null pointer");
  UNS_CHECK(n >= 0 && l_C > 0 && d_c > 0, "score: bad shape n={} l_C={} d_c={}", n, l_C, d_c);
}

void ProximityParams::check() const {
  UNS_CHECK(n == 0 || (score && tokens && out && out != score), "proximity: bad pointers");
  UNS_CHECK(n >= 0 && eps >= 0, "proximity: bad shape");
}

void TopKParams::check() const {
  // out_count may be null: the caller reads the count from the -1 padding of out_tokens, and
  // the CUDA backend then queues the op without synchronising.
  UNS_CHECK((k == 0 || (out_values && out_tokens)) && (n == 0 || (values && tokens)),
            "top_k: null pointer");
  UNS_CHECK(n >= 0 && k >= 0, "top_k: bad shape n={} k={}", n, k);
}

void RowsOfTokensParams::check() const {
  UNS_CHECK((initial_end == initial_begin && k == 0) || rows_out, "rows_of_tokens: null rows_out");
  UNS_CHECK((k == 0 || selected) && (search_end == search_begin || tokens), "rows_of_tokens: null pointer");
  UNS_CHECK(k >= 0 && 0 <= search_begin && search_begin <= search_end && 0 <= initial_begin && initial_begin <= initial_end,
            "rows_of_tokens: bad ranges k={} search [{}, {}) initial [{}, {})", k, search_begin, search_end, initial_begin,
            initial_end);
  UNS_CHECK(search_end <= INT32_MAX && initial_end <= INT32_MAX && initial_end - initial_begin + k <= INT32_MAX,
            "rows_of_tokens: rows beyond int32");
}

void AttendParams::check() const {
  UNS_CHECK(q && o && lse && inv_freq, "attend: null pointer");
  UNS_CHECK(n == 0 || (k && v && key_tokens), "attend: null key/value pointer");
  UNS_CHECK(l_C > 0 && H > 0 && G > 0 && H % G == 0 && d > 0 && d % 2 == 0 && n >= 0, "attend: bad shape");
}

void MergeParams::check() const {
  UNS_CHECK(o && (rows == 0 || (o_parts && lse_parts)), "merge: null pointer");
  UNS_CHECK(n_parts > 0 && rows >= 0 && d > 0, "merge: bad shape");
}

void LagExtremaParams::check() const {
  UNS_CHECK(extrema && (n == 0 || (k && v)), "lag_reference_extrema: null pointer");
  UNS_CHECK(n >= 0 && G > 0 && d > 0, "lag_reference_extrema: bad shape");
}

void LagStdParams::check() const {
  UNS_CHECK(extrema && (n == 0 || (k && v && token_std)), "lag_token_std: null pointer");
  UNS_CHECK(n >= 0 && G > 0 && d > 1, "lag_token_std: bad shape (d must be > 1 for an unbiased std)");
}

void LagScoreParams::check() const {
  UNS_CHECK(lag == 0 || (token_std && score), "lag_partition_scores: null pointer");
  UNS_CHECK(lag >= 0 && G > 0, "lag_partition_scores: bad shape");
}

}  // namespace unshackle
