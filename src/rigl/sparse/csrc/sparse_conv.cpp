// CPU kernels of the compressed sparse convolution (rigl.sparse.conv): a direct sparse
// convolution vectorised over the batch, no im2col.
//
// The weight W (O x C*KH*KW) is the convolution kernel viewed as a matrix, column
// j = c*KH*KW + a*KW + b (kernel row a, column b), compressed as for the linear layer
// (CSR row_ptr[O+1], col_idx[nnz] int32, values[nnz]).
//
// Layout. Each call copies its NCHW operands, one block of 8 images at a time, into
//   xb[c][h + ph][w + pw][n % 8]     (zero padded; a batch tail padded with zeros),
// so the 8 images of a block sit in one vector register and every active weight moves
// whole vectors, whatever the stride, dilation or plane size (an 8x8 plane vectorises as
// well as a 32x32 one). A batch of fewer than 8 images of a stride-1 convolution that
// keeps its height fills the lanes with bands of rows of its images instead (Lanes,
// Fold). A non-zero W[o, j] reads at one fixed offset of an image block,
// off = ((c*Hx + a*dh)*Wp + b*dw)*8 (Hx = Hp unless folded), computed once per call.
//
//   forward   y[n, o, r, q]  = sum_k W_k xb[off_k + (r*sh*Wp + q*sw)*8]        (gather)
//   dx        stride 1: the same gather over the output gradient padded by d*(K-1) - p,
//             with the kernel transposed and flipped; other strides: a scatter into dxb
//   dW        dW_k = sum_{n, r, q} dyb[o_k, r, q] * xb[off_k + ...]          (at the actives)
//
// A tile of 8 output positions of one row is held in 8 registers while the non-zeros of
// an output row stream through (one load and one FMA per vector, no stores); the tile is
// written back NCHW through an 8x8 register transpose. All threads work on one image block
// at a time (its copy, then its tiles of output rows), so the blocked copy (C*Hp*Wp*8
// values: 2.4 MB for 64 channels at 32x32) is written and read while it is in the cache;
// it lives in scratch memory of the calling thread, reused across calls.
// docs/design.md gives the measurements behind the choice.

#include <torch/extension.h>

#include <omp.h>
#include <sys/mman.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14; older kernels refuse it (EINVAL)
#endif

namespace {

constexpr int kL = 8;  // images per block: the vector lanes

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(kL * sizeof(T)), __may_alias__));
};
template <typename T>
using V = typename VecOf<T>::type;

template <typename T>
inline V<T>& vat(T* p) { return *reinterpret_cast<V<T>*>(p); }
template <typename T>
inline const V<T>& vat(const T* p) { return *reinterpret_cast<const V<T>*>(p); }

// Scratch memory of the calling thread for the blocked copies of one image block, kept
// between calls: a fresh allocation would page-fault on its first touch in every call.
class Scratch {
 public:
  void* get(int slot, size_t bytes) {
    Slot& s = slots_[slot];
    if (bytes > s.bytes) {
      std::free(s.ptr);
      s.ptr = nullptr;
      s.bytes = 0;
      s.ptr = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
      TORCH_CHECK(s.ptr != nullptr, "rigl sparse conv: out of memory for ", bytes, " bytes");
      s.bytes = bytes;
    }
    return s.ptr;
  }
  ~Scratch() {
    for (Slot& s : slots_) std::free(s.ptr);
  }

 private:
  struct Slot {
    void* ptr = nullptr;
    size_t bytes = 0;
  };
  Slot slots_[3];
};

template <typename T>
T* scratch(int slot, int64_t n) {
  thread_local Scratch arena;
  return static_cast<T*>(arena.get(slot, static_cast<size_t>(n) * sizeof(T)));
}

int threads_for(int64_t work) {
  return work < (int64_t{1} << 15) ? 1 : std::max(1, at::get_num_threads());
}

#if defined(__AVX2__)
// r[i][j] <- r[j][i] for an 8 x 8 float tile held in registers.
inline void transpose8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// -- layout changes, one block of kL images at a time ------------------------------------
// The functions below hold orphaned `omp for` loops: inside a parallel region the threads
// share their rows, and the implicit barrier at each loop's end orders the phases.

// Which image, and from which output row, each lane of a block holds. Lanes are the images
// of a block of kL; a batch of fewer than kL images of a stride-1 convolution that keeps
// its height is folded instead: each image is cut into bands of rows, one band per lane
// (see Fold), so that small batches fill the lanes too.
struct Lanes {
  int64_t img[kL];   // image of the lane, -1 for none
  int64_t row0[kL];  // first output row of the lane's band (0 when not folded)
};

// The lane plan of a call: S bands per image (1: lanes are whole images), and the rows a
// block computes of the output (R_out) and of the input gradient (R_in).
struct Fold {
  int64_t S, R_out, R_in;
  int64_t blocks(int64_t N) const { return S == 1 ? (N + kL - 1) / kL : 1; }
  Lanes lanes(int64_t nb, int64_t N, int64_t Ho) const {
    Lanes L;
    for (int l = 0; l < kL; ++l) {
      const int64_t n = S == 1 ? nb * kL + l : l / S, r0 = S == 1 ? 0 : l % S * R_out;
      L.img[l] = n < N && r0 < Ho ? n : -1;
      L.row0[l] = r0;
    }
    return L;
  }
};

// xb (C, Hb, W + 2pw, kL): row j of lane l is row L.row0[l] - top + j of its image in
// x (N, C, H, W); zero outside the image, in the width padding and in unused lanes.
template <typename T>
void block_in(const T* x, T* xb, const Lanes& L, int64_t C, int64_t H, int64_t W, int64_t top,
              int64_t pw, int64_t Hb) {
  const int64_t Wp = W + 2 * pw;
#pragma omp for schedule(static)
  for (int64_t ch = 0; ch < C * Hb; ++ch) {
    const int64_t c = ch / Hb, j = ch % Hb;
    T* row = xb + ch * Wp * kL;
    const T* src[kL];
    int valid = 0;
    for (int l = 0; l < kL; ++l) {
      const int64_t h = L.row0[l] - top + j;
      const bool ok = L.img[l] >= 0 && h >= 0 && h < H;
      src[l] = ok ? x + (L.img[l] * C + c) * H * W + h * W : nullptr;
      valid += ok;
    }
    if (valid == 0) {
      std::memset(row, 0, Wp * kL * sizeof(T));
      continue;
    }
    std::memset(row, 0, pw * kL * sizeof(T));
    std::memset(row + (pw + W) * kL, 0, pw * kL * sizeof(T));
    T* out = row + pw * kL;
    int64_t w = 0;
#if defined(__AVX2__)
    if constexpr (std::is_same_v<T, float>) {
      if (valid == kL)
        for (; w + 8 <= W; w += 8) {
          __m256 r[8];
          for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(src[l] + w);
          transpose8(r);
          for (int t = 0; t < 8; ++t) _mm256_store_ps(out + (w + t) * kL, r[t]);
        }
    }
#endif
    for (; w < W; ++w)
      for (int l = 0; l < kL; ++l) out[w * kL + l] = src[l] ? src[l][w] : T(0);
  }
}

// Image block nb of out (N, C, H, W) = xb (C, H + 2ph, W + 2pw, kL) without its padding.
template <typename T>
void block_out(const T* xb, T* x, int64_t nb, int64_t N, int64_t C, int64_t H, int64_t W,
               int64_t ph, int64_t pw) {
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t lanes = std::min<int64_t>(kL, N - nb * kL);
#pragma omp for schedule(static)
  for (int64_t ch = 0; ch < C * H; ++ch) {
    const int64_t c = ch / H, h = ch % H;
    const T* in = xb + ((c * Hp) + h + ph) * Wp * kL + pw * kL;
    for (int l = 0; l < lanes; ++l) {
      T* dst = x + ((nb * kL + l) * C + c) * H * W + h * W;
      for (int64_t w = 0; w < W; ++w) dst[w] = in[w * kL + l];
    }
  }
}

// Store an accumulated tile: out[lane[l] + t] = acc[t][l] + bias for the lanes in `valid`
// (a bit per lane) and t < tq.
template <typename T, int TQ>
inline void store_tile(const V<T>* acc, T* out, const int64_t* lane, unsigned valid,
                       int64_t tq, T bias) {
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float> && TQ == 8) {
    if (valid == 0xFFu && tq == 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t) r[t] = reinterpret_cast<const __m256&>(acc[t]);
      transpose8(r);
      const __m256 b = _mm256_set1_ps(bias);
      for (int l = 0; l < 8; ++l) _mm256_storeu_ps(out + lane[l], _mm256_add_ps(b, r[l]));
      return;
    }
  }
#endif
  for (int l = 0; l < kL; ++l)
    if (valid >> l & 1u)
      for (int64_t t = 0; t < tq; ++t) out[lane[l] + t] = acc[t][l] + bias;
}

// One tile of outputs: acc[t] = sum_k vals[k] * s[off[k] + t*step] for t < tq (lanes =
// images). TQ is the register tile; a row's last, partial tile (tq < TQ) reads only its
// own positions, so nothing past the end of the blocked operand is read.
template <typename T, int TQ>
inline void gather_tile(const T* __restrict s, const int64_t* __restrict off,
                        const T* __restrict vals, int64_t k0, int64_t k1, int64_t step,
                        int64_t tq, V<T>* acc) {
  for (int t = 0; t < TQ; ++t) acc[t] = V<T>{};
  if (tq == TQ) {
    for (int64_t k = k0; k < k1; ++k) {
      const T* p = s + off[k];
      const T w = vals[k];
      for (int t = 0; t < TQ; ++t) acc[t] += w * vat(p + t * step);
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      const T* p = s + off[k];
      const T w = vals[k];
      for (int64_t t = 0; t < tq; ++t) acc[t] += w * vat(p + t * step);
    }
  }
}

constexpr int kTQ = 8;  // output positions per register tile

// One block of out (N, R, Ho, Wo): out[img, i, row0 + r, q] = bias[i] + sum_{k in row i}
// vals[k] * s[off[k] + (r*sh*Ws + q*sw)*kL + lane] for the block's rows r < Hb (s the
// block in blocked layout, lanes as L says).
template <typename T>
void gather(const T* s, int64_t Ws, const int64_t* row_ptr, const int64_t* off,
            const T* vals, const T* bias, T* out, const Lanes& L, int64_t R, int64_t Hb,
            int64_t Ho, int64_t Wo, int64_t sh, int64_t sw) {
  const int64_t plane = Ho * Wo, tiles = (Wo + kTQ - 1) / kTQ;
  int64_t base[kL], rows[kL];
  for (int l = 0; l < kL; ++l) {
    base[l] = L.img[l] >= 0 ? L.img[l] * R * plane + L.row0[l] * Wo : 0;
    rows[l] = L.img[l] >= 0 ? std::min(Hb, Ho - L.row0[l]) : 0;
  }
#pragma omp for schedule(static)
  for (int64_t rt = 0; rt < Hb * tiles; ++rt) {
    const int64_t r = rt / tiles, q0 = rt % tiles * kTQ, tq = std::min<int64_t>(kTQ, Wo - q0);
    unsigned valid = 0;
    for (int l = 0; l < kL; ++l) valid |= (r < rows[l] ? 1u : 0u) << l;
    if (valid == 0) continue;
    const T* sb = s + (r * sh * Ws + q0 * sw) * kL;
    T* o = out + r * Wo + q0;
    V<T> acc[kTQ];
    for (int64_t i = 0; i < R; ++i, o += plane) {
      gather_tile<T, kTQ>(sb, off, vals, row_ptr[i], row_ptr[i + 1], sw * kL, tq, acc);
      store_tile<T, kTQ>(acc, o, base, valid, tq, bias ? bias[i] : T(0));
    }
  }
}

// The input gradient of one image block at any stride, as a scatter, one input channel per
// task: d (C, Hp, Wp, kL) = sum over the entries e = (o, a, b) of channel c of
// vals[e] * g[o] placed at (r*sh + a*dh, q*sw + b*dw); g (O, Ho, Wo, kL).
template <typename T>
void scatter(const T* g, const int64_t* col_ptr, const int64_t* g_off, const int64_t* d_off,
             const T* vals, T* d, int64_t C, int64_t Hp, int64_t Wp, int64_t Ho, int64_t Wo,
             int64_t sh, int64_t sw) {
#pragma omp for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    T* dc = d + c * Hp * Wp * kL;
    std::fill(dc, dc + Hp * Wp * kL, T(0));
    for (int64_t e = col_ptr[c]; e < col_ptr[c + 1]; ++e) {
      const T* ge = g + g_off[e];
      T* de = dc + d_off[e];
      const T w = vals[e];
      for (int64_t r = 0; r < Ho; ++r)
        for (int64_t q = 0; q < Wo; ++q)
          vat(de + (r * sh * Wp + q * sw) * kL) += w * vat(ge + (r * Wo + q) * kL);
    }
  }
}

// Weight gradient at the active entries, one image block: for k in row i,
// sums[c][k] += sum_{r in chunk c, q, lanes} g[i, P + r, Q + q] * s[off[k] + (r*sh*Ws +
// q*sw)*kL]. The tasks are (block of consecutive rows, chunk of output rows): the row
// blocks (bounds rb) hold about kWRows non-zeros at most, as few as give every thread
// four tasks (one block for all rows of a sparse 64-channel layer), and the chunks (of
// wchunks(Ho).rows rows) split the positions, so that the threads share the image block's
// positions and each reads only its part of the blocked copy (2.4 MB at 64 channels,
// 32x32: larger than a core's L2; row blocks alone made every thread read all of it, 1.06x
// slower forward + backward at 64->64 32x32, side by side). Every sums[c][k] has one
// writer and the chunks depend on the plane alone, so dW (the sum over c, in order, at the
// end) is the same bits whatever the number of threads. Within a task, the output gradient
// of a tile of positions sits in registers while the row's non-zeros stream; each non-zero
// keeps per-image partial sums (part, per thread, the block's non-zeros only).
constexpr int64_t kWRows = 4096;

// Output rows per chunk of the weight gradient: at least 8 (the partial sums are cleared and
// folded once per task), at most 4 chunks per plane (1.01-1.05x forward + backward over
// chunks of 4 rows, at most 8, on every layer tried side by side).
struct WChunks {
  int64_t rows, count;
};
inline WChunks wchunks(int64_t Ho) {
  const int64_t rows = std::max<int64_t>(8, (Ho + 3) / 4);
  return {rows, (Ho + rows - 1) / rows};
}

template <typename T>
void wgrad(const T* s, int64_t Ws, const T* g, int64_t P, int64_t Q, const int64_t* row_ptr,
           const int64_t* off, const std::vector<int64_t>& rb, int64_t max_block, T* sums,
           int64_t nnz, int64_t Ho, int64_t Wo, int64_t sh, int64_t sw) {
  const int64_t Hg = Ho + 2 * P, Wg = Wo + 2 * Q, tiles = (Wo + kTQ - 1) / kTQ;
  const auto [rows, chunks] = wchunks(Ho);
  V<T>* part = reinterpret_cast<V<T>*>(scratch<T>(2, max_block * kL));
  const int64_t n_blocks = static_cast<int64_t>(rb.size()) - 1;
#pragma omp for schedule(dynamic, 1)
  for (int64_t task = 0; task < n_blocks * chunks; ++task) {
    const int64_t b = task / chunks, c = task % chunks;
    const int64_t i0 = rb[b], i1 = rb[b + 1], k0 = row_ptr[i0], k1 = row_ptr[i1];
    V<T>* mine = part - k0;
    std::fill(part, part + (k1 - k0), V<T>{});
    for (int64_t rt = c * rows * tiles; rt < std::min(Ho, (c + 1) * rows) * tiles; ++rt) {
      const int64_t r = rt / tiles, q0 = rt % tiles * kTQ, tq = std::min<int64_t>(kTQ, Wo - q0);
      const T* sb = s + (r * sh * Ws + q0 * sw) * kL;
      for (int64_t i = i0; i < i1; ++i) {
        const T* gp = g + ((i * Hg + P + r) * Wg + Q + q0) * kL;
        V<T> dy[kTQ];
        for (int t = 0; t < kTQ; ++t) dy[t] = t < tq ? vat(gp + t * kL) : V<T>{};
        for (int64_t k = row_ptr[i]; k < row_ptr[i + 1]; ++k) {
          const T* p = sb + off[k];
          V<T> a0{}, a1{};
          if (tq == kTQ) {
            for (int t = 0; t < kTQ; t += 2) {
              a0 += dy[t] * vat(p + t * sw * kL);
              a1 += dy[t + 1] * vat(p + (t + 1) * sw * kL);
            }
          } else {
            for (int64_t t = 0; t < tq; ++t) a0 += dy[t] * vat(p + t * sw * kL);
          }
          mine[k] += a0 + a1;
        }
      }
    }
    T* out = sums + c * nnz;
    for (int64_t k = k0; k < k1; ++k) {
      T sum = 0;
      for (int l = 0; l < kL; ++l) sum += mine[k][l];
      out[k] += sum;
    }
  }
}

// Blocks of consecutive rows of about `target` non-zeros (a row is never split), and the
// most non-zeros in one block.
std::vector<int64_t> row_blocks(const std::vector<int64_t>& rp, int64_t target,
                                int64_t& max_block) {
  std::vector<int64_t> rb{0};
  const int64_t rows = static_cast<int64_t>(rp.size()) - 1;
  max_block = 0;
  for (int64_t i = 0; i < rows; ++i)
    if (rp[i + 1] - rp[rb.back()] >= target || i + 1 == rows) {
      max_block = std::max(max_block, rp[i + 1] - rp[rb.back()]);
      rb.push_back(i + 1);
    }
  return rb;
}

struct G {
  int64_t N, C, H, W, O, KH, KW, sh, sw, dh, dw, ph, pw, Hp, Wp, Ho, Wo;
  Fold fold;   // the lane plan
  int64_t Hx;  // rows of a blocked input block: Hp, or a band and its padding when folded
  int64_t block() const { return C * Hx * Wp * kL; }  // elements of a blocked input block
};

void check_int(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous int32 CPU tensor");
}

void check_act(const torch::Tensor& t, const torch::Tensor& values, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 4-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), name, " dtype differs from values");
}

// geom = (KH, KW, sh, sw, dh, dw, ph, pw).
G make(const torch::Tensor& values, const torch::Tensor& row_ptr, const torch::Tensor& col_idx,
       const torch::Tensor& x, const std::vector<int64_t>& geom) {
  check_int(row_ptr, "row_ptr");
  check_int(col_idx, "col_idx");
  check_act(x, values, "x");
  TORCH_CHECK(values.is_contiguous() && values.numel() == col_idx.numel(), "bad values");
  TORCH_CHECK(geom.size() == 8, "geom is (KH, KW, sh, sw, dh, dw, ph, pw)");
  G g{x.size(0), x.size(1), x.size(2), x.size(3), row_ptr.numel() - 1, geom[0], geom[1],
      geom[2], geom[3], geom[4], geom[5], geom[6], geom[7], 0, 0, 0, 0};
  TORCH_CHECK(g.KH > 0 && g.KW > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0 &&
                  g.ph >= 0 && g.pw >= 0,
              "kernel size, stride and dilation must be positive, padding not negative");
  g.Hp = g.H + 2 * g.ph;
  g.Wp = g.W + 2 * g.pw;
  TORCH_CHECK(g.Hp >= g.dh * (g.KH - 1) + 1 && g.Wp >= g.dw * (g.KW - 1) + 1,
              "the padded input is smaller than the kernel");
  g.Ho = (g.Hp - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.Wp - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.O >= 0 && row_ptr.data_ptr<int32_t>()[g.O] == col_idx.numel(),
              "row_ptr does not end at nnz");
  // A batch of fewer than kL images folds into bands of rows where the input gradient is a
  // gather over the same bands: stride 1, the height kept (so P = ph), Q >= 0.
  g.fold = Fold{1, g.Ho, g.H};
  if (g.N > 0 && g.N < kL && g.sh == 1 && g.sw == 1 && g.Ho == g.H &&
      g.dw * (g.KW - 1) >= g.pw) {
    const int64_t bands = std::min<int64_t>(kL / g.N, g.H);
    if (bands > 1) {
      const int64_t rows = (g.H + bands - 1) / bands;
      g.fold = Fold{(g.H + rows - 1) / rows, rows, rows};
    }
  }
  g.Hx = g.fold.S == 1 ? g.Hp : g.fold.R_out + 2 * g.ph;
  return g;
}

// Column j of the weight matrix as its kernel tap: input channel c, kernel row a, column b.
struct Tap {
  int64_t c, a, b;
};
inline Tap tap(int64_t j, const G& g) {
  const int64_t K = g.KH * g.KW;
  return {j / K, j % K / g.KW, j % g.KW};
}

// Row pointers, and the offset of every active weight in a blocked input block.
void forward_index(const G& g, const torch::Tensor& row_ptr, const torch::Tensor& col_idx,
                   std::vector<int64_t>& rp, std::vector<int64_t>& off) {
  const int32_t* p = row_ptr.data_ptr<int32_t>();
  const int32_t* j = col_idx.data_ptr<int32_t>();
  const int64_t nnz = col_idx.numel();
  rp.assign(p, p + g.O + 1);
  off.resize(nnz);
  for (int64_t k = 0; k < nnz; ++k) {
    const Tap t = tap(j[k], g);
    off[k] = ((t.c * g.Hx + t.a * g.dh) * g.Wp + t.b * g.dw) * kL;
  }
}

// Fault in the pages of [p, p + bytes) for writing. A fresh allocation (its first page not
// in memory: glibc maps blocks of 32 MiB and more anew on every call) is populated by one
// madvise(MADV_POPULATE_WRITE) call, about 20% faster than a fault per page on the 2-core
// VM of benchmarks/results/sparse_conv.md; a reused one (or a kernel without that advice)
// gets a write per page, which costs nothing where the pages are there already.
void populate(void* p, size_t bytes) {
  constexpr uintptr_t kPage = 4096;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
  if (e <= a) return;
  unsigned char first = 0;
  if (mincore(reinterpret_cast<void*>(a), kPage, &first) == 0 && !(first & 1) &&
      madvise(reinterpret_cast<void*>(a), e - a, MADV_POPULATE_WRITE) == 0)
    return;
  for (uintptr_t q = a; q < e; q += kPage) *reinterpret_cast<volatile char*>(q) = 0;
}

// Fault in a new output's pages before the kernels write it, each thread its own
// contiguous part: faults taken by both threads in the same regions (as the tiles of one
// image block would) contend.
template <typename T>
void prefault(T* out, int64_t n, int nt) {
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), m = omp_get_num_threads();
    const int64_t a = n * t / m, e = n * (t + 1) / m;
    populate(out + a, static_cast<size_t>(e - a) * sizeof(T));
  }
}

template <typename T>
void run_forward(const G& g, const std::vector<int64_t>& rp, const std::vector<int64_t>& off,
                 const T* vals, const T* b, const T* xp, T* yp) {
  T* xb = scratch<T>(0, g.block());
  const int64_t nnz = static_cast<int64_t>(off.size());
  const int nt = threads_for(g.N * (nnz + g.O) * g.Ho * g.Wo);
  prefault(yp, g.N * g.O * g.Ho * g.Wo, nt);
#pragma omp parallel num_threads(nt)
  for (int64_t nb = 0; nb < g.fold.blocks(g.N); ++nb) {
    const Lanes L = g.fold.lanes(nb, g.N, g.Ho);
    block_in<T>(xp, xb, L, g.C, g.H, g.W, g.ph, g.pw, g.Hx);
    gather<T>(xb, g.Wp, rp.data(), off.data(), vals, b, yp, L, g.O, g.fold.R_out, g.Ho, g.Wo,
              g.sh, g.sw);
  }
}

// The input gradient and the weight gradient (see backward below).
template <typename T>
void run_backward(const G& g, const std::vector<int64_t>& rp, const std::vector<int64_t>& off,
                  const std::vector<int64_t>& col_ptr, const std::vector<int64_t>& t_off,
                  const std::vector<int64_t>& d_off, const std::vector<int32_t>& t_src,
                  bool as_gather, int64_t Pg, int64_t Qg, const T* vals, const T* xp,
                  const T* dyp, T* dxp, T* dwp) {
  const int64_t nnz = static_cast<int64_t>(off.size());
  const int64_t Hg = g.fold.R_out + 2 * Pg, Wg = g.Wo + 2 * Qg;
  std::vector<T> t_val(dxp ? nnz : 0);
  for (size_t e = 0; e < t_val.size(); ++e) t_val[e] = vals[t_src[e]];
  T* xb = dwp || (dxp && !as_gather) ? scratch<T>(0, g.block()) : nullptr;
  T* gb = scratch<T>(1, g.O * Hg * Wg * kL);
  const int nt = threads_for(g.N * (nnz + g.O + g.C) * g.Ho * g.Wo);
  int64_t max_block = 0;
  const int64_t chunks = wchunks(g.fold.R_out).count;
  // Row blocks as large as kWRows allows while every thread gets four tasks or more.
  const int64_t target = std::clamp<int64_t>(nnz * chunks / (4 * nt), 1, kWRows);
  const std::vector<int64_t> rb = row_blocks(rp, target, max_block);
  std::vector<T> sums(dwp ? chunks * nnz : 0, T(0));  // per chunk of output rows
  if (dxp) prefault(dxp, g.N * g.C * g.H * g.W, nt);
#pragma omp parallel num_threads(nt)
  for (int64_t nb = 0; nb < g.fold.blocks(g.N); ++nb) {
    const Lanes L = g.fold.lanes(nb, g.N, g.Ho);
    block_in<T>(dyp, gb, L, g.O, g.Ho, g.Wo, Pg, Qg, Hg);
    if (dwp) {
      block_in<T>(xp, xb, L, g.C, g.H, g.W, g.ph, g.pw, g.Hx);
      wgrad<T>(xb, g.Wp, gb, Pg, Qg, rp.data(), off.data(), rb, max_block, sums.data(), nnz,
               g.fold.R_out, g.Wo, g.sh, g.sw);
    }
    if (dxp && as_gather) {
      gather<T>(gb, Wg, col_ptr.data(), t_off.data(), t_val.data(), nullptr, dxp, L, g.C,
                g.fold.R_in, g.H, g.W, 1, 1);
    } else if (dxp) {  // never folded (the fold needs the gather)
      scatter<T>(gb, col_ptr.data(), t_off.data(), d_off.data(), t_val.data(), xb, g.C, g.Hp,
                 g.Wp, g.Ho, g.Wo, g.sh, g.sw);
      block_out<T>(xb, dxp, nb, g.N, g.C, g.H, g.W, g.ph, g.pw);
    }
  }
  if (dwp) {
#pragma omp parallel for schedule(static) num_threads(threads_for(chunks * nnz))
    for (int64_t k = 0; k < nnz; ++k) {
      T sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += sums[c * nnz + k];
      dwp[k] = sum;
    }
  }
}

}  // namespace

// y (N, O, Ho, Wo) from x (N, C, H, W).
torch::Tensor forward(const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const torch::Tensor& col_idx, const torch::Tensor& x,
                      const c10::optional<torch::Tensor>& bias, std::vector<int64_t> geom) {
  const G g = make(values, row_ptr, col_idx, x, geom);
  std::vector<int64_t> rp, off;
  forward_index(g, row_ptr, col_idx, rp, off);
  auto y = torch::empty({g.N, g.O, g.Ho, g.Wo}, x.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_conv_forward", [&] {
    const scalar_t* b = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->is_contiguous() && bias->numel() == g.O &&
                      bias->scalar_type() == values.scalar_type(),
                  "bias must be a contiguous tensor of O entries, the dtype of values");
      b = bias->data_ptr<scalar_t>();
    }
    run_forward<scalar_t>(g, rp, off, values.data_ptr<scalar_t>(), b, x.data_ptr<scalar_t>(),
                          y.data_ptr<scalar_t>());
  });
  return y;
}

// (dx (N, C, H, W) or undefined, dW (nnz) or undefined) from x and dy (N, O, Ho, Wo).
std::vector<torch::Tensor> backward(const torch::Tensor& values, const torch::Tensor& row_ptr,
                                    const torch::Tensor& col_idx, const torch::Tensor& x,
                                    const torch::Tensor& dy, std::vector<int64_t> geom,
                                    bool want_dx, bool want_dw) {
  const G g = make(values, row_ptr, col_idx, x, geom);
  check_act(dy, values, "dy");
  TORCH_CHECK(dy.size(0) == g.N && dy.size(1) == g.O && dy.size(2) == g.Ho && dy.size(3) == g.Wo,
              "dy has the wrong shape for this geometry");
  const int64_t nnz = col_idx.numel();
  torch::Tensor dx, dw;
  if (want_dx) dx = torch::empty_like(x);
  if (want_dw) dw = torch::zeros({nnz}, values.options());
  if ((!want_dx && !want_dw) || g.N == 0) return {dx, dw};
  std::vector<int64_t> rp, off;
  forward_index(g, row_ptr, col_idx, rp, off);
  // The input gradient as a gather where it is one (stride 1: the convolution of the output
  // gradient, padded by d*(K-1) - p, with the kernel transposed and flipped), else a scatter.
  const int64_t P = g.dh * (g.KH - 1) - g.ph, Q = g.dw * (g.KW - 1) - g.pw;
  const bool as_gather = g.sh == 1 && g.sw == 1 && P >= 0 && Q >= 0;
  const int64_t Pg = as_gather ? P : 0, Qg = as_gather ? Q : 0;
  const int64_t Hg = g.fold.R_out + 2 * Pg, Wg = g.Wo + 2 * Qg;
  // The kernel by input channel: entries (o, a, b) in order of o, their offsets in a blocked
  // output-gradient block (t_off) and, for the scatter, in an input channel's plane (d_off).
  std::vector<int64_t> col_ptr(g.C + 1, 0), t_off, d_off;
  std::vector<int32_t> t_src;
  if (want_dx) {
    const int32_t* j = col_idx.data_ptr<int32_t>();
    t_off.resize(nnz);
    t_src.resize(nnz);
    if (!as_gather) d_off.resize(nnz);
    for (int64_t k = 0; k < nnz; ++k) ++col_ptr[tap(j[k], g).c + 1];
    for (int64_t c = 0; c < g.C; ++c) col_ptr[c + 1] += col_ptr[c];
    std::vector<int64_t> fill(col_ptr.begin(), col_ptr.end() - 1);
    for (int64_t o = 0; o < g.O; ++o)
      for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
        const Tap t = tap(j[k], g);
        const int64_t e = fill[t.c]++;
        t_src[e] = static_cast<int32_t>(k);
        if (as_gather) {
          t_off[e] = ((o * Hg + (g.KH - 1 - t.a) * g.dh) * Wg + (g.KW - 1 - t.b) * g.dw) * kL;
        } else {
          t_off[e] = o * Hg * Wg * kL;
          d_off[e] = (t.a * g.dh * g.Wp + t.b * g.dw) * kL;
        }
      }
  }
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_conv_backward", [&] {
    run_backward<scalar_t>(g, rp, off, col_ptr, t_off, d_off, t_src, as_gather, Pg, Qg,
                           values.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           dy.data_ptr<scalar_t>(), want_dx ? dx.data_ptr<scalar_t>() : nullptr,
                           want_dw ? dw.data_ptr<scalar_t>() : nullptr);
  });
  return {dx, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "direct sparse convolution, NCHW in and out");
  m.def("backward", &backward, "input gradient and weight gradient at the active entries");
}
