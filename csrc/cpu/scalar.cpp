// Portable kernels: any CPU, any floating dtype the ops accept (float64 for gradcheck). They read
// the same plain-data arguments as the SIMD kernels, with row-major operands (panel == 0).
#include "kernels.h"

namespace sparsekern::cpu {
namespace {

template <class T>
void bsr_forward(const BsrArgs<T>& a, const T* x, int64_t ldx, const T* bias, T* y, int64_t ldy,
                 int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t I = i0; I < i1; ++I)
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < bn; ++n) {
        T acc = bias ? bias[I * bn + n] : T(0);
        for (int64_t p = a.row_ptr[I]; p < a.row_ptr[I + 1]; ++p) {
          const T* xr = x + m * ldx + a.col_idx[p] * bk;
          const T* w = a.values + p * bn * bk + n;  // block stored [bk][bn]
          for (int64_t kk = 0; kk < bk; ++kk) acc += xr[kk] * w[kk * bn];
        }
        y[m * ldy + I * bn + n] = acc;
      }
}

template <class T>
void bsr_transpose_blocks(const T* values, const int32_t* perm, int64_t bk, int64_t bn, T* out,
                          int64_t q0, int64_t q1) {
  for (int64_t q = q0; q < q1; ++q)
    for (int64_t kk = 0; kk < bk; ++kk)
      for (int64_t n = 0; n < bn; ++n)
        out[(q * bn + n) * bk + kk] = values[(int64_t(perm[q]) * bk + kk) * bn + n];
}

template <class T>
void bsr_grad_weight(const BsrArgs<T>& a, const T* dy, int64_t lddy, const T* x, int64_t x_rs,
                     int64_t x_cs, T* dw, int64_t i0, int64_t i1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t I = i0; I < i1; ++I)
    for (int64_t p = a.row_ptr[I]; p < a.row_ptr[I + 1]; ++p) {
      T* out = dw + p * bn * bk;
      for (int64_t i = 0; i < bn * bk; ++i) out[i] = 0;
      for (int64_t m = 0; m < a.M; ++m) {
        const T* xr = x + m * x_rs + a.col_idx[p] * x_cs;
        const T* d = dy + m * lddy + I * bn;
        for (int64_t kk = 0; kk < bk; ++kk)
          for (int64_t n = 0; n < bn; ++n) out[kk * bn + n] += xr[kk] * d[n];
      }
    }
}

template <class T>
void csr_spmm(const CsrSpmmArgs<T>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t m = 0; m < a.M; ++m) {
      T acc = a.bias ? a.bias[r] : T(0);
      const T* xr = a.dense + m * a.C;
      for (int64_t j = a.row_ptr[r]; j < a.row_ptr[r + 1]; ++j) acc += a.values[j] * xr[a.col_idx[j]];
      a.out[m * a.ldo + r] = acc;
    }
}

template <class T>
void csr_sddmm(const CsrSddmmArgs<T>& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = a.row_ptr[r]; j < a.row_ptr[r + 1]; ++j) {
      T acc = 0;
      for (int64_t m = 0; m < a.M; ++m) acc += a.dy[m * a.R + r] * a.x[m * a.C + a.col_idx[j]];
      a.out[j] = a.accumulate ? a.out[j] + acc : acc;
    }
}

// ---- conv2d: plain NHWC (one image per CSR "chunk") -----------------------------------------

template <class T>
void bsr_conv_forward(const BsrArgs<T>& a, const ConvGeometry& g, const T* x, const T* bias,
                      T* y, int64_t ldy, int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t I = i0; I < i1; ++I)
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t n = 0; n < bn; ++n) {
        T acc = bias ? bias[I * bn + n] : T(0);
        for (int64_t p = a.row_ptr[I]; p < a.row_ptr[I + 1]; ++p)
          for (int64_t t = 0; t < g.taps; ++t) {
            if (g.tap_mask && !(g.tap_mask[m] >> t & 1)) continue;  // outside: implicit zero
            const T* xr = x + g.pix_off[m] + g.tap_off[t] + a.col_idx[p] * bk;
            const T* w = a.values + (p * g.taps + t) * bk * bn + n;
            for (int64_t k = 0; k < bk; ++k) acc += xr[k] * w[k * bn];
          }
        y[m * ldy + I * bn + n] = acc;
      }
}

template <class T>
void bsr_conv_grad_input(const BsrArgs<T>& a, const ConvGeometry& g, const T* dy, int64_t lddy,
                         T* dx, int64_t j0, int64_t j1, int64_t m0, int64_t m1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t J = j0; J < j1; ++J)
    for (int64_t q = a.row_ptr[J]; q < a.row_ptr[J + 1]; ++q)
      for (int64_t t = 0; t < g.taps; ++t)
        for (int64_t m = m0; m < m1; ++m) {
          const T* d = dy + m * lddy + a.col_idx[q] * bk;
          const T* w = a.values + (q * g.taps + t) * bk * bn;
          T* out = dx + g.pix_off[m] + g.tap_off[t] + J * bn;
          for (int64_t k = 0; k < bk; ++k)
            for (int64_t n = 0; n < bn; ++n) out[n] += d[k] * w[k * bn + n];
        }
}

template <class T>
void bsr_conv_grad_weight(const BsrArgs<T>& a, const ConvGeometry& g, const int32_t* block_row,
                          const T* dy, int64_t lddy, const T* x, T* dw, int64_t u0, int64_t u1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t p = u / g.taps, t = u % g.taps;
    T* out = dw + u * bk * bn;
    for (int64_t i = 0; i < bk * bn; ++i) out[i] = 0;
    for (int64_t m = 0; m < g.M; ++m) {
      const T* xr = x + g.pix_off[m] + g.tap_off[t] + a.col_idx[p] * bk;
      const T* d = dy + m * lddy + block_row[p] * bn;
      for (int64_t k = 0; k < bk; ++k)
        for (int64_t n = 0; n < bn; ++n) out[k * bn + n] += xr[k] * d[n];
    }
  }
}

template <class T>
void csr_conv_forward(const CsrConvArgs<T>& a, const ConvGeometry& g, const T* x, const T* bias,
                      T* y, int64_t r0, int64_t r1) {
  for (int64_t img = 0; img < a.images; ++img) {
    const T* xi = x + img * a.in_rows;
    for (int64_t m = 0; m < g.M; ++m)
      for (int64_t r = r0; r < r1; ++r) {
        T acc = bias ? bias[r] : T(0);
        for (int64_t j = a.row_ptr[r]; j < a.row_ptr[r + 1]; ++j)
          acc += a.values[j] * xi[g.pix_off[m] + a.col_off[j]];
        y[(img * g.M + m) * a.out_channels + r] = acc;
      }
  }
}

template <class T>
void csr_conv_grad_input(const CsrConvArgs<T>& a, const ConvGeometry& g, const int32_t* t_rows,
                         const T* dy, T* dx, int64_t c0, int64_t c1) {
  const int64_t R = a.out_channels;
  for (int64_t img = 0; img < a.images; ++img)
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t t = 0; t < g.taps; ++t)
        for (int64_t q = a.row_ptr[c * g.taps + t]; q < a.row_ptr[c * g.taps + t + 1]; ++q)
          for (int64_t m = 0; m < g.M; ++m)
            dx[img * a.in_rows + g.pix_off[m] + g.tap_off[t] + c] +=
                a.values[q] * dy[(img * g.M + m) * R + t_rows[q]];
}

template <class T>
void csr_conv_grad_weight(const CsrConvArgs<T>& a, const ConvGeometry& g, const T* dy,
                          const T* x, T* dw, int64_t r0, int64_t r1) {
  const int64_t R = a.out_channels;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = a.row_ptr[r]; j < a.row_ptr[r + 1]; ++j) {
      T acc = 0;
      for (int64_t img = 0; img < a.images; ++img)
        for (int64_t m = 0; m < g.M; ++m)
          acc += dy[(img * g.M + m) * R + r] * x[img * a.in_rows + g.pix_off[m] + a.col_off[j]];
      dw[j] = acc;
    }
}

}  // namespace

template <class T>
const KernelTable<T>* scalar_kernels() {
  static constexpr KernelTable<T> table{"scalar",
                                        0,
                                        0,
                                        &bsr_forward<T>,
                                        &bsr_transpose_blocks<T>,
                                        &bsr_grad_weight<T>,
                                        &csr_spmm<T>,
                                        &csr_sddmm<T>,
                                        nullptr,
                                        nullptr,
                                        nullptr,
                                        nullptr,
                                        &bsr_conv_forward<T>,
                                        &bsr_conv_grad_input<T>,
                                        &bsr_conv_grad_weight<T>,
                                        &csr_conv_forward<T>,
                                        &csr_conv_grad_input<T>,
                                        &csr_conv_grad_weight<T>};
  return &table;
}

template const KernelTable<float>* scalar_kernels<float>();
template const KernelTable<double>* scalar_kernels<double>();

}  // namespace sparsekern::cpu
