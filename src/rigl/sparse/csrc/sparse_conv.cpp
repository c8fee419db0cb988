// CPU kernels of the compressed sparse convolution (rigl.sparse.conv): a direct sparse
// convolution, no im2col.
//
// The weight W (O x C*KH*KW) is the convolution kernel viewed as a matrix, column
// j = c*KH*KW + a*KW + b (kernel row a, column b), compressed as for the linear layer:
//   CSR  row_ptr[O+1], col_idx[nnz] (int32), values[nnz]
//   CSC  col_ptr[n_blocks*(C*KH*KW+1)], row_idx[nnz], perm[nnz]: values_csc[k] = values[perm[k]]
// Activations are NCHW. The input arrives zero-padded, xp (N, C, Hp, Wp), so that no
// inner loop tests a boundary. Each non-zero W[o, j] moves a whole plane:
//
//   forward   y[n, o, r, q]   += W[o, j] * xp[n, c, r*sh + a*dh, q*sw + b*dw]
//   backward  dxp[n, c, ...]  += W[o, j] * dy[n, o, r, q]        (same positions)
//             dW[o, j]         = sum_{n, r, q} dy[n, o, r, q] * xp[n, c, ...]
//
// Stride 1 (the common case): an output plane held with the row pitch of the padded input
// (Wp, the last Wp - Wo columns of each row unused) makes each non-zero's product ONE
// contiguous axpy/dot over (Ho-1)*Wp + Wo elements, shifted by a*dh*Wp + b*dw in xp: long
// vectorised loops even for 8x8 planes. The unused columns of dy are zero (the caller pads
// dy to pitch Wp), so they add nothing to dx or dW. Other strides run row by row.
//
// Work is cut by image: an image's padded input, output gradient and one plane of dx
// stay in L2 (C*Hp*Wp floats: 296 KB for 64 channels at 32x32) while every non-zero that
// reads them is applied. dW is summed per thread, then over threads.

#include <torch/extension.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

int n_threads(int64_t work) {
  return work < (int64_t{1} << 16) ? 1 : std::max(1, at::get_num_threads());
}

// Geometry of one call (all sizes of the padded input).
struct Geom {
  int64_t C, Hp, Wp, O, Ho, Wo, KH, KW, sh, sw, dh, dw;
  bool flat() const { return sh == 1 && sw == 1; }
  int64_t rows() const { return flat() ? 1 : Ho; }  // runs per plane
  int64_t len() const { return flat() ? (Ho - 1) * Wp + Wo : Wo; }  // elements per run
  int64_t pitch() const { return flat() ? Wp : Wo; }  // row pitch of y / dy planes
  int64_t xrow() const { return sh * Wp; }  // xp step per output row
  int64_t plane_in() const { return Hp * Wp; }
  int64_t plane_out() const { return Ho * pitch(); }
  int64_t offset(int64_t j) const {  // xp offset of column j within its channel plane
    const int64_t k = j % (KH * KW);
    return (k / KW) * dh * Wp + (k % KW) * dw;
  }
};

// x[run] += w * y[run]: the input gradient from one output-gradient plane.
template <typename T, bool UNIT>
inline void scatter(T* __restrict x, const T* __restrict y, T w, const Geom& g) {
  const int64_t n = g.len(), sx = UNIT ? 1 : g.sw;
  for (int64_t r = 0; r < g.rows(); ++r) {
    const T* __restrict yr = y + r * g.pitch();
    T* __restrict xr = x + r * g.xrow();
    if (UNIT) {
#pragma omp simd
      for (int64_t q = 0; q < n; ++q) xr[q] += w * yr[q];
    } else {
      for (int64_t q = 0; q < n; ++q) xr[q * sx] += w * yr[q];  // strided: not vectorised
    }
  }
}

// <y[run], x[run]>: kAcc independent partial sums (one FMA chain would wait on its latency).
constexpr int kAcc = 32;

template <typename T, bool UNIT>
inline T dot(const T* __restrict y, const T* __restrict x, const Geom& g) {
  const int64_t n = g.len(), sx = UNIT ? 1 : g.sw, full = n - n % kAcc;
  T acc[kAcc] = {};
  T tail = 0;
  for (int64_t r = 0; r < g.rows(); ++r) {
    const T* __restrict yr = y + r * g.pitch();
    const T* __restrict xr = x + r * g.xrow();
    for (int64_t q0 = 0; q0 < full; q0 += kAcc) {
#pragma omp simd
      for (int i = 0; i < kAcc; ++i) acc[i] += yr[q0 + i] * xr[(q0 + i) * sx];
    }
    for (int64_t q = full; q < n; ++q) tail += yr[q] * xr[q * sx];
  }
  for (int i = 0; i < kAcc; ++i) tail += acc[i];
  return tail;
}

// y[run] += w * x[run], runs of g.len() elements, x stepping by g.sw within a run. (Tiling
// the run into register-held chunks that loop over the non-zeros measured slower: each
// chunk then gathers a few cache lines from another channel's plane per non-zero, where
// this loop streams one plane at a time.)
template <typename T, bool UNIT>
inline void axpy(T* __restrict y, const T* __restrict x, T w, const Geom& g) {
  const int64_t n = g.len(), sx = UNIT ? 1 : g.sw;
  for (int64_t r = 0; r < g.rows(); ++r) {
    T* __restrict yr = y + r * g.pitch();
    const T* __restrict xr = x + r * g.xrow();
#pragma omp simd
    for (int64_t q = 0; q < n; ++q) yr[q] += w * xr[q * sx];
  }
}

// y (N, O, Ho, Wo) = conv(xp, W) + bias; one task per (image, output channel).
template <typename T, bool UNIT>
void forward_impl(const T* vals, const int32_t* row_ptr, const int32_t* col_idx, const T* xp,
                  const T* bias, T* y, int64_t N, const Geom& g) {
  const int64_t K = g.KH * g.KW, nnz = row_ptr[g.O];
  const int nt = n_threads(N * (nnz + g.O) * g.Ho * g.Wo);
  // Where each non-zero reads in an image's xp: its channel's plane plus its shift. Computed
  // once per call: the integer divisions would cost more than a short run's FMAs (8x8 planes).
  std::vector<int64_t> xoff(nnz);
  for (int64_t k = 0; k < nnz; ++k)
    xoff[k] = (col_idx[k] / K) * g.plane_in() + g.offset(col_idx[k]);
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> acc(g.plane_out());
#pragma omp for schedule(static) collapse(2)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t o = 0; o < g.O; ++o) {
        std::fill(acc.begin(), acc.end(), T(0));
        const T* xn = xp + n * g.C * g.plane_in();
        for (int64_t k = row_ptr[o]; k < row_ptr[o + 1]; ++k)
          axpy<T, UNIT>(acc.data(), xn + xoff[k], vals[k], g);
        const T b = bias ? bias[o] : T(0);
        T* yo = y + (n * g.O + o) * g.Ho * g.Wo;
        for (int64_t r = 0; r < g.Ho; ++r)
          for (int64_t q = 0; q < g.Wo; ++q) yo[r * g.Wo + q] = acc[r * g.pitch() + q] + b;
      }
    }
  }
}

// dxp (N, C, Hp, Wp) and dW (nnz): one task per (image, input channel) walks the CSC
// columns of that channel; each gathered dy plane is used twice (dx and dW).
template <typename T, bool UNIT, bool WANT_DX, bool WANT_DW>
void backward_impl(const T* vals, const int32_t* col_ptr, int64_t n_blocks,
                   const int32_t* row_idx, const int32_t* perm, const T* xp, const T* dy,
                   T* dxp, T* dw, int64_t N, int64_t nnz, const Geom& g) {
  const int64_t K = g.KH * g.KW, n_in = g.C * K;
  const int nt = n_threads(N * (nnz + g.C) * g.Ho * g.Wo);
  std::vector<T> part(WANT_DW ? nt * nnz : 0, T(0));
#pragma omp parallel num_threads(nt)
  {
    T* mine = WANT_DW ? part.data() + omp_get_thread_num() * nnz : nullptr;
#pragma omp for schedule(static) collapse(2)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t c = 0; c < g.C; ++c) {
        const T* xc = xp + (n * g.C + c) * g.plane_in();
        T* dxc = WANT_DX ? dxp + (n * g.C + c) * g.plane_in() : nullptr;
        if (WANT_DX) std::fill(dxc, dxc + g.plane_in(), T(0));
        const T* dyn = dy + n * g.O * g.plane_out();
        for (int64_t blk = 0; blk < n_blocks; ++blk) {
          const int32_t* ptr = col_ptr + blk * (n_in + 1);
          for (int64_t j = c * K; j < (c + 1) * K; ++j) {
            const int64_t off = g.offset(j);
            for (int64_t k = ptr[j]; k < ptr[j + 1]; ++k) {
              const T* dyo = dyn + row_idx[k] * g.plane_out();
              if (WANT_DX) scatter<T, UNIT>(dxc + off, dyo, vals[perm[k]], g);
              if (WANT_DW) mine[perm[k]] += dot<T, UNIT>(dyo, xc + off, g);
            }
          }
        }
      }
    }
  }
  if (WANT_DW) {
#pragma omp parallel for schedule(static) num_threads(n_threads(nnz * nt))
    for (int64_t k = 0; k < nnz; ++k) {
      T s = 0;
      for (int t = 0; t < nt; ++t) s += part[t * nnz + k];
      dw[k] = s;
    }
  }
}

void check_int(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kInt32 && t.is_contiguous() && t.device().is_cpu(),
              name, " must be a contiguous int32 CPU tensor");
}

void check_act(const torch::Tensor& t, const torch::Tensor& values, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 4-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == values.scalar_type(), name, " dtype differs from values");
}

// geom = (KH, KW, sh, sw, dh, dw); the output size follows from the padded input's.
Geom make_geom(const torch::Tensor& xp, int64_t O, const std::vector<int64_t>& geom) {
  TORCH_CHECK(geom.size() == 6, "geom is (KH, KW, sh, sw, dh, dw)");
  Geom g{xp.size(1), xp.size(2), xp.size(3), O, 0, 0,
         geom[0], geom[1], geom[2], geom[3], geom[4], geom[5]};
  TORCH_CHECK(g.KH > 0 && g.KW > 0 && g.sh > 0 && g.sw > 0 && g.dh > 0 && g.dw > 0,
              "kernel size, stride and dilation must be positive");
  g.Ho = (g.Hp - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.Wp - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "the padded input is smaller than the kernel");
  return g;
}

}  // namespace

// y (N, O, Ho, Wo) from the padded input xp (N, C, Hp, Wp).
torch::Tensor forward(const torch::Tensor& values, const torch::Tensor& row_ptr,
                      const torch::Tensor& col_idx, const torch::Tensor& xp,
                      const c10::optional<torch::Tensor>& bias, std::vector<int64_t> geom) {
  check_int(row_ptr, "row_ptr");
  check_int(col_idx, "col_idx");
  check_act(xp, values, "xp");
  TORCH_CHECK(values.is_contiguous() && values.numel() == col_idx.numel(), "bad values");
  const int64_t O = row_ptr.numel() - 1;
  const Geom g = make_geom(xp, O, geom);
  auto y = torch::empty({xp.size(0), O, g.Ho, g.Wo}, xp.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_conv_forward", [&] {
    const scalar_t* b = nullptr;
    if (bias.has_value() && bias->defined()) {
      TORCH_CHECK(bias->is_contiguous() && bias->numel() == O, "bias must have O entries");
      b = bias->data_ptr<scalar_t>();
    }
    auto impl = g.sw == 1 ? forward_impl<scalar_t, true> : forward_impl<scalar_t, false>;
    impl(values.data_ptr<scalar_t>(), row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
         xp.data_ptr<scalar_t>(), b, y.data_ptr<scalar_t>(), xp.size(0), g);
  });
  return y;
}

// (dxp (N, C, Hp, Wp) or empty, dW (nnz) or empty); dy is (N, O, Ho, pitch) with pitch Wp
// (unused columns zero) at stride 1, Wo otherwise.
std::vector<torch::Tensor> backward(const torch::Tensor& values, const torch::Tensor& col_ptr,
                                    int64_t n_blocks, const torch::Tensor& row_idx,
                                    const torch::Tensor& perm, const torch::Tensor& xp,
                                    const torch::Tensor& dy, std::vector<int64_t> geom,
                                    bool want_dx, bool want_dw) {
  check_int(col_ptr, "col_ptr");
  check_int(row_idx, "row_idx");
  check_int(perm, "perm");
  check_act(xp, values, "xp");
  check_act(dy, values, "dy");
  TORCH_CHECK(values.is_contiguous() && values.numel() == row_idx.numel() &&
                  perm.numel() == row_idx.numel(), "bad values or perm");
  const Geom g = make_geom(xp, dy.size(1), geom);
  TORCH_CHECK(n_blocks >= 1 && col_ptr.numel() == n_blocks * (g.C * g.KH * g.KW + 1),
              "col_ptr does not fit the input channels and kernel size");
  TORCH_CHECK(dy.size(0) == xp.size(0) && dy.size(2) == g.Ho && dy.size(3) == g.pitch(),
              "dy has the wrong shape for this geometry");
  const int64_t nnz = values.numel(), N = xp.size(0);
  torch::Tensor dxp, dw;
  if (want_dx) dxp = torch::empty_like(xp);
  if (want_dw) dw = torch::zeros({nnz}, values.options());
  if ((!want_dx && !want_dw) || N == 0) return {dxp, dw};
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "rigl_sparse_conv_backward", [&] {
    auto run = [&](auto impl) {
      impl(values.data_ptr<scalar_t>(), col_ptr.data_ptr<int32_t>(), n_blocks,
           row_idx.data_ptr<int32_t>(), perm.data_ptr<int32_t>(), xp.data_ptr<scalar_t>(),
           dy.data_ptr<scalar_t>(), want_dx ? dxp.data_ptr<scalar_t>() : nullptr,
           want_dw ? dw.data_ptr<scalar_t>() : nullptr, N, nnz, g);
    };
    const bool unit = g.sw == 1;
    if (want_dx && want_dw)
      unit ? run(backward_impl<scalar_t, true, true, true>)
           : run(backward_impl<scalar_t, false, true, true>);
    else if (want_dx)
      unit ? run(backward_impl<scalar_t, true, true, false>)
           : run(backward_impl<scalar_t, false, true, false>);
    else
      unit ? run(backward_impl<scalar_t, true, false, true>)
           : run(backward_impl<scalar_t, false, false, true>);
  });
  return {dxp, dw};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "direct sparse convolution, NCHW, padded input");
  m.def("backward", &backward, "fused input gradient and weight gradient at the active entries");
}
