// The one library definition of sparsekern: every op schema lives here. Device implementations
// register in csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
//
// Linear ops compute y = x W^T + b for a sparse W of shape [out_features, in_features], x 2-D.
// Each format gets the three products of the kernel contract: forward, grad_input (dX = dY W,
// on the transposed index) and grad_weight (dW sampled at stored positions only). The forward
// also receives the transposed index so that autograd can save it for the backward.
//
// Conv2d ops are the same three products over the (C_out, C_in*kh*kw) view of the weight
// (implicit GEMM, no im2col): x is [N, C_in, H, W] in any memory format, outputs and dX come back
// channels_last (NHWC), the layout the kernels compute in. padding is symmetric (the Python
// wrapper resolves "same"/"valid" and asymmetric padding). BSR conv values are
// [nnz_blocks, kh, kw, block_k, block_n]; CSR conv columns are ci*kh*kw + dh*kw + dw.
#include <torch/extension.h>

#include "cpu/isa.h"

TORCH_LIBRARY(sparsekern, m) {
  m.def(
      "bsr_linear(Tensor x, Tensor values, Tensor block_row_ptr, Tensor block_col_idx, "
      "Tensor block_col_ptr, Tensor block_row_idx, Tensor block_perm, Tensor? bias, "
      "int out_features) -> Tensor");
  m.def(
      "bsr_linear_grad_input(Tensor grad_out, Tensor values, Tensor block_col_ptr, "
      "Tensor block_row_idx, Tensor block_perm, int in_features) -> Tensor");
  m.def(
      "bsr_linear_grad_weight(Tensor grad_out, Tensor x, Tensor block_row_ptr, "
      "Tensor block_col_idx, int block_n, int block_k) -> Tensor");
  m.def(
      "csr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, "
      "Tensor row_idx, Tensor perm, Tensor? bias, int out_features) -> Tensor");
  m.def(
      "csr_linear_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
      "Tensor perm, int in_features) -> Tensor");
  m.def("csr_linear_grad_weight(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx) -> Tensor");
  // The CSR forward and dX as CUDA C++ (csrc/cuda/csr_spmm.cu, Sputnik-style), beside the
  // Triton kernels that csr_linear runs on CUDA by default: CUDA kernels only, opt-in from
  // Python until measured on a GPU (ops.py, set_csr_cuda). Same arguments as the ops above.
  m.def(
      "csr_linear_cuda(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, "
      "Tensor row_idx, Tensor perm, Tensor? bias, int out_features) -> Tensor");
  m.def(
      "csr_linear_grad_input_cuda(Tensor grad_out, Tensor values, Tensor col_ptr, "
      "Tensor row_idx, Tensor perm, int in_features) -> Tensor");
  m.def(
      "bsr_conv2d(Tensor x, Tensor values, Tensor block_row_ptr, Tensor block_col_idx, "
      "Tensor block_col_ptr, Tensor block_row_idx, Tensor block_perm, Tensor? bias, "
      "int out_channels, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "bsr_conv2d_grad_input(Tensor grad_out, Tensor values, Tensor block_col_ptr, "
      "Tensor block_row_idx, Tensor block_perm, int[4] input_size, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "bsr_conv2d_grad_weight(Tensor grad_out, Tensor x, Tensor block_row_ptr, "
      "Tensor block_col_idx, int[2] kernel_size, int block_n, int block_k, int[2] stride, "
      "int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "csr_conv2d(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor col_ptr, "
      "Tensor row_idx, Tensor perm, Tensor? bias, int out_channels, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "csr_conv2d_grad_input(Tensor grad_out, Tensor values, Tensor col_ptr, Tensor row_idx, "
      "Tensor perm, int[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  m.def(
      "csr_conv2d_grad_weight(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "sparsekern C++ ops (registered under torch.ops.sparsekern) and CPU ISA control";
  module.def("available_isas", &sparsekern::cpu::available_isas,
             "CPU instruction sets usable by the float32 kernels, best first");
  module.def("active_isa", &sparsekern::cpu::active_isa);
  module.def("set_isa", &sparsekern::cpu::set_isa, "Select the float32 kernel instruction set");
  module.def("active_panel_rows", &sparsekern::cpu::active_panel_rows,
             "Batch rows per x panel of the active CSR kernels (0: x read row-major)");
  module.attr("cuda_built") = pybind11::bool_(
#ifdef SPARSEKERN_WITH_CUDA
      true
#else
      false
#endif
  );
}
