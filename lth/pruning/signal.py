"""Does the input reach the output through the kept weights?

A mask can cut a network in two without emptying any layer: fc1 keeps only the weights into
hidden unit 3 while fc2 keeps only those out of unit 7. Such a phase trains a constant function
(its accuracy is the majority class) and must be reported as no result, while a residual network
whose branch conv is pruned entirely still carries the signal over its skip path and is a result.

The test is structural, as SynFlow's linearization: every weight becomes its mask (1 where kept,
scaled per layer so that nothing overflows), biases become 0, and activations, normalization and
dropout become the identity. With a non-negative input every value stays non-negative, so an
output unit is > 0 exactly when some path of kept weights joins it to the input.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# elementwise maps that are monotone on x >= 0 and normalizations: on the linearized network
# they only rescale a value, never create or cut a path, so they pass their input through
_PASS_THROUGH = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_,
    F.relu6, torch._C._nn.relu6, F.hardtanh, F.hardtanh_, F.leaky_relu, F.leaky_relu_,
    F.elu, F.elu_, F.gelu, F.silu, F.mish, F.softplus, F.hardswish, F.selu, F.celu,
    torch.tanh, torch.sigmoid, torch.Tensor.tanh, torch.Tensor.sigmoid,
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, F.log_softmax,
})


class _Linearized(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PASS_THROUGH:
            return args[0] if args else kwargs["input"]
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def outputs_reached(model: nn.Module, masks: dict[str, torch.Tensor],
                    example: torch.Tensor) -> tuple[int, int]:
    """(output units that some path of kept weights joins to the input, output units), for
    `model`'s plain dense form (parameter names as in `masks`; weights not in `masks` count as
    fully kept) on inputs shaped like `example` (one sample is used). The model is copied to
    float64 on the CPU; its own weights are not touched."""
    net = copy.deepcopy(model).cpu().double().eval()
    for name, p in net.named_parameters():
        if p.dim() >= 2:
            kept = masks[name].cpu().to(torch.float64) if name in masks else torch.ones_like(p)
            # <= 1 per output unit, so a deep stack of dense layers cannot overflow float64;
            # the smallest path product ((1/fan_in)^depth) stays far above its underflow
            p.copy_(kept / kept.flatten(1).sum(1).max().clamp(min=1))
        elif name.rsplit(".", 1)[-1] == "bias":
            p.zero_()
    x = torch.ones_like(example[:1], dtype=torch.float64, device="cpu")
    with _Linearized():
        out = net(x).flatten(1)[0]
    return int((out > 0).sum()), out.numel()
