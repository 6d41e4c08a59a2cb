// CPU implementations of the linear ops: argument checks, ragged-edge padding, operand packing
// and work partitioning (helpers in common.h); the arithmetic is in the kernel tables.
#include <torch/library.h>

#include "common.h"

namespace sparsekern::cpu {
namespace {

void check_matrix(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, features], got shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float64 or bfloat16 on the CPU, got ",
              t.scalar_type());
}

// ---- BSR -----------------------------------------------------------------------------------

// fn(u0, u1) over one cost-balanced range of units per thread. The kernels block their loops
// within a range (BSR: groups of block rows meeting an x tile; CSR: a batch panel reused by
// every row of the range), and more ranges per thread would only restart that blocking: OpenMP
// hands each thread a fixed share of the ranges, so extra ranges balance nothing.
template <class F>
void parallel_ranges(const int32_t* ptr, int64_t units, int64_t base_cost, F fn) {
  parallel_by_cost(ptr, units, base_cost, fn, 1);
}


// [M, C] -> [C / width][M][width]: column block j of t stored contiguously.
Tensor block_columns(const Tensor& t, int64_t width) {
  return t.view({t.size(0), t.size(1) / width, width}).transpose(0, 1).contiguous();
}

struct BsrShape {
  int64_t bk, bn, nnzb;
};

BsrShape check_bsr_values(const Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 3, op, ": values must be [nnz_blocks, block_k, block_n], got shape ",
              values.sizes());
  const int64_t bk = values.size(1), bn = values.size(2);
  TORCH_CHECK(bk % 8 == 0 && bn % 8 == 0 && bk > 0 && bn > 0, op,
              ": block dims must be positive multiples of 8, got block_k=", bk, " block_n=", bn);
  return {bk, bn, values.size(0)};
}

Tensor bsr_linear(const Tensor& x, const Tensor& values, const Tensor& block_row_ptr,
                  const Tensor& block_col_idx, const Tensor& block_col_ptr,
                  const Tensor& block_row_idx, const Tensor& block_perm,
                  const std::optional<Tensor>& bias, int64_t out_features) {
  constexpr const char* op = "sparsekern.bsr_linear";
  check_matrix(x, op, "x");
  check_float(values, op, "values", x);
  if (bias) check_float(*bias, op, "bias", x);
  if (is_bf16(x))
    return narrow_bf16(bsr_linear(widen(x), widen(values), block_row_ptr, block_col_idx,
                                  block_col_ptr, block_row_idx, block_perm, widen(bias),
                                  out_features));
  const auto [bk, bn, nnzb] = check_bsr_values(values, op);
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  TORCH_CHECK(N >= 0, op, ": out_features must be >= 0, got ", N);
  const int64_t Nb = ceil_div(N, bn), Kb = ceil_div(K, bk);
  check_compressed(op, "block_row_ptr", block_row_ptr, "block_col_idx", block_col_idx, Nb, Kb, nnzb);
  Tensor bias_padded;
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                "], got ", bias->sizes());
    bias_padded = padded_cols(bias->view({1, N}), Nb * bn).view({Nb * bn});
  }
  const Tensor xp = padded_cols(x, Kb * bk);
  const Tensor vals = values.contiguous();
  Tensor y = at::empty({M, Nb * bn}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const BsrArgs<scalar_t> args{M, bn, bk, block_row_ptr.data_ptr<int32_t>(),
                                 block_col_idx.data_ptr<int32_t>(), vals.data_ptr<scalar_t>()};
    const scalar_t* b = bias ? bias_padded.data_ptr<scalar_t>() : nullptr;
    parallel_block_row_ranges(args.row_ptr, Nb, M, [&](int64_t i0, int64_t i1, int64_t m0,
                                                        int64_t m1) {
      k->bsr_forward(args, xp.data_ptr<scalar_t>(), xp.size(1), b, y.data_ptr<scalar_t>(),
                     y.size(1), i0, i1, m0, m1);
    });
  });
  return unpadded_cols(y, N);
}

Tensor bsr_linear_grad_input(const Tensor& grad_out, const Tensor& values,
                             const Tensor& block_col_ptr, const Tensor& block_row_idx,
                             const Tensor& block_perm, int64_t in_features) {
  constexpr const char* op = "sparsekern.bsr_linear_grad_input";
  check_matrix(grad_out, op, "grad_out");
  check_float(values, op, "values", grad_out);
  if (is_bf16(grad_out))
    return narrow_bf16(bsr_linear_grad_input(widen(grad_out), widen(values), block_col_ptr,
                                             block_row_idx, block_perm, in_features));
  const auto [bk, bn, nnzb] = check_bsr_values(values, op);
  const int64_t M = grad_out.size(0), N = grad_out.size(1), K = in_features;
  TORCH_CHECK(K >= 0, op, ": in_features must be >= 0, got ", K);
  const int64_t Nb = ceil_div(N, bn), Kb = ceil_div(K, bk);
  check_compressed(op, "block_col_ptr", block_col_ptr, "block_row_idx", block_row_idx, Kb, Nb, nnzb);
  check_index(block_perm, op, "block_perm", nnzb);
  check_range(block_perm, op, "block_perm", nnzb);
  const Tensor dy = padded_cols(grad_out, Nb * bn);
  const Tensor vals = values.contiguous();
  Tensor t_vals = at::empty({nnzb, bn, bk}, vals.options());
  Tensor dx = at::empty({M, Kb * bk}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    at::parallel_for(0, nnzb, 16, [&](int64_t q0, int64_t q1) {
      k->bsr_transpose_blocks(vals.data_ptr<scalar_t>(), block_perm.data_ptr<int32_t>(), bk, bn,
                              t_vals.data_ptr<scalar_t>(), q0, q1);
    });
    // W^T as a block-sparse matrix: block rows = W's block columns, blocks [bn][bk].
    const BsrArgs<scalar_t> args{M, bk, bn, block_col_ptr.data_ptr<int32_t>(),
                                 block_row_idx.data_ptr<int32_t>(),
                                 t_vals.data_ptr<scalar_t>()};
    parallel_block_row_ranges(args.row_ptr, Kb, M, [&](int64_t j0, int64_t j1, int64_t m0,
                                                        int64_t m1) {
      k->bsr_forward(args, dy.data_ptr<scalar_t>(), dy.size(1), nullptr,
                     dx.data_ptr<scalar_t>(), dx.size(1), j0, j1, m0, m1);
    });
  });
  return unpadded_cols(dx, K);
}

Tensor bsr_linear_grad_weight(const Tensor& grad_out, const Tensor& x,
                              const Tensor& block_row_ptr, const Tensor& block_col_idx,
                              int64_t block_n, int64_t block_k) {
  constexpr const char* op = "sparsekern.bsr_linear_grad_weight";
  check_matrix(grad_out, op, "grad_out");
  check_matrix(x, op, "x");
  check_float(x, op, "x", grad_out);
  if (is_bf16(x))
    return narrow_bf16(bsr_linear_grad_weight(widen(grad_out), widen(x), block_row_ptr,
                                              block_col_idx, block_n, block_k));
  TORCH_CHECK(x.size(0) == grad_out.size(0), op, ": x has ", x.size(0),
              " rows but grad_out has ", grad_out.size(0));
  const int64_t bn = block_n, bk = block_k;
  TORCH_CHECK(bk % 8 == 0 && bn % 8 == 0 && bk > 0 && bn > 0, op,
              ": block dims must be positive multiples of 8, got block_n=", bn,
              " block_k=", bk);
  const int64_t M = x.size(0), Nb = ceil_div(grad_out.size(1), bn),
                Kb = ceil_div(x.size(1), bk);
  const int64_t nnzb = block_col_idx.numel();
  check_compressed(op, "block_row_ptr", block_row_ptr, "block_col_idx", block_col_idx, Nb, Kb, nnzb);
  // x in block columns when its block columns are read by many block rows: one copy of x, and
  // every block's chunk is a contiguous run. Where few block rows read each column the copy
  // (a pass over a fresh M x K buffer, mostly page faults) cost more than the kernel copying
  // each block's chunk into L1 itself: measured on AVX2 (Zen 5, 2 threads, 90%, M=256-1024),
  // in place won 15-20% at 2.4 blocks per block column (3072x768) and 8% at 3.2 (1024x1024),
  // and lost 8% from 6.4 (2048x2048) up.
  constexpr double kBlockColumnsFrom = 4.0;  // mean stored blocks per block column
  const bool in_place = nnzb < kBlockColumnsFrom * Kb;
  const Tensor dy = padded_cols(grad_out, Nb * bn);
  const Tensor xp = in_place ? padded_cols(x, Kb * bk) : block_columns(padded_cols(x, Kb * bk), bk);
  const int64_t x_rs = in_place ? xp.size(1) : bk, x_cs = in_place ? bk : M * bk;
  Tensor dw = at::empty({nnzb, bk, bn}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const BsrArgs<scalar_t> args{M, bn, bk, block_row_ptr.data_ptr<int32_t>(),
                                 block_col_idx.data_ptr<int32_t>(), nullptr};
    parallel_by_cost(args.row_ptr, Nb, 0, [&](int64_t i0, int64_t i1) {
      k->bsr_grad_weight(args, dy.data_ptr<scalar_t>(), dy.size(1), xp.data_ptr<scalar_t>(),
                         x_rs, x_cs, dw.data_ptr<scalar_t>(), i0, i1);
    });
  });
  return dw;
}

// ---- CSR -----------------------------------------------------------------------------------

// out[M, R] = dense[M, C] S^T (+ bias) for the CSR matrix S [R, C] given by (row_ptr, col_idx, vals).
//
// Whole batch chunks per thread when they divide evenly among the threads and a chunk's panel
// fits in three quarters of L2 beside the weight stream: each thread packs one chunk's panel
// into its own buffer just before every row sweeps it, so the gathers find the panel in the L2
// of the core that wrote it. Packing all chunks first (to_panels) and splitting rows between
// threads left each panel in L3 by the time its rows ran (M = 256, K = 3072: 3 MB of panels
// against 1 MB of L2) and made both threads read every panel. Measured on Zen 4 (1 MB L2,
// 2 threads, 90%, forward fraction of the dense FLOP rate, three alternations): AVX2 1024x1024
// M=1024 0.36 -> 0.42, 2048x2048 M=1024 0.41 -> 0.45, 3072x768 M=256 0.34 -> 0.37; AVX-512
// 3072x768 M=256 (768 KB panels) 0.36 -> 0.41. Where the panel would fill L2 (AVX-512,
// K = 4096: 1 MB) the weight stream would evict it: 4096x4096 M=1024 measured 0.38-0.45 either
// way, so it keeps the row split, as do fewer chunks than threads and uneven counts.
template <class T>
void csr_spmm_into(const Tensor& dense, const int32_t* row_ptr, const int32_t* col_idx,
                   const T* vals, const T* bias, int64_t R, Tensor& out) {
  const KernelTable<T>* k = kernels_for<T>();
  const int64_t M = dense.size(0), C = dense.size(1), P = k->panel, ldo = out.size(1);
  const int64_t chunks = P > 0 ? ceil_div(M, P) : 0, threads = at::get_num_threads();
  const Tensor src = dense.contiguous();
  if (chunks > 0 && chunks % threads == 0 && panel_stays_in_l2(C, P, sizeof(T))) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const Tensor panel = panel_scratch(kOperandSlot, {C, P}, dense.options());
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t m0 = c * P, rows = std::min(P, M - m0);
        k->pack_panels(src.data_ptr<T>() + m0 * C, rows, C, C, panel.data_ptr<T>(), 0, 1);
        const CsrSpmmArgs<T> args{rows, C, row_ptr, col_idx, vals, nullptr,
                                  panel.data_ptr<T>(), bias, out.data_ptr<T>() + m0 * ldo, ldo};
        k->csr_spmm(args, 0, R);
      }
    });
    return;
  }
  const Tensor panels = P > 0 ? to_panels(k, src) : Tensor();
  const CsrSpmmArgs<T> args{M, C, row_ptr, col_idx, vals, src.data_ptr<T>(),
                            P > 0 ? panels.data_ptr<T>() : nullptr, bias, out.data_ptr<T>(), ldo};
  parallel_ranges(row_ptr, R, 4, [&](int64_t r0, int64_t r1) { k->csr_spmm(args, r0, r1); });
}

void check_csr_values(const Tensor& values, const char* op) {
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
}

Tensor csr_linear(const Tensor& x, const Tensor& values, const Tensor& row_ptr,
                  const Tensor& col_idx, const Tensor& col_ptr, const Tensor& row_idx,
                  const Tensor& perm, const std::optional<Tensor>& bias, int64_t out_features) {
  constexpr const char* op = "sparsekern.csr_linear";
  check_matrix(x, op, "x");
  check_float(values, op, "values", x);
  if (bias) check_float(*bias, op, "bias", x);
  if (is_bf16(x))
    return narrow_bf16(csr_linear(widen(x), widen(values), row_ptr, col_idx, col_ptr, row_idx,
                                  perm, widen(bias), out_features));
  check_csr_values(values, op);
  const int64_t N = out_features, nnz = values.numel();
  TORCH_CHECK(N >= 0, op, ": out_features must be >= 0, got ", N);
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, N, x.size(1), nnz);
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                "], got ", bias->sizes());
  }
  const Tensor xc = x.contiguous(), vals = values.contiguous();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  Tensor y = at::empty({x.size(0), N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    csr_spmm_into<scalar_t>(xc, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                            vals.data_ptr<scalar_t>(), bias ? b.data_ptr<scalar_t>() : nullptr,
                            N, y);
  });
  return y;
}

Tensor csr_linear_grad_input(const Tensor& grad_out, const Tensor& values, const Tensor& col_ptr,
                             const Tensor& row_idx, const Tensor& perm, int64_t in_features) {
  constexpr const char* op = "sparsekern.csr_linear_grad_input";
  check_matrix(grad_out, op, "grad_out");
  check_float(values, op, "values", grad_out);
  if (is_bf16(grad_out))
    return narrow_bf16(csr_linear_grad_input(widen(grad_out), widen(values), col_ptr, row_idx,
                                             perm, in_features));
  check_csr_values(values, op);
  const int64_t K = in_features, nnz = values.numel();
  TORCH_CHECK(K >= 0, op, ": in_features must be >= 0, got ", K);
  check_compressed(op, "col_ptr", col_ptr, "row_idx", row_idx, K, grad_out.size(1), nnz);
  check_index(perm, op, "perm", nnz);
  check_range(perm, op, "perm", nnz);
  // W^T in CSR form is the transposed index with the values gathered into column order.
  const Tensor t_vals = values.index_select(0, perm);
  const Tensor dy = grad_out.contiguous();
  Tensor dx = at::empty({grad_out.size(0), K}, grad_out.options());
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), op, [&] {
    csr_spmm_into<scalar_t>(dy, col_ptr.data_ptr<int32_t>(), row_idx.data_ptr<int32_t>(),
                            t_vals.data_ptr<scalar_t>(), nullptr, K, dx);
  });
  return dx;
}

// dW over one cost-balanced range of rows per thread, a batch chunk at a time: the thread packs
// the chunk's x panel and its own rows' columns of dy into its own buffers just before sweeping
// them, so the gathers from the x panel hit the L2 of the core that wrote it, and every chunk
// after the first adds into dW. (to_panels packed every chunk up front, and each chunk's x panel
// came back from L3.) Each thread packs all of x, C panel rows per chunk, about what C entries
// cost, so this runs only where each thread has at least 8 C entries. Measured on
// Zen 4 (2 threads, 90%, dW's fraction of the dense forward's FLOP rate, three alternations):
// AVX2 3072x768 M=1024 0.32-0.34 -> 0.39-0.40, 2048x2048 M=256 0.41-0.47 -> 0.49-0.50; AVX-512
// 3072x768 M=1024 0.29-0.34 -> 0.40-0.42.
template <class T>
void csr_sddmm_by_chunks(const KernelTable<T>* k, const Tensor& grad_out, const Tensor& x,
                         const int32_t* row_ptr, const int32_t* col_idx, T* dw) {
  const int64_t M = x.size(0), R = grad_out.size(1), C = x.size(1), P = k->panel;
  const Tensor xc = x.contiguous(), dyc = grad_out.contiguous();
  parallel_ranges(row_ptr, R, 4, [&](int64_t r0, int64_t r1) {
    const Tensor x_panel = panel_scratch(kOperandSlot, {C, P}, x.options());
    const Tensor dy_panel = panel_scratch(kSecondSlot, {r1 - r0, P}, x.options());
    for (int64_t m0 = 0; m0 < M; m0 += P) {
      const int64_t rows = std::min(P, M - m0);
      k->pack_panels(xc.data_ptr<T>() + m0 * C, rows, C, C, x_panel.data_ptr<T>(), 0, 1);
      k->pack_panels(dyc.data_ptr<T>() + m0 * R + r0, rows, r1 - r0, R, dy_panel.data_ptr<T>(),
                     0, 1);
      CsrSddmmArgs<T> args{rows, r1 - r0, C, row_ptr + r0, col_idx, dy_panel.data_ptr<T>(),
                           x_panel.data_ptr<T>(), dw};
      args.accumulate = m0 > 0;
      k->csr_sddmm(args, 0, r1 - r0);
    }
  });
}

Tensor csr_linear_grad_weight(const Tensor& grad_out, const Tensor& x, const Tensor& row_ptr,
                              const Tensor& col_idx) {
  constexpr const char* op = "sparsekern.csr_linear_grad_weight";
  check_matrix(grad_out, op, "grad_out");
  check_matrix(x, op, "x");
  check_float(x, op, "x", grad_out);
  if (is_bf16(x))
    return narrow_bf16(csr_linear_grad_weight(widen(grad_out), widen(x), row_ptr, col_idx));
  TORCH_CHECK(x.size(0) == grad_out.size(0), op, ": x has ", x.size(0),
              " rows but grad_out has ", grad_out.size(0));
  const int64_t M = x.size(0), R = grad_out.size(1), C = x.size(1), nnz = col_idx.numel();
  check_compressed(op, "row_ptr", row_ptr, "col_idx", col_idx, R, C, nnz);
  Tensor dw = at::empty({nnz}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    if (k->panel > 0 && M > 0 && nnz >= 8 * C * at::get_num_threads() &&
        panel_stays_in_l2(C, k->panel, sizeof(scalar_t))) {
      csr_sddmm_by_chunks(k, grad_out, x, row_ptr.data_ptr<int32_t>(), col_idx.data_ptr<int32_t>(),
                          dw.data_ptr<scalar_t>());
      return;
    }
    const Tensor dy = k->panel > 0 ? to_panels(k, grad_out) : grad_out.contiguous();
    const Tensor xs = k->panel > 0 ? to_panels(k, x) : x.contiguous();
    if (M == 0) {
      dw.zero_();
      return;
    }
    const CsrSddmmArgs<scalar_t> args{M,   R,   C,   row_ptr.data_ptr<int32_t>(),
                                      col_idx.data_ptr<int32_t>(), dy.data_ptr<scalar_t>(),
                                      xs.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>()};
    parallel_ranges(args.row_ptr, R, 4, [&](int64_t r0, int64_t r1) { k->csr_sddmm(args, r0, r1); });
  });
  return dw;
}

}  // namespace

// The CUDA C++ CSR ops (csrc/cuda/csr_spmm.cu) have no CPU kernel: a CPU call says so and
// names the op that runs CPU tensors, instead of the dispatcher's list of backends.
#ifdef SPARSEKERN_WITH_CUDA
constexpr const char* kCudaKernels = "a CUDA kernel only";
#else
constexpr const char* kCudaKernels = "a CUDA kernel only, not compiled into this CPU-only build";
#endif

[[noreturn]] void cuda_only(const char* op, const char* cpu_op, const Tensor& operand,
                            const char* name) {
  TORCH_CHECK(false, "sparsekern.", op, ": ", name, " is on ", operand.device(), "; this op has ",
              kCudaKernels, "; sparsekern.", cpu_op, " runs CPU tensors");
}

Tensor csr_linear_cuda_on_cpu(const Tensor& x, const Tensor&, const Tensor&, const Tensor&,
                              const Tensor&, const Tensor&, const Tensor&,
                              const std::optional<Tensor>&, int64_t) {
  cuda_only("csr_linear_cuda", "csr_linear", x, "x");
}

Tensor csr_linear_grad_input_cuda_on_cpu(const Tensor& grad_out, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, int64_t) {
  cuda_only("csr_linear_grad_input_cuda", "csr_linear_grad_input", grad_out, "grad_out");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("csr_linear_cuda", &csr_linear_cuda_on_cpu);
  m.impl("csr_linear_grad_input_cuda", &csr_linear_grad_input_cuda_on_cpu);
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_grad_input", &bsr_linear_grad_input);
  m.impl("bsr_linear_grad_weight", &bsr_linear_grad_weight);
  m.impl("csr_linear", &csr_linear);
  m.impl("csr_linear_grad_input", &csr_linear_grad_input);
  m.impl("csr_linear_grad_weight", &csr_linear_grad_weight);
}

}  // namespace sparsekern::cpu
