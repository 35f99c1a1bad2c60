// Paged attention on the CPU for query tokens that each read their own keys (decode tokens, short
// chunks): jaxllm/attention/cpu/__init__.py calls it through the XLA FFI from inside a jitted step.
//
// Why a kernel: in jnp (jaxllm/attention/reference.py) every KV chunk is first gathered out of the
// paged cache into a new array, and XLA:CPU's gathers, transposes and tiny [g, D] x [D, C] dots run
// at 3-7 GB/s there. This reads each key and value row where it lies in its block, once, and only
// the rows in [lo, hi): unused or stale blocks (NaN in the tests) are never touched.
//
// Layout: q [T, nH, D]; k, v [num_blocks, block_size, nKV, D]; block_tables [S, max_blocks];
// per token t: seq[t] (its block-table row), key positions [lo[t], hi[t]) (hi <= lo: zeros out).
// Query head h reads KV head h / (nH / nKV). Work is split over (token, KV head) pairs between
// the calling thread and XLA's intra-op thread pool. f32 throughout; online softmax per block.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxGroup = 16;   // query heads per KV head
constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlock = 64;   // positions per cache block

struct Problem {
  const float* q;        // [T, nH, D]
  const float* k;        // [NB, bs, nKV, D]
  const float* v;
  const int32_t* block_tables;  // [S, MB]
  const int32_t* seq;    // [T]
  const int32_t* lo;     // [T]
  const int32_t* hi;     // [T]
  float* out;            // [T, nH, D]
  int64_t T, nH, nKV, D, bs, MB, NB;
  float sm_scale, soft_cap;
};

// Online softmax of one token's g query heads of KV head kh over key positions [lo, hi).
// Block tables are clamped into range, as the jnp reference clamps them.
void AttendOne(const Problem& p, int64_t t, int64_t kh) {
  const int64_t g = p.nH / p.nKV, D = p.D, bs = p.bs;
  float* o = p.out + (t * p.nH + kh * g) * D;
  const int32_t lo = p.lo[t], hi = p.hi[t];
  if (hi <= lo) {
    std::fill(o, o + g * D, 0.0f);
    return;
  }
  const float* q = p.q + (t * p.nH + kh * g) * D;
  float acc[kMaxGroup][kMaxHeadDim];
  float m[kMaxGroup], l[kMaxGroup], s[kMaxGroup][kMaxBlock];
  for (int64_t i = 0; i < g; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    std::fill(acc[i], acc[i] + D, 0.0f);
  }
  const int32_t* table = p.block_tables + int64_t(p.seq[t]) * p.MB;
  for (int64_t b = lo / bs; b * bs < hi; ++b) {
    const int64_t first = std::max<int64_t>(lo, b * bs), last = std::min<int64_t>(hi, (b + 1) * bs);
    const int64_t block = std::clamp<int64_t>(table[std::min<int64_t>(b, p.MB - 1)], 0, p.NB - 1);
    const int64_t n = last - first;
    const float* kb = p.k + ((block * bs + (first - b * bs)) * p.nKV + kh) * D;
    const float* vb = p.v + ((block * bs + (first - b * bs)) * p.nKV + kh) * D;
    const int64_t stride = p.nKV * D;  // between positions
    for (int64_t i = 0; i < g; ++i) {
      float mx = m[i];
      for (int64_t j = 0; j < n; ++j) {
        const float* kr = kb + j * stride;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += q[i * D + d] * kr[d];
        dot *= p.sm_scale;
        if (p.soft_cap > 0.0f) dot = p.soft_cap * std::tanh(dot / p.soft_cap);
        s[i][j] = dot;
        mx = std::max(mx, dot);
      }
      const float alpha = std::exp(m[i] - mx);
      m[i] = mx;
      l[i] *= alpha;
      for (int64_t d = 0; d < D; ++d) acc[i][d] *= alpha;
      for (int64_t j = 0; j < n; ++j) {
        const float e = std::exp(s[i][j] - mx);
        l[i] += e;
        const float* vr = vb + j * stride;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[i][d] += e * vr[d];
      }
    }
  }
  for (int64_t i = 0; i < g; ++i) {
    const float inv = 1.0f / l[i];
    for (int64_t d = 0; d < D; ++d) o[i * D + d] = acc[i][d] * inv;
  }
}

void AttendRange(const Problem& p, int64_t begin, int64_t end) {
  for (int64_t w = begin; w < end; ++w) AttendOne(p, w / p.nKV, w % p.nKV);
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> block_tables,
                ffi::Buffer<ffi::S32> seq, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                float sm_scale, float soft_cap, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), bd = block_tables.dimensions();
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), block_tables.typed_data(),
            seq.typed_data(), lo.typed_data(), hi.typed_data(), out->typed_data(),
            qd[0], qd[1], kd[2], qd[2], kd[1], bd[1], kd[0], sm_scale, soft_cap};
  if (p.nH % p.nKV || p.nH / p.nKV > kMaxGroup || p.D > kMaxHeadDim || p.bs > kMaxBlock)
    return ffi::Error::InvalidArgument("paged_attention: unsupported shape");
  // Chunks of (token, KV head) pairs are claimed from a shared counter by the calling thread and
  // by helper tasks on XLA's pool. The caller never waits for a task to *start* (the pool's
  // threads may all be busy, e.g. running other devices' steps, which would deadlock), only for
  // chunks a running thread has claimed to finish; the state is shared-owned, so a task that
  // starts after the call returned finds no work and touches nothing freed.
  struct Shared {
    Problem p;
    int64_t work, per, chunks;
    std::atomic<int64_t> next{0}, done{0};
  };
  const int64_t work = p.T * p.nKV;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), work));
  auto shared = std::make_shared<Shared>();
  shared->p = p;
  shared->work = work;
  shared->chunks = std::min<int64_t>(work, threads * 4);
  shared->per = shared->chunks ? (work + shared->chunks - 1) / shared->chunks : 0;
  auto run = [](Shared& s) {
    for (int64_t c; (c = s.next.fetch_add(1)) < s.chunks;) {
      AttendRange(s.p, c * s.per, std::min(s.work, (c + 1) * s.per));
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < threads; ++i) pool.Schedule([shared, run] { run(*shared); });
  run(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmPagedAttentionF32, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Ret<ffi::Buffer<ffi::F32>>());
