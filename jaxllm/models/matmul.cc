// f32 matmul against a weight packed once at load time, for the CPU: jaxllm/models/packed.py calls
// it through the XLA FFI for every projection of a step when the matmul backend is "cpu".
//
// Why: XLA:CPU's dots read a decode step's weights at 15-25 GB/s of the machine's 40-60 (rows
// 4-32), and a weight stored [K, N] row-major cannot be streamed column panel by column panel.
// Here the weight is packed into panels of kNR columns, w_packed [P, K, kNR] (P = ceil(N / kNR),
// the last panel's spare columns zero), so every weight read is sequential.
//
// x [M, K] row-major, out [M, N]. A work item is one panel against a chunk of up to kChunkRows
// rows (the chunk's x stays in L2, the panel too), spread over the calling thread and XLA's
// intra-op pool by ParallelFor (jaxllm/cpu_include/parallel_for.h). Inside an item a micro-tile
// keeps a kMR x kNR block of the result in registers over the whole K loop: each packed weight
// row, loaded once, meets kMR broadcast activations. Each output row is summed over k in order,
// alone, so a row's result does not depend on how many rows the call has or where the row sits.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kVec = 16;  // floats per register
constexpr int kMR = 8;    // rows per micro-tile: 8 x 3 accumulators + 3 weight vectors of 32 registers
#else
constexpr int kVec = 8;
constexpr int kMR = 4;    // 4 x 3 accumulators + 3 weight vectors of 16 registers
#endif
constexpr int kNV = 3;               // weight vectors per packed row
constexpr int kNR = kVec * kNV;      // columns per panel
constexpr int kChunkRows = 64;       // rows of one work item (its x chunk stays in L2)

typedef float VF __attribute__((vector_size(kVec * 4)));
inline VF Load(const float* x) {
  VF v;
  std::memcpy(&v, x, sizeof v);
  return v;
}
inline void Store(float* x, VF v) { std::memcpy(x, &v, sizeof v); }

// out[r, 0:ncols] = sum_k x[r, k] * panel[k, :] for kRows rows (ldx, ldo: row strides).
template <int kRows>
inline void MicroTile(const float* __restrict x, int64_t ldx, const float* __restrict panel, int64_t K,
                      float* __restrict out, int64_t ldo, int64_t ncols) {
  VF acc[kRows][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) acc[r][j] = VF{};
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * kNR;
    VF b[kNV];
#pragma GCC unroll 3
    for (int j = 0; j < kNV; ++j) {
      b[j] = Load(w + j * kVec);
#if defined(__x86_64__) && !defined(__AVX512F__)
      // Pin the weight vector in a register: with 16 ymm registers GCC otherwise folds the load
      // into each FMA, reloading every weight vector kMR times (16 loads per 12 FMAs on AVX2, a
      // load-port bound loop); pinned, the 4 x 24 tile runs 1.15-1.35x faster at 8-64 rows.
      asm("" : "+x"(b[j]));
#endif
    }
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      // x - 0 is x for every x (also -0), so this is one broadcast load; VF{} + x was not
      // foldable (-0 + 0 = +0) and put a scalar add before each broadcast (3-8% at 16-512 rows).
      const VF a = x[r * ldx + k] - VF{};
#pragma GCC unroll 3
      for (int j = 0; j < kNV; ++j) acc[r][j] += a * b[j];
    }
  }
  if (ncols == kNR) {
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 3
      for (int j = 0; j < kNV; ++j) Store(out + r * ldo + j * kVec, acc[r][j]);
  } else {
    for (int r = 0; r < kRows; ++r) {
      float tmp[kNR];
      for (int j = 0; j < kNV; ++j) Store(tmp + j * kVec, acc[r][j]);
      std::memcpy(out + r * ldo, tmp, ncols * sizeof(float));
    }
  }
}

template <int kRows>
void MicroTileDispatch(int rows, const float* x, int64_t ldx, const float* panel, int64_t K, float* out,
                       int64_t ldo, int64_t ncols) {
  if constexpr (kRows > 0) {
    if (rows == kRows) return MicroTile<kRows>(x, ldx, panel, K, out, ldo, ncols);
    return MicroTileDispatch<kRows - 1>(rows, x, ldx, panel, K, out, ldo, ncols);
  }
}

struct Problem {
  const float* x;
  const float* w;
  float* out;
  int64_t M, K, N, panels, chunks;
};

void RunItem(const Problem& p, int64_t item) {
  const int64_t panel = item % p.panels, chunk = item / p.panels;
  const float* w = p.w + panel * p.K * kNR;
  const int64_t n0 = panel * kNR, ncols = std::min<int64_t>(kNR, p.N - n0);
  const int64_t r_end = std::min<int64_t>(p.M, (chunk + 1) * kChunkRows);
  for (int64_t r = chunk * kChunkRows; r < r_end; r += kMR) {
    const int rows = static_cast<int>(std::min<int64_t>(kMR, r_end - r));
    MicroTileDispatch<kMR>(rows, p.x + r * p.K, p.K, w, p.K, p.out + r * p.N + n0, p.N, ncols);
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[2] != kNR || wd[1] != xd[1] || od[1] > wd[0] * kNR)
    return ffi::Error::InvalidArgument("matmul_packed: shapes do not match the packed layout");
  Problem p{x.typed_data(), w.typed_data(), out->typed_data(), xd[0], xd[1], od[1], wd[0], 0};
  p.chunks = (p.M + kChunkRows - 1) / kChunkRows;
  jaxllm::ParallelFor(pool, p.panels * p.chunks, [p](int64_t item) { RunItem(p, item); });
  return ffi::Error::Success();
}

}  // namespace

// The panel width this build packs for (48 with AVX-512, 24 otherwise): packed.py asks it.
extern "C" int JaxllmMatmulPanelWidth() { return kNR; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmMatmulPackedF32, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
