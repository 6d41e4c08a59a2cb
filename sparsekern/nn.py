"""Modules over the sparse ops, and model-level conversion: sparsify / densify.

A SparseLinear trains its packed `values` (an nn.Parameter holding only the kept weights), so
gradients and optimizer state exist only for kept weights; the index tensors are buffers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.formats import BLOCK_SIZES, CSR, BlockSparse
from sparsekern.ops import sparse_linear
from sparsekern.timing import interleaved_medians

FORMATS = ("auto", "bsr", "csr")
POLICIES = ("auto", "sparse", "dense")


def _aligned_block(mask: torch.Tensor) -> tuple[int, int] | None:
    """The largest block (bn, bk) whose block closure of `mask` is `mask` itself, if any: a
    ticket pruned in whole blocks of that shape runs on the BSR kernels without extra weights."""
    n, k = mask.shape
    for bn, bk in sorted(((bn, bk) for bn in BLOCK_SIZES for bk in BLOCK_SIZES),
                         key=lambda b: (-b[0] * b[1], -b[0])):
        nb, kb = -(-n // bn), -(-k // bk)
        padded = mask.new_zeros(nb * bn, kb * bk)
        padded[:n, :k] = mask
        present = padded.view(nb, bn, kb, bk).any(dim=3).any(dim=1)
        closure = present[:, None, :, None].expand(nb, bn, kb, bk).reshape(nb * bn, kb * bk)
        if bool((closure[:n, :k] == mask).all()):
            return bn, bk
    return None


def pack(weight: torch.Tensor, mask: torch.Tensor | None, format: str = "auto",
         block=None) -> BlockSparse | CSR:
    """Packs a dense weight. format="auto": BSR when the mask is made of whole blocks (the
    largest such block shape), else CSR."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    mask = weight.detach() != 0 if mask is None else mask
    if format == "auto":
        if block is None:
            block = _aligned_block(mask) if mask.shape == weight.shape else None
        format = "bsr" if block is not None else "csr"
    if format == "bsr":
        return BlockSparse.from_dense(weight, mask, block=block or (32, 32))
    return CSR.from_dense(weight, mask)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as BlockSparse or CSR."""

    def __init__(self, weight: BlockSparse | CSR, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, (BlockSparse, CSR)):
            raise TypeError(f"SparseLinear: weight must be BlockSparse or CSR, got "
                            f"{type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.format = "bsr" if isinstance(weight, BlockSparse) else "csr"
        self.values = nn.Parameter(weight.values.detach().clone())
        self._index_names = tuple(n for n in weight.tensors() if n != "values")
        for name in self._index_names:
            self.register_buffer(name, getattr(weight, name).clone())
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got "
                             f"{tuple(bias.shape)}")
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: torch.Tensor | None = None,
                   format: str = "bsr", block=(32, 32)) -> "SparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: linear must be nn.Linear, got "
                            f"{type(linear).__name__}")
        block = None if format == "auto" else block
        return cls(pack(linear.weight, mask, format, block), linear.bias)

    def index(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._index_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.values, self.index(),
                             (self.out_features, self.in_features), self.bias)

    def weight_format(self) -> BlockSparse | CSR:
        """The current weight as a format object (sharing this module's tensors)."""
        cls = BlockSparse if self.format == "bsr" else CSR
        return cls(self.values.detach(), shape=(self.out_features, self.in_features),
                   **self.index())

    def dense_weight(self) -> torch.Tensor:
        return self.weight_format().to_dense()

    def mask(self) -> torch.Tensor:
        return self.weight_format().mask()

    def to_linear(self) -> nn.Linear:
        return _linear_like(self, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        w = self.weight_format()
        block = f", block={w.block}" if self.format == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{block}, sparsity={w.sparsity:.3f}, "
                f"bias={self.bias is not None}")


class MaskedLinear(nn.Linear):
    """Dense kernels with a fixed mask: what `sparsify` keeps where sparse is not faster.
    Pruned weights take no part in the output, so they get no gradient from the loss."""

    def __init__(self, linear: nn.Linear, mask: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.register_buffer("weight_mask", mask.clone())
        with torch.no_grad():
            self.weight.copy_(linear.weight * mask)
            if linear.bias is not None:
                self.bias.copy_(linear.bias)

    def forward(self, x):
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    def mask(self) -> torch.Tensor:
        return self.weight_mask

    def to_linear(self) -> nn.Linear:
        return _linear_like(self, self.weight.detach() * self.weight_mask, self.bias)


def _linear_like(module, weight, bias) -> nn.Linear:
    out = nn.Linear(module.in_features, module.out_features, bias is not None,
                    device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _train_step_fn(module: nn.Module, x: torch.Tensor):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()
    return step


def _choose(linear: nn.Linear, sparse: SparseLinear, mask, x: torch.Tensor, repeats: int):
    dense = MaskedLinear(linear, mask)
    times = interleaved_medians({"dense": _train_step_fn(dense, x),
                                 "sparse": _train_step_fn(sparse, x)}, warmup=2,
                                repeats=repeats)
    chosen = "sparse" if times["sparse"] < times["dense"] else "dense"
    return chosen, dense, times


def _timing_inputs(model: nn.Module, names, example_input, batch_size: int) -> dict:
    """{layer name: the input its timing uses}. With an example input: what the layer really
    receives in model(example_input), including whether it needs a gradient (the first layer's
    input usually does not, so its dX is not timed). Without: batch_size random rows that need
    a gradient, from a private generator so the caller's random stream is untouched."""
    modules = dict(model.named_modules())
    if example_input is None:
        out = {}
        for name in names:
            w = modules[name].weight
            generator = torch.Generator(device=w.device).manual_seed(0)
            out[name] = torch.randn(batch_size, modules[name].in_features, device=w.device,
                                    dtype=w.dtype, generator=generator, requires_grad=True)
        return out
    seen = {}
    hooks = [modules[name].register_forward_pre_hook(
        lambda module, args, name=name: seen.setdefault(name, args[0]))
        for name in names]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no side effects: batch-norm statistics stay as they are, dropout draws nothing
    try:
        with torch.enable_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes:
            m.training = training
    missing = sorted(set(names) - set(seen))
    if missing:
        raise ValueError(f"sparsify: example_input never reached layers {missing}")
    return {name: x.detach().clone().requires_grad_(x.requires_grad) for name, x in seen.items()}


def sparsify(model: nn.Module, masks: dict[str, torch.Tensor] | None = None,
             format: str = "auto", policy: str = "auto", block=None, batch_size: int = 256,
             repeats: int = 7, example_input=None) -> nn.Module:
    """Replaces the pruned nn.Linear layers of `model` (in place) and returns it.

    masks: {"<layer>.weight": bool tensor}; layers not named stay as they are. None: every Linear
    with zeros in its weight is pruned where it is zero. policy="auto" times a training step of
    each layer both ways (interleaved, median of `repeats`) and keeps the faster; "sparse" /
    "dense" force the choice. The timing input is what each layer receives in
    model(example_input) when one is given (a real batch: its size, and no dX for a layer whose
    input needs no gradient), else batch_size random rows. Each decision is readable afterwards
    via `decisions(model)`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if masks is not None:
        names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = sorted(set(masks) - names)
        if unknown:
            raise ValueError(f"masks: no nn.Linear weight named {unknown}; known: {sorted(names)}")
    targets = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        if masks is None:
            mask = module.weight.detach() != 0
            if not bool(mask.all()):
                targets[name] = mask
        elif f"{name}.weight" in masks:
            targets[name] = masks[f"{name}.weight"]
    inputs = (_timing_inputs(model, targets, example_input, batch_size)
              if policy == "auto" and targets else {})
    for name, mask in targets.items():
        module = model.get_submodule(name)
        sparse = SparseLinear.from_dense(module, mask, format=format,
                                         block=block or (32, 32))
        decision = {"format": sparse.format, "sparsity": sparse.weight_format().sparsity}
        if policy == "auto":
            chosen, dense, times = _choose(module, sparse, mask, inputs[name], repeats)
            decision.update(dense_ms=times["dense"] * 1e3, sparse_ms=times["sparse"] * 1e3,
                            timed_input=list(inputs[name].shape),
                            timed_grad_input=inputs[name].requires_grad)
        else:
            chosen, dense = policy, MaskedLinear(module, mask) if policy == "dense" else None
        decision["chosen"] = chosen
        replacement = sparse if chosen == "sparse" else dense
        replacement.sparsekern_decision = decision
        _set_submodule(model, name, replacement)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replaces every SparseLinear / MaskedLinear (in place) by an nn.Linear with zeros where
    pruned, and returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (SparseLinear, MaskedLinear)):
            _set_submodule(model, name, module.to_linear())
    return model


def decisions(model: nn.Module) -> dict[str, dict]:
    """{layer name: what sparsify decided and measured} for every converted layer."""
    return {name: dict(m.sparsekern_decision) for name, m in model.named_modules()
            if hasattr(m, "sparsekern_decision")}


def _set_submodule(model: nn.Module, name: str, module: nn.Module):
    if not name:
        raise ValueError("sparsify/densify: the model itself is a Linear layer; wrap it in a "
                         "container (e.g. nn.Sequential) to convert it in place")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
