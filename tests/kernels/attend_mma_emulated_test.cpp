// The tensor-core chunk kernel (kernels/cuda/attend_mma.cuh) run on the host, for machines and
// CI without a GPU: every CUDA thread a fiber (emulated/cta_emulator.h), ldmatrix, mma and
// cp.async emulated with the PTX ISA's fragment layouts (emulated/ptx_emulated.h), the launch
// as attend.cu makes it (attend_mma::plan, the query rotation, the LSE merge), against the CPU
// backend within tolerance::kBF16Mma. It checks the kernel's indexing, masks, online softmax,
// splits and pipeline order (cp.async landing only at the wait); kernels_cuda_test's
// ChunkAttend* cases check the same on the real instructions.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "test_data.h"
#include "tolerance.h"
#include "unshackle/kernels/attention_config.h"
#include "unshackle/kernels/backend.h"
#include "unshackle/kernels/params.h"

#define UNS_ATTEND_MMA_EMULATED 1
#include "emulated/ptx_emulated.h"  // before the kernel headers: it takes the CUDA keywords
#include "attend_mma.cuh"
#include "merge.cuh"

namespace unshackle {
namespace {

using testing::normal_vector;
using testing::relative_error;

// attend.cu's run_mma on the emulator; `slots` stands for occupancy x SMs (small: many splits).
template <int D>
void emulated_attend(const AttendParams& p, int64_t slots) {
  using C = cuda::attend_mma::Config<D>;
  const cuda::attend_mma::Plan plan = cuda::attend_mma::plan<D>(p, slots);
  const int64_t M = static_cast<int64_t>(p.l_C) * (p.H / p.G);
  const size_t rows = static_cast<size_t>(p.l_C) * p.H;
  std::vector<__nv_bfloat16> q_rot(static_cast<size_t>(p.G * M) * D);
  std::vector<float> parts(plan.splits > 1 ? rows * plan.splits * (D + 1) : 0, std::nanf(""));
  cuda::attend_mma::Outputs out{p.o, p.lse, 1};
  if (plan.splits > 1) out = {parts.data(), parts.data() + rows * plan.splits * D, plan.splits};
  emu::launch(dim3(3), dim3(64), [&] { cuda::attend_mma::prepare_queries_kernel(p, q_rot.data()); });
  emu::launch(dim3(static_cast<unsigned>(plan.query_tiles), static_cast<unsigned>(p.G), static_cast<unsigned>(plan.splits)),
              dim3(C::kThreads), [&] { cuda::attend_mma::attend_mma_kernel<D>(p, q_rot.data(), plan.rows_per_split, out); });
  if (plan.splits > 1) {
    const cuda::merge::Shape shape = cuda::merge::merge_shape(D, plan.splits);
    emu::launch(dim3(static_cast<unsigned>(rows)), dim3(shape.threads), [&] {
      cuda::merge::merge_kernel(out.o, out.lse, plan.splits, 1, plan.splits, D, shape, p.o, p.lse);
    });
  }
}

struct Case {
  int l_C;
  int64_t n;
  int d, group, G;
  bool global, causal, rows;
  int64_t token0;        // token of store row 0; tokens ascend by one
  int64_t query_lag;     // the chunk starts this many tokens before the last l_C of the store
  int64_t slots;         // emulated occupancy x SMs
  int pad_every;         // > 0: every pad_every-th rows entry is padding (< 0)
};

std::string name(const Case& cs) {
  return "l_C " + std::to_string(cs.l_C) + " n " + std::to_string(cs.n) + " d " + std::to_string(cs.d) + " group " +
         std::to_string(cs.group) + " G " + std::to_string(cs.G) + (cs.global ? " global" : " relative") +
         (cs.causal ? " causal" : " full") + (cs.rows ? " rows" : " contiguous") + " slots " + std::to_string(cs.slots) +
         " pad " + std::to_string(cs.pad_every);
}

std::vector<uint16_t> to_bf16(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = float_to_bf16(x[i]);
  return out;
}

void check(const Case& cs, bool deferred) {
  SCOPED_TRACE(name(cs) + (deferred ? " (cp.async lands at the wait)" : " (cp.async lands at the issue)"));
  emu::state.deferred_cp_async = deferred;
  const int H = cs.G * cs.group;
  const int64_t store = cs.n + 40;
  const size_t width = static_cast<size_t>(cs.G) * cs.d;
  const auto kb = to_bf16(normal_vector(static_cast<size_t>(store) * width, 400 + static_cast<uint64_t>(cs.n)));
  const auto vb = to_bf16(normal_vector(static_cast<size_t>(store) * width, 401 + static_cast<uint64_t>(cs.n)));
  const auto q = normal_vector(static_cast<size_t>(cs.l_C) * H * cs.d, 402, 0.5f);
  std::vector<int64_t> tokens(static_cast<size_t>(store));
  std::iota(tokens.begin(), tokens.end(), cs.token0);
  std::vector<int32_t> rows;  // padding entries < 0: skipped by the CPU backend too
  for (int64_t i = 0; i < (cs.rows ? cs.n : 0); ++i) {
    const bool pad = cs.pad_every > 0 && i % cs.pad_every == 0;
    rows.push_back(pad ? (i % 2 ? -1 : INT32_MIN) : static_cast<int32_t>((i * 7919 + 3) % store));
  }
  const auto inv = rope_inv_freq(cs.d, 500000.0);
  const size_t outs = static_cast<size_t>(cs.l_C) * H;
  std::vector<float> want_o(outs * cs.d), want_lse(outs), got_o(outs * cs.d, std::nanf("")), got_lse(outs, std::nanf(""));
  const int64_t q_token0 = cs.token0 + store - cs.l_C - cs.query_lag;
  AttendParams p{.q = q.data(), .q_token0 = q_token0, .k = kb.data(), .v = vb.data(), .kv_dtype = DType::kBF16,
                 .key_tokens = tokens.data(), .rows = cs.rows ? rows.data() : nullptr, .n = cs.n, .l_C = cs.l_C, .H = H, .G = cs.G, .d = cs.d,
                 .causal = cs.causal, .positions = cs.global ? PositionScheme::kGlobal : PositionScheme::kRelative,
                 .origin = cs.token0 > 1000 ? 0 : std::min(cs.token0, q_token0) / 2,
                 .query_position = cs.token0 > 1000 ? 1048100 : 4096, .inv_freq = inv.data(),
                 .scale = 1.0f / std::sqrt(static_cast<float>(cs.d)), .o = want_o.data(), .lse = want_lse.data()};
  make_cpu_backend()->attend(p);
  AttendParams e = p;
  e.o = got_o.data();
  e.lse = got_lse.data();
  if (cs.d == 64) emulated_attend<64>(e, cs.slots);
  else emulated_attend<128>(e, cs.slots);

  std::vector<float> go, wo, gl, wl;
  size_t empty_wrong = 0;
  for (size_t r = 0; r < outs; ++r) {
    const auto at = [&](const std::vector<float>& o) { return o.begin() + static_cast<std::ptrdiff_t>(r * cs.d); };
    if (want_lse[r] == -INFINITY) {
      empty_wrong += got_lse[r] != -INFINITY || std::any_of(at(got_o), at(got_o) + cs.d, [](float x) { return x != 0.0f; });
      continue;
    }
    go.insert(go.end(), at(got_o), at(got_o) + cs.d);
    wo.insert(wo.end(), at(want_o), at(want_o) + cs.d);
    gl.push_back(got_lse[r]);
    wl.push_back(want_lse[r]);
  }
  EXPECT_EQ(empty_wrong, 0u) << "rows that see no key must give o = 0, lse = -inf";
  if (wl.empty()) return;
  EXPECT_LT(relative_error(go, wo), tolerance::kBF16Mma) << testing::first_offenders(go, wo, 3e-2);
  EXPECT_LT(relative_error(gl, wl), tolerance::kBF16Mma) << testing::first_offenders(gl, wl, 3e-2);
}

// Every shape class of the device test at sizes the emulator runs in seconds: d 64/128
// (two warp layouts), groups 1/2/3/4/8, both schemes, causal or not, rows or contiguous, one or
// several splits (the LSE merge), n 0 and 1, queries that see nothing, padding rows and an all-
// padding tile, positions near 1,048,000, a query tile only partly filled.
TEST(AttendMmaEmulated, AgainstCpuBackend) {
  const Case cases[] = {
      {16, 0, 128, 4, 2, true, false, true, 0, 0, 264, 0},
      {16, 1, 64, 1, 4, false, true, false, 1048000, 0, 264, 0},
      {16, 97, 128, 8, 2, false, true, true, 1048000, 0, 264, 0},
      {33, 97, 64, 4, 2, true, false, true, 5, 0, 264, 0},
      {33, 97, 128, 2, 3, false, true, true, 40, 110, 264, 0},
      {20, 300, 64, 3, 2, false, true, true, 50, 0, 8, 0},
      {24, 700, 128, 4, 1, true, false, true, 1048000, 0, 64, 0},
      {40, 330, 64, 8, 1, false, true, false, 999000, 0, 16, 0},
      {64, 97, 128, 1, 1, false, true, false, 1000, 0, 264, 0},
      {24, 400, 128, 4, 2, false, true, true, 1048000, 0, 32, 7},
      {17, 200, 64, 4, 1, true, false, true, 3, 0, 264, 1},  // every entry padding
  };
  for (const Case& cs : cases) check(cs, true);
  check(cases[9], false);
}

// A whole 64-row tile of padding inside a split, and padding at both ends.
TEST(AttendMmaEmulated, PaddingTileAndEnds) {
  const Case cs{24, 320, 128, 4, 1, false, true, true, 1048000, 0, 264, 0};
  const int64_t store = cs.n + 40;
  SCOPED_TRACE(name(cs));
  emu::state.deferred_cp_async = true;
  const int H = cs.group;
  const size_t width = static_cast<size_t>(cs.d);
  const auto kb = to_bf16(normal_vector(static_cast<size_t>(store) * width, 500));
  const auto vb = to_bf16(normal_vector(static_cast<size_t>(store) * width, 501));
  const auto q = normal_vector(static_cast<size_t>(cs.l_C) * H * cs.d, 502, 0.5f);
  std::vector<int64_t> tokens(static_cast<size_t>(store));
  std::iota(tokens.begin(), tokens.end(), cs.token0);
  std::vector<int32_t> rows;
  for (int64_t i = 0; i < cs.n; ++i) {
    const bool pad = i == 0 || i == cs.n - 1 || (i >= 128 && i < 192);
    rows.push_back(pad ? -1 : static_cast<int32_t>((i * 7919 + 3) % store));
  }
  const auto inv = rope_inv_freq(cs.d, 500000.0);
  const size_t outs = static_cast<size_t>(cs.l_C) * H;
  std::vector<float> want_o(outs * cs.d), want_lse(outs), got_o(outs * cs.d, std::nanf("")), got_lse(outs, std::nanf(""));
  AttendParams p{.q = q.data(), .q_token0 = cs.token0 + store - cs.l_C, .k = kb.data(), .v = vb.data(),
                 .kv_dtype = DType::kBF16, .key_tokens = tokens.data(), .rows = rows.data(), .n = cs.n, .l_C = cs.l_C, .H = H, .G = 1, .d = cs.d, .causal = true,
                 .positions = PositionScheme::kRelative, .origin = 0, .inv_freq = inv.data(),
                 .scale = 1.0f / std::sqrt(static_cast<float>(cs.d)), .o = want_o.data(), .lse = want_lse.data()};
  make_cpu_backend()->attend(p);
  AttendParams e = p;
  e.o = got_o.data();
  e.lse = got_lse.data();
  emulated_attend<128>(e, 264);
  EXPECT_LT(relative_error(got_o, want_o), tolerance::kBF16Mma) << testing::first_offenders(got_o, want_o, 3e-2);
  EXPECT_LT(relative_error(got_lse, want_lse), tolerance::kBF16Mma);
}

}  // namespace
}  // namespace unshackle
