// A host emulator of CUDA thread blocks, enough to run a kernel body written for the device on
// a machine without a GPU (kernels_mma_emulated_test): every CUDA thread is a fiber with its own
// stack on one OS thread, switched cooperatively; __syncthreads() and the warp collectives are
// barriers of the scheduler, blocks run one after the other. Warp collectives (shuffles here,
// ldmatrix / mma / cp.async in ptx_emulated.h) exchange values through per-warp slots between
// two warp barriers, so every lane sees the others' operands as the hardware would.
//
// Include it before any kernel header: it takes the CUDA keywords (__device__, __global__,
// __shared__ = static: one copy shared by the block's fibers, blocks being sequential) and the
// builtin variables (threadIdx, blockIdx, blockDim, gridDim). x86-64 only (the fiber switch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __device__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// Saves the callee-saved registers and the stack pointer into *save_sp, resumes at new_sp.
extern "C" void uns_emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl uns_emu_switch
.type uns_emu_switch,@function
uns_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");

namespace unshackle::emu {

enum class Wait : uint8_t { kNone, kBlock, kWarp };

struct Fiber {
  void* sp = nullptr;
  std::vector<char> stack;
  dim3 thread_idx;
  int tid = 0;
  bool done = false;
  Wait wait = Wait::kNone;
  std::vector<std::function<void()>> pending;  // cp.async copies not yet landed (deferred mode)
};

// One word exchange area per thread for the warp collectives.
struct Slot {
  uint64_t address;
  uint32_t words[8];
};

struct State {
  std::vector<Fiber> fibers;
  std::vector<Slot> slots;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::function<void()> body;
  dim3 block_idx, block_dim, grid_dim;
  bool deferred_cp_async = false;  // land cp.async copies at the wait (true) or at the issue
};
inline State state;

inline void yield() { uns_emu_switch(&state.current->sp, state.scheduler_sp); }

[[noreturn]] inline void fiber_entry() {
  state.body();
  state.current->done = true;
  yield();
  std::abort();  // a finished fiber is never resumed
}

inline void block_barrier() {
  state.current->wait = Wait::kBlock;
  yield();
}
inline void warp_barrier() {
  state.current->wait = Wait::kWarp;
  yield();
}
inline int lane() { return state.current->tid % 32; }
inline Slot* warp_slots() { return &state.slots[static_cast<size_t>(state.current->tid / 32 * 32)]; }

// Runs `body` as every thread of block `block` (threads.x * y * z, a multiple of 32).
inline void run_block(dim3 block, dim3 threads, const std::function<void()>& body) {
  const int n = static_cast<int>(threads.x * threads.y * threads.z);
  state.block_idx = block;
  state.block_dim = threads;
  state.fibers.resize(static_cast<size_t>(n));  // stacks are kept from block to block
  state.slots.assign(static_cast<size_t>(n), Slot{});
  state.body = body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = state.fibers[static_cast<size_t>(i)];
    f.tid = i;
    f.thread_idx = dim3(i % threads.x, (i / threads.x) % threads.y, i / (threads.x * threads.y));
    f.done = false;
    f.wait = Wait::kNone;
    f.pending.clear();
    f.stack.resize(size_t{1} << 17);
    auto* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15});
    *--sp = 0;                                              // fiber_entry's return address (never used)
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);       // where the first switch returns to
    for (int r = 0; r < 6; ++r) *--sp = 0;                  // the six callee-saved registers
    f.sp = sp;
  }
  for (;;) {
    bool progress = false, all_done = true;
    for (Fiber& f : state.fibers) {
      if (f.done) continue;
      all_done = false;
      if (f.wait != Wait::kNone) continue;
      state.current = &f;
      uns_emu_switch(&state.scheduler_sp, f.sp);
      state.current = nullptr;
      progress = true;
    }
    if (all_done) return;
    for (int w = 0; w * 32 < n; ++w) {  // a warp barrier opens when all 32 lanes wait at one
      Fiber* lanes = &state.fibers[static_cast<size_t>(w * 32)];
      bool all = true;
      for (int l = 0; l < 32 && all; ++l) all = !lanes[l].done && lanes[l].wait == Wait::kWarp;
      if (!all) continue;
      for (int l = 0; l < 32; ++l) lanes[l].wait = Wait::kNone;
      progress = true;
    }
    bool all = true;
    for (const Fiber& f : state.fibers) all = all && !f.done && f.wait == Wait::kBlock;
    if (all) {
      for (Fiber& f : state.fibers) f.wait = Wait::kNone;
      progress = true;
    }
    if (!progress) {
      std::fprintf(stderr, "emulator: block (%u, %u, %u) is stuck: a barrier not reached by every thread\n", block.x,
                   block.y, block.z);
      std::abort();
    }
  }
}

inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body) {
  state.grid_dim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(dim3(x, y, z), threads, body);
}

}  // namespace unshackle::emu

#define threadIdx (::unshackle::emu::state.current->thread_idx)
#define blockIdx (::unshackle::emu::state.block_idx)
#define blockDim (::unshackle::emu::state.block_dim)
#define gridDim (::unshackle::emu::state.grid_dim)

inline void __syncthreads() { unshackle::emu::block_barrier(); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
// The hardware's approximate sine/cosine (|error| < 2^-21.4) stands in as the accurate one.
inline void __sincosf(float a, float* s, float* c) { ::sincosf(a, s, c); }
template <typename T>
inline T atomicMax(T* a, T v) { const T old = *a; if (v > old) *a = v; return old; }
template <typename T>
inline T atomicMin(T* a, T v) { const T old = *a; if (v < old) *a = v; return old; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  auto* slots = unshackle::emu::warp_slots();
  const int lane = unshackle::emu::lane();
  std::memcpy(&slots[lane].words[0], &v, 4);
  unshackle::emu::warp_barrier();
  float other;
  std::memcpy(&other, &slots[lane ^ lane_mask].words[0], 4);
  unshackle::emu::warp_barrier();
  return other;
}
