// Host versions of attend_mma.cuh's PTX wrappers (its block under UNS_ATTEND_MMA_EMULATED), on
// cta_emulator.h's warps. The fragment layouts are the PTX ISA's:
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 b16 matrix i; lane l receives
//     elements (l / 4, 2 (l % 4) + {0, 1}) of each (.trans: (2 (l % 4) + {0, 1}, l / 4)).
//   mma m16n8k16 (g = lane / 4, t = lane % 4): A a0 = (g, 2t..), a1 = (g + 8, 2t..),
//     a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..); B b0 = (k 2t.., n g), b1 = (k 2t + 8.., n g);
//     C/D c0, c1 = (g, 2t + {0, 1}), c2, c3 = (g + 8, 2t + {0, 1}); lower column in the low half.
// cp.async lands at the issue or, in deferred mode, at this thread's wait (what a missing wait
// would read is then stale). Alignment is checked as the hardware requires it.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cta_emulator.h"

namespace unshackle::cuda::attend_mma {

inline unsigned char* dynamic_shared() {
  alignas(128) static unsigned char memory[size_t{1} << 18];
  return memory;
}

namespace emulated {

inline uint32_t load_u16(uint64_t address) {
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const void*>(address), 2);
  return v;
}
inline float bf16_half(uint32_t word, int half) { return __uint_as_float((half ? word >> 16 : word & 0xffffu) << 16); }

inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
  emu::Slot* slots = emu::warp_slots();
  const int l = emu::lane();
  if (reinterpret_cast<uintptr_t>(row) % 16) {
    std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
    std::abort();
  }
  slots[l].address = reinterpret_cast<uint64_t>(row);
  emu::warp_barrier();
  for (int i = 0; i < 4; ++i) {
    uint32_t lo, hi;
    if (!trans) {
      const uint64_t a = slots[i * 8 + l / 4].address;
      lo = load_u16(a + 2 * (2 * (l % 4)));
      hi = load_u16(a + 2 * (2 * (l % 4) + 1));
    } else {
      lo = load_u16(slots[i * 8 + 2 * (l % 4)].address + 2 * (l / 4));
      hi = load_u16(slots[i * 8 + 2 * (l % 4) + 1].address + 2 * (l / 4));
    }
    r[i] = lo | (hi << 16);
  }
  emu::warp_barrier();
}

inline void copy(void* dst, const void* src, int bytes, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % static_cast<uintptr_t>(bytes) ||
      (valid && reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes))) {
    std::fprintf(stderr, "cp.async: address not %d-byte aligned\n", bytes);
    std::abort();
  }
  unsigned char data[16] = {};
  if (valid) std::memcpy(data, src, static_cast<size_t>(bytes));
  const auto land = [dst, bytes, data] { std::memcpy(dst, data, static_cast<size_t>(bytes)); };
  if (emu::state.deferred_cp_async) emu::state.current->pending.push_back(land);
  else land();
}

}  // namespace emulated

inline uint32_t shared_address(const void*) { return 0; }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emulated::ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emulated::ldmatrix(r, row, true); }

// Products of bf16 values are exact in fp32; the sum runs in k order (the hardware's order and
// internal precision differ, by far less than the tests' bf16 bounds).
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Slot* slots = emu::warp_slots();
  const int l = emu::lane();
  for (int i = 0; i < 4; ++i) slots[l].words[i] = a[i];
  slots[l].words[4] = b0;
  slots[l].words[5] = b1;
  emu::warp_barrier();
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    const uint32_t* w = slots[lane].words;
    for (int j = 0; j < 2; ++j) {
      A[g][2 * t + j] = emulated::bf16_half(w[0], j);
      A[g + 8][2 * t + j] = emulated::bf16_half(w[1], j);
      A[g][2 * t + 8 + j] = emulated::bf16_half(w[2], j);
      A[g + 8][2 * t + 8 + j] = emulated::bf16_half(w[3], j);
      B[2 * t + j][g] = emulated::bf16_half(w[4], j);
      B[2 * t + 8 + j][g] = emulated::bf16_half(w[5], j);
    }
  }
  const int g = l / 4, t = l % 4;
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float acc = d[e];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    out[e] = acc;
  }
  emu::warp_barrier();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

inline void cp_async_16(void* dst, const void* src, bool valid) { emulated::copy(dst, src, 16, valid); }
inline void cp_async_8(void* dst, const void* src) { emulated::copy(dst, src, 8, true); }
inline void cp_async_4(void* dst, const void* src) { emulated::copy(dst, src, 4, true); }
inline void cp_async_wait_all() {
  for (auto& land : emu::state.current->pending) land();
  emu::state.current->pending.clear();
}

}  // namespace unshackle::cuda::attend_mma
