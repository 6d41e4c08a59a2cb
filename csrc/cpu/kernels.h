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
// dw[nnzb][bk][bn] = (dy^T x) sampled at the stored blocks of block rows [i0, i1); dy row-major
// [M][lddy]; x[m, J*bk + kk] at x[m * x_rs + J * x_cs + kk]: row-major (x_rs = ld, x_cs = bk)
// or in block columns [Kb][M][bk] (x_rs = bk, x_cs = M*bk).
template <class T>
using bsr_grad_weight_fn = void (*)(const BsrArgs<T>&, const T* dy, int64_t lddy, const T* x,
                                    int64_t x_rs, int64_t x_cs, T* dw, int64_t i0, int64_t i1);

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
  bool accumulate = false;    // out[j] += the sum instead (batch chunks after the first)
};
template <class T>
using csr_sddmm_fn = void (*)(const CsrSddmmArgs<T>&, int64_t r0, int64_t r1);

// Packs rows of a row-major [M, C] operand (leading dim ld) into panel chunks [c0, c1).
template <class T>
using pack_panels_fn = void (*)(const T* src, int64_t M, int64_t C, int64_t ld, T* dst,
                                int64_t c0, int64_t c1);

// ---- conv2d (implicit GEMM) -----------------------------------------------------------------
// Activations are NHWC with the input zero-padded once per call, so no kernel tests bounds
// (except the BSR forward given a tap_mask, below). Offsets count elements of that padded NHWC
// input ("channel rows"): pix_off[m] is where output pixel m's window starts, tap_off[t] how far
// tap t of the kh x kw window lies from that start, so output pixel m at tap t reads input
// channel c at pix_off[m] + tap_off[t] + c. Strides, dilation and padding live only in these
// two arrays.
struct ConvGeometry {
  int64_t M;               // output pixels the offsets cover
  int64_t taps;            // kh * kw
  const int64_t* pix_off;  // [M]
  const int64_t* tap_off;  // [taps]
  // BSR forward only: the input unpadded, read in place (offsets as if it were padded: where
  // a window hangs over the border they point outside it). Bit t of tap_mask[m] is set when
  // tap t of pixel m lies inside the input; a tap outside contributes zero. Null: padded input.
  const uint64_t* tap_mask = nullptr;  // [M]
};

// BSR conv blocks are stored values[nnzb][taps][bk][bn]: per tap the linear kernels' transposed
// block. y[m][I*bn + n] = bias + sum over stored blocks (I, J), taps t, k < bk of
// x[pix_off[m] + tap_off[t] + J*bk + k] * values[p][t][k][n], for block rows [i0, i1) and output
// pixels [m0, m1) (y row-major [M][ldy], i.e. NHWC).
template <class T>
using bsr_conv_forward_fn = void (*)(const BsrArgs<T>&, const ConvGeometry&, const T* x,
                                     const T* bias, T* y, int64_t ldy, int64_t i0, int64_t i1,
                                     int64_t m0, int64_t m1);
// dX by scatter, over W^T in block form (a = the transposed index, values [q][taps][bk][bn] with
// bk = W's output-channel block, bn = W's input-channel block): for block rows [j0, j1) and
// output pixels [m0, m1), dx[pix_off[m] + tap_off[t] + J*bn + n] += sum_k dy[m][I*bk + k] *
// values[q][t][k][n]. Callers split work so that no two calls write the same dx element.
template <class T>
using bsr_conv_grad_input_fn = void (*)(const BsrArgs<T>&, const ConvGeometry&, const T* dy,
                                        int64_t lddy, T* dx, int64_t j0, int64_t j1, int64_t m0,
                                        int64_t m1);
// dw[p][t] = sum_m x[pix_off[m] + tap_off[t] + J*bk ..][k] * dy[m][I*bn + n] for the units
// u = p * taps + t in [u0, u1); block_row[p] is the block row of stored block p.
template <class T>
using bsr_conv_grad_weight_fn = void (*)(const BsrArgs<T>&, const ConvGeometry&,
                                         const int32_t* block_row, const T* dy, int64_t lddy,
                                         const T* x, T* dw, int64_t u0, int64_t u1);

// CSR conv over batch panels: the padded NHWC input of each chunk of `conv_panel` images is
// stored [chunk][HpWp*Ci][conv_panel] (kernels with conv_panel == 0 read plain NHWC: one image
// per chunk), so one stored weight multiplies a contiguous run of images. Geometry offsets are
// per image.
template <class T>
struct CsrConvArgs {
  int64_t chunks;           // image chunks (images when conv_panel == 0)
  int64_t images;           // N: lanes of the last chunk past it are padding
  int64_t in_rows;          // channel rows of one padded input image: Hp*Wp*Ci
  int64_t out_channels;     // R: rows of the sparse matrix (C_out)
  const int32_t* row_ptr;   // [R+1]
  const int64_t* col_off;   // [nnz]: tap_off[tap] + ci of each stored weight
  const T* values;          // [nnz]
  // Column segments of the forward and dW: row r's entries of columns [b*S, (b+1)*S) are
  // [seg_ptr[r*(segments+1) + b], seg_ptr[r*(segments+1) + b + 1]). The SIMD kernels walk one
  // segment of many rows while that segment's input lines stay in L1; null for dX.
  const int32_t* seg_ptr;
  int64_t segments;
};
// y[n][m][r] = bias[r] + sum_j values[j] * x[n][pix_off[m] + col_off[j]] for sparse rows
// [r0, r1) and the a.images images of the chunk; x in panels, y NHWC ([images][M][R]): the SIMD
// kernels finish a tile of pixels x rows x images in L1 and transpose it into y there, so no
// second pass over the output is needed.
template <class T>
using csr_conv_forward_fn = void (*)(const CsrConvArgs<T>&, const ConvGeometry&, const T* x,
                                     const T* bias, T* y, int64_t r0, int64_t r1);
// dx[n][pix_off[m] + tap_off[t] + c] += sum over stored (r, c, t) of W * dy[n][m][r], for input
// channels c in [c0, c1), with the transposed index (a.row_ptr = col_ptr over columns
// c*taps + t, t_rows = row of each entry, a.values = values gathered into column order).
// dy and dx in panels ([chunk][M*R][panel] and [chunk][in_rows][panel]).
template <class T>
using csr_conv_grad_input_fn = void (*)(const CsrConvArgs<T>&, const ConvGeometry&,
                                        const int32_t* t_rows, const T* dy, T* dx, int64_t c0,
                                        int64_t c1);
// dw[j] = sum_n sum_m dy[n][m][r] * x[n][pix_off[m] + col_off[j]] for rows r in [r0, r1);
// dy and x in panels.
template <class T>
using csr_conv_grad_weight_fn = void (*)(const CsrConvArgs<T>&, const ConvGeometry&,
                                         const T* dy, const T* x, T* dw, int64_t r0, int64_t r1);

// Images [N][C][H][W], addressed through element strides (s_w == 1 or s_c == 1: NCHW or
// channels_last), as the CSR conv kernels' panels: each padded image is NHWC with pixel_stride
// floats per pixel, `conv_panel` images per chunk:
// panels[chunk][((h + pad_h) * (W + 2 pad_w) + w + pad_w) * pixel_stride + c][lane].
struct ImagePanels {
  int64_t N, C, H, W;
  int64_t s_n, s_c, s_h, s_w;
  int64_t pad_h, pad_w;
  int64_t pixel_stride;  // >= C; channels past C are never read by the kernels
  int64_t Hp() const { return H + 2 * pad_h; }
  int64_t Wp() const { return W + 2 * pad_w; }
  // to_image_panels' units of work per chunk: a channel of NCHW images, a row of channels_last.
  int64_t units_per_chunk() const { return s_w == 1 ? C : H; }
};
// Packs the units [u0, u1) (u = chunk * units_per_chunk() + unit) in one pass from the images
// as they are: border pixels and lanes past N are written as zeros, channels past C not at all.
// One pass replaces a padded NHWC copy followed by a transpose into panels.
template <class T>
using to_image_panels_fn = void (*)(const T* src, const ImagePanels& p, T* panels, int64_t u0,
                                    int64_t u1);
// The inverse for the interior pixels (the border of the panels is dropped) into channels_last
// images (s_c == 1), unit u = chunk * H + image row.
template <class T>
using from_image_panels_fn = void (*)(const T* panels, const ImagePanels& p, T* dst, int64_t u0,
                                      int64_t u1);

// One NCHW image [C][H][W] into the interior of a padded NHWC one: dst[(h*Wp + w) * stride + c]
// (dst already offset to the first interior pixel; Wp = row length of the padded image).
template <class T>
using nchw_to_nhwc_fn = void (*)(const T* src, int64_t C, int64_t H, int64_t W, T* dst,
                                 int64_t Wp, int64_t stride);

template <class T>
struct KernelTable {
  const char* name;
  int panel;  // CSR panel width in batch rows; 0 = kernels read row-major operands
  int conv_panel;  // CSR conv image panel width in images; 0 = kernels read plain NHWC
  bsr_forward_fn<T> bsr_forward;
  bsr_transpose_blocks_fn<T> bsr_transpose_blocks;
  bsr_grad_weight_fn<T> bsr_grad_weight;
  csr_spmm_fn<T> csr_spmm;
  csr_sddmm_fn<T> csr_sddmm;
  pack_panels_fn<T> pack_panels;  // null when panel == 0
  to_image_panels_fn<T> to_image_panels;      // null when conv_panel == 0
  from_image_panels_fn<T> from_image_panels;  // null when conv_panel == 0
  nchw_to_nhwc_fn<T> nchw_to_nhwc;    // null: torch's copy does it
  bsr_conv_forward_fn<T> bsr_conv_forward;
  bsr_conv_grad_input_fn<T> bsr_conv_grad_input;
  bsr_conv_grad_weight_fn<T> bsr_conv_grad_weight;
  csr_conv_forward_fn<T> csr_conv_forward;
  csr_conv_grad_input_fn<T> csr_conv_grad_input;
  csr_conv_grad_weight_fn<T> csr_conv_grad_weight;
};

// Each returns null when the instruction set was not compiled in.
const KernelTable<float>* avx512_kernels();
const KernelTable<float>* avx2_kernels();
template <class T>
const KernelTable<T>* scalar_kernels();

}  // namespace sparsekern::cpu
