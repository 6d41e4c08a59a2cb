"""Typed wrappers over torch.ops.sparsekern.*, with their fake (meta) kernels.

The schemas live in csrc/ops.cpp, the autograd formulas in csrc/autograd.cpp (C++: a Python formula
cost ~130 us per training step of a layer, see there). When the extension is not loaded every
wrapper runs the matching function of reference.py instead, so callers never need to care.

The ops check every index they read for dtype, size, order and range, so no index makes them
read out of bounds; they do not check that a transposed index (col_ptr, row_idx, perm) is the
same pattern as the forward one: dX receives only the transposed one, and the check is O(nnz).
The format constructors and load_state_dict check it once, so the formats and modules are safe;
an inconsistent index handed to torch.ops.sparsekern.* directly gives a wrong dX.

N:M weights (formats.NM) run on the CSR ops (their values viewed flat: no copy), except a 2:4
linear on CUDA in float16/bfloat16 whose shape fits CUTLASS's tile: that one runs
`semi_structured_linear` below, torch's semi-structured sparse matmul (sparse tensor cores).
Where a CUDA N:M weight cannot take that path, a warning says why, once per reason. The path
is chosen for the dtype the product runs in: under torch.autocast that is the autocast dtype,
so float32 master weights under a CUDA bfloat16/float16 autocast take the 2:4 path.

CSR on CUDA runs the Triton kernels by default. `set_csr_cuda(True)` (or SPARSEKERN_CSR_CUDA=1
at import) sends the forward and dX of CUDA CSR linears to the CUDA C++ kernels instead
(`csr_linear_cuda`, csrc/cuda/csr_spmm.cu): opt-in until they have passed on a real GPU.

float16 on the CPU: the CPU kernels have no float16 path (the C++ ops refuse it), so
`sparse_linear` / `sparse_conv2d` (hence sk.linear, sk.conv2d and the modules) run it as the C++
kernels run bfloat16: operands widened to float32 once per call, float32 kernels and
accumulation, each output (y, and through autograd dX, dW, dbias) rounded to float16 once. The
same with and without the extension. The Triton backend (SPARSEKERN_BACKEND=triton) takes
float16 as it is.
"""
from __future__ import annotations

import functools
import inspect
import math
import operator
import os
import warnings

import torch
import torch.nn.functional as F

from sparsekern import _extension, reference
from sparsekern.formats import CSR, NM, SEMI_STRUCTURED_MULTIPLE, BlockSparse, scatter_slots
from sparsekern.triton import get_backend

_HAVE_OPS = _extension.available()

_AUTOCAST = torch.library.Library("sparsekern", "IMPL")


def _register_autocast(name: str) -> None:
    """Under torch.autocast a sparse product runs in the context's dtype, as F.linear and
    F.conv2d do: its floating inputs are cast to torch.get_autocast_dtype(device) (index tensors
    are left alone). torch.library.register_autocast would fix one dtype for every context. The
    CPU kernels have no float16 path, so a CPU float16 context runs them as sk.linear runs
    float16: widened to float32, the output rounded to float16 once."""
    op = getattr(torch.ops.sparsekern, name).default
    for device in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device=device, excluded=excluded):
            dtype = torch.get_autocast_dtype(device)
            widen = device == "cpu" and dtype == torch.float16
            run_dtype = torch.float32 if widen else dtype
            cast = [a.to(run_dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                    and a.device.type == device else a for a in args]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                out = op(*cast)
            return out.to(torch.float16) if widen else out

        _AUTOCAST.impl(name, kernel, key, with_keyset=True)


if _HAVE_OPS:
    for _name in ("bsr_linear", "csr_linear", "csr_linear_cuda", "bsr_conv2d", "csr_conv2d"):
        _register_autocast(_name)


def _op(name):
    return getattr(torch.ops.sparsekern, name) if _HAVE_OPS else getattr(reference, name)


def product_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype a product of floating operands in `dtype` runs in on `device_type`: the
    autocast dtype where torch.autocast is on for that device (it casts float16, bfloat16 and
    float32 operands, as for F.linear, and leaves float64 alone), else `dtype` itself."""
    if torch.is_autocast_enabled(device_type) and dtype in (torch.float16, torch.bfloat16,
                                                            torch.float32):
        return torch.get_autocast_dtype(device_type)
    return dtype


# ---- CSR on CUDA: the Triton kernels, or (opt-in) the CUDA C++ ones ------------------------------

_csr_cuda = False


def cuda_csr_built() -> bool:
    """Whether the loaded extension has the CUDA C++ CSR kernels (a CUDA build of _C)."""
    return _HAVE_OPS and torch._C._dispatch_has_kernel_for_dispatch_key(
        "sparsekern::csr_linear_cuda", "CUDA")


def set_csr_cuda(enabled: bool) -> None:
    """True: the forward and dX of CSR linears on CUDA tensors (sk.linear, SparseLinear, N:M
    weights off the 2:4 path) run the CUDA C++ kernels (csr_linear_cuda,
    csr_linear_grad_input_cuda) instead of the Triton ones; dW stays on Triton. False (the
    default until the C++ kernels have passed on a real GPU): Triton. A RuntimeError when this
    build has no CUDA kernels. SPARSEKERN_CSR_CUDA=1 sets it at import."""
    global _csr_cuda
    if enabled and not cuda_csr_built():
        raise RuntimeError(
            "sparsekern.set_csr_cuda(True): this build of sparsekern._C has no CUDA kernels ("
            + ("C++ extension not loaded" if not _HAVE_OPS else "built without CUDA: it needs "
               "a CUDA build of torch and a CUDA toolkit at build time, see README") + ")")
    _csr_cuda = bool(enabled)


def csr_cuda_enabled() -> bool:
    return _csr_cuda


def csr_linear_op_name(device_type: str) -> str:
    """The op a CSR linear on `device_type` runs: csr_linear (C++ on the CPU, Triton on CUDA),
    or csr_linear_cuda for CUDA tensors while set_csr_cuda(True)."""
    return "csr_linear_cuda" if _csr_cuda and device_type == "cuda" else "csr_linear"


def _csr_cuda_from_environment():
    value = os.environ.get("SPARSEKERN_CSR_CUDA", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return
    if value not in ("1", "true", "yes"):
        warnings.warn(f"SPARSEKERN_CSR_CUDA={value!r} is not 1 or 0; the CUDA CSR linears run "
                      "the Triton kernels", RuntimeWarning, stacklevel=3)
        return
    try:
        set_csr_cuda(True)
    except RuntimeError as exc:
        warnings.warn(f"SPARSEKERN_CSR_CUDA=1 ignored: {exc}", RuntimeWarning, stacklevel=3)


def bsr_linear(x: torch.Tensor, values: torch.Tensor, block_row_ptr: torch.Tensor,
               block_col_idx: torch.Tensor, block_col_ptr: torch.Tensor,
               block_row_idx: torch.Tensor, block_perm: torch.Tensor,
               bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """y = x W^T + bias for a BlockSparse W; x is [M, in_features]."""
    return _op("bsr_linear")(x, values, block_row_ptr, block_col_idx, block_col_ptr,
                             block_row_idx, block_perm, bias, out_features)


def bsr_linear_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          in_features: int) -> torch.Tensor:
    """dX = dY W on the transposed block index."""
    return _op("bsr_linear_grad_input")(grad_out, values, block_col_ptr, block_row_idx,
                                        block_perm, in_features)


def bsr_linear_grad_weight(grad_out, x, block_row_ptr, block_col_idx, block_n: int,
                           block_k: int) -> torch.Tensor:
    """dW = dY^T X at the stored blocks only: [nnz_blocks, block_k, block_n]."""
    return _op("bsr_linear_grad_weight")(grad_out, x, block_row_ptr, block_col_idx, block_n,
                                         block_k)


def csr_linear(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias,
               out_features: int) -> torch.Tensor:
    """y = x W^T + bias for a CSR W; x is [M, in_features]. On CUDA: the Triton kernels, or the
    CUDA C++ ones under set_csr_cuda(True)."""
    return _op(csr_linear_op_name(x.device.type))(x, values, row_ptr, col_idx, col_ptr, row_idx,
                                                  perm, bias, out_features)


def csr_linear_grad_input(grad_out, values, col_ptr, row_idx, perm,
                          in_features: int) -> torch.Tensor:
    return _op("csr_linear_grad_input")(grad_out, values, col_ptr, row_idx, perm, in_features)


def csr_linear_grad_weight(grad_out, x, row_ptr, col_idx) -> torch.Tensor:
    """dW = dY^T X at the stored positions only: [nnz]."""
    return _op("csr_linear_grad_weight")(grad_out, x, row_ptr, col_idx)


def csr_linear_grad_input_cuda(grad_out, values, col_ptr, row_idx, perm,
                               in_features: int) -> torch.Tensor:
    """dX of csr_linear_cuda: the CUDA C++ kernel on the transposed index (CUDA tensors only)."""
    return torch.ops.sparsekern.csr_linear_grad_input_cuda(grad_out, values, col_ptr, row_idx,
                                                           perm, in_features)


# ---- N:M ---------------------------------------------------------------------------------------

_warned: set[str] = set()


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def semi_structured_refusal(nm, shape, has_meta: bool, dtype: torch.dtype,
                            capability: tuple[int, int], cusparselt: bool) -> str | None:
    """Why an N:M linear on a CUDA device of `capability` cannot run torch's 2:4 semi-structured
    matmul (`cusparselt`: whether this torch has cuSPARSELt), or None when it can. `dtype` is
    the operands'; the check is on the dtype the product runs in, product_dtype(dtype, "cuda"):
    under a CUDA bfloat16/float16 autocast, float32 weights qualify (the op casts them)."""
    dtype = product_dtype(dtype, "cuda")
    if tuple(nm) != (2, 4):
        return f"{nm[0]}:{nm[1]} is not 2:4, the only N:M pattern of the sparse tensor cores"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}: the 2:4 kernels take float16 or bfloat16"
    if not has_meta:
        return (f"weight {shape[0]}x{shape[1]} is not a multiple of {SEMI_STRUCTURED_MULTIPLE[0]}"
                f"x{SEMI_STRUCTURED_MULTIPLE[1]} (CUTLASS's 2:4 operand)")
    if tuple(capability) < (8, 0):
        return (f"compute capability {capability[0]}.{capability[1]} < 8.0 has no sparse tensor "
                f"cores")
    if capability[0] != 8 and not cusparselt:
        return (f"compute capability {capability[0]}.{capability[1]}: torch's CUTLASS 2:4 kernels "
                f"run on 8.x only and this torch build has no cuSPARSELt")
    return None


def _check_semi_structured(x, values, meta, bias):
    op = "semi_structured_linear"
    if x.dim() != 2 or values.dim() != 2 or x.shape[1] != 2 * values.shape[1]:
        raise ValueError(f"{op}: x must be [M, K] and values [N, K / 2], got x "
                         f"{tuple(x.shape)}, values {tuple(values.shape)}")
    if x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype):
        raise ValueError(f"{op}: x, values and bias must share a dtype, got {x.dtype}, "
                         f"{values.dtype}, {None if bias is None else bias.dtype}")
    want = (values.shape[0], x.shape[1] // 16)
    if meta.dtype != torch.int16 or tuple(meta.shape) != want:
        raise ValueError(f"{op}: meta must be int16 {list(want)} (CUTLASS 2:4 metadata), got "
                         f"{meta.dtype} {list(meta.shape)}")
    if bias is not None and tuple(bias.shape) != (values.shape[0],):
        raise ValueError(f"{op}: bias must have {values.shape[0]} entries, got "
                         f"{tuple(bias.shape)}")
    devices = {t.device for t in (x, values, meta, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: x, values, meta and bias must be on one device, got {devices}")


@torch.library.custom_op(
    "sparsekern::semi_structured_linear", mutates_args=(), device_types="cpu",
    schema="(Tensor x, Tensor values, Tensor meta, Tensor row_ptr, Tensor col_idx, Tensor? bias)"
           " -> Tensor")
def semi_structured_linear(x, values, meta, row_ptr, col_idx, bias):
    """y = x W^T + bias for a 2:4 W given as CUTLASS's semi-structured operand: `values`
    [N, K / 2] (an NM weight's values) and its `meta`; `row_ptr`, `col_idx` (the NM weight's CSR
    index) are what the backward samples dW with.

    CUDA: on compute capability 8.x torch's CUTLASS 2:4 GEMM takes values + meta as they are
    (nothing is packed per call); torch builds those kernels for 8.x only, so on 9.x and later
    (H100) cuSPARSELt runs it, after compressing the dense weight into its own opaque layout
    (one pass over an [N, K] matrix per call, small beside the GEMM at training batch sizes).
    CPU: decodes values + meta with torch's own CUTLASS converter and multiplies densely;
    sk.linear never sends CPU tensors here: it lets the layout, the metadata and the autograd
    formula be checked without a GPU."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_to_dense_cutlass)
    _check_semi_structured(x, values, meta, bias)
    # torch's converter reads float32 operands as CUTLASS's 1:2 float32 layout; a 2:4 float32
    # operand is decoded exactly through float64
    wide = values.double() if values.dtype == torch.float32 else values
    w = sparse_semi_structured_to_dense_cutlass(wide, meta).to(values.dtype)
    return F.linear(x, w, bias)


@semi_structured_linear.register_kernel("cuda")
def _(x, values, meta, row_ptr, col_idx, bias):
    _check_semi_structured(x, values, meta, bias)
    if x.shape[0] == 0:
        return x.new_zeros(0, values.shape[0])
    with torch.cuda.device(x.device), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's one-time "prototype API" notice
        if torch.cuda.get_device_capability(x.device)[0] == 8:
            w = torch.sparse.SparseSemiStructuredTensorCUTLASS(
                torch.Size((values.shape[0], x.shape[1])), packed=values.contiguous(),
                meta=meta.contiguous(), packed_t=None, meta_t=None,
                compressed_swizzled_bitmask=None)
        else:
            w = torch.sparse.SparseSemiStructuredTensorCUSPARSELT.from_dense(
                scatter_slots(values, col_idx, x.shape[1]).contiguous())
        return F.linear(x.contiguous(), w, bias).contiguous()


@semi_structured_linear.register_fake
def _(x, values, meta, row_ptr, col_idx, bias):
    check_one_device("semi_structured_linear", x=x, values=values, meta=meta, row_ptr=row_ptr,
                     col_idx=col_idx, bias=bias)
    return x.new_empty(x.shape[0], values.shape[0])


def _semi_structured_setup(ctx, inputs, output):
    x, values, meta, row_ptr, col_idx, bias = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx)
    ctx.has_bias = bias is not None


def _semi_structured_backward(ctx, grad_out):
    x, values, row_ptr, col_idx = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dv = db = None
    if ctx.needs_input_grad[0]:
        # dX = dY W reduces over out_features, along which W has no 2:4 structure (it has it
        # along in_features only): no sparse tensor-core product applies. At 50% density a
        # dense GEMM with W's zeros (cuBLAS) is the fast exact choice.
        dx = grad_out @ scatter_slots(values, col_idx, x.shape[1])
    if ctx.needs_input_grad[1]:  # at the kept slots only
        dv = csr_linear_grad_weight(grad_out, x, row_ptr, col_idx).view_as(values)
    if ctx.has_bias and ctx.needs_input_grad[5]:
        db = grad_out.sum(0)
    return dx, dv, None, None, None, db


semi_structured_linear.register_autograd(_semi_structured_backward,
                                         setup_context=_semi_structured_setup)
# Under autocast it runs in the context's dtype like the other products: _nm_linear chooses it
# for that dtype (product_dtype), so a float32 weight under a bfloat16 autocast lands here.
_register_autocast("semi_structured_linear")


def _nm_linear(x2, values, index, out_features, bias, nm):
    if x2.device.type == "cuda":
        refusal = semi_structured_refusal(nm, (out_features, x2.shape[1]),
                                          "semi_structured_meta" in index, values.dtype,
                                          torch.cuda.get_device_capability(x2.device),
                                          torch.backends.cusparselt.is_available())
        if refusal is None:
            return semi_structured_linear(x2, values, index["semi_structured_meta"],
                                          index["row_ptr"], index["col_idx"], bias)
        _warn_once(f"sparsekern: this {nm[0]}:{nm[1]} linear on CUDA runs the CSR kernels, "
                   f"not the 2:4 sparse tensor cores: {refusal}")
    return csr_linear(x2, values.reshape(-1), index["row_ptr"], index["col_idx"],
                      index["col_ptr"], index["row_idx"], index["perm"], bias, out_features)


# ---- dispatch ------------------------------------------------------------------------------------

def _widened_half(x, values, bias, who: str) -> bool:
    """Whether this call is float16 on the CPU kernels, which run it widened to float32 (see
    the module docstring); float16 mixed with another dtype is an error naming them."""
    half = torch.float16
    if x.dtype != half and values.dtype != half and (bias is None or bias.dtype != half):
        return False  # the usual call, decided without building the dicts below
    operands = {"x": x, "values": values, "bias": bias}
    dtypes = {name: t.dtype for name, t in operands.items() if t is not None}
    if x.device.type != "cpu" or get_backend() == "triton":
        return False
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"{who}: x, values and bias must share a dtype, got "
                         + ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items()))
    return True


def _check_tensors(who: str, **args) -> None:
    for name, value in args.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{who}: {name} must be a tensor{' or None' if name != 'x' else ''}, "
                            f"got {type(value).__name__}")


def check_one_device(who: str, **tensors) -> None:
    """All tensors of a call on one device, checked in the fake kernels: a meta tensor among CPU
    ones sends an eager call to them (the device kernels check devices themselves), and
    without this they would return uninitialised memory on x's device."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        first, device = next(iter(devices.items()))
        others = ", ".join(f"{name} is on {d}" for name, d in devices.items() if d != device)
        raise ValueError(f"{who}: all tensors must be on one device: {first} is on {device}, "
                         f"but {others}")


def _float(t):
    return None if t is None else t.float()


def _described(weight) -> str:
    shape = getattr(weight, "shape", None)
    return type(weight).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")


def linear(x: torch.Tensor, weight: BlockSparse | CSR | NM,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias with a sparse W; x may have any leading batch dims. Autograd-aware."""
    if not isinstance(weight, (BlockSparse, CSR, NM)) or len(weight.shape) != 2:
        raise TypeError(f"linear: weight must be a sparsekern.BlockSparse, CSR or NM made from "
                        f"a 2-D linear weight, got {_described(weight)}")
    return sparse_linear(x, weight.values, weight.tensors(), weight.shape, bias,
                         getattr(weight, "nm", None))


def sparse_linear(x: torch.Tensor, values: torch.Tensor, index: dict, shape, bias=None,
                  nm=None):
    """The dispatch behind `linear` and the modules: `index` holds a format's index tensors;
    nm = (n, m) for an NM weight."""
    out_features, in_features = shape
    _check_tensors("linear", x=x, bias=bias)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear: x must end in in_features={in_features}, got shape "
                         f"{tuple(x.shape)}")
    if _widened_half(x, values, bias, "linear"):
        return sparse_linear(x.float(), values.float(), index, shape, _float(bias),
                             nm).to(torch.float16)
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), in_features)  # not -1: may be 0
    if nm is not None:
        y = _nm_linear(x2, values, index, out_features, bias, nm)
    elif "block_row_ptr" in index:
        y = bsr_linear(x2, values, index["block_row_ptr"], index["block_col_idx"],
                       index["block_col_ptr"], index["block_row_idx"], index["block_perm"],
                       bias, out_features)
    else:
        y = csr_linear(x2, values, index["row_ptr"], index["col_idx"], index["col_ptr"],
                       index["row_idx"], index["perm"], bias, out_features)
    return y if flat else y.reshape(*x.shape[:-1], out_features)


def bsr_conv2d(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx,
               block_perm, bias, out_channels: int, stride, padding, dilation) -> torch.Tensor:
    """Conv2d with a BlockSparse 4-D weight; x [N, C_in, H, W]; symmetric padding."""
    return _op("bsr_conv2d")(x, values, block_row_ptr, block_col_idx, block_col_ptr,
                             block_row_idx, block_perm, bias, out_channels, stride, padding,
                             dilation)


def bsr_conv2d_grad_input(grad_out, values, block_col_ptr, block_row_idx, block_perm,
                          input_size, stride, padding, dilation) -> torch.Tensor:
    return _op("bsr_conv2d_grad_input")(grad_out, values, block_col_ptr, block_row_idx,
                                        block_perm, input_size, stride, padding, dilation)


def bsr_conv2d_grad_weight(grad_out, x, block_row_ptr, block_col_idx, kernel_size, block_n,
                           block_k, stride, padding, dilation) -> torch.Tensor:
    """dW at the stored blocks only: [nnz_blocks, kh, kw, block_k, block_n]."""
    return _op("bsr_conv2d_grad_weight")(grad_out, x, block_row_ptr, block_col_idx, kernel_size,
                                         block_n, block_k, stride, padding, dilation)


def csr_conv2d(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_channels: int,
               kernel_size, stride, padding, dilation) -> torch.Tensor:
    """Conv2d with a CSR weight over the (C_out, C_in*kh*kw) view; symmetric padding."""
    return _op("csr_conv2d")(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias,
                             out_channels, kernel_size, stride, padding, dilation)


def csr_conv2d_grad_input(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size,
                          stride, padding, dilation) -> torch.Tensor:
    return _op("csr_conv2d_grad_input")(grad_out, values, col_ptr, row_idx, perm, input_size,
                                        kernel_size, stride, padding, dilation)


def csr_conv2d_grad_weight(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding,
                           dilation) -> torch.Tensor:
    """dW at the stored positions only: [nnz]."""
    return _op("csr_conv2d_grad_weight")(grad_out, x, row_ptr, col_idx, kernel_size, stride,
                                         padding, dilation)


def _pair(value, name: str) -> tuple[int, int]:
    """(h, w) of ints in the kernels' int32 range (beyond it the geometry overflows)."""
    try:  # any integer (numpy's too, as torch takes them), as a plain int
        if hasattr(value, "__index__") and not isinstance(value, bool):
            a = b = operator.index(value)
        else:
            a, b = value
            if isinstance(a, bool) or isinstance(b, bool):
                raise TypeError
            a, b = operator.index(a), operator.index(b)
    except (TypeError, ValueError):
        raise ValueError(f"conv2d: {name} must be an int or a pair of ints, got "
                         f"{value!r}") from None
    if max(abs(a), abs(b)) >= 2**31:
        raise ValueError(f"conv2d: {name} must be below 2**31, got {value!r}")
    return a, b


def conv_geometry(stride, padding, dilation, kernel_size):
    """stride, dilation (pairs), then conv_padding's two pairs; every value checked."""
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1:
        raise ValueError(f"conv2d: stride and dilation must be >= 1, got stride={stride}, "
                         f"dilation={dilation}")
    return (stride, dilation, *conv_padding(padding, kernel_size, stride, dilation))


def conv_padding(padding, kernel_size, stride, dilation):
    """Resolves conv2d's padding (int, pair, "same", "valid") into symmetric (ph, pw) plus the
    extra (right, bottom) that an even kernel with "same" needs: (ph, pw), (extra_w, extra_h)."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding != "same":
            raise ValueError(f"conv2d: padding must be an int, a pair, 'same' or 'valid', got "
                             f"{padding!r}")
        if stride != (1, 1):
            raise ValueError(f"conv2d: padding='same' needs stride 1, got stride={stride}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        low = tuple(t // 2 for t in total)
        return low, (total[1] - 2 * low[1], total[0] - 2 * low[0])
    ph, pw = _pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"conv2d: padding must be >= 0, got {padding!r}")
    return (ph, pw), (0, 0)


def conv2d(x: torch.Tensor, weight: BlockSparse | CSR | NM, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Like F.conv2d (groups=1) with a sparse 4-D weight; autograd-aware. x is [N, C_in, H, W]
    or unbatched [C_in, H, W]. The output is channels_last (the layout the kernels compute in)."""
    if not isinstance(weight, (BlockSparse, CSR, NM)) or len(weight.shape) != 4:
        raise TypeError(f"conv2d: weight must be a sparsekern.BlockSparse, CSR or NM made from "
                        f"a 4-D conv weight, got {_described(weight)}")
    return sparse_conv2d(x, weight.values, weight.tensors(), weight.shape, bias, stride,
                         padding, dilation, getattr(weight, "nm", None))


def sparse_conv2d(x: torch.Tensor, values: torch.Tensor, index: dict, shape, bias=None,
                  stride=1, padding=0, dilation=1, nm=None):
    """The dispatch behind `conv2d` and SparseConv2d: `index` holds a format's index tensors,
    shape = (C_out, C_in, kh, kw); nm = (n, m) for an NM weight (run on the CSR conv ops)."""
    out_channels, in_channels, kh, kw = shape
    _check_tensors("conv2d", x=x, bias=bias)
    if x.dim() not in (3, 4) or x.shape[-3] != in_channels:
        raise ValueError(f"conv2d: x must be [N, {in_channels}, H, W] (or unbatched "
                         f"[{in_channels}, H, W]), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:  # as F.conv2d: a zero batch or channel count only
        raise ValueError(f"conv2d: x must have positive height and width, got shape "
                         f"{tuple(x.shape)}")
    if x.dim() == 3:
        return sparse_conv2d(x.unsqueeze(0), values, index, shape, bias, stride, padding,
                             dilation, nm).squeeze(0)
    if _widened_half(x, values, bias, "conv2d"):
        return sparse_conv2d(x.float(), values.float(), index, shape, _float(bias), stride,
                             padding, dilation, nm).to(torch.float16)
    if nm is not None:
        if x.device.type == "cuda":
            _warn_once(f"sparsekern: a {nm[0]}:{nm[1]} conv2d on CUDA runs the CSR conv "
                       f"kernels, not the 2:4 sparse tensor cores (torch's semi-structured "
                       f"matmul is linear-only)")
        values = values.reshape(-1)
    stride, dilation, pad, (extra_w, extra_h) = conv_geometry(stride, padding, dilation,
                                                              (kh, kw))
    padded = (x.shape[-2] + 2 * pad[0] + extra_h, x.shape[-1] + 2 * pad[1] + extra_w)
    if max(padded) >= 2**31:
        raise ValueError(f"conv2d: padding={padding!r} makes the padded input {padded[0]} x "
                         f"{padded[1]}, beyond the kernels' int32 range (2**31)")
    if extra_w or extra_h:  # "same" with an even kernel: torch pads the far side one more
        x = F.pad(x, (0, extra_w, 0, extra_h))
    if "block_row_ptr" in index:
        return bsr_conv2d(x, values, index["block_row_ptr"], index["block_col_idx"],
                          index["block_col_ptr"], index["block_row_idx"], index["block_perm"],
                          bias, out_channels, stride, pad, dilation)
    return csr_conv2d(x, values, index["row_ptr"], index["col_idx"], index["col_ptr"],
                      index["row_idx"], index["perm"], bias, out_channels, (kh, kw), stride,
                      pad, dilation)


def _conv_out_shape(x, kernel_size, stride, padding, dilation):
    return [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1)
            // stride[i] + 1 for i in range(2)]


def _checked_fake(op: str):
    """torch.library.register_fake for sparsekern::`op`, its tensor arguments checked to be on
    one device first (check_one_device, by the fake's parameter names)."""
    def register(fake):
        names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            check_one_device(op, **dict(zip(names, args)), **kwargs)
            return fake(*args, **kwargs)
        return torch.library.register_fake(f"sparsekern::{op}")(checked)
    return register


if _HAVE_OPS:

    @_checked_fake("bsr_linear")
    def _(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx, block_perm,
          bias, out_features):
        torch._check(x.dim() == 2, lambda: "bsr_linear: x must be 2-D")
        return x.new_empty(x.shape[0], out_features)

    @_checked_fake("bsr_linear_grad_input")
    def _(grad_out, values, block_col_ptr, block_row_idx, block_perm, in_features):
        return grad_out.new_empty(grad_out.shape[0], in_features)

    @_checked_fake("bsr_linear_grad_weight")
    def _(grad_out, x, block_row_ptr, block_col_idx, block_n, block_k):
        return x.new_empty(block_col_idx.shape[0], block_k, block_n)

    def csr_linear_fakes(op):  # csr_linear and its CUDA C++ twin take the same arguments
        @_checked_fake(op)
        def _(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_features):
            torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D")
            return x.new_empty(x.shape[0], out_features)

        @_checked_fake(op.replace("linear", "linear_grad_input"))
        def _(grad_out, values, col_ptr, row_idx, perm, in_features):
            return grad_out.new_empty(grad_out.shape[0], in_features)

    csr_linear_fakes("csr_linear")
    csr_linear_fakes("csr_linear_cuda")

    @_checked_fake("csr_linear_grad_weight")
    def _(grad_out, x, row_ptr, col_idx):
        return x.new_empty(col_idx.shape[0])

    def _channels_last(like, *size):
        return like.new_empty(size).contiguous(memory_format=torch.channels_last)

    @_checked_fake("bsr_conv2d")
    def _(x, values, block_row_ptr, block_col_idx, block_col_ptr, block_row_idx, block_perm,
          bias, out_channels, stride, padding, dilation):
        torch._check(x.dim() == 4, lambda: "bsr_conv2d: x must be 4-D")
        oh, ow = _conv_out_shape(x, values.shape[1:3], stride, padding, dilation)
        return _channels_last(x, x.shape[0], out_channels, oh, ow)

    @_checked_fake("bsr_conv2d_grad_input")
    def _(grad_out, values, block_col_ptr, block_row_idx, block_perm, input_size, stride,
          padding, dilation):
        return _channels_last(grad_out, *input_size)

    @_checked_fake("bsr_conv2d_grad_weight")
    def _(grad_out, x, block_row_ptr, block_col_idx, kernel_size, block_n, block_k, stride,
          padding, dilation):
        return x.new_empty(block_col_idx.shape[0], *kernel_size, block_k, block_n)

    @_checked_fake("csr_conv2d")
    def _(x, values, row_ptr, col_idx, col_ptr, row_idx, perm, bias, out_channels, kernel_size,
          stride, padding, dilation):
        torch._check(x.dim() == 4, lambda: "csr_conv2d: x must be 4-D")
        oh, ow = _conv_out_shape(x, kernel_size, stride, padding, dilation)
        return _channels_last(x, x.shape[0], out_channels, oh, ow)

    @_checked_fake("csr_conv2d_grad_input")
    def _(grad_out, values, col_ptr, row_idx, perm, input_size, kernel_size, stride, padding,
          dilation):
        return _channels_last(grad_out, *input_size)

    @_checked_fake("csr_conv2d_grad_weight")
    def _(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding, dilation):
        return x.new_empty(col_idx.shape[0])


_csr_cuda_from_environment()
