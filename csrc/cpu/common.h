// Shared by the CPU op implementations (linear.cpp, conv.cpp): argument checks, bfloat16
// widening, ragged-edge padding, batch panels and work partitioning over at::parallel_for.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <vector>

#include "isa.h"
#include "kernels.h"

namespace sparsekern::cpu {

using at::Tensor;

template <class T>
const KernelTable<T>* kernels_for() {
  if constexpr (std::is_same_v<T, float>) {
    return float_kernels();
  } else {
    return scalar_kernels<T>();
  }
}

inline void check_float(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but expected ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but expected ", like.device());
}

// An index tensor: int32, 1-D, contiguous, on the CPU, with `length` entries.
inline void check_index(const Tensor& t, const char* op, const char* name, int64_t length) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), op, ": ", name,
              " must be a contiguous 1-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.numel() == length, op, ": ", name, " must have ", length, " entries, got ",
              t.numel());
}

// A compressed pointer array: starts at 0, never decreases, ends at nnz.
inline void check_ptr(const Tensor& ptr, const char* op, const char* name, int64_t rows, int64_t nnz) {
  check_index(ptr, op, name, rows + 1);
  const int32_t* p = ptr.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[rows] == nnz, op, ": ", name, " must start at 0 and end at ", nnz,
              ", got ", p[0], " .. ", p[rows]);
  for (int64_t i = 0; i < rows; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], op, ": ", name, " decreases at position ", i);
}

// Every entry of idx in [0, limit).
inline void check_range(const Tensor& idx, const char* op, const char* name, int64_t limit) {
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
inline void check_compressed(const char* op, const char* ptr_name, const Tensor& ptr,
                      const char* idx_name, const Tensor& idx, int64_t rows, int64_t cols,
                      int64_t nnz) {
  check_ptr(ptr, op, ptr_name, rows, nnz);
  check_index(idx, op, idx_name, nnz);
  check_range(idx, op, idx_name, cols);
}

// bfloat16 runs on the float32 kernels: operands are widened once per call, products
// accumulate in fp32 and each output element is rounded to bfloat16 once.
inline bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }
inline Tensor widen(const Tensor& t) { return t.to(at::kFloat); }
inline std::optional<Tensor> widen(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(widen(*t)) : std::nullopt;
}
inline Tensor narrow_bf16(const Tensor& t) { return t.to(at::kBFloat16); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous, with the column count padded to `cols` by zeros (ragged block edges).
inline Tensor padded_cols(const Tensor& t, int64_t cols) {
  Tensor c = t.contiguous();
  return c.size(1) == cols ? c : at::constant_pad_nd(c, {0, cols - c.size(1)});
}

inline Tensor unpadded_cols(const Tensor& t, int64_t cols) {
  return t.size(1) == cols ? t : t.narrow(1, 0, cols).contiguous();
}

// The operands the kernels read are often copies of the activations, tens of MB (the CSR conv
// panels of a 64-channel 32x32 batch of 64: 19 MB). The CSR panels are written a channel at a
// time, 8 KB apart: on 4 KB pages every store of a transpose lands on another page; and a fresh
// buffer that size is a fresh mmap whose every page faults in, zeroed by the kernel, on first
// touch (a fifth of a CSR conv training step). So each thread keeps its copies between calls in
// 2 MB-aligned buffers advised as huge pages, one per slot (a call uses distinct slots), grown
// to the largest asked of it: the memory stays with the thread, like a oneDNN scratchpad.
// Never returned to the caller.
enum PanelSlot { kOperandSlot, kSecondSlot, kSlots };

inline Tensor huge_page_buffer(int64_t numel, const at::TensorOptions& options) {
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t bytes = (size_t(numel) * options.dtype().itemsize() + kHugePage - 1) /
                       kHugePage * kHugePage;
  void* data = nullptr;
  TORCH_CHECK(posix_memalign(&data, kHugePage, bytes) == 0,
              "sparsekern: out of memory for ", bytes, " bytes of conv panels");
  madvise(data, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages, 4 KB pages
  return at::from_blob(data, {numel}, [](void* p) { free(p); }, options);
}

inline Tensor panel_scratch(PanelSlot slot, at::IntArrayRef sizes,
                            const at::TensorOptions& options) {
  thread_local std::array<Tensor, kSlots> buffers;
  Tensor& buffer = buffers[slot];
  const int64_t numel = c10::multiply_integers(sizes);
  if (!buffer.defined() || buffer.numel() < numel || buffer.dtype() != options.dtype())
    buffer = huge_page_buffer(numel, options);
  return buffer.narrow(0, 0, numel).view(sizes);
}

// [M, C] row-major -> [ceil(M/P)][C][P] batch panels (zero rows past M), see kernels.h.
template <class T>
inline Tensor to_panels(const KernelTable<T>* k, const Tensor& t) {
  const int64_t M = t.size(0), C = t.size(1), P = k->panel, chunks = ceil_div(M, P);
  const Tensor src = t.contiguous();
  Tensor panels = at::empty({chunks, C, P}, t.options());
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    k->pack_panels(src.data_ptr<T>(), M, C, C, panels.data_ptr<T>(), c0, c1);
  });
  return panels;
}

// This core's L2 in bytes (512 KB, Zen 3's, where the C library cannot tell).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? int64_t(reported) : int64_t(512) * 1024;
  }();
  return bytes;
}

// Whether a thread's own [C][P] batch panel can stay in its L2 while a sparse matrix streams
// past it: at most three quarters of L2.
inline bool panel_stays_in_l2(int64_t C, int64_t P, size_t element_bytes) {
  return 4 * C * P * int64_t(element_bytes) <= 3 * l2_bytes();
}

// Splits [0, units) into `pieces` consecutive ranges of near-equal cost, cost(u) = ptr[u+1] -
// ptr[u] + base_cost: pruned rows vary a lot in how much they kept (magnitude pruning leaves
// some neurons dense), so equal unit counts would leave threads idle.
inline std::vector<int64_t> cost_bounds(const int32_t* ptr, int64_t units, int64_t base_cost,
                                        int64_t pieces) {
  const auto cost_before = [&](int64_t u) { return int64_t(ptr[u]) + base_cost * u; };
  std::vector<int64_t> bounds(pieces + 1, units);
  bounds[0] = 0;
  int64_t u = 0;
  for (int64_t p = 1; p < pieces; ++p) {
    const int64_t target = cost_before(units) * p / pieces;
    while (u < units && cost_before(u) < target) ++u;
    bounds[p] = u;
  }
  return bounds;
}

// Runs fn(u0, u1) in parallel over consecutive ranges of units [0, units) of near-equal cost,
// ranges_per_thread of them per thread.
template <class F>
inline void parallel_by_cost(const int32_t* ptr, int64_t units, int64_t base_cost, F fn,
                             int64_t ranges_per_thread = 4) {
  const int64_t pieces = std::min<int64_t>(units, ranges_per_thread * at::get_num_threads());
  if (pieces <= 0) return;
  const std::vector<int64_t> bounds = cost_bounds(ptr, units, base_cost, pieces);
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (bounds[p] < bounds[p + 1]) fn(bounds[p], bounds[p + 1]);
  });
}

// Runs fn(chunk, u0, u1) over image chunks x cost-balanced ranges of units. Whole chunks per
// thread when they divide evenly among the threads: each thread then streams only its own
// images through the caches (a conv's input is megabytes, its sparse weight kilobytes, so
// splitting the weight's rows instead makes every thread read every image). Otherwise each
// chunk is also split by cost, so that no thread idles.
template <class F>
inline void parallel_chunks_by_cost(const int32_t* ptr, int64_t units, int64_t base_cost,
                                    int64_t chunks, F fn) {
  const int64_t threads = at::get_num_threads();
  if (units <= 0 || chunks <= 0) return;
  const int64_t per_chunk =
      chunks % threads == 0 ? 1 : std::min<int64_t>(units, ceil_div(4 * threads, chunks));
  const std::vector<int64_t> bounds = cost_bounds(ptr, units, base_cost, per_chunk);
  at::parallel_for(0, chunks * per_chunk, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t c = w / per_chunk, p = w % per_chunk;
      if (bounds[p] < bounds[p + 1]) fn(c, bounds[p], bounds[p + 1]);
    }
  });
}

// fn(u0, u1, m0, m1) over block rows x batch rows: by cost over block rows when there are
// enough of them to feed every thread, else also splitting the batch.
template <class F>
inline void parallel_blocks_rows(const int32_t* ptr, int64_t units, int64_t M, F fn) {
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

// fn(i0, i1, m0, m1) for the BSR forward kernel (linear forward and dX, 1x1 conv). With at
// least kRowsPerThread batch rows per thread, one range of rows per thread over every block
// row: each thread reads only its own x rows (once per weight group) and writes whole y rows.
// Else one cost-balanced range of block rows per thread when there are enough of them to
// balance (the kernel blocks its loops within a range, so more ranges would only restart that
// blocking), else block rows x batch rows (parallel_blocks_rows). Measured on AVX2 (Zen 5, 2
// threads, 90%): the row split ran 1024x1024 at M=1024 at 0.86 of the dense FLOP rate where
// block rows ran 0.62-0.78 (both threads streaming all of x), and was no better below M=256.
template <class F>
inline void parallel_block_row_ranges(const int32_t* ptr, int64_t units, int64_t M, F fn) {
  constexpr int64_t kRowsPerThread = 128;
  if (M == 0) return;
  const int64_t threads = at::get_num_threads();
  if (M >= kRowsPerThread * threads) {
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) fn(0, units, M * t / threads, M * (t + 1) / threads);
    });
    return;
  }
  if (units < 4 * at::get_num_threads()) {
    parallel_blocks_rows(ptr, units, M, fn);
    return;
  }
  parallel_by_cost(ptr, units, 1, [&](int64_t i0, int64_t i1) { fn(i0, i1, 0, M); }, 1);
}

}  // namespace sparsekern::cpu
