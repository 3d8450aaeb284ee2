// Paged decode attention on the CPU: one query token per row attends to its past positions,
// read in place from a paged K/V pool through per-row indices, and to its own fresh K/V. The pool
// (and the own K/V, rounded as the pool stores them) may be fp32, fp16, bf16 or fp8 (e4m3);
// queries, scores and the output are fp32, so a narrower pool cuts the bytes read and nothing
// else.
//
// Why hand-written: inductor writes this gather-and-reduce as index arithmetic, a bounds check
// and a horizontal sum per (position, head), ~150 cycles each; here a position costs one
// contiguous dot product and one axpy per query head (measured in bench/RESULTS.md).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// Vec::size() elements of a K/V row as fp32 (F16C / AVX-512 conversions for half types).
inline Vec load_f32(const float* p) { return Vec::loadu(p); }
template <typename T>
inline Vec load_f32(const T* p) {
  Vec out;
  at::vec::load_to_float<T>(p, out);
  return out;
}

// One stored K/V element as the kernel computes with it: its value, except fp8's, which is read
// as value / STORED_SCALE<Fp8> (exact: a power of two). The scores' scale and the output's
// normalisation put the factor back, once per score and per output element.
template <typename T>
constexpr float STORED_SCALE = 1.f;
template <typename T>
inline float to_f32(T x) { return static_cast<float>(x); }

// fp8 e4m3fn (torch.float8_e4m3fn; pools hold torch's saturating casts, never NaN). Sign-
// extended to 16 bits, moved up by 7 and with bit 14 cleared, its bits are the fp16 whose value
// is the fp8's times 2^-8, normals and subnormals alike (both formats' subnormals have exponent
// field 0): three integer ops and the F16C / AVX-512 conversion read 8 or 16 values.
using Fp8 = c10::Float8_e4m3fn;
template <>
constexpr float STORED_SCALE<Fp8> = 256.f;
inline float to_f32(Fp8 x) { return static_cast<float>(x) * (1.f / 256.f); }
inline Vec load_f32(const Fp8* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(-0x4080));
  return Vec(_mm512_cvtph_ps(h));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(-0x4080));
  return Vec(_mm256_cvtph_ps(h));
#else
  float out[Vec::size()];
  for (int64_t i = 0; i < Vec::size(); ++i) out[i] = to_f32(p[i]);
  return Vec::loadu(out);
#endif
}

// 2 * Vec::size() elements as two vectors. fp8 on AVX2: one 16-byte load, widened and converted
// as 16 lanes (one sign extension, shift and mask for both halves).
template <typename T>
inline void load_f32x2(const T* p, Vec& lo, Vec& hi) {
  lo = load_f32(p);
  hi = load_f32(p + Vec::size());
}
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
inline void load_f32x2(const Fp8* p, Vec& lo, Vec& hi) {
  const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(-0x4080));
  lo = Vec(_mm256_cvtph_ps(_mm256_castsi256_si128(h)));
  hi = Vec(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
#endif

template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + i), load_f32(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const Vec av(a);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    at::vec::fmadd(av, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

void check(const at::Tensor& t, const char* name, int64_t dim, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got ", t.dim());
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
}

// Flash-decoding: each task takes one row's positions [begin, end) (position n is the row's own
// token) and leaves an unnormalised partial result: per query head the max score m, the sum of
// exp(score - m), and the exp-weighted sum of V. `merge` combines a row's chunks. A chunk's K/V
// rows (at most CHUNK of them, 128 KiB at 4 heads x 64 fp32) stay in L2 across its heads.
template <typename T>
struct Chunk {
  const float* q;   // (H, D) the row's queries
  const T* k_self;  // (Hkv, D)
  const T* v_self;
  const int64_t* rows;  // the row's pool rows
  int64_t n, begin, end;
};

template <typename T>
struct Shape {
  const T *pool_k, *pool_v;
  int64_t num_rows, H, Hkv, G, D;
  float scale;
};

constexpr int64_t POSITIONS = 8;  // scores computed together: independent FMA chains

// s[0..8) = the horizontal sums of eight vectors. AVX2: a tree of horizontal adds (six of them, two
// lane permutes and an add for all eight, where summing each alone takes three shuffles and three
// adds).
inline void reduce8(Vec a0, Vec a1, Vec a2, Vec a3, Vec a4, Vec a5, Vec a6, Vec a7, float* s) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  // u0: a0..a3's sums over the low 128 bits, then over the high 128 bits; u1: a4..a7's
  _mm256_storeu_ps(s, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                                    _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  const Vec sums[POSITIONS] = {a0, a1, a2, a3, a4, a5, a6, a7};
  for (int64_t p = 0; p < POSITIONS; ++p)
    s[p] = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, sums[p]);
#endif
}

// s[p] = q . rows[p][off, off + D) for POSITIONS rows: one accumulator per row, so the FMAs of
// different rows overlap instead of waiting on one chain (and one horizontal sum per row). The
// eight are named, not an array: with `Vec a[8]` GCC stored every accumulator to the stack on
// every step (found with perf annotate); named, they stay in registers: one row at 900
// positions, fp8, 2-core AMD EPYC, 103 -> 84 us a call on rows not in cache, 111 -> 95 on
// cached ones (medians of 3 alternating runs).
template <typename T>
inline void scores_block(const float* q, const T* const* rows, int64_t off, int64_t D,
                         float* s) {
  static_assert(POSITIONS == 8, "scores_block names its eight accumulators");
  const T *r0 = rows[0] + off, *r1 = rows[1] + off, *r2 = rows[2] + off, *r3 = rows[3] + off;
  const T *r4 = rows[4] + off, *r5 = rows[5] + off, *r6 = rows[6] + off, *r7 = rows[7] + off;
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f), a4(0.f), a5(0.f), a6(0.f), a7(0.f);
  constexpr int64_t V = Vec::size();
  int64_t d = 0;
  for (; d + 2 * V <= D; d += 2 * V) {
    const Vec qa = Vec::loadu(q + d), qb = Vec::loadu(q + d + V);
    Vec lo, hi;
    load_f32x2(r0 + d, lo, hi), a0 = at::vec::fmadd(qa, lo, a0), a0 = at::vec::fmadd(qb, hi, a0);
    load_f32x2(r1 + d, lo, hi), a1 = at::vec::fmadd(qa, lo, a1), a1 = at::vec::fmadd(qb, hi, a1);
    load_f32x2(r2 + d, lo, hi), a2 = at::vec::fmadd(qa, lo, a2), a2 = at::vec::fmadd(qb, hi, a2);
    load_f32x2(r3 + d, lo, hi), a3 = at::vec::fmadd(qa, lo, a3), a3 = at::vec::fmadd(qb, hi, a3);
    load_f32x2(r4 + d, lo, hi), a4 = at::vec::fmadd(qa, lo, a4), a4 = at::vec::fmadd(qb, hi, a4);
    load_f32x2(r5 + d, lo, hi), a5 = at::vec::fmadd(qa, lo, a5), a5 = at::vec::fmadd(qb, hi, a5);
    load_f32x2(r6 + d, lo, hi), a6 = at::vec::fmadd(qa, lo, a6), a6 = at::vec::fmadd(qb, hi, a6);
    load_f32x2(r7 + d, lo, hi), a7 = at::vec::fmadd(qa, lo, a7), a7 = at::vec::fmadd(qb, hi, a7);
  }
  for (; d + V <= D; d += V) {
    const Vec qv = Vec::loadu(q + d);
    a0 = at::vec::fmadd(qv, load_f32(r0 + d), a0);
    a1 = at::vec::fmadd(qv, load_f32(r1 + d), a1);
    a2 = at::vec::fmadd(qv, load_f32(r2 + d), a2);
    a3 = at::vec::fmadd(qv, load_f32(r3 + d), a3);
    a4 = at::vec::fmadd(qv, load_f32(r4 + d), a4);
    a5 = at::vec::fmadd(qv, load_f32(r5 + d), a5);
    a6 = at::vec::fmadd(qv, load_f32(r6 + d), a6);
    a7 = at::vec::fmadd(qv, load_f32(r7 + d), a7);
  }
  reduce8(a0, a1, a2, a3, a4, a5, a6, a7, s);
  for (int64_t p = 0; p < POSITIONS; ++p)
    for (int64_t i = d; i < D; ++i) s[p] += q[i] * to_f32(rows[p][off + i]);
}

// out[0, N * Vec::size()) = sum_j w[j] * rows[j][0, ...): N output vectors stay in registers
// while every row is visited (no load-add-store of the output per row), read two at a time.
template <int64_t N, typename T>
inline void weighted_tile(const float* w, const T* const* rows, int64_t len, int64_t off,
                          float* out) {
  static_assert(N % 2 == 0, "a tile is read two vectors at a time");
  constexpr int64_t V = Vec::size();
  Vec r[N];
  for (int64_t i = 0; i < N; ++i) r[i] = Vec(0.f);
  for (int64_t j = 0; j < len; ++j) {
    const Vec wj(w[j]);
    const T* x = rows[j] + off;
    for (int64_t i = 0; i < N; i += 2) {
      Vec lo, hi;
      load_f32x2(x + i * V, lo, hi);
      r[i] = at::vec::fmadd(wj, lo, r[i]);
      r[i + 1] = at::vec::fmadd(wj, hi, r[i + 1]);
    }
  }
  for (int64_t i = 0; i < N; ++i) r[i].store(out + i * V);
}

// out[0, D) = sum_j w[j] * rows[j][off, off + D): the widest tiles first (one pass over the rows
// for a 64-wide head on AVX2: eight independent FMA chains; four took two passes).
template <typename T>
inline void weighted_sum(const float* w, const T* const* rows, int64_t len, int64_t off,
                         int64_t D, float* out) {
  constexpr int64_t V = Vec::size();
  int64_t d = 0;
  for (; d + 8 * V <= D; d += 8 * V) weighted_tile<8>(w, rows, len, off + d, out + d);
  for (; d + 4 * V <= D; d += 4 * V) weighted_tile<4>(w, rows, len, off + d, out + d);
  for (; d + 2 * V <= D; d += 2 * V) weighted_tile<2>(w, rows, len, off + d, out + d);
  for (; d + V <= D; d += V) {
    Vec r(0.f);
    for (int64_t j = 0; j < len; ++j)
      r = at::vec::fmadd(Vec(w[j]), load_f32(rows[j] + off + d), r);
    r.store(out + d);
  }
  for (; d < D; ++d) {
    float r = 0.f;
    for (int64_t j = 0; j < len; ++j) r += w[j] * to_f32(rows[j][off + d]);
    out[d] = r;
  }
}

// Every cache line of `n` pool rows of `bytes` each, requested. The loops below read a row one
// head (K) or a few vectors (V) at a time: strided streams that the hardware fetches a line per
// row and pass, so at long context, where the rows come from DRAM, a chunk waited on memory
// latency. attend_chunk asks for whole K and V rows PREFETCH_AHEAD positions ahead of its first
// pass: one row, 900 positions, rows not in cache, 2-core AMD EPYC: fp16 166 -> 128 us, fp8
// 134 -> 84 us a call (medians of 3 alternating runs; asking for a whole chunk up front: 166 /
// 121 us, most of those requests dropped while the first ones are in flight).
constexpr int64_t PREFETCH_AHEAD = 16;
template <typename T>
inline void prefetch_rows(const T* const* rows, int64_t n, int64_t bytes) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < bytes; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(rows[j]) + b);
}

// Per task scratch, reused across its chunks.
template <typename T>
struct Scratch {
  std::vector<float> scores;   // (H, len)
  std::vector<const T*> k, v;  // the chunk's K and V rows (every head)
};

template <typename T>
void attend_chunk(const Chunk<T>& c, const Shape<T>& sh, float* m, float* sum, float* acc,
                  Scratch<T>& x) {
  // len >= 1: the caller makes tasks of non-empty chunks only
  const int64_t H = sh.H, D = sh.D, G = sh.G, len = c.end - c.begin, row_size = sh.Hkv * D;
  x.k.resize(len), x.v.resize(len);
  for (int64_t l = c.begin; l < c.end; ++l) {
    if (l == c.n) {
      x.k[l - c.begin] = c.k_self, x.v[l - c.begin] = c.v_self;
      continue;
    }
    const int64_t r = c.rows[l];
    TORCH_CHECK(r >= 0 && r < sh.num_rows, "pool row ", r, " out of range [0, ", sh.num_rows, ")");
    x.k[l - c.begin] = sh.pool_k + r * row_size, x.v[l - c.begin] = sh.pool_v + r * row_size;
  }
  const int64_t row_bytes = row_size * sizeof(T);
  prefetch_rows(x.k.data(), std::min(PREFETCH_AHEAD, len), row_bytes);
  prefetch_rows(x.v.data(), std::min(PREFETCH_AHEAD, len), row_bytes);
  x.scores.resize(H * len);
  for (int64_t hq = 0; hq < H; ++hq) {
    const int64_t off = (hq / G) * D;
    const float* q = c.q + hq * D;
    float* s = x.scores.data() + hq * len;
    int64_t j = 0;
    for (; j + POSITIONS <= len; j += POSITIONS) {
      if (hq == 0 && j + PREFETCH_AHEAD < len) {  // the first pass pulls the rows ahead in
        const int64_t n = std::min(POSITIONS, len - j - PREFETCH_AHEAD);
        prefetch_rows(&x.k[j + PREFETCH_AHEAD], n, row_bytes);
        prefetch_rows(&x.v[j + PREFETCH_AHEAD], n, row_bytes);
      }
      scores_block(q, &x.k[j], off, D, s + j);
    }
    for (; j < len; ++j) s[j] = dot(q, x.k[j] + off, D);
    at::vec::map([scale = sh.scale * STORED_SCALE<T>](Vec a) { return a * Vec(scale); }, s, s,
                 len);
    m[hq] = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s,
                                       len);
    const float mh = m[hq];
    at::vec::map([mh](Vec a) { return (a - Vec(mh)).exp_u20(); }, s, s, len);
    sum[hq] = at::vec::reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, s, len);
    weighted_sum(s, x.v.data(), len, off, D, acc + hq * D);
  }
}

// out (H, D) = the chunks' results rescaled to their common max and normalised; v_scale: what
// the V rows were read divided by (STORED_SCALE).
void merge(int64_t chunks, int64_t H, int64_t D, const float* m, const float* sum,
           const float* acc, float v_scale, float* out) {
  for (int64_t hq = 0; hq < H; ++hq) {
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, m[c * H + hq]);
    float total = 0.f;
    float* o = out + hq * D;
    std::fill(o, o + D, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {  // a chunk's sum >= 1 (its max scores exp(0))
      const float w = std::exp(m[c * H + hq] - top);
      total += w * sum[c * H + hq];
      axpy(w, acc + (c * H + hq) * D, o, D);
    }
    const float norm = v_scale / total;
    for (int64_t i = 0; i < D; ++i) o[i] *= norm;
  }
}

constexpr int64_t CHUNK = 128;  // positions a task: a few tasks per thread at long context

// The body of decode_attention for pool element type T (inputs checked, contiguous).
template <typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& pool_k, const at::Tensor& pool_v, const at::Tensor& rows,
                 const at::Tensor& lengths, float scale, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), L = rows.size(1);
  const float* qp = q.data_ptr<float>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *pk = pool_k.data_ptr<T>(), *pv = pool_v.data_ptr<T>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const Shape<T> shape{pk, pv, pool_k.size(0), H, Hkv, H / Hkv, D, scale};
  // one task per non-empty chunk, so rows of different lengths spread over the threads
  std::vector<int64_t> first(B + 1, 0), row_of;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = std::clamp<int64_t>(lp[b], 0, L);
    first[b + 1] = first[b] + (n + 1 + CHUNK - 1) / CHUNK;  // past positions + itself
    row_of.insert(row_of.end(), first[b + 1] - first[b], b);
  }
  const int64_t tasks = first[B];
  // every slot is written by its task (attend_chunk), so no zero fill
  auto m = std::make_unique_for_overwrite<float[]>(tasks * H);
  auto sum = std::make_unique_for_overwrite<float[]>(tasks * H);
  auto acc = std::make_unique_for_overwrite<float[]>(tasks * H * D);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = row_of[task], c = task - first[b];
      const int64_t n = std::clamp<int64_t>(lp[b], 0, L);
      const Chunk<T> chunk{qp + b * H * D, kp + b * Hkv * D, vp + b * Hkv * D, rp + b * L, n,
                           c * CHUNK, std::min((c + 1) * CHUNK, n + 1)};
      attend_chunk(chunk, shape, &m[task * H], &sum[task * H], &acc[task * H * D], scratch);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    merge(first[b + 1] - first[b], H, D, &m[first[b] * H], &sum[first[b] * H],
          &acc[first[b] * H * D], STORED_SCALE<T>, op + b * H * D);
}

// q (B, H, D) fp32; k_self, v_self (B, Hkv, D) and pool_k, pool_v (R, Hkv, D) of one dtype: fp32,
// fp16, bf16 or fp8 e4m3; rows (B, L) pool rows of each row's past positions; lengths (B,) how many of them
// are real. Returns (B, H, D) fp32.
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& pool_k, const at::Tensor& pool_v,
                            const at::Tensor& rows_in, const at::Tensor& lengths_in,
                            double scale) {
  const auto kv = pool_k.scalar_type();
  TORCH_CHECK(kv == at::kFloat || kv == at::kHalf || kv == at::kBFloat16 ||
                  kv == at::kFloat8_e4m3fn,
              "pool_k has dtype ", kv, "; expected Float, Half, BFloat16 or Float8_e4m3fn");
  check(q_in, "q", 3, at::kFloat);
  check(k_in, "k_self", 3, kv);
  check(v_in, "v_self", 3, kv);
  check(pool_k, "pool_k", 3, kv);
  check(pool_v, "pool_v", 3, kv);
  check(rows_in, "rows", 2, at::kLong);
  check(lengths_in, "lengths", 1, at::kLong);
  TORCH_CHECK(pool_k.is_contiguous() && pool_v.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(pool_k.sizes() == pool_v.sizes(), "pool_k and pool_v differ in shape");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto rows = rows_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && pool_k.size(1) == Hkv && pool_k.size(2) == D && k.size(2) == D,
              "head shapes disagree");
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && rows.size(0) == B && lengths.size(0) == B,
              "batch sizes disagree");
  auto out = at::empty_like(q);
  const float s = static_cast<float>(scale);
  if (kv == at::kFloat)
    attend_rows<float>(q, k, v, pool_k, pool_v, rows, lengths, s, out);
  else if (kv == at::kHalf)
    attend_rows<c10::Half>(q, k, v, pool_k, pool_v, rows, lengths, s, out);
  else if (kv == at::kBFloat16)
    attend_rows<c10::BFloat16>(q, k, v, pool_k, pool_v, rows, lengths, s, out);
  else
    attend_rows<Fp8>(q, k, v, pool_k, pool_v, rows, lengths, s, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(parcae, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_self, Tensor v_self, Tensor pool_k, Tensor pool_v, "
      "Tensor rows, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(parcae, CPU, m) { m.impl("decode_attention", &decode_attention); }
