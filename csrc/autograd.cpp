// Autograd for every sparsekern op, registered once for all devices (the Autograd key): the
// backward calls the grad ops through the dispatcher, so a CUDA tensor reaches the Triton
// kernels and a CPU tensor the C++ ones (or the Triton interpreter under SPARSEKERN_BACKEND).
//
// Why C++ and not torch.library.register_autograd: the Python formula cost ~130 us per
// training step of a layer (forward wrapper, backward node, and one Python wrapper around each
// grad op) next to ~30 us for a dense F.linear step; at a 1024x1024 layer and 256 rows at 90%
// that is 15% of the sparse step. Here a step pays one C++ autograd node.
//
// The grad ops are first-order only: their Autograd kernel is torch's not-implemented
// fallback, so a double backward (e.g. a gradient penalty) raises "derivative for
// sparsekern::..._grad_... is not implemented" instead of silently returning zeros.
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

namespace sparsekern {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// Saves the operands every format's backward needs: x, values, the forward index (dW) and the
// transposed index (dX).
void save_operands(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                   const Tensor& ptr, const Tensor& idx, const Tensor& t_ptr,
                   const Tensor& t_idx, const Tensor& perm, const std::optional<Tensor>& bias) {
  ctx->save_for_backward({x, values, ptr, idx, t_ptr, t_idx, perm});
  ctx->saved_data["has_bias"] = bias.has_value();
}

// ---- linear ----------------------------------------------------------------------------------

using LinearSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&,
                         const std::optional<Tensor>&, int64_t);
using GradInputSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, int64_t);

// One sparse linear format: its forward op, dX op and how it calls its dW op.
struct BsrLinear {
  static constexpr const char* forward = "sparsekern::bsr_linear";
  static constexpr const char* grad_input = "sparsekern::bsr_linear_grad_input";
  static Tensor grad_weight(const Tensor& dy, const Tensor& x, const Tensor& ptr,
                            const Tensor& idx, const Tensor& values) {
    static const auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                         int64_t)>("sparsekern::bsr_linear_grad_weight");
    return op.call(dy, x, ptr, idx, values.size(2), values.size(1));
  }
};
struct CsrLinear {
  static constexpr const char* forward = "sparsekern::csr_linear";
  static constexpr const char* grad_input = "sparsekern::csr_linear_grad_input";
  static Tensor grad_weight(const Tensor& dy, const Tensor& x, const Tensor& ptr,
                            const Tensor& idx, const Tensor&) {
    static const auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&)>(
            "sparsekern::csr_linear_grad_weight");
    return op.call(dy, x, ptr, idx);
  }
};
struct CsrLinearCuda : CsrLinear {
  static constexpr const char* forward = "sparsekern::csr_linear_cuda";
  static constexpr const char* grad_input = "sparsekern::csr_linear_grad_input_cuda";
};

template <class Format>
struct LinearFunction : torch::autograd::Function<LinearFunction<Format>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& ptr, const Tensor& idx, const Tensor& t_ptr,
                        const Tensor& t_idx, const Tensor& perm,
                        const std::optional<Tensor>& bias, int64_t out_features) {
    static const auto op = op_handle<LinearSig>(Format::forward);
    save_operands(ctx, x, values, ptr, idx, t_ptr, t_idx, perm, bias);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, values, ptr, idx, t_ptr, t_idx, perm, bias, out_features);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto grad_input = op_handle<GradInputSig>(Format::grad_input);
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1];
    const Tensor dy = grads[0].contiguous();
    variable_list out(9);
    if (ctx->needs_input_grad(0))
      out[0] = grad_input.call(dy, values, saved[4], saved[5], saved[6], x.size(1));
    if (ctx->needs_input_grad(1)) out[1] = Format::grad_weight(dy, x, saved[2], saved[3], values);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(7)) out[7] = dy.sum(0);
    return out;
  }
};

template <class Format>
Tensor linear_autograd(const Tensor& x, const Tensor& values, const Tensor& ptr,
                       const Tensor& idx, const Tensor& t_ptr, const Tensor& t_idx,
                       const Tensor& perm, const std::optional<Tensor>& bias,
                       int64_t out_features) {
  return LinearFunction<Format>::apply(x, values, ptr, idx, t_ptr, t_idx, perm, bias,
                                       out_features);
}

// ---- conv2d ----------------------------------------------------------------------------------

using IntArray = c10::IntArrayRef;

struct BsrConvFunction : torch::autograd::Function<BsrConvFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& ptr, const Tensor& idx, const Tensor& t_ptr,
                        const Tensor& t_idx, const Tensor& perm,
                        const std::optional<Tensor>& bias, int64_t out_channels,
                        IntArray stride, IntArray padding, IntArray dilation) {
    static const auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&,
                         const std::optional<Tensor>&, int64_t, IntArray, IntArray, IntArray)>(
            "sparsekern::bsr_conv2d");
    save_operands(ctx, x, values, ptr, idx, t_ptr, t_idx, perm, bias);
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, values, ptr, idx, t_ptr, t_idx, perm, bias, out_channels, stride,
                   padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto grad_input =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, IntArray, IntArray, IntArray, IntArray)>(
            "sparsekern::bsr_conv2d_grad_input");
    static const auto grad_weight =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, IntArray,
                         int64_t, int64_t, IntArray, IntArray, IntArray)>(
            "sparsekern::bsr_conv2d_grad_weight");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &dy = grads[0];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    variable_list out(12);
    if (ctx->needs_input_grad(0))
      out[0] = grad_input.call(dy, values, saved[4], saved[5], saved[6], x.sizes(), stride,
                               padding, dilation);
    if (ctx->needs_input_grad(1))  // values [nnz_blocks, kh, kw, block_k, block_n]
      out[1] = grad_weight.call(dy, x, saved[2], saved[3], values.sizes().slice(1, 2),
                                values.size(4), values.size(3), stride, padding, dilation);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(7))
      out[7] = dy.sum({0, 2, 3});
    return out;
  }
};

struct CsrConvFunction : torch::autograd::Function<CsrConvFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& values,
                        const Tensor& ptr, const Tensor& idx, const Tensor& t_ptr,
                        const Tensor& t_idx, const Tensor& perm,
                        const std::optional<Tensor>& bias, int64_t out_channels,
                        IntArray kernel_size, IntArray stride, IntArray padding,
                        IntArray dilation) {
    static const auto op =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, const Tensor&, const Tensor&,
                         const std::optional<Tensor>&, int64_t, IntArray, IntArray, IntArray,
                         IntArray)>("sparsekern::csr_conv2d");
    save_operands(ctx, x, values, ptr, idx, t_ptr, t_idx, perm, bias);
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(x, values, ptr, idx, t_ptr, t_idx, perm, bias, out_channels, kernel_size,
                   stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto grad_input =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const Tensor&, IntArray, IntArray, IntArray, IntArray, IntArray)>(
            "sparsekern::csr_conv2d_grad_input");
    static const auto grad_weight =
        op_handle<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, IntArray,
                         IntArray, IntArray, IntArray)>("sparsekern::csr_conv2d_grad_weight");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &values = saved[1], &dy = grads[0];
    const auto kernel_size = ctx->saved_data["kernel_size"].toIntVector();
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    const auto dilation = ctx->saved_data["dilation"].toIntVector();
    variable_list out(13);
    if (ctx->needs_input_grad(0))
      out[0] = grad_input.call(dy, values, saved[4], saved[5], saved[6], x.sizes(),
                               kernel_size, stride, padding, dilation);
    if (ctx->needs_input_grad(1))
      out[1] = grad_weight.call(dy, x, saved[2], saved[3], kernel_size, stride, padding,
                                dilation);
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(7))
      out[7] = dy.sum({0, 2, 3});
    return out;
  }
};

Tensor bsr_conv2d_autograd(const Tensor& x, const Tensor& values, const Tensor& ptr,
                           const Tensor& idx, const Tensor& t_ptr, const Tensor& t_idx,
                           const Tensor& perm, const std::optional<Tensor>& bias,
                           int64_t out_channels, IntArray stride, IntArray padding,
                           IntArray dilation) {
  return BsrConvFunction::apply(x, values, ptr, idx, t_ptr, t_idx, perm, bias, out_channels,
                                stride, padding, dilation);
}

Tensor csr_conv2d_autograd(const Tensor& x, const Tensor& values, const Tensor& ptr,
                           const Tensor& idx, const Tensor& t_ptr, const Tensor& t_idx,
                           const Tensor& perm, const std::optional<Tensor>& bias,
                           int64_t out_channels, IntArray kernel_size, IntArray stride,
                           IntArray padding, IntArray dilation) {
  return CsrConvFunction::apply(x, values, ptr, idx, t_ptr, t_idx, perm, bias, out_channels,
                                kernel_size, stride, padding, dilation);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  using namespace sparsekern;
  m.impl("bsr_linear", &linear_autograd<BsrLinear>);
  m.impl("csr_linear", &linear_autograd<CsrLinear>);
  m.impl("csr_linear_cuda", &linear_autograd<CsrLinearCuda>);
  m.impl("bsr_conv2d", &bsr_conv2d_autograd);
  m.impl("csr_conv2d", &csr_conv2d_autograd);
  for (const char* grad_op :
       {"bsr_linear_grad_input", "bsr_linear_grad_weight", "csr_linear_grad_input",
        "csr_linear_grad_weight", "csr_linear_grad_input_cuda", "bsr_conv2d_grad_input",
        "bsr_conv2d_grad_weight", "csr_conv2d_grad_input", "csr_conv2d_grad_weight"})
    m.impl(grad_op, torch::autograd::autogradNotImplementedFallback());
}
