// CPU implementations of the linear ops: argument checks, ragged-edge padding, operand packing
// and work partitioning over at::parallel_for; the arithmetic is in the kernel tables.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <algorithm>
#include <optional>
#include <vector>

#include "isa.h"
#include "kernels.h"

namespace sparsekern::cpu {
namespace {

using at::Tensor;

template <class T>
const KernelTable<T>* kernels_for() {
  if constexpr (std::is_same_v<T, float>) {
    return float_kernels();
  } else {
    return scalar_kernels<T>();
  }
}

void check_float(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but expected ", like.device());
}

// An index tensor: int32, 1-D, contiguous, on the CPU, with `length` entries.
void check_index(const Tensor& t, const char* op, const char* name, int64_t length) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == length, op, ": ", name, " must have ", length, " entries, got ",
              t.numel());
}

// A compressed pointer array: starts at 0, never decreases, ends at nnz.
void check_ptr(const Tensor& ptr, const char* op, const char* name, int64_t rows, int64_t nnz) {
  check_index(ptr, op, name, rows + 1);
  const int32_t* p = ptr.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[rows] == nnz, op, ": ", name, " must start at 0 and end at ", nnz,
              ", got ", p[0], " .. ", p[rows]);
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], op, ": ", name, " decreases at position ", i);
}

// Every entry of idx in [0, limit).
void check_range(const Tensor& idx, const char* op, const char* name, int64_t limit) {
  const int32_t* p = idx.data_ptr<int32_t>();
  const int64_t n = idx.numel();
  int32_t lo = 0, hi = 0;
  if (n > 0) {
    lo = hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = std::min(lo, p[i]);
      hi = std::max(hi, p[i]);
    }
  }
  TORCH_CHECK(n == 0 || (lo >= 0 && hi < limit), op, ": ", name, " has entries in [", lo, ", ",
              hi, "] but they must lie in [0, ", limit, ")");
}

// A compressed index over `rows` rows and `cols` columns holding `nnz` entries.
void check_compressed(const char* op, const char* ptr_name, const Tensor& ptr,
                      const char* idx_name, const Tensor& idx, int64_t rows, int64_t cols,
                      int64_t nnz) {
  check_ptr(ptr, op, ptr_name, rows, nnz);
  check_index(idx, op, idx_name, nnz);
  check_range(idx, op, idx_name, cols);
}

void check_matrix(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, features], got shape ",
              t.sizes());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float64 or bfloat16 on the CPU, got ",
              t.scalar_type());
}

// bfloat16 runs on the float32 kernels: operands are widened once per call, products
// accumulate in fp32 and each output element is rounded to bfloat16 once.
bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }
Tensor widen(const Tensor& t) { return t.to(at::kFloat); }
std::optional<Tensor> widen(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(widen(*t)) : std::nullopt;
}
Tensor narrow_bf16(const Tensor& t) { return t.to(at::kBFloat16); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous, with the column count padded to `cols` by zeros (ragged block edges).
Tensor padded_cols(const Tensor& t, int64_t cols) {
  Tensor c = t.contiguous();
  return c.size(1) == cols ? c : at::constant_pad_nd(c, {0, cols - c.size(1)});
}

Tensor unpadded_cols(const Tensor& t, int64_t cols) {
  return t.size(1) == cols ? t : t.narrow(1, 0, cols).contiguous();
}

// [M, C] row-major -> [ceil(M/P)][C][P] batch panels (zero rows past M), see kernels.h.
template <class T>
Tensor to_panels(const KernelTable<T>* k, const Tensor& t) {
  const int64_t M = t.size(0), C = t.size(1), P = k->panel, chunks = ceil_div(M, P);
  const Tensor src = t.contiguous();
  Tensor panels = at::empty({chunks, C, P}, t.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    k->pack_panels(src.data_ptr<T>(), M, C, C, panels.data_ptr<T>(), c0, c1);
  });
  return panels;
}

// Runs fn(u0, u1) in parallel over consecutive ranges of units [0, units) of near-equal cost,
// cost(u) = ptr[u+1] - ptr[u] + base_cost: pruned rows vary a lot in how much they kept
// (magnitude pruning leaves some neurons dense), so equal unit counts would leave threads idle.
template <class F>
void parallel_by_cost(const int32_t* ptr, int64_t units, int64_t base_cost, F fn) {
  const int64_t pieces = std::min<int64_t>(units, 4 * at::get_num_threads());
  if (pieces <= 0) return;
  const auto cost_before = [&](int64_t u) { return int64_t(ptr[u]) + base_cost * u; };
  std::vector<int64_t> bounds(pieces + 1, units);
  bounds[0] = 0;
  int64_t u = 0;
  for (int64_t p = 1; p < pieces; ++p) {
    const int64_t target = cost_before(units) * p / pieces;
    while (u < units && cost_before(u) < target) ++u;
    bounds[p] = u;
  }
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (bounds[p] < bounds[p + 1]) fn(bounds[p], bounds[p + 1]);
  });
}

// fn(u0, u1, m0, m1) over block rows x batch rows: by cost over block rows when there are
// enough of them to feed every thread, else also splitting the batch.
template <class F>
void parallel_blocks_rows(const int32_t* ptr, int64_t units, int64_t M, F fn) {
  const int64_t want = 4 * at::get_num_threads();
  if (M == 0) return;
  if (units >= want) {
    parallel_by_cost(ptr, units, 1, [&](int64_t u0, int64_t u1) { fn(u0, u1, 0, M); });
    return;
  }
  const int64_t chunk = std::max<int64_t>(ceil_div(M, ceil_div(want, std::max<int64_t>(units, 1))), 24);
  const int64_t chunks = ceil_div(M, chunk);
  at::parallel_for(0, units * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const int64_t u = w / chunks, m0 = (w % chunks) * chunk;
      fn(u, u + 1, m0, std::min(M, m0 + chunk));
    }
  });
}

// ---- BSR -----------------------------------------------------------------------------------

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
    parallel_blocks_rows(args.row_ptr, Nb, M, [&](int64_t i0, int64_t i1, int64_t m0, int64_t m1) {
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
    parallel_blocks_rows(args.row_ptr, Kb, M, [&](int64_t j0, int64_t j1, int64_t m0, int64_t m1) {
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
  const Tensor dy = padded_cols(grad_out, Nb * bn);
  const Tensor xp = padded_cols(x, Kb * bk);
  Tensor dw = at::empty({nnzb, bk, bn}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    const KernelTable<scalar_t>* k = kernels_for<scalar_t>();
    const BsrArgs<scalar_t> args{M, bn, bk, block_row_ptr.data_ptr<int32_t>(),
                                 block_col_idx.data_ptr<int32_t>(), nullptr};
    parallel_by_cost(args.row_ptr, Nb, 0, [&](int64_t i0, int64_t i1) {
      k->bsr_grad_weight(args, dy.data_ptr<scalar_t>(), dy.size(1), xp.data_ptr<scalar_t>(),
                         xp.size(1), dw.data_ptr<scalar_t>(), i0, i1);
    });
  });
  return dw;
}

// ---- CSR -----------------------------------------------------------------------------------

// out[M, R] = dense[M, C] S^T (+ bias) for the CSR matrix S [R, C] given by (row_ptr, col_idx, vals).
template <class T>
void csr_spmm_into(const Tensor& dense, const int32_t* row_ptr, const int32_t* col_idx,
                   const T* vals, const T* bias, int64_t R, Tensor& out) {
  const KernelTable<T>* k = kernels_for<T>();
  const Tensor panels = k->panel > 0 ? to_panels(k, dense) : Tensor();
  const CsrSpmmArgs<T> args{dense.size(0),
                            dense.size(1),
                            row_ptr,
                            col_idx,
                            vals,
                            dense.data_ptr<T>(),
                            k->panel > 0 ? panels.data_ptr<T>() : nullptr,
                            bias,
                            out.data_ptr<T>(),
                            out.size(1)};
  parallel_by_cost(row_ptr, R, 4, [&](int64_t r0, int64_t r1) { k->csr_spmm(args, r0, r1); });
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
    const Tensor dy = k->panel > 0 ? to_panels(k, grad_out) : grad_out.contiguous();
    const Tensor xs = k->panel > 0 ? to_panels(k, x) : x.contiguous();
    if (M == 0) {
      dw.zero_();
      return;
    }
    const CsrSddmmArgs<scalar_t> args{M,   R,   C,   row_ptr.data_ptr<int32_t>(),
                                      col_idx.data_ptr<int32_t>(), dy.data_ptr<scalar_t>(),
                                      xs.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>()};
    parallel_by_cost(args.row_ptr, R, 4, [&](int64_t r0, int64_t r1) { k->csr_sddmm(args, r0, r1); });
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("bsr_linear", &bsr_linear);
  m.impl("bsr_linear_grad_input", &bsr_linear_grad_input);
  m.impl("bsr_linear_grad_weight", &bsr_linear_grad_weight);
  m.impl("csr_linear", &csr_linear);
  m.impl("csr_linear_grad_input", &csr_linear_grad_input);
  m.impl("csr_linear_grad_weight", &csr_linear_grad_weight);
}

}  // namespace sparsekern::cpu
