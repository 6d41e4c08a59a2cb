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
void bsr_grad_weight(const BsrArgs<T>& a, const T* dy, int64_t lddy, const T* x, int64_t ldx,
                     T* dw, int64_t i0, int64_t i1) {
  const int64_t bn = a.bn, bk = a.bk;
  for (int64_t I = i0; I < i1; ++I)
    for (int64_t p = a.row_ptr[I]; p < a.row_ptr[I + 1]; ++p) {
      T* out = dw + p * bn * bk;
      for (int64_t i = 0; i < bn * bk; ++i) out[i] = 0;
      for (int64_t m = 0; m < a.M; ++m) {
        const T* xr = x + m * ldx + a.col_idx[p] * bk;
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
      a.out[j] = acc;
    }
}

}  // namespace

template <class T>
const KernelTable<T>* scalar_kernels() {
  static constexpr KernelTable<T> table{"scalar",
                                        0,
                                        &bsr_forward<T>,
                                        &bsr_transpose_blocks<T>,
                                        &bsr_grad_weight<T>,
                                        &csr_spmm<T>,
                                        &csr_sddmm<T>,
                                        nullptr};
  return &table;
}

template const KernelTable<float>* scalar_kernels<float>();
template const KernelTable<double>* scalar_kernels<double>();

}  // namespace sparsekern::cpu
