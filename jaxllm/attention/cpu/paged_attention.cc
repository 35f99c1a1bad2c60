// Ragged paged attention on the CPU, every token of a step (prefill chunks and decodes) in one
// call: jaxllm/attention/cpu/__init__.py calls it through the XLA FFI from inside a jitted step.
//
// Why a kernel: in jnp (jaxllm/attention/reference.py) every KV chunk is first gathered out of the
// paged cache into a new array, and XLA:CPU's gathers, transposes and tiny [g, D] x [D, C] dots run
// at 3-7 GB/s there; its per-step bookkeeping (which token belongs to which sequence, the tile
// schedule) is dozens of small ops, repeated in every layer. This reads each key and value row
// where it lies in its block, once per query tile, and only the rows a query may see: unused or
// stale blocks (NaN in the tests) are never touched.
//
// Layout: q [T, nH, D]; k, v [num_blocks, block_size, nKV, D]; kv_lens [S]; block_tables
// [S, max_blocks]; cu_q_lens [S + 1]. Sequence s owns tokens [cu_q_lens[s], cu_q_lens[s + 1]),
// its last q_len of kv_lens[s] positions; tokens past cu_q_lens[S] are padding (zeros out).
// Query head h reads KV head h / (nH / nKV). A work item is a tile of up to kTileTokens
// consecutive tokens of one sequence and one KV head: the tile's g * tokens query rows share
// every K/V row read (a decode is a tile of one token). Items are claimed one at a time from a
// shared counter by the calling thread and by tasks on XLA's intra-op pool (parallel_for.h).
// f32 throughout; online softmax per block.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 64;      // query rows (tokens x heads of one KV head) of a work item
constexpr int kTileTokens = 16;   // tokens of a prefill tile, at most (kMaxRows / group)
constexpr int kMaxGroup = 16;     // query heads per KV head
constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlock = 64;     // positions per cache block

// Eight floats as one GCC/Clang vector (one AVX2 register; the compiler splits it where the CPU
// has narrower ones). Loads and stores go through memcpy: rows need not be aligned. Sixteen-wide
// vectors (AVX-512, which this Zen 5 VM has) were tried: prefill tiles the same, decodes 0.80-0.85x.
typedef float V8 __attribute__((vector_size(32)));
inline V8 Load(const float* x) {
  V8 v;
  __builtin_memcpy(&v, x, sizeof v);
  return v;
}
inline void Store(float* x, V8 v) { __builtin_memcpy(x, &v, sizeof v); }
inline V8 Splat(float x) { return V8{x, x, x, x, x, x, x, x}; }
inline float Sum(V8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
typedef int32_t V8i __attribute__((vector_size(32)));

// exp(x) for x <= 0 (scores minus their running max), eight at a time: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by a degree-6 polynomial (Cephes' expf), 2^n built in the exponent bits.
// Relative error 8e-8 over [-87, 0] (checked against std::exp); below -87 (exp < 1.6e-38) the
// result is 0. libm's expf, one value at a
// time, was ~10% of a prefill tile's time.
inline V8 ExpNonPositive(V8 x) {
  const V8 lo = Splat(-87.0f);
  const V8 under = x < lo ? Splat(1.0f) : Splat(0.0f);  // lanes that underflow to 0
  x = x < lo ? lo : x;
  // n = round(x log2e): for a non-positive value, truncating (toward zero) v - 0.5 rounds v.
  const V8 n = __builtin_convertvector(__builtin_convertvector(x * Splat(1.44269504f) - Splat(0.5f), V8i), V8);
  const V8 r = (x - n * Splat(0.693359375f)) + n * Splat(2.12194440e-4f);
  V8 p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.0f);
  V8i bits = (__builtin_convertvector(n, V8i) + 127) << 23;
  V8 scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  const V8 e = p * scale;
  return under > Splat(0.5f) ? Splat(0.0f) : e;
}

// q . k over D floats. kD > 0 (a multiple of 8): four independent accumulators, so the sum is
// not one chain of dependent FMAs (a loop's single accumulator made each 64-wide dot wait on
// eight FMA latencies).
template <int kD>
inline float Dot(const float* q, const float* k, int64_t D) {
  if constexpr (kD > 0) {
    V8 a0 = Load(q) * Load(k), a1 = Load(q + 8) * Load(k + 8);
    V8 a2 = Splat(0.0f), a3 = Splat(0.0f);
    if constexpr (kD >= 32) {
      a2 = Load(q + 16) * Load(k + 16);
      a3 = Load(q + 24) * Load(k + 24);
    }
#pragma GCC unroll 8
    for (int d = 32; d < kD; d += 32) {
      a0 += Load(q + d) * Load(k + d);
      a1 += Load(q + d + 8) * Load(k + d + 8);
      a2 += Load(q + d + 16) * Load(k + d + 16);
      a3 += Load(q + d + 24) * Load(k + d + 24);
    }
    return Sum((a0 + a1) + (a2 + a3));
  } else {
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[d];
    return dot;
  }
}

// Scores of one query row against a block's n keys held transposed (kt [D][kMaxBlock], key j in
// column j): s[j] = q . k_j for j < n, eight keys per vector and no horizontal sums. Worth it
// when a tile has many rows to share the transpose (prefill tiles), not for a decode's g rows.
template <int kD>
inline void ScoresTransposed(const float* q, const float* kt, int64_t n, float* s) {
  for (int64_t c0 = 0; c0 < n; c0 += 16) {  // 16 keys (two vectors) at a time
    // Four independent partial sums over d per vector: one chain of kD dependent FMAs per
    // vector was half of a prefill tile's time.
    V8 a[4][2] = {};
    for (int d = 0; d < kD; d += 4) {
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const V8 qd = Splat(q[d + u]);
        const float* row = kt + (d + u) * kMaxBlock + c0;
        a[u][0] += qd * Load(row);
        a[u][1] += qd * Load(row + 8);
      }
    }
    Store(s + c0, (a[0][0] + a[1][0]) + (a[2][0] + a[3][0]));
    Store(s + c0 + 8, (a[0][1] + a[1][1]) + (a[2][1] + a[3][1]));
  }
}

// acc = alpha * acc + sum_j e[j] * v_j over n value rows `stride` floats apart (acc: D floats).
// kD > 0: acc is held in registers over the rows.
template <int kD>
inline void Accumulate(float* acc, float alpha, const float* e, const float* v, int64_t stride, int64_t n,
                       int64_t D) {
  if constexpr (kD > 0) {
    V8 a[kD / 8];
    const V8 al = Splat(alpha);
    for (int d = 0; d < kD / 8; ++d) a[d] = Load(acc + 8 * d) * al;
    for (int64_t j = 0; j < n; ++j) {
      const V8 ej = Splat(e[j]);
      const float* vr = v + j * stride;
      for (int d = 0; d < kD / 8; ++d) a[d] += ej * Load(vr + 8 * d);
    }
    for (int d = 0; d < kD / 8; ++d) Store(acc + 8 * d, a[d]);
  } else {
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      const float* vr = v + j * stride;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) acc[d] += e[j] * vr[d];
    }
  }
}

struct Problem {
  const float* q;             // [T, nH, D]
  const float* k;             // [NB, bs, nKV, D]
  const float* v;
  const int32_t* kv_lens;     // [S]
  const int32_t* block_tables;  // [S, MB]
  const int32_t* cu_q_lens;   // [S + 1]
  float* out;                 // [T, nH, D]
  int64_t T, nH, nKV, D, bs, MB, NB, S;
  float sm_scale, soft_cap;
  int64_t window;             // sliding window (keys at positions > pos - window); 0: none
};

struct Item {
  int32_t seq, first_token, num_tokens, kv_head;
};

// Online softmax of one item's rows (token i, head h of KV head kh: row i * g + h) over the keys
// each token may see: positions [lo_i, hi_i), hi_i = pos_i + 1 (causal), lo_i from the window.
// Block tables are clamped into range, as the jnp reference clamps them.
template <int kD>
void AttendTile(const Problem& p, const Item& it) {
  const int64_t g = p.nH / p.nKV, D = p.D, bs = p.bs, nt = it.num_tokens, kh = it.kv_head;
  const int64_t q_len = p.cu_q_lens[it.seq + 1] - p.cu_q_lens[it.seq];
  const int64_t kv_len = p.kv_lens[it.seq];
  const int64_t pos0 = kv_len - q_len + (it.first_token - p.cu_q_lens[it.seq]);  // token 0's position
  int64_t lo[kTileTokens], hi[kTileTokens];
  for (int64_t i = 0; i < nt; ++i) {
    hi[i] = std::clamp<int64_t>(pos0 + i + 1, 0, kv_len);
    lo[i] = p.window > 0 ? std::clamp<int64_t>(pos0 + i - p.window + 1, 0, hi[i]) : 0;
  }
  const int64_t lo_min = lo[0], hi_max = hi[nt - 1];  // both grow with i
  float acc[kMaxRows][kMaxHeadDim];
  float m[kMaxRows], l[kMaxRows], s[kMaxRows][kMaxBlock + 8];  // + 8: the exp loop's spare lanes
  static thread_local float kt[kMaxHeadDim * kMaxBlock];  // a block's keys, transposed
  const int64_t rows = nt * g;
  for (int64_t r = 0; r < rows; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    std::fill(acc[r], acc[r] + D, 0.0f);
  }
  const int32_t* table = p.block_tables + int64_t(it.seq) * p.MB;
  const int64_t stride = p.nKV * D;  // floats between positions
  auto q_row = [&](int64_t i, int64_t h) { return p.q + ((it.first_token + i) * p.nH + kh * g + h) * D; };
  for (int64_t b = lo_min / bs; b * bs < hi_max; ++b) {
    const int64_t first = std::max<int64_t>(lo_min, b * bs), last = std::min<int64_t>(hi_max, (b + 1) * bs);
    const int64_t block = std::clamp<int64_t>(table[std::min<int64_t>(b, p.MB - 1)], 0, p.NB - 1);
    const float* kb = p.k + ((block * bs + (first - b * bs)) * p.nKV + kh) * D;  // position `first`
    const float* vb = p.v + ((block * bs + (first - b * bs)) * p.nKV + kh) * D;
    const int64_t n = last - first;
    const bool transposed = kD > 0 && rows >= 8;
    if (transposed) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < D; ++d) kt[d * kMaxBlock + j] = kb[j * stride + d];
    }
    for (int64_t i = 0; i < nt; ++i) {
      // The keys of this block token i sees, as offsets from `first`.
      const int64_t j0 = std::max<int64_t>(lo[i], first) - first, j1 = std::min<int64_t>(hi[i], last) - first;
      if (j1 <= j0) continue;
      for (int64_t h = 0; h < g; ++h) {
        const int64_t r = i * g + h;
        const float* qr = q_row(i, h);
        float mx = m[r];
        if constexpr (kD > 0) {
          if (transposed) ScoresTransposed<kD>(qr, kt, n, s[r]);
        }
        int64_t j = j0;
        if (transposed && p.soft_cap == 0.0f) {  // scale and max eight at a time (a scalar loop was ~11%)
          V8 vmx = Splat(mx);
          for (; j + 8 <= j1; j += 8) {
            const V8 dot = Load(s[r] + j) * Splat(p.sm_scale);
            Store(s[r] + j, dot);
            vmx = vmx > dot ? vmx : dot;
          }
          for (int u = 0; u < 8; ++u) mx = std::max(mx, vmx[u]);
        }
        for (; j < j1; ++j) {
          float dot = (transposed ? s[r][j] : Dot<kD>(qr, kb + j * stride, D)) * p.sm_scale;
          if (p.soft_cap > 0.0f) dot = p.soft_cap * std::tanh(dot / p.soft_cap);
          s[r][j] = dot;
          mx = std::max(mx, dot);
        }
        // The running max mostly stays put after the first blocks: alpha is then exactly 1, and
        // libm's exp (~9% of a prefill tile, once per row and block) is skipped.
        const float alpha = mx == m[r] ? 1.0f : std::exp(m[r] - mx);
        m[r] = mx;
        // Eight at a time from j0; lanes past j1 compute garbage into s's spare columns.
        V8 vsum = Splat(0.0f);
        for (j = j0; j < j1; j += 8) {
          const V8 e = ExpNonPositive(Load(s[r] + j) - Splat(mx));
          Store(s[r] + j, e);
          if (j + 8 <= j1) vsum += e;
        }
        float sum = Sum(vsum);
        for (j = j0 + (j1 - j0) / 8 * 8; j < j1; ++j) sum += s[r][j];
        l[r] = alpha * l[r] + sum;
        Accumulate<kD>(acc[r], alpha, s[r] + j0, vb + j0 * stride, stride, j1 - j0, D);
      }
    }
  }
  for (int64_t i = 0; i < nt; ++i) {
    for (int64_t h = 0; h < g; ++h) {
      const int64_t r = i * g + h;
      float* o = p.out + ((it.first_token + i) * p.nH + kh * g + h) * D;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;  // a token that sees no key: zeros
      for (int64_t d = 0; d < D; ++d) o[d] = acc[r][d] * inv;
    }
  }
}

ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> kv_lens,
                ffi::Buffer<ffi::S32> block_tables, ffi::Buffer<ffi::S32> cu_q_lens,
                float sm_scale, float soft_cap, int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), bd = block_tables.dimensions();
  Problem p{q.typed_data(), k.typed_data(), v.typed_data(), kv_lens.typed_data(),
            block_tables.typed_data(), cu_q_lens.typed_data(), out->typed_data(),
            qd[0], qd[1], kd[2], qd[2], kd[1], bd[1], kd[0], bd[0], sm_scale, soft_cap, window};
  if (p.nH % p.nKV || p.nH / p.nKV > kMaxGroup || p.D > kMaxHeadDim || p.bs > kMaxBlock)
    return ffi::Error::InvalidArgument("ragged_paged_attention: unsupported shape");
  const int64_t g = p.nH / p.nKV;
  const int32_t tile = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(kTileTokens, kMaxRows / g)));
  // Work items, and zeros for the padding tokens after the last sequence's.
  std::vector<Item> items;
  const int64_t used = std::clamp<int64_t>(p.cu_q_lens[p.S], 0, p.T);
  for (int64_t s = 0; s < p.S; ++s) {
    const int32_t begin = std::clamp<int32_t>(p.cu_q_lens[s], 0, used);
    const int32_t end = std::clamp<int32_t>(p.cu_q_lens[s + 1], begin, used);
    for (int32_t t = begin; t < end; t += tile)
      for (int32_t kh = 0; kh < p.nKV; ++kh)
        items.push_back({static_cast<int32_t>(s), t, std::min<int32_t>(tile, end - t), kh});
  }
  std::fill(p.out + used * p.nH * p.D, p.out + p.T * p.nH * p.D, 0.0f);
  const int64_t work = static_cast<int64_t>(items.size());
  jaxllm::ParallelFor(pool, work, [p, items = std::move(items)](int64_t w) {
    switch (p.D) {  // head dims of common models unrolled; others take the generic loops
      case 32: AttendTile<32>(p, items[w]); break;
      case 64: AttendTile<64>(p, items[w]); break;
      case 128: AttendTile<128>(p, items[w]); break;
      case 256: AttendTile<256>(p, items[w]); break;
      default: AttendTile<0>(p, items[w]);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxllmRaggedPagedAttentionF32, Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("sm_scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
