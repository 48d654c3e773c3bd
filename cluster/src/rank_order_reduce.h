// Element-wise reduction of P gathered blocks in rank order, shared by the host
// communicators: every rank runs the same loop on the same bytes, so all get identical bits.
#pragma once

#include <algorithm>
#include <cstddef>

#include "unshackle/cluster/communicator.h"
#include "unshackle/common/check.h"

namespace unshackle::detail {

template <typename T>
void reduce_in_rank_order(T* out, const unsigned char* gathered, size_t count, int ranks, ReduceOp op) {
  const T* in = reinterpret_cast<const T*>(gathered);
  for (size_t i = 0; i < count; ++i) {
    T acc = in[i];
    for (int r = 1; r < ranks; ++r) {
      const T x = in[static_cast<size_t>(r) * count + i];
      acc = op == ReduceOp::kSum ? static_cast<T>(acc + x) : op == ReduceOp::kMax ? std::max(acc, x) : std::min(acc, x);
    }
    out[i] = acc;
  }
}

// Reduces `gathered` ([ranks][count] of dtype) into `out`.
inline void reduce_gathered(void* out, const unsigned char* gathered, size_t count, int ranks, DType dtype, ReduceOp op) {
  switch (dtype) {
    case DType::kF32: return reduce_in_rank_order(static_cast<float*>(out), gathered, count, ranks, op);
    case DType::kF64: return reduce_in_rank_order(static_cast<double*>(out), gathered, count, ranks, op);
    case DType::kI32: return reduce_in_rank_order(static_cast<int32_t*>(out), gathered, count, ranks, op);
    case DType::kI64: return reduce_in_rank_order(static_cast<int64_t*>(out), gathered, count, ranks, op);
    default: fail(ErrorKind::kUnsupported, fmt::format("all_reduce: dtype {} unsupported", dtype_name(dtype)));
  }
}

}  // namespace unshackle::detail
