// Plain-data interface between the dispatching layer (linear.cpp, which knows torch) and the
// instruction-set specific kernels (isa_*.cpp, which must not include torch headers: they are
// compiled under `#pragma GCC target`, and inline code shared with other translation units would
// otherwise leak AVX instructions into callers that run on any x86-64).
#pragma once
#include <cstdint>

namespace sparsekern::cpu {

// Block-sparse weight, blocks stored transposed: values[nnzb][bk][bn] (see formats.py).
template <class T>
struct BsrArgs {
  int64_t M;                  // rows of x / grad_out
  int64_t bn, bk;             // block shape
  const int32_t* row_ptr;     // [Nb+1]
  const int32_t* col_idx;     // [nnzb]  block column of each stored block
  const T* values;
};

// y[M, Nb*bn] = x[M, Kb*bk] W^T + bias, for block rows [i0, i1) and rows [m0, m1).
template <class T>
using bsr_forward_fn = void (*)(const BsrArgs<T>&, const T* x, int64_t ldx, const T* bias,
                                T* y, int64_t ldy, int64_t i0, int64_t i1, int64_t m0, int64_t m1);
// out[q] = values[perm[q]]^T ([bk][bn] -> [bn][bk]) for q in [q0, q1): with it, the forward
// kernel over the transposed index computes dx = dy W.
template <class T>
using bsr_transpose_blocks_fn = void (*)(const T* values, const int32_t* perm, int64_t bk,
                                         int64_t bn, T* out, int64_t q0, int64_t q1);
// dw[nnzb][bk][bn] = (dy^T x) sampled at the stored blocks of block rows [i0, i1).
template <class T>
using bsr_grad_weight_fn = void (*)(const BsrArgs<T>&, const T* dy, int64_t lddy, const T* x,
                                    int64_t ldx, T* dw, int64_t i0, int64_t i1);

// Unstructured (CSR) products. The SIMD kernels read dense operands as "panels": the operand
// [M, C] transposed and cut into chunks of `panel` rows, stored [M/panel][C][panel], so that one
// stored scalar multiplies a contiguous run of `panel` batch rows. Kernels with panel == 0 read
// the plain row-major operand instead.
template <class T>
struct CsrSpmmArgs {
  int64_t M, C;               // batch rows; columns of the dense operand
  const int32_t* row_ptr;     // [R+1]
  const int32_t* col_idx;     // [nnz]
  const T* values;            // [nnz]
  const T* dense;             // row-major [M, C] (ld = C), used when panel == 0
  const T* panels;            // [ceil(M/panel)][C][panel], used when panel > 0
  const T* bias;              // [R] or null
  T* out;                     // row-major [M, R] (ld = ldo)
  int64_t ldo;
};
// out[:, r] = dense @ (row r of the sparse matrix)^T + bias[r] for rows r in [r0, r1).
template <class T>
using csr_spmm_fn = void (*)(const CsrSpmmArgs<T>&, int64_t r0, int64_t r1);

template <class T>
struct CsrSddmmArgs {
  int64_t M, R, C;            // batch rows; sparse rows (dy columns); sparse columns (x columns)
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const T* dy;                // row-major [M, R] or panels [.][R][panel]
  const T* x;                 // row-major [M, C] or panels [.][C][panel]
  T* out;                     // [nnz]: out[j] = sum_m dy[m, row(j)] * x[m, col(j)]
};
template <class T>
using csr_sddmm_fn = void (*)(const CsrSddmmArgs<T>&, int64_t r0, int64_t r1);

// Packs rows of a row-major [M, C] operand (leading dim ld) into panel chunks [c0, c1).
template <class T>
using pack_panels_fn = void (*)(const T* src, int64_t M, int64_t C, int64_t ld, T* dst,
                                int64_t c0, int64_t c1);

template <class T>
struct KernelTable {
  const char* name;
  int panel;  // CSR panel width in batch rows; 0 = kernels read row-major operands
  bsr_forward_fn<T> bsr_forward;
  bsr_transpose_blocks_fn<T> bsr_transpose_blocks;
  bsr_grad_weight_fn<T> bsr_grad_weight;
  csr_spmm_fn<T> csr_spmm;
  csr_sddmm_fn<T> csr_sddmm;
  pack_panels_fn<T> pack_panels;  // null when panel == 0
};

// Each returns null when the instruction set was not compiled in.
const KernelTable<float>* avx512_kernels();
const KernelTable<float>* avx2_kernels();
template <class T>
const KernelTable<T>* scalar_kernels();

}  // namespace sparsekern::cpu
