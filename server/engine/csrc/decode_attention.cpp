// Paged decode attention on the CPU: one query token per row attends to its past positions,
// read in place from a paged K/V pool through per-row indices, and to its own fresh K/V.
//
// Why hand-written: inductor writes this gather-and-reduce as index arithmetic, a bounds check
// and a horizontal sum per (position, head), ~150 cycles each; here a position costs one
// contiguous dot product and one axpy per query head (measured in bench/RESULTS.md).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.f);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size())
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
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
// token), visits each position's K and V once for all heads (a pool row holds every head's K
// contiguously), and leaves an unnormalised partial result: per query head the max score m, the
// sum of exp(score - m), and the exp-weighted sum of V. `merge` combines a row's chunks.
struct Chunk {
  const float* q;       // (H, D) the row's queries
  const float* k_self;  // (Hkv, D)
  const float* v_self;
  const int64_t* rows;  // the row's pool rows
  int64_t n, begin, end;
};

struct Shape {
  const float *pool_k, *pool_v;
  int64_t num_rows, H, Hkv, G, D;
  float scale;
};

void attend_chunk(const Chunk& c, const Shape& sh, float* m, float* sum, float* acc,
                  std::vector<float>& scores) {
  // len >= 1: the caller makes tasks of non-empty chunks only
  const int64_t H = sh.H, D = sh.D, G = sh.G, len = c.end - c.begin, row_size = sh.Hkv * D;
  std::fill(acc, acc + H * D, 0.f);
  auto k_of = [&](int64_t l) -> const float* {
    if (l == c.n) return c.k_self;
    const int64_t r = c.rows[l];
    TORCH_CHECK(r >= 0 && r < sh.num_rows, "pool row ", r, " out of range [0, ", sh.num_rows, ")");
    return sh.pool_k + r * row_size;
  };
  // rows[l] was bounds-checked by k_of in the score pass over the same positions
  auto v_of = [&](int64_t l) { return l == c.n ? c.v_self : sh.pool_v + c.rows[l] * row_size; };
  scores.resize(H * len);  // (H, len)
  for (int64_t l = c.begin; l < c.end; ++l) {
    const float* k = k_of(l);
    for (int64_t hq = 0; hq < H; ++hq)
      scores[hq * len + (l - c.begin)] = dot(c.q + hq * D, k + (hq / G) * D, D) * sh.scale;
  }
  for (int64_t hq = 0; hq < H; ++hq) {
    float* s = scores.data() + hq * len;
    m[hq] = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, s,
                                       len);
    const float mh = m[hq];
    at::vec::map([mh](Vec x) { return (x - Vec(mh)).exp_u20(); }, s, s, len);
    sum[hq] = at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s, len);
  }
  for (int64_t l = c.begin; l < c.end; ++l) {
    const float* v = v_of(l);
    for (int64_t hq = 0; hq < H; ++hq)
      axpy(scores[hq * len + (l - c.begin)], v + (hq / G) * D, acc + hq * D, D);
  }
}

// out (H, D) = the chunks' results rescaled to their common max and normalised.
void merge(int64_t chunks, int64_t H, int64_t D, const float* m, const float* sum,
           const float* acc, float* out) {
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
    for (int64_t i = 0; i < D; ++i) o[i] /= total;
  }
}

constexpr int64_t CHUNK = 128;  // positions a task: a few tasks per thread at long context

// q (B, H, D); k_self, v_self (B, Hkv, D); pool_k, pool_v (R, Hkv, D); rows (B, L) pool rows of
// each row's past positions; lengths (B,) how many of them are real. Returns (B, H, D).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& pool_k, const at::Tensor& pool_v,
                            const at::Tensor& rows_in, const at::Tensor& lengths_in,
                            double scale) {
  check(q_in, "q", 3, at::kFloat);
  check(k_in, "k_self", 3, at::kFloat);
  check(v_in, "v_self", 3, at::kFloat);
  check(pool_k, "pool_k", 3, at::kFloat);
  check(pool_v, "pool_v", 3, at::kFloat);
  check(rows_in, "rows", 2, at::kLong);
  check(lengths_in, "lengths", 1, at::kLong);
  TORCH_CHECK(pool_k.is_contiguous() && pool_v.is_contiguous(), "pools must be contiguous");
  TORCH_CHECK(pool_k.sizes() == pool_v.sizes(), "pool_k and pool_v differ in shape");
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto rows = rows_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), L = rows.size(1);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && pool_k.size(1) == Hkv && pool_k.size(2) == D && k.size(2) == D,
              "head shapes disagree");
  TORCH_CHECK(k.size(0) == B && v.sizes() == k.sizes() && rows.size(0) == B && lengths.size(0) == B,
              "batch sizes disagree");
  auto out = at::empty_like(q);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *pk = pool_k.data_ptr<float>(), *pv = pool_v.data_ptr<float>();
  const int64_t *rp = rows.data_ptr<int64_t>(), *lp = lengths.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const Shape shape{pk, pv, pool_k.size(0), H, Hkv, H / Hkv, D, static_cast<float>(scale)};
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
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = row_of[task], c = task - first[b];
      const int64_t n = std::clamp<int64_t>(lp[b], 0, L);
      const Chunk chunk{qp + b * H * D, kp + b * Hkv * D, vp + b * Hkv * D, rp + b * L, n,
                        c * CHUNK, std::min((c + 1) * CHUNK, n + 1)};
      attend_chunk(chunk, shape, &m[task * H], &sum[task * H], &acc[task * H * D], scores);
    }
  });
  for (int64_t b = 0; b < B; ++b)
    merge(first[b + 1] - first[b], H, D, &m[first[b] * H], &sum[first[b] * H],
          &acc[first[b] * H * D], op + b * H * D);
  return out;
}

}  // namespace

TORCH_LIBRARY(parcae, m) {
  m.def(
      "decode_attention(Tensor q, Tensor k_self, Tensor v_self, Tensor pool_k, Tensor pool_v, "
      "Tensor rows, Tensor lengths, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(parcae, CPU, m) { m.impl("decode_attention", &decode_attention); }
