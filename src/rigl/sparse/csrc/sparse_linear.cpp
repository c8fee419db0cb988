// CPU kernels of the compressed sparse linear layer (rigl.sparse).
//
// Layout (chosen so that every inner loop runs over the batch, contiguously):
//   W   (out x in) sparse: CSR  row_ptr[out+1], col_idx[nnz]   (int32), values[nnz]
//                          CSC  col_ptr[in+1],  row_idx[nnz],  perm[nnz] (int32)
//                          with values_csc[k] = values[perm[k]]; rebuilt only when the
//                          topology changes (every ΔT steps), never per step.
//   activations are held transposed, feature-major: xt (in x B), yt (out x B),
//   dyt (out x B), dxt (in x B), row stride `ld` (= B).
//
//   forward          yt[o, :]  = bias[o] + sum_{j in row o} W[o, j] * xt[j, :]
//   fused backward   dxt[i, :] = sum_{o in col i} W[o, i] * dyt[o, :]
//                    dW[o, i]  = <dyt[o, :], xt[i, :]>          (SDDMM, active entries only)
//
// The fused backward walks W column by column: the gathered row dyt[o, :] is loaded once
// and used twice, by the dx accumulation and by the dW dot product (xt[i, :] stays in L1).
// The batch is cut into chunks of C columns (a compile-time size) so that the
// accumulators live in vector registers; the loop over chunks is outermost so that the
// gathered rows of one chunk (features x C floats) stay in L2.

#include <torch/extension.h>

#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

#ifndef RIGL_CHUNK_FWD
#define RIGL_CHUNK_FWD 64
#endif
#ifndef RIGL_CHUNK_BWD
#define RIGL_CHUNK_BWD 32
#endif
#ifndef RIGL_PREFETCH
#define RIGL_PREFETCH 8
#endif
constexpr int kChunkFwd = RIGL_CHUNK_FWD;  // batch columns per register tile, forward
constexpr int kChunkBwd = RIGL_CHUNK_BWD;  // batch columns per register tile, fused backward

int n_threads() { return std::max(1, at::get_num_threads()); }

// Threads for `work` multiply-adds: one below ~64K, where waking a team costs more than
// it saves (and on a busy machine a barrier can wait a whole scheduler slice).
int n_threads(int64_t work) { return work < (int64_t{1} << 16) ? 1 : n_threads(); }

// ------------------------------------------------------------------------- transpose
// dst (cols x rows) = src (rows x cols)^T, both contiguous; tiles of 32 x 32 (8 x 8 AVX
// register transposes for float32) so that both sides are read and written by cache line.
#ifdef __AVX2__
inline void transpose8x8(const float* src, int64_t ls, float* dst, int64_t ld) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 2; ++j) {
      const __m256 a = t[4 * i + j], b = t[4 * i + 2 + j];
      r[4 * i + 2 * j] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 2 * j + 1] = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// --------------------------------------------------------------------------- forward
template <typename T, int C>
inline void fwd_tile(const int32_t* __restrict cols, const T* __restrict vals, int64_t n,
                     const T* __restrict xt, int64_t ld, T* __restrict out, T b) {
  T acc[C];
#pragma omp simd
  for (int i = 0; i < C; ++i) acc[i] = b;
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict xr = xt + static_cast<int64_t>(cols[k]) * ld;
    const T w = vals[k];
#pragma omp simd
    for (int i = 0; i < C; ++i) acc[i] += w * xr[i];
  }
#pragma omp simd
  for (int i = 0; i < C; ++i) out[i] = acc[i];
}

#ifdef __AVX2__
// float32 tiles with explicit AVX2/FMA: NV vectors of 8 batch columns in registers, and a
// software prefetch of the row gathered kPrefetch non-zeros ahead (the gathered rows are
// random, so the hardware prefetchers cannot guess them).
constexpr int kPrefetch = RIGL_PREFETCH;

template <int NV>
inline void fwd_tile_avx(const int32_t* __restrict cols, const float* __restrict vals, int64_t n,
                         const float* __restrict xt, int64_t ld, float* __restrict out, float b) {
  __m256 acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_set1_ps(b);
  for (int64_t k = 0; k < n; ++k) {
    if (k + kPrefetch < n) {
      const char* pf = reinterpret_cast<const char*>(xt + static_cast<int64_t>(cols[k + kPrefetch]) * ld);
#pragma GCC unroll 16
      for (int l = 0; l < NV * 32; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    }
    const float* __restrict xr = xt + static_cast<int64_t>(cols[k]) * ld;
    const __m256 w = _mm256_set1_ps(vals[k]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * v), acc[v]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

template <>
inline void fwd_tile<float, kChunkFwd>(const int32_t* __restrict cols, const float* __restrict vals,
                                       int64_t n, const float* __restrict xt, int64_t ld,
                                       float* __restrict out, float b) {
  fwd_tile_avx<kChunkFwd / 8>(cols, vals, n, xt, ld, out, b);
}
#endif

template <typename T>
inline void fwd_tile_any(const int32_t* __restrict cols, const T* __restrict vals, int64_t n,
                         const T* __restrict xt, int64_t ld, T* __restrict out, T b, int c) {
  for (int i = 0; i < c; ++i) out[i] = b;
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict xr = xt + static_cast<int64_t>(cols[k]) * ld;
    const T w = vals[k];
#pragma omp simd
    for (int i = 0; i < c; ++i) out[i] += w * xr[i];
  }
}

// Tiles of g <= kGroup rows x `valid` columns (row r at buf + r * Pitch) stored transposed,
// row-major: dst[t * ld + r] = buf[r * Pitch + t]. Sixteen full float32 rows go through
// two 8 x 8 register transposes per eight columns, so that each batch row gets 64
// contiguous bytes (a whole cache line) at once: the rows written are ld apart, a power of
// two for most layers, so they share a few cache sets, and a line written half now and
// half later is fetched twice.
#ifndef RIGL_STORE_GROUP
#define RIGL_STORE_GROUP 16
#endif
constexpr int kGroup = RIGL_STORE_GROUP;
static_assert(kGroup % 8 == 0, "groups of whole 8 x 8 transposes");

template <typename T, int Pitch = kChunkFwd>
inline void store_rows_transposed(const T* buf, int64_t g, int64_t valid, T* dst, int64_t ld) {
  int64_t t0 = 0;
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    if (g == kGroup)
      for (; t0 + 8 <= valid; t0 += 8)
        for (int h = 0; h < kGroup; h += 8)
          transpose8x8(buf + h * Pitch + t0, Pitch, dst + t0 * ld + h, ld);
  }
#endif
  for (int64_t t = t0; t < valid; ++t)
    for (int64_t r = 0; r < g; ++r) dst[t * ld + r] = buf[r * Pitch + t];
}

// Output row o of W x + bias over the c columns from c0 of one panel (row stride `width`),
// into out[0:c]: the register tile for a full chunk, the general loop for a shorter one.
template <typename T>
inline void fwd_row(const T* vals, const int32_t* row_ptr, const int32_t* col_idx, int64_t o,
                    const T* xp, int64_t width, int64_t c0, int64_t c, T* out, const T* bias) {
  const int64_t p = row_ptr[o], n = row_ptr[o + 1] - p;
  const T b = bias ? bias[o] : T(0);
  if (c == kChunkFwd)
    fwd_tile<T, kChunkFwd>(col_idx + p, vals + p, n, xp + c0, width, out, b);
  else
    fwd_tile_any<T>(col_idx + p, vals + p, n, xp + c0, width, out, b, static_cast<int>(c));
}

// y = W x + bias on panels of xt (n_panels x n_in x width; one panel: n_in x B). Output in
// panels yt (n_panels x n_out x width), or, when y_rm is given, row-major y_rm (n_rows x
// n_out): the batch's rows only (not the padding), sixteen output rows at a time through an
// L1 buffer, which saves a transpose of the whole output afterwards.
template <typename T>
void forward_impl(const T* vals, const int32_t* row_ptr, const int32_t* col_idx, const T* xt,
                  const T* bias, T* yt, int64_t n_out, int64_t n_in, int64_t n_panels,
                  int64_t width, T* y_rm, int64_t n_rows) {
  const int nt = n_threads((row_ptr[n_out] + n_out) * n_panels * width);
  const int64_t per_panel = (width + kChunkFwd - 1) / kChunkFwd;
  const int64_t n_chunks = n_panels * per_panel;
  // Row blocks small enough for dynamic balancing (rows differ in their counts); whole
  // groups of kGroup rows for the row-major output.
  int64_t rows_per_block = std::max<int64_t>(1, n_out / (16 * nt));
  if (y_rm) rows_per_block = (rows_per_block + kGroup - 1) / kGroup * kGroup;
  const int64_t n_blocks = (n_out + rows_per_block - 1) / rows_per_block;
  const int64_t n_tasks = n_chunks * n_blocks;  // chunk-major: one chunk's rows stay hot
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t t = 0; t < n_tasks; ++t) {
    const int64_t chunk = t / n_blocks, panel = chunk / per_panel;
    const int64_t c0 = (chunk % per_panel) * kChunkFwd;
    const int64_t c = std::min<int64_t>(kChunkFwd, width - c0);
    const T* xp = xt + panel * n_in * width;
    const int64_t r0 = (t % n_blocks) * rows_per_block;
    const int64_t r1 = std::min(n_out, r0 + rows_per_block);
    if (y_rm) {
      const int64_t first = panel * width + c0;  // the batch row of the chunk's column 0
      const int64_t valid = std::min<int64_t>(c, n_rows - first);
      if (valid <= 0) continue;  // padding only
      alignas(64) T buf[kGroup * kChunkFwd];
      for (int64_t o0 = r0; o0 < r1; o0 += kGroup) {
        const int64_t g = std::min<int64_t>(kGroup, r1 - o0);
        for (int64_t r = 0; r < g; ++r)
          fwd_row(vals, row_ptr, col_idx, o0 + r, xp, width, c0, c, buf + r * kChunkFwd, bias);
        store_rows_transposed<T>(buf, g, valid, y_rm + first * n_out + o0, n_out);
      }
      continue;
    }
    T* yp = yt + panel * n_out * width;
    for (int64_t o = r0; o < r1; ++o)
      fwd_row(vals, row_ptr, col_idx, o, xp, width, c0, c, yp + o * width + c0, bias);
  }
}

// -------------------------------------------------------------------- fused backward
// One column i of W, one chunk of the batch. WANT_DX / WANT_DW select the products.
// dw_acc: partial dot products of earlier chunks (CSC order), or null for the first.
// dw_out: where the finished dot product goes: CSC-order scratch, or values order via perm.
template <typename T, int C, bool WANT_DX, bool WANT_DW>
inline void bwd_tile(const int32_t* __restrict rows, const T* __restrict vals_csc, int64_t n,
                     const T* __restrict dyt, const T* __restrict xr, int64_t ld,
                     T* __restrict dx_out, const T* __restrict dw_acc, T* __restrict dw_out,
                     const int32_t* __restrict perm, bool dx_accum) {
  T acc[C];
  T x[C];
#pragma omp simd
  for (int i = 0; i < C; ++i) {
    acc[i] = (WANT_DX && dx_accum) ? dx_out[i] : T(0);
    x[i] = xr[i];
  }
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict g = dyt + static_cast<int64_t>(rows[k]) * ld;
    if (WANT_DX) {
      const T w = vals_csc[k];
#pragma omp simd
      for (int i = 0; i < C; ++i) acc[i] += w * g[i];
    }
    if (WANT_DW) {
      T d = dw_acc ? dw_acc[k] : T(0);
#pragma omp simd reduction(+ : d)
      for (int i = 0; i < C; ++i) d += g[i] * x[i];
      if (perm)
        dw_out[perm[k]] = d;
      else
        dw_out[k] = d;
    }
  }
  if (WANT_DX) {
#pragma omp simd
    for (int i = 0; i < C; ++i) dx_out[i] = acc[i];
  }
}

#ifdef __AVX2__
// Sum of each of four vectors: {sum(a), sum(b), sum(c), sum(d)}.
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// float32 fused backward tile: non-zeros in groups of four so that four dot products are
// reduced together (one horizontal reduction per four entries instead of one per entry).
template <int NV, bool WANT_DX, bool WANT_DW>
inline void bwd_tile_avx(const int32_t* __restrict rows, const float* __restrict vals_csc,
                         int64_t n, const float* __restrict dyt, const float* __restrict xr,
                         int64_t ld, float* __restrict dx_out, const float* __restrict dw_acc,
                         float* __restrict dw_out, const int32_t* __restrict perm,
                         bool dx_accum) {
  __m256 acc[NV];
  __m256 x[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) {
    acc[v] = (WANT_DX && dx_accum) ? _mm256_loadu_ps(dx_out + 8 * v) : _mm256_setzero_ps();
    x[v] = _mm256_loadu_ps(xr + 8 * v);
  }
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    __m256 d[4];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      if (k + u + kPrefetch < n) {
        const char* pf =
            reinterpret_cast<const char*>(dyt + static_cast<int64_t>(rows[k + u + kPrefetch]) * ld);
#pragma GCC unroll 16
        for (int l = 0; l < NV * 32; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
      }
      const float* __restrict g = dyt + static_cast<int64_t>(rows[k + u]) * ld;
      const __m256 w = _mm256_set1_ps(WANT_DX ? vals_csc[k + u] : 0.f);
      d[u] = _mm256_setzero_ps();
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __m256 gv = _mm256_loadu_ps(g + 8 * v);
        if (WANT_DX) acc[v] = _mm256_fmadd_ps(w, gv, acc[v]);
        if (WANT_DW) d[u] = _mm256_fmadd_ps(gv, x[v], d[u]);
      }
    }
    if (WANT_DW) {
      __m128 s = hsum4(d[0], d[1], d[2], d[3]);
      if (dw_acc) s = _mm_add_ps(s, _mm_loadu_ps(dw_acc + k));
      if (perm) {
        alignas(16) float tmp[4];
        _mm_store_ps(tmp, s);
        for (int u = 0; u < 4; ++u) dw_out[perm[k + u]] = tmp[u];
      } else {
        _mm_storeu_ps(dw_out + k, s);
      }
    }
  }
  for (; k < n; ++k) {  // remainder, one entry at a time
    const float* __restrict g = dyt + static_cast<int64_t>(rows[k]) * ld;
    const __m256 w = _mm256_set1_ps(WANT_DX ? vals_csc[k] : 0.f);
    __m256 dv = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m256 gv = _mm256_loadu_ps(g + 8 * v);
      if (WANT_DX) acc[v] = _mm256_fmadd_ps(w, gv, acc[v]);
      if (WANT_DW) dv = _mm256_fmadd_ps(gv, x[v], dv);
    }
    if (WANT_DW) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(dv), _mm256_extractf128_ps(dv, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      float dsum = _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
      if (dw_acc) dsum += dw_acc[k];
      if (perm)
        dw_out[perm[k]] = dsum;
      else
        dw_out[k] = dsum;
    }
  }
  if (WANT_DX) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(dx_out + 8 * v, acc[v]);
  }
}
#endif

template <typename T, bool WANT_DX, bool WANT_DW>
inline void bwd_tile_any(const int32_t* __restrict rows, const T* __restrict vals_csc, int64_t n,
                         const T* __restrict dyt, const T* __restrict xr, int64_t ld,
                         T* __restrict dx_out, const T* __restrict dw_acc, T* __restrict dw_out,
                         const int32_t* __restrict perm, int c, bool dx_accum) {
  if (WANT_DX && !dx_accum)
    for (int i = 0; i < c; ++i) dx_out[i] = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T* __restrict g = dyt + static_cast<int64_t>(rows[k]) * ld;
    if (WANT_DX) {
      const T w = vals_csc[k];
#pragma omp simd
      for (int i = 0; i < c; ++i) dx_out[i] += w * g[i];
    }
    if (WANT_DW) {
      T d = dw_acc ? dw_acc[k] : T(0);
#pragma omp simd reduction(+ : d)
      for (int i = 0; i < c; ++i) d += g[i] * xr[i];
      if (perm)
        dw_out[perm[k]] = d;
      else
        dw_out[k] = d;
    }
  }
}

template <typename T, bool WANT_DX, bool WANT_DW>
inline void bwd_tile_full(const int32_t* rows, const T* vals_csc, int64_t n, const T* dyt,
                          const T* xr, int64_t ld, T* dx_out, const T* dw_acc, T* dw_out,
                          const int32_t* perm, bool dx_accum) {
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    bwd_tile_avx<kChunkBwd / 8, WANT_DX, WANT_DW>(rows, vals_csc, n, dyt, xr, ld, dx_out, dw_acc,
                                                  dw_out, perm, dx_accum);
    return;
  }
#endif
  bwd_tile<T, kChunkBwd, WANT_DX, WANT_DW>(rows, vals_csc, n, dyt, xr, ld, dx_out, dw_acc, dw_out,
                                           perm, dx_accum);
}

// Split columns [0, n_in) into nt contiguous parts of about equal work (nnz + a per-column
// constant), so that every column belongs to one thread for all blocks and chunks: the dx
// rows and the dW partial sums of one entry are never touched by two threads.
std::vector<int64_t> balanced_parts(const int32_t* col_ptr, int64_t n_blocks, int64_t n_in,
                                    int nt) {
  std::vector<double> work(n_in + 1, 0.0);
  for (int64_t i = 0; i < n_in; ++i) {
    double w = 4.0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int32_t* ptr = col_ptr + b * (n_in + 1);
      w += ptr[i + 1] - ptr[i];
    }
    work[i + 1] = work[i] + w;
  }
  std::vector<int64_t> parts(nt + 1, n_in);
  parts[0] = 0;
  int64_t j = 0;
  for (int t = 1; t < nt; ++t) {
    const double goal = work[n_in] * t / nt;
    while (j < n_in && work[j] < goal) ++j;
    parts[t] = j;
  }
  return parts;
}

// Blocked CSC: the rows are cut into blocks of about 64K non-zeros; block b has its own CSC
// (col_ptr + b * (n_in + 1) points into row_idx / perm). Walking one block at a time keeps
// the gathered dyt rows (a few hundred rows x chunk) in L1 and the perm targets (values,
// dW) inside a window of the block's non-zeros in L2; dx of a column is accumulated across
// blocks in dxt (one extra read-modify-write of a dxt row per block).
// With dx_rm (panels only), dx goes row-major into dx_rm (n_rows x n_in) instead of dxt:
// a thread's columns of one chunk are finished in an L2 buffer (all row blocks added),
// then stored sixteen columns at a time through 8 x 8 transposes, the padding left out.
template <typename T, bool WANT_DX, bool WANT_DW>
void backward_impl(const T* vals, const int32_t* col_ptr, int64_t n_blocks,
                   const int32_t* row_idx, const int32_t* perm, const T* xt, const T* dyt, T* dxt,
                   T* dw, int64_t n_in, int64_t n_out, int64_t nnz, int64_t n_panels,
                   int64_t width, T* dx_rm, int64_t n_rows) {
  const int nt = n_threads((nnz + n_in) * n_panels * width);
  const int64_t per_panel = (width + kChunkBwd - 1) / kChunkBwd;
  const int64_t n_chunks = n_panels * per_panel;
  std::vector<T> vals_csc(WANT_DX ? nnz : 0);
  std::vector<T> dw_csc(WANT_DW && n_chunks > 1 ? nnz : 0);
  const std::vector<int64_t> parts = balanced_parts(col_ptr, n_blocks, n_in, nt);
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int64_t i0 = tid < nt ? parts[tid] : 0, i1 = tid < nt ? parts[tid + 1] : 0;
    if (WANT_DX) {  // values in blocked-CSC order, this thread's columns only
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int32_t* ptr = col_ptr + b * (n_in + 1);
        for (int64_t k = ptr[i0]; k < ptr[i1]; ++k) vals_csc[k] = vals[perm[k]];
      }
    }
    std::vector<T> dx_buf(WANT_DX && dx_rm ? (i1 - i0) * kChunkBwd : 0);
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      const int64_t panel = ch / per_panel, c0 = (ch % per_panel) * kChunkBwd;
      const int64_t c = std::min<int64_t>(kChunkBwd, width - c0);
      const T* xp = xt + panel * n_in * width;
      const T* dyp = dyt + panel * n_out * width;
      T* dxp = WANT_DX && !dx_rm ? dxt + panel * n_in * width : nullptr;
      const bool first = ch == 0, last = ch == n_chunks - 1;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int32_t* ptr = col_ptr + b * (n_in + 1);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t p = ptr[i], n = ptr[i + 1] - p;
          if (n == 0 && b > 0) continue;
          const T* acc_in = (WANT_DW && !first) ? dw_csc.data() + p : nullptr;
          T* out = WANT_DW ? (last ? dw : dw_csc.data() + p) : nullptr;
          const int32_t* pm = last ? perm + p : nullptr;
          T* dxo = !WANT_DX ? nullptr
                   : dx_rm  ? dx_buf.data() + (i - i0) * kChunkBwd
                            : dxp + i * width + c0;
          const T* vc = WANT_DX ? vals_csc.data() + p : nullptr;
          const T* xr = xp + i * width + c0;
          if (c == kChunkBwd)
            bwd_tile_full<T, WANT_DX, WANT_DW>(row_idx + p, vc, n, dyp + c0, xr, width, dxo,
                                               acc_in, out, pm, b > 0);
          else
            bwd_tile_any<T, WANT_DX, WANT_DW>(row_idx + p, vc, n, dyp + c0, xr, width, dxo,
                                              acc_in, out, pm, static_cast<int>(c), b > 0);
        }
      }
      if (WANT_DX && dx_rm) {  // this chunk's dx of the thread's columns is final
        const int64_t row0 = panel * width + c0;
        const int64_t valid = std::min<int64_t>(c, n_rows - row0);
        for (int64_t i = i0; i < i1 && valid > 0; i += kGroup)
          store_rows_transposed<T, kChunkBwd>(dx_buf.data() + (i - i0) * kChunkBwd,
                                              std::min<int64_t>(kGroup, i1 - i), valid,
                                              dx_rm + row0 * n_in + i, n_in);
      }
    }
  }
}


// dst[c * ld + r] = src[r * ls + c] over the tile rows [r0, r1) x columns [c0, c1).
template <typename T>
inline void transpose_tile(const T* src, int64_t ls, T* dst, int64_t ld, int64_t r0, int64_t r1,
                           int64_t c0, int64_t c1) {
#ifdef __AVX2__
  if constexpr (std::is_same_v<T, float>) {
    if ((r1 - r0) % 8 == 0 && (c1 - c0) % 8 == 0) {
      for (int64_t r = r0; r < r1; r += 8)
        for (int64_t c = c0; c < c1; c += 8) transpose8x8(src + r * ls + c, ls, dst + c * ld + r, ld);
      return;
    }
  }
#endif
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) dst[c * ld + r] = src[r * ls + c];
}

// Panels: the batch (N rows of a row-major (N x F) activation) cut into n_panels slices of
// `width` rows, each stored transposed, feature-major: panel p is (F x width), panels one
// after another. With one panel of width N this is the plain transpose (F x N). The kernels
// walk one panel at a time, so the rows they gather are `width` floats apart instead of N:
// at N = 4096 the gathered rows of one chunk lie on as many pages as there are features,
// and the forward ran at a fifth of its speed at N = 512 (512 x 2048 layer, density 0.02).
// to_panels: src (N x F) -> dst (n_panels x F x width), the last panel's missing rows zero.
// from_panels: src (n_panels x F x width) -> dst (N x F), the padding left out.
// to_panels can also sum the columns of src (sums: f entries; a bias gradient from the
// output gradient in the same pass): each thread sums its tiles, the threads' sums added.
template <typename T>
void panels_impl(const T* src, T* dst, int64_t n, int64_t f, int64_t width, bool to,
                 T* sums = nullptr) {
  constexpr int64_t kTile = 32;
  const int64_t n_panels = (n + width - 1) / width;
  const int64_t tw = (width + kTile - 1) / kTile, tf = (f + kTile - 1) / kTile;
  const int64_t per_panel = tw * tf;
  const int nt = n_threads(n * f);
  std::vector<T> partial(sums ? nt * f : 0, T(0));
#pragma omp parallel num_threads(nt)
  {
    T* mine = sums ? partial.data() + omp_get_thread_num() * f : nullptr;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_panels * per_panel; ++t) {
      const int64_t p = t / per_panel, valid = std::min(width, n - p * width);
      const int64_t w0 = ((t % per_panel) / tf) * kTile, f0 = (t % tf) * kTile;
      const int64_t w1 = std::min(width, w0 + kTile), f1 = std::min(f, f0 + kTile);
      const int64_t wv = std::min(w1, valid);  // rows of the batch that exist
      if (to) {
        const T* block = src + p * width * f;
        T* panel = dst + p * f * width;
        if (w0 < wv) transpose_tile(block, f, panel, width, w0, wv, f0, f1);
        for (int64_t c = f0; c < f1; ++c)
          for (int64_t r = std::max(w0, wv); r < w1; ++r) panel[c * width + r] = T(0);
        if (mine)
          for (int64_t r = w0; r < wv; ++r)
#pragma omp simd
            for (int64_t c = f0; c < f1; ++c) mine[c] += block[r * f + c];
      } else if (w0 < wv) {
        transpose_tile(src + p * f * width, width, dst + p * width * f, f, f0, f1, w0, wv);
      }
    }
  }
  if (sums)
    for (int64_t c = 0; c < f; ++c) {
      T total = T(0);
      for (int i = 0; i < nt; ++i) total += partial[i * f + c];
      sums[c] = total;
    }
}

// The Python side (rigl/sparse/kernels.py) checks every operand against the index before
// calling in; these checks are the last line: what a wrong tensor would make the kernels read
// or write out of bounds (index contents are validated when an index is built or loaded).
void check_index(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32, name, " must be int32");
  TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), name, " must be a contiguous CPU tensor");
}

// Activations: (rows x B) for one panel, or (n_panels x rows x width).
void check_act(const torch::Tensor& t, const torch::Tensor& values, const char* name) {
  TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 2-D or 3-D (panels) CPU tensor");
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), name, " dtype differs from values");
}

// (n_panels, rows, width) of a 2-D (one panel) or 3-D activation.
struct Panels {
  int64_t n, rows, width;
  explicit Panels(const torch::Tensor& t)
      : n(t.dim() == 3 ? t.size(0) : 1), rows(t.size(-2)), width(t.size(-1)) {}
};

// A tensor of `rows` rows shaped like the activation `like` (2-D or panels).
torch::Tensor empty_like_act(const torch::Tensor& like, int64_t rows) {
  if (like.dim() == 2) return torch::empty({rows, like.size(1)}, like.options());
  return torch::empty({like.size(0), rows, like.size(2)}, like.options());
}

void check_values(const torch::Tensor& values, int64_t nnz) {
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.device().is_cpu(),
              "values must be a contiguous 1-D CPU tensor");
  TORCH_CHECK(values.numel() == nnz, "values has ", values.numel(), " entries, the index ", nnz);
}

}  // namespace

// yt (n_out x B) = W xt (+ bias), with xt (n_in x B) contiguous, or panel by panel; with
// rows >= 0 (panels only), y row-major (rows x n_out) instead, the padding left out.
torch::Tensor forward(const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const torch::Tensor& col_idx, const torch::Tensor& xt,
                      const c10::optional<torch::Tensor>& bias, int64_t rows) {
  check_index(row_ptr, "row_ptr");
  check_index(col_idx, "col_idx");
  check_act(xt, values, "xt");
  check_values(values, col_idx.numel());
  const Panels pn(xt);
  const int64_t n_out = row_ptr.numel() - 1;
  const bool row_major = rows >= 0;
  TORCH_CHECK(!row_major || (xt.dim() == 3 && rows > (pn.n - 1) * pn.width &&
                             rows <= pn.n * pn.width),
              "rows must be the batch size of the panels");
  auto yt = row_major ? torch::empty({rows, n_out}, xt.options()) : empty_like_act(xt, n_out);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_forward", [&] {
    const scalar_t* b = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->is_contiguous() && bias->numel() == n_out && bias->device().is_cpu(),
                  "bias must be a contiguous CPU tensor of n_out entries");
      b = bias->data_ptr<scalar_t>();
    }
    forward_impl<scalar_t>(values.data_ptr<scalar_t>(), row_ptr.data_ptr<int32_t>(),
                           col_idx.data_ptr<int32_t>(), xt.data_ptr<scalar_t>(), b,
                           row_major ? nullptr : yt.data_ptr<scalar_t>(), n_out, pn.rows, pn.n,
                           pn.width, row_major ? yt.data_ptr<scalar_t>() : nullptr, rows);
  });
  return yt;
}

// Returns (dxt (n_in x B) or empty, dW values (nnz) or empty); panels as xt and dyt are,
// or with rows >= 0 (panels only) dx row-major (rows x n_in).
std::vector<torch::Tensor> backward(const torch::Tensor& values, const torch::Tensor& col_ptr,
                                    int64_t n_blocks,
                                    const torch::Tensor& row_idx, const torch::Tensor& perm,
                                    const torch::Tensor& xt, const torch::Tensor& dyt,
                                    bool want_dx, bool want_dw, int64_t rows) {
  check_index(col_ptr, "col_ptr");
  check_index(row_idx, "row_idx");
  check_index(perm, "perm");
  check_act(xt, values, "xt");
  check_act(dyt, values, "dyt");
  check_values(values, row_idx.numel());
  TORCH_CHECK(perm.numel() == row_idx.numel(), "perm and row_idx differ in length");
  const Panels px(xt), py(dyt);
  TORCH_CHECK(xt.dim() == dyt.dim() && px.n == py.n && px.width == py.width,
              "xt and dyt differ in batch size or panels");
  TORCH_CHECK(n_blocks >= 1 && col_ptr.numel() % n_blocks == 0, "bad blocked col_ptr");
  const int64_t n_in = col_ptr.numel() / n_blocks - 1, nnz = values.numel();
  const int64_t batch = px.n * px.width;
  TORCH_CHECK(px.rows == n_in, "xt has ", px.rows, " rows, the index ", n_in, " columns");
  const bool row_major = rows >= 0;
  TORCH_CHECK(!row_major || (xt.dim() == 3 && rows > (px.n - 1) * px.width &&
                             rows <= px.n * px.width),
              "rows must be the batch size of the panels");
  torch::Tensor dxt, dw;
  if (want_dx) dxt = row_major ? torch::empty({rows, n_in}, xt.options()) : empty_like_act(xt, n_in);
  // An empty batch runs no chunk, so nothing would write dW: it is a sum of nothing, zero.
  if (want_dw) dw = batch == 0 ? torch::zeros({nnz}, values.options())
                                : torch::empty({nnz}, values.options());
  if ((!want_dx && !want_dw) || batch == 0) return {dxt, dw};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_backward", [&] {
    auto run = [&](auto impl) {
      impl(values.data_ptr<scalar_t>(), col_ptr.data_ptr<int32_t>(), n_blocks,
           row_idx.data_ptr<int32_t>(),
           perm.data_ptr<int32_t>(), xt.data_ptr<scalar_t>(), dyt.data_ptr<scalar_t>(),
           want_dx && !row_major ? dxt.data_ptr<scalar_t>() : nullptr,
           want_dw ? dw.data_ptr<scalar_t>() : nullptr, n_in, py.rows, nnz, px.n, px.width,
           want_dx && row_major ? dxt.data_ptr<scalar_t>() : nullptr, rows);
    };
    if (want_dx && want_dw)
      run(backward_impl<scalar_t, true, true>);
    else if (want_dx)
      run(backward_impl<scalar_t, true, false>);
    else
      run(backward_impl<scalar_t, false, true>);
  });
  return {dxt, dw};
}

// src (N x F) row-major -> (n_panels x F x width) feature-major panels (see panels_impl).
torch::Tensor to_panels(const torch::Tensor& src, int64_t width) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous(), "src must be a contiguous 2-D tensor");
  const int64_t n = src.size(0), f = src.size(1);
  TORCH_CHECK(width >= 1 && width <= std::max<int64_t>(n, 1), "panel width out of range");
  auto dst = torch::empty({(n + width - 1) / width, f, width}, src.options());
  // A plain copy: the 16-bit floating types too (the products compute them in float32).
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "rigl_sparse_to_panels", [&] {
    panels_impl<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), n, f, width, true);
  });
  return dst;
}

// to_panels(src, width) and the column sums of src (F), in one pass (float32 / float64).
std::vector<torch::Tensor> to_panels_and_sums(const torch::Tensor& src, int64_t width) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous(), "src must be a contiguous 2-D tensor");
  const int64_t n = src.size(0), f = src.size(1);
  TORCH_CHECK(width >= 1 && width <= std::max<int64_t>(n, 1), "panel width out of range");
  auto dst = torch::empty({(n + width - 1) / width, f, width}, src.options());
  auto sums = torch::empty({f}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "rigl_sparse_to_panels_and_sums", [&] {
    panels_impl<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), n, f, width, true,
                          sums.data_ptr<scalar_t>());
  });
  return {dst, sums};
}

// (n_panels x F x width) panels -> (N x F) row-major, the padding of the last panel dropped.
torch::Tensor from_panels(const torch::Tensor& src, int64_t n) {
  TORCH_CHECK(src.dim() == 3 && src.is_contiguous(), "src must be contiguous panels");
  const int64_t n_panels = src.size(0), f = src.size(1), width = src.size(2);
  TORCH_CHECK(n > (n_panels - 1) * width && n <= n_panels * width,
              "n does not match the number of panels");
  auto dst = torch::empty({n, f}, src.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(),
                                  "rigl_sparse_from_panels", [&] {
    panels_impl<scalar_t>(src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), n, f, width, false);
  });
  return dst;
}

// Contiguous transpose of a contiguous 2-D tensor: one panel.
torch::Tensor transpose(const torch::Tensor& src) {
  TORCH_CHECK(src.dim() == 2 && src.is_contiguous(), "src must be a contiguous 2-D tensor");
  return to_panels(src, std::max<int64_t>(src.size(0), 1)).view({src.size(1), src.size(0)});
}

// Blocked CSC of a CSR pattern (rebuilt at every topology update): one counting sort per
// row block, blocks in parallel. Within a (block, column) the rows stay ascending, as in
// a stable sort of the CSR positions by (block, column).
std::vector<torch::Tensor> csc_index(const torch::Tensor& row_ptr, const torch::Tensor& col_idx,
                                     const torch::Tensor& block_rows, int64_t n_in) {
  check_index(row_ptr, "row_ptr");
  check_index(col_idx, "col_idx");
  check_index(block_rows, "block_rows");
  const int64_t n_blocks = block_rows.numel() - 1, nnz = col_idx.numel();
  TORCH_CHECK(n_blocks >= 1 && n_in >= 0, "bad block_rows or n_in");
  auto opts = row_ptr.options();
  auto col_ptr = torch::empty({n_blocks * (n_in + 1)}, opts);
  auto row_idx = torch::empty({nnz}, opts);
  auto perm = torch::empty({nnz}, opts);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const int32_t* br = block_rows.data_ptr<int32_t>();
  int32_t* cp = col_ptr.data_ptr<int32_t>();
  int32_t* ri = row_idx.data_ptr<int32_t>();
  int32_t* pm = perm.data_ptr<int32_t>();
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads(nnz + n_blocks * n_in))
  for (int64_t b = 0; b < n_blocks; ++b) {
    int32_t* ptr = cp + b * (n_in + 1);
    const int64_t r0 = br[b], r1 = br[b + 1];
    std::fill(ptr, ptr + n_in + 1, 0);
    for (int64_t k = rp[r0]; k < rp[r1]; ++k) ++ptr[ci[k] + 1];
    ptr[0] = rp[r0];
    for (int64_t j = 0; j < n_in; ++j) ptr[j + 1] += ptr[j];
    std::vector<int32_t> next(ptr, ptr + n_in);
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        const int32_t pos = next[ci[k]]++;
        ri[pos] = static_cast<int32_t>(r);
        pm[pos] = static_cast<int32_t>(k);
      }
    }
  }
  return {col_ptr, row_idx, perm};
}

// The active set after a topology update, sorted: the kept old positions (old_flat sorted,
// keep[i] says whether old_flat[i] stays) merged with the grown ones (sorted, none kept).
// slot[o] is the old position of merged[o] (kept, or dropped and grown again), else -1.
std::vector<torch::Tensor> merge_plan(const torch::Tensor& old_flat, const torch::Tensor& keep,
                                      const torch::Tensor& grown) {
  TORCH_CHECK(old_flat.scalar_type() == torch::kInt64 && grown.scalar_type() == torch::kInt64,
              "old_flat and grown must be int64");
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.numel() == old_flat.numel(),
              "keep must be a bool tensor the size of old_flat");
  TORCH_CHECK(old_flat.is_contiguous() && keep.is_contiguous() && grown.is_contiguous(),
              "merge_plan needs contiguous tensors");
  const int64_t n = old_flat.numel(), m = grown.numel();
  const int64_t* a = old_flat.data_ptr<int64_t>();
  const int64_t* g = grown.data_ptr<int64_t>();
  const bool* kp = keep.data_ptr<bool>();
  int64_t n_keep = 0;
  for (int64_t i = 0; i < n; ++i) n_keep += kp[i];
  auto merged = torch::empty({n_keep + m}, old_flat.options());
  auto slot = torch::empty({n_keep + m}, old_flat.options());
  int64_t* out = merged.data_ptr<int64_t>();
  int64_t* sl = slot.data_ptr<int64_t>();
  int64_t i = 0, j = 0, o = 0;
  while (i < n || j < m) {
    if (j < m && (i >= n || g[j] < a[i])) {
      out[o] = g[j++];
      sl[o++] = -1;
    } else if (j < m && g[j] == a[i]) {  // dropped and grown again: the old slot
      out[o] = g[j++];
      sl[o++] = i++;
    } else {
      if (kp[i]) {
        out[o] = a[i];
        sl[o++] = i;
      }
      ++i;
    }
  }
  TORCH_CHECK(o == n_keep + m, "grown positions overlap kept ones");
  return {merged, slot};
}

void bind_condensed(pybind11::module_& m);  // condensed_linear.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_condensed(m);
  m.def("transpose", &transpose, "contiguous transpose (tiled, OpenMP)");
  m.def("to_panels", &to_panels, "(N x F) -> feature-major panels (n_panels x F x width)");
  m.def("from_panels", &from_panels, "feature-major panels -> (N x F)");
  m.def("to_panels_and_sums", &to_panels_and_sums, "to_panels and the column sums, one pass");
  m.def("merge_plan", &merge_plan, "kept and grown positions merged, with their old slots");
  m.def("csc_index", &csc_index, "blocked CSC (col_ptr, row_idx, perm) of a CSR pattern");
  m.def("forward", &forward, "yt = W xt + bias (CSR W, feature-major activations)",
        pybind11::arg("values"), pybind11::arg("row_ptr"), pybind11::arg("col_idx"), pybind11::arg("xt"), pybind11::arg("bias"),
        pybind11::arg("rows") = -1);
  m.def("backward", &backward, "fused dxt = W^T dyt and dW = SDDMM(dyt, xt) over blocked CSC W",
        pybind11::arg("values"), pybind11::arg("col_ptr"), pybind11::arg("n_blocks"),
        pybind11::arg("row_idx"), pybind11::arg("perm"), pybind11::arg("xt"), pybind11::arg("dyt"),
        pybind11::arg("want_dx"), pybind11::arg("want_dw"), pybind11::arg("rows") = -1);
}
