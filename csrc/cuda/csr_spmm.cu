// Unstructured (CSR) sparse-dense products on CUDA cores, after Sputnik (Gale, Zaharia, Young,
// Elsen, "Sparse GPU Kernels for Deep Learning", SC 2020). One kernel serves two ops:
//
//   csr_linear_cuda             y[M, N]  = x[M, K] W^T (+ bias)  on W's rows    (row_ptr, col_idx)
//   csr_linear_grad_input_cuda  dX[M, K] = dY[M, N] W            on W's columns (col_ptr, row_idx,
//                                                                 perm: the transposed index)
//
// Both are out[m, r] = sum over the entries e of compressed row r of v[perm(e)] * src[m, idx[e]]
// (perm(e) = e for the forward). dW at the kept positions stays on the Triton SDDMM.
//
// Why CUDA C++ here and not Triton (issue 7, point 4(c)): the Triton CSR kernel
// (sparsekern/triton/kernels.py, csr_spmm) gives each program a block of 16-32 rows that walk
// their entries in lockstep up to the longest row (shorter rows idle, masked), loads every
// entry's column and value once per row per step, and runs programs in row order (the heaviest
// rows may start last and form the tail). Triton has no way to say "this warp owns this row"
// or to pass a register between lanes, which is what the Sputnik design needs:
//   * one subwarp (8, 16 or 32 lanes) owns one compressed row and a tile of m: it walks exactly
//     that row's entries, never another row's length;
//   * row swizzle: subwarps take rows in order of entry count, heaviest first (a per-call
//     stable argsort of the row lengths), so the subwarps of one block have about the same work
//     and the longest rows start first instead of forming the tail;
//   * the row's column indices and values are staged through registers: each lane loads one
//     entry (one coalesced load per kSub entries) and __shfl_sync broadcasts it to the subwarp;
//   * each lane loads 16 bytes of the activation per entry (float4 / 8 halves), accumulating
//     in float32 registers.
// The activation is read transposed, src^T [S, M] (one copy per call, as the Triton kernel
// does), so the kSub lanes of an entry read one contiguous run of kSub * 16 bytes.
//
// Like the Triton kernel it gathers one activation row per kept entry, so at large M it is
// bound by L2 -> SM bandwidth (see benchmarks/roofline.py for the CSR figures). The stores of
// out[m, r] are strided by N (a subwarp owns a column of the output); that costs one 32-byte
// sector per element written, small beside the per-entry gathers.
//
// Not the default dispatch (issue 7): it has not yet run on a GPU. sk.linear uses it for CUDA
// CSR weights only after sparsekern.set_csr_cuda(True) or SPARSEKERN_CSR_CUDA=1 (ops.py);
// `python -m benchmarks gpu-bench --device cuda` times it beside the Triton kernel.
//
// Index tensors are the formats' own (validated when built, formats.py); checking their
// ranges here would need a device-to-host sync per call. Instead every index the kernel reads
// is clamped into range, so a corrupt index gives a wrong result but never a memory fault.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <optional>

namespace sparsekern::cuda {
namespace {

using at::Tensor;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;

// The two 16-bit values of a 32-bit word (low half first) as floats.
__device__ inline void unpack_pair(unsigned word, c10::Half, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}

__device__ inline void unpack_pair(unsigned word, c10::BFloat16, float* out) {
  out[0] = __uint_as_float(word << 16);  // bfloat16 is the high half of a float32: exact
  out[1] = __uint_as_float(word & 0xffff0000u);
}

// One lane's 16-byte load of T, widened to float: kSize elements. The 16-bit types unpack each
// 32-bit word of the load with integer ops (no address-taken temporaries, which would put the
// vector in local memory).
template <typename T>
struct Vec16 {
  static_assert(sizeof(T) == 2, "Vec16: 16-bit types here, float is specialised below");
  static constexpr int kSize = 8;
  __device__ static void load(const T* p, float* out) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) unpack_pair(words[i], T(), out + 2 * i);
  }
};

template <>
struct Vec16<float> {
  static constexpr int kSize = 4;
  __device__ static void load(const float* p, float* out) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};

// The lanes of this thread's subwarp of kSub lanes: the shuffles name only them, so subwarps
// of one warp may run rows of different lengths (and a subwarp without a row may leave).
template <int kSub>
__device__ unsigned subwarp_mask() {
  if constexpr (kSub == kWarpSize) {
    return 0xffffffffu;
  } else {
    const int first = (threadIdx.x % kWarpSize) / kSub * kSub;
    return ((1u << kSub) - 1u) << first;
  }
}

__device__ int clamp_index(int i, int hi) { return min(max(i, 0), hi); }

// Grid: x = groups of kRowsPerBlock rows in swizzled order, y = tiles of kSub * kVec values of m.
// x runs fastest, so the blocks in flight share one m-tile of srcT (its reuse stays in L2).
//   srcT  [S, ld]: the activation transposed, ld = M rounded up to kVec (16-byte aligned rows)
//   out   [M, rows], row-major
// No __launch_bounds__: with it ptxas (CUDA 13) caps the 16-bit kernels at 40 registers and
// spills; without it they take <= 49 and spill nothing (9+ blocks of 128 threads per SM).
template <typename T, int kSub>
__global__ void csr_spmm_kernel(const T* __restrict__ srcT, int64_t ld, int64_t M, int64_t S,
                                const T* __restrict__ values, int64_t nnz,
                                const int* __restrict__ ptr, const int* __restrict__ idx,
                                const int* __restrict__ perm, const int* __restrict__ order,
                                int64_t rows, const T* __restrict__ bias, T* __restrict__ out) {
  constexpr int kVec = Vec16<T>::kSize;
  constexpr int kRowsPerBlock = kWarpsPerBlock * kWarpSize / kSub;
  const int lane = threadIdx.x % kSub;
  const int64_t slot = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kSub;
  if (slot >= rows) return;  // the whole subwarp: no shuffle of another subwarp waits on it
  const int r = order[slot];  // built by the launcher: in range
  const int end_max = int(nnz);
  const int begin = clamp_index(ptr[r], end_max);
  const int end = max(begin, clamp_index(ptr[r + 1], end_max));
  const unsigned mask = subwarp_mask<kSub>();

  const int64_t m0 = int64_t(blockIdx.y) * (kSub * kVec) + int64_t(lane) * kVec;
  // ld is a multiple of kVec, so a lane whose first value is inside a row of srcT reads its
  // whole vector there; lanes past the end read the row's first vector and discard it (a
  // branch-free loop: the loads of successive entries can be in flight together).
  const int64_t m_load = m0 < ld ? m0 : 0;
  float acc[kVec] = {};
  for (int base = begin; base < end; base += kSub) {
    const int count = min(kSub, end - base);  // the same for the whole subwarp
    int col = 0;
    float val = 0.f;
    if (lane < count) {
      const int e = base + lane;
      col = clamp_index(idx[e], int(S - 1));
      val = static_cast<float>(values[perm ? clamp_index(perm[e], end_max - 1) : e]);
    }
    // Unrolled by 4: four gathers in flight per lane (resident warps supply the rest of the
    // memory parallelism) at <= 49 registers, no spills (benchmarks/gpu/RESULTS.md).
#pragma unroll 4
    for (int j = 0; j < count; ++j) {
      const int c = __shfl_sync(mask, col, j, kSub);
      const float v = __shfl_sync(mask, val, j, kSub);
      float a[kVec];
      Vec16<T>::load(srcT + int64_t(c) * ld + m_load, a);
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[i] = fmaf(v, a[i], acc[i]);
    }
  }
  if (m0 >= M) return;
  const float b = bias ? static_cast<float>(bias[r]) : 0.f;
#pragma unroll
  for (int i = 0; i < kVec; ++i)
    if (m0 + i < M) out[(m0 + i) * rows + r] = T(acc[i] + b);
}

// ---- host side: checks and launch ----------------------------------------------------------

void check_cuda(const Tensor& t, const char* op, const char* name, const at::Device& device) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but expected ",
              device);
}

void check_index(const Tensor& t, const char* op, const char* name, int64_t length,
                 const at::Device& device) {
  check_cuda(t, op, name, device);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1, op, ": ", name,
              " must be a 1-D int32 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.size(0) == length, op, ": ", name, " must have ", length, " entries, got ",
              t.size(0));
}

// src [M, S] (x or dY), values [nnz]: dtype, device, shape; the result names them.
void check_operands(const Tensor& src, const char* src_name, const Tensor& values,
                    const char* op) {
  const at::Device device = src.device();
  check_cuda(src, op, src_name, device);
  const auto dtype = src.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ",
              src_name, " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(src.dim() == 2, op, ": ", src_name, " must be 2-D [rows, features], got shape ",
              src.sizes());
  check_cuda(values, op, "values", device);
  TORCH_CHECK(values.scalar_type() == dtype, op, ": values has dtype ", values.scalar_type(),
              " but ", src_name, " is ", dtype);
  TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D [nnz], got shape ", values.sizes());
  TORCH_CHECK(values.size(0) < (int64_t(1) << 31), op, ": at most 2^31 - 1 entries (int32 "
              "index), got ", values.size(0));
  TORCH_CHECK(src.size(1) > 0 || values.size(0) == 0, op, ": ", values.size(0),
              " entries but ", src_name, " has no features for them to index");
}

template <typename T, int kSub>
void launch(const Tensor& srcT, int64_t M, const Tensor& values, const Tensor& ptr,
            const Tensor& idx, const Tensor* perm, const Tensor& order, const Tensor* bias,
            Tensor& out) {
  constexpr int kTileM = kSub * Vec16<T>::kSize;
  constexpr int kRowsPerBlock = kWarpsPerBlock * kWarpSize / kSub;
  const int64_t rows = out.size(1);
  const int64_t m_tiles = (M + kTileM - 1) / kTileM;
  TORCH_CHECK(m_tiles <= 65535, "csr_spmm: at most ", 65535 * kTileM, " rows of ",
              "activations per call, got ", M);
  const dim3 grid(unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock), unsigned(m_tiles));
  csr_spmm_kernel<T, kSub><<<grid, kWarpsPerBlock * kWarpSize, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
      srcT.const_data_ptr<T>(), srcT.stride(0), M, srcT.size(0), values.const_data_ptr<T>(),
      values.size(0), ptr.const_data_ptr<int>(), idx.const_data_ptr<int>(),
      perm ? perm->const_data_ptr<int>() : nullptr, order.const_data_ptr<int>(), rows,
      bias ? bias->const_data_ptr<T>() : nullptr, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_for_rows(const Tensor& srcT, int64_t M, const Tensor& values, const Tensor& ptr,
                     const Tensor& idx, const Tensor* perm, const Tensor& order,
                     const Tensor* bias, Tensor& out) {
  // The narrowest subwarp whose tile covers M: few activation rows (inference) keep every
  // lane busy with 8 or 16 lanes per row; training batches take the whole warp.
  constexpr int kVec = Vec16<T>::kSize;
  if (M <= 8 * kVec)
    launch<T, 8>(srcT, M, values, ptr, idx, perm, order, bias, out);
  else if (M <= 16 * kVec)
    launch<T, 16>(srcT, M, values, ptr, idx, perm, order, bias, out);
  else
    launch<T, 32>(srcT, M, values, ptr, idx, perm, order, bias, out);
}

// out[m, r] = sum_{e in ptr[r] .. ptr[r+1]} values[perm ? perm[e] : e] * src[m, idx[e]] (+ bias[r])
Tensor csr_spmm(const Tensor& src, const Tensor& values, const Tensor& ptr, const Tensor& idx,
                const Tensor* perm, const Tensor* bias, int64_t rows) {
  const int64_t M = src.size(0), S = src.size(1);
  Tensor out = at::empty({M, rows}, src.options());
  if (M == 0 || rows == 0) return out;
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t vec = src.scalar_type() == at::kFloat ? 4 : 8;
  // src^T with rows padded to a multiple of the 16-byte vector: every lane's load is aligned.
  Tensor srcT = at::empty({S, (M + vec - 1) / vec * vec}, src.options());
  srcT.narrow(1, 0, M).copy_(src.t());
  const Tensor lengths = ptr.narrow(0, 1, rows).sub(ptr.narrow(0, 0, rows));
  const Tensor order = std::get<1>(lengths.sort(/*stable=*/true, /*dim=*/0,
                                                /*descending=*/true)).to(at::kInt);
  const Tensor vals = values.contiguous(), p = ptr.contiguous(), i = idx.contiguous();
  const std::optional<Tensor> pm = perm ? std::optional<Tensor>(perm->contiguous()) : std::nullopt;
  const std::optional<Tensor> b = bias ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  const Tensor* pm_ptr = pm ? &*pm : nullptr;
  const Tensor* b_ptr = b ? &*b : nullptr;
  switch (src.scalar_type()) {
    case at::kFloat:
      launch_for_rows<float>(srcT, M, vals, p, i, pm_ptr, order, b_ptr, out);
      break;
    case at::kHalf:
      launch_for_rows<c10::Half>(srcT, M, vals, p, i, pm_ptr, order, b_ptr, out);
      break;
    default:  // bfloat16: check_operands allows nothing else
      launch_for_rows<c10::BFloat16>(srcT, M, vals, p, i, pm_ptr, order, b_ptr, out);
  }
  return out;
}

Tensor csr_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& row_ptr,
                       const Tensor& col_idx, const Tensor& col_ptr, const Tensor& row_idx,
                       const Tensor& perm, const std::optional<Tensor>& bias,
                       int64_t out_features) {
  constexpr const char* op = "sparsekern.csr_linear_cuda";
  check_operands(x, "x", values, op);
  const at::Device device = x.device();
  const int64_t N = out_features, K = x.size(1), nnz = values.size(0);
  TORCH_CHECK(N >= 0, op, ": out_features must be >= 0, got ", N);
  check_index(row_ptr, op, "row_ptr", N + 1, device);
  check_index(col_idx, op, "col_idx", nnz, device);
  // The transposed index is not read by the forward; autograd saves it for dX.
  check_index(col_ptr, op, "col_ptr", K + 1, device);
  check_index(row_idx, op, "row_idx", nnz, device);
  check_index(perm, op, "perm", nnz, device);
  if (bias) {
    check_cuda(*bias, op, "bias", device);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias has dtype ",
                bias->scalar_type(), " but x is ", x.scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N,
                "], got ", bias->sizes());
  }
  return csr_spmm(x, values, row_ptr, col_idx, nullptr, bias ? &*bias : nullptr, N);
}

Tensor csr_linear_grad_input_cuda(const Tensor& grad_out, const Tensor& values,
                                  const Tensor& col_ptr, const Tensor& row_idx,
                                  const Tensor& perm, int64_t in_features) {
  constexpr const char* op = "sparsekern.csr_linear_grad_input_cuda";
  check_operands(grad_out, "grad_out", values, op);
  const at::Device device = grad_out.device();
  const int64_t K = in_features, nnz = values.size(0);
  TORCH_CHECK(K >= 0, op, ": in_features must be >= 0, got ", K);
  check_index(col_ptr, op, "col_ptr", K + 1, device);
  check_index(row_idx, op, "row_idx", nnz, device);
  check_index(perm, op, "perm", nnz, device);
  return csr_spmm(grad_out, values, col_ptr, row_idx, &perm, nullptr, K);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("csr_linear_cuda", &csr_linear_cuda);
  m.impl("csr_linear_grad_input_cuda", &csr_linear_grad_input_cuda);
}

}  // namespace sparsekern::cuda
