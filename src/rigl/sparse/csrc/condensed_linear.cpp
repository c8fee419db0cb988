// CPU kernels of the condensed (constant fan-in) sparse linear layer (rigl.sparse.condensed).
//
// Layout: every output row o keeps exactly k inputs, so the weight needs no row pointers:
//   values[o * k + j]  (out x k, row-major),  idx[o * k + j] (int32, sorted within a row).
// Activations are feature-major as in sparse_linear.cpp: xt (in x B), yt and dyt (out x B).
//
//   forward        yt[o, :] = bias[o] + sum_j values[o, j] * xt[idx[o, j], :]
//   weight grad    dW[o, j] = <dyt[o, :], xt[idx[o, j], :]>      (active entries only)
//
// The input gradient dxt = W^T dyt needs the transposed pattern; it runs through the fused
// blocked-CSC kernel of sparse_linear.cpp (see rigl/sparse/condensed_ops.py for why).
//
// Work is split by rows: every row costs the same (k gathers of a batch chunk), so each
// thread takes one contiguous range of rows and no dynamic scheduling or balancing pass is
// needed (the CSR kernels of sparse_linear.cpp balance rows of unequal length dynamically).
// Within its rows a thread walks the batch in chunks (outer loop), so the gathered part of
// xt (in x chunk floats) stays in its L2 cache for all of its rows.
//
// Loop order and tile sizes, chosen by measurement (4096 x 4096, batch 128, one thread,
// CPU time, AMD EPYC Zen 4 with AVX-512, on a loaded machine: only the gross differences
// count). The forward is bound by reading the gathered rows from L2:
//   - fan-in, a chunk of 32 columns per row (4 AVX2 registers): 16 ms at density 0.1 and
//     2.3 ms at 0.01, against 20 and 2.7 ms with chunks of 64 (the xt slice of a chunk,
//     in x 64 floats = 1 MB, does not stay in a 1 MB L2; 512 KB does). Several rows in
//     lockstep gave nothing at 0.1 (19-30 ms): random columns share no cache lines.
//   - N:M: entry j of every row lies in group j / N, so rows walked in lockstep read the
//     same M rows of xt, which stay in L1 for the whole row block: 8 rows x 32 columns
//     (16 AVX-512 accumulators) took 52 ms for 2:4, one row at a time 90 ms, dense
//     torch.mm 66 ms. With AVX2 only (16 registers; an AMD EPYC with 512 KB L2, two
//     threads, wall clock): 3 rows x 32 columns (12 accumulators) 60 ms for 2:4, against
//     69 ms for 2 rows, 80 ms for 4 rows x 16 columns and 79 ms one row at a time.

#include <torch/extension.h>

#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace {

#ifndef RIGL_COND_CHUNK
#define RIGL_COND_CHUNK 32
#endif
#ifndef RIGL_COND_PREFETCH
#define RIGL_COND_PREFETCH 8
#endif
constexpr int kChunk = RIGL_COND_CHUNK;  // batch columns of one register tile (forward)
constexpr int kChunkDw = 32;             // batch columns of one weight-gradient tile
constexpr int kPrefetch = RIGL_COND_PREFETCH;

// Threads for `work` multiply-adds: one below ~64K (waking a team costs more than it saves).
int n_threads(int64_t work) {
  return work < (int64_t{1} << 16) ? 1 : std::max(1, at::get_num_threads());
}

// Rows [r0, r1) of thread `tid` of `nt`: contiguous and equal (every row is equal work).
inline void row_range(int64_t n_out, int tid, int nt, int64_t& r0, int64_t& r1) {
  r0 = n_out * tid / nt;
  r1 = n_out * (tid + 1) / nt;
}

// ------------------------------------------------------------------------------- forward
// One row, `c` batch columns: out[0:c] = b + sum_j vals[j] * xt[cols[j], 0:c].
template <typename T>
inline void fwd_row(const int32_t* __restrict cols, const T* __restrict vals, int64_t k,
                    const T* __restrict xt, int64_t ld, T* __restrict out, T b, int c) {
  for (int i = 0; i < c; ++i) out[i] = b;
  for (int64_t j = 0; j < k; ++j) {
    const T* __restrict xr = xt + static_cast<int64_t>(cols[j]) * ld;
    const T w = vals[j];
#pragma omp simd
    for (int i = 0; i < c; ++i) out[i] += w * xr[i];
  }
}

#ifdef __AVX2__
// float32, a full chunk: NV vectors of 8 columns held in registers; the row gathered
// kPrefetch entries ahead is prefetched (random rows: the hardware cannot guess them).
template <int NV>
inline void fwd_row_avx(const int32_t* __restrict cols, const float* __restrict vals, int64_t k,
                        const float* __restrict xt, int64_t ld, float* __restrict out, float b) {
  __m256 acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_set1_ps(b);
  for (int64_t j = 0; j < k; ++j) {
    if (j + kPrefetch < k) {
      const char* pf = reinterpret_cast<const char*>(xt + static_cast<int64_t>(cols[j + kPrefetch]) * ld);
#pragma GCC unroll 16
      for (int l = 0; l < NV * 32; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    }
    const float* __restrict xr = xt + static_cast<int64_t>(cols[j]) * ld;
    const __m256 w = _mm256_set1_ps(vals[j]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[v]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}
#endif

#ifdef __AVX512F__
// N:M, float32: kLockRows rows in lockstep over their entries, 32 batch columns (two
// AVX-512 vectors) per row. The entries j of all these rows fall in the same group of M
// inputs, so the rows of xt they read were just read by the rows before: L1 hits.
constexpr int kLockRows = 8;

inline void fwd_rows_nm(const int32_t* __restrict cols, const float* __restrict vals, int64_t k,
                        const float* __restrict xt, int64_t ld, float* __restrict out,
                        int64_t ldo, const float* __restrict bias) {
  __m512 acc[kLockRows][2];
#pragma GCC unroll 8
  for (int r = 0; r < kLockRows; ++r)
    acc[r][0] = acc[r][1] = _mm512_set1_ps(bias ? bias[r] : 0.f);
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < kLockRows; ++r) {
      const float* __restrict xr = xt + static_cast<int64_t>(cols[r * k + j]) * ld;
      const __m512 w = _mm512_set1_ps(vals[r * k + j]);
      acc[r][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16), acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kLockRows; ++r) {
    _mm512_storeu_ps(out + r * ldo, acc[r][0]);
    _mm512_storeu_ps(out + r * ldo + 16, acc[r][1]);
  }
}
#elif defined(__AVX2__)
// The same lockstep with AVX2's 16 registers: 3 rows x 32 columns (four 8-wide vectors
// per row, 12 accumulators), the rest for the broadcast weight and the loaded row.
constexpr int kLockRows = 3;

inline void fwd_rows_nm(const int32_t* __restrict cols, const float* __restrict vals, int64_t k,
                        const float* __restrict xt, int64_t ld, float* __restrict out,
                        int64_t ldo, const float* __restrict bias) {
  __m256 acc[kLockRows][4];
#pragma GCC unroll 4
  for (int r = 0; r < kLockRows; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_set1_ps(bias ? bias[r] : 0.f);
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 4
    for (int r = 0; r < kLockRows; ++r) {
      const float* __restrict xr = xt + static_cast<int64_t>(cols[r * k + j]) * ld;
      const __m256 w = _mm256_set1_ps(vals[r * k + j]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < kLockRows; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(out + r * ldo + 8 * v, acc[r][v]);
}
#endif

// Rows [r0, r1) of yt, one chunk of columns; `grouped`: an N:M pattern (lockstep tiles).
template <typename T>
inline int64_t forward_rows_nm(const T* vals, const int32_t* idx, int64_t k, const T* xt,
                               const T* bias, T* yt, int64_t r0, int64_t r1, int64_t batch,
                               int64_t c0, int c) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    if (c == 32 && kChunk == 32) {
      int64_t o = r0;
      for (; o + kLockRows <= r1; o += kLockRows)
        fwd_rows_nm(idx + o * k, vals + o * k, k, xt + c0, batch, yt + o * batch + c0, batch,
                    bias ? bias + o : nullptr);
      return o;  // the rows left over take the one-row tiles
    }
  }
#endif
  return r0;
}

// xt (n_panels x in x width) panels (one panel: in x B), yt likewise (out rows).
template <typename T>
void forward_impl(const T* vals, const int32_t* idx, int64_t k, const T* xt, const T* bias, T* yt,
                  int64_t n_out, int64_t n_in, int64_t n_panels, int64_t width, bool grouped) {
  const int nt = n_threads((k + 1) * n_out * n_panels * width);
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    row_range(n_out, omp_get_thread_num(), omp_get_num_threads(), r0, r1);
    for (int64_t p = 0; p < n_panels; ++p) {
      const T* xp = xt + p * n_in * width;
      T* yp = yt + p * n_out * width;
      for (int64_t c0 = 0; c0 < width; c0 += kChunk) {
        const int c = static_cast<int>(std::min<int64_t>(kChunk, width - c0));
        const int64_t from =
            grouped ? forward_rows_nm<T>(vals, idx, k, xp, bias, yp, r0, r1, width, c0, c) : r0;
        for (int64_t o = from; o < r1; ++o) {
          const T b = bias ? bias[o] : T(0);
          T* out = yp + o * width + c0;
#ifdef __AVX2__
          if constexpr (std::is_same_v<T, float>) {
            if (c == kChunk) {
              fwd_row_avx<kChunk / 8>(idx + o * k, vals + o * k, k, xp + c0, width, out, b);
              continue;
            }
          }
#endif
          fwd_row<T>(idx + o * k, vals + o * k, k, xp + c0, width, out, b, c);
        }
      }
    }
  }
}

// ----------------------------------------------------------------------- weight gradient
// One row o, `c` batch columns from c0: dw[j] (+)= <dy[0:c], xt[cols[j], 0:c]> for all j.
template <typename T>
inline void dw_row(const int32_t* __restrict cols, int64_t k, const T* __restrict dy,
                   const T* __restrict xt, int64_t ld, T* __restrict dw, bool accumulate, int c) {
  for (int64_t j = 0; j < k; ++j) {
    const T* __restrict xr = xt + static_cast<int64_t>(cols[j]) * ld;
    T d = accumulate ? dw[j] : T(0);
#pragma omp simd reduction(+ : d)
    for (int i = 0; i < c; ++i) d += dy[i] * xr[i];
    dw[j] = d;
  }
}

#ifdef __AVX2__
// The eight sums of eight vectors, as one vector: {sum(v[0]), ..., sum(v[7])}.
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  // a = {s0 s1 s2 s3 | s0' s1' s2' s3'} (low and high 128-bit halves), b likewise for 4..7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// float32, a full tile of kChunkDw = 8 * NV columns: the row's dy tile in NV registers,
// eight entries at a time (eight independent dot products, one joint reduction).
template <int NV>
inline void dw_row_avx(const int32_t* __restrict cols, int64_t k, const float* __restrict dy,
                       const float* __restrict xt, int64_t ld, float* __restrict dw,
                       bool accumulate) {
  __m256 g[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) g[v] = _mm256_loadu_ps(dy + 8 * v);
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 d[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      if (j + u + kPrefetch < k)
        _mm_prefetch(reinterpret_cast<const char*>(xt + static_cast<int64_t>(cols[j + u + kPrefetch]) * ld),
                     _MM_HINT_T0);
      const float* __restrict xr = xt + static_cast<int64_t>(cols[j + u]) * ld;
      d[u] = _mm256_mul_ps(g[0], _mm256_loadu_ps(xr));
#pragma GCC unroll 8
      for (int v = 1; v < NV; ++v) d[u] = _mm256_fmadd_ps(g[v], _mm256_loadu_ps(xr + 8 * v), d[u]);
    }
    __m256 s = hsum8(d);
    if (accumulate) s = _mm256_add_ps(s, _mm256_loadu_ps(dw + j));
    _mm256_storeu_ps(dw + j, s);
  }
  if (j < k) dw_row<float>(cols + j, k - j, dy, xt, ld, dw + j, accumulate, 8 * NV);
}
#endif

template <typename T>
void weight_grad_impl(const int32_t* idx, int64_t k, const T* xt, const T* dyt, T* dw,
                      int64_t n_out, int64_t n_in, int64_t n_panels, int64_t width) {
  const int nt = n_threads(k * n_out * n_panels * width);
#pragma omp parallel num_threads(nt)
  {
    int64_t r0, r1;
    row_range(n_out, omp_get_thread_num(), omp_get_num_threads(), r0, r1);
    for (int64_t p = 0; p < n_panels; ++p) {
      const T* xp = xt + p * n_in * width;
      const T* dyp = dyt + p * n_out * width;
      for (int64_t c0 = 0; c0 < width; c0 += kChunkDw) {
        const int c = static_cast<int>(std::min<int64_t>(kChunkDw, width - c0));
        const bool accumulate = p > 0 || c0 > 0;
        for (int64_t o = r0; o < r1; ++o) {
          const T* dy = dyp + o * width + c0;
#ifdef __AVX2__
          if constexpr (std::is_same_v<T, float>) {
            if (c == kChunkDw) {
              dw_row_avx<kChunkDw / 8>(idx + o * k, k, dy, xp + c0, width, dw + o * k, accumulate);
              continue;
            }
          }
#endif
          dw_row<T>(idx + o * k, k, dy, xp + c0, width, dw + o * k, accumulate, c);
        }
      }
    }
  }
}

// The Python side (rigl/sparse/condensed_ops.py) checks every operand first; these checks are
// the last line against reading or writing out of bounds. Index contents (every column in
// [0, in)) are validated when an index is built or loaded.
void check_condensed(const torch::Tensor& idx, const torch::Tensor& xt) {
  TORCH_CHECK(idx.scalar_type() == torch::kInt32 && idx.dim() == 2 && idx.is_contiguous() &&
                  idx.device().is_cpu(),
              "idx must be a contiguous 2-D int32 CPU tensor");
  TORCH_CHECK((xt.dim() == 2 || xt.dim() == 3) && xt.is_contiguous() && xt.device().is_cpu(),
              "xt must be a contiguous 2-D or 3-D (panels) CPU tensor");
}

// (n_panels, width) of a 2-D (one panel) or 3-D activation.
inline int64_t n_panels(const torch::Tensor& t) { return t.dim() == 3 ? t.size(0) : 1; }

// A tensor of `rows` rows shaped like the activation `like` (2-D or panels).
torch::Tensor empty_act(const torch::Tensor& like, int64_t rows) {
  if (like.dim() == 2) return torch::empty({rows, like.size(1)}, like.options());
  return torch::empty({like.size(0), rows, like.size(2)}, like.options());
}

}  // namespace

// yt (out x B) = W xt (+ bias): values and idx (out x k), xt (in x B).
// `grouped`: the pattern is N:M (entries j of all rows fall in one group of inputs).
torch::Tensor condensed_forward(const torch::Tensor& values, const torch::Tensor& idx,
                                const torch::Tensor& xt, const c10::optional<torch::Tensor>& bias,
                                bool grouped) {
  check_condensed(idx, xt);
  TORCH_CHECK(values.sizes() == idx.sizes() && values.is_contiguous() &&
                  values.scalar_type() == xt.scalar_type() && values.device().is_cpu(),
              "values must be a contiguous CPU tensor of idx's shape and xt's dtype");
  const int64_t n_out = idx.size(0), k = idx.size(1), width = xt.size(-1);
  auto yt = empty_act(xt, n_out);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_condensed_forward", [&] {
    const scalar_t* b = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->is_contiguous() && bias->numel() == n_out && bias->device().is_cpu() &&
                      bias->scalar_type() == values.scalar_type(),
                  "bias must be a contiguous CPU tensor of n_out entries");
      b = bias->data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(values.data_ptr<scalar_t>(), idx.data_ptr<int32_t>(), k,
                           xt.data_ptr<scalar_t>(), b, yt.data_ptr<scalar_t>(), n_out,
                           xt.size(-2), n_panels(xt), width, grouped);
  });
  return yt;
}

// dW (out x k) at the active entries: dW[o, j] = <dyt[o, :], xt[idx[o, j], :]>.
torch::Tensor condensed_weight_grad(const torch::Tensor& idx, const torch::Tensor& xt,
                                    const torch::Tensor& dyt) {
  check_condensed(idx, xt);
  TORCH_CHECK(dyt.dim() == xt.dim() && dyt.is_contiguous() && dyt.device().is_cpu() &&
                  dyt.size(-2) == idx.size(0) && dyt.size(-1) == xt.size(-1) &&
                  n_panels(dyt) == n_panels(xt) && dyt.scalar_type() == xt.scalar_type(),
              "dyt must be a contiguous CPU tensor (out x B, or panels) of xt's dtype and batch");
  const int64_t n_out = idx.size(0), k = idx.size(1), width = xt.size(-1);
  const int64_t batch = n_panels(xt) * width;
  // An empty batch runs no chunk: the gradient is a sum of nothing, zero.
  auto dw = batch == 0 ? torch::zeros({n_out, k}, xt.options()) : torch::empty({n_out, k}, xt.options());
  if (batch == 0) return dw;
  AT_DISPATCH_FLOATING_TYPES(xt.scalar_type(), "rigl_condensed_weight_grad", [&] {
    weight_grad_impl<scalar_t>(idx.data_ptr<int32_t>(), k, xt.data_ptr<scalar_t>(),
                               dyt.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(), n_out,
                               xt.size(-2), n_panels(xt), width);
  });
  return dw;
}

// Called from the PYBIND11_MODULE of sparse_linear.cpp (one extension, two sources).
void bind_condensed(pybind11::module_& m) {
  m.def("condensed_forward", &condensed_forward, "yt = W xt + bias, W condensed (out x k)");
  m.def("condensed_weight_grad", &condensed_weight_grad, "dW at the active entries (out x k)");
}
