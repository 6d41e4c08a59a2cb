"""Autotune configurations of the Triton kernels, shared by every kernel file.

``CONFIGS[kernel][element_size]`` is the config list of one kernel for 2-byte operands (16-bit
types) and for 4-byte ones (float32; float64 uses the same). Each kernel file adds its own
entries; ``@triton.autotune`` gets every config of a kernel (``all_configs``) and keeps, per
launch, the list of its operands' element size (``pruner``). The AOT compile report
(sparsekern.triton.aot) iterates the same lists.
"""
from __future__ import annotations

import triton
from triton import knobs

CONFIGS: dict[str, dict[int, list]] = {}


def cfg(num_warps, num_stages, **tiles):
    return triton.Config(tiles, num_warps=num_warps, num_stages=num_stages)


def configs_for(kernel: str, element_size: int):
    """The autotune configs of `kernel` for operands of `element_size` bytes (8 uses 4's)."""
    return CONFIGS[kernel][2 if element_size <= 2 else 4]


def all_configs(kernel):
    return list({id(c): c for c in CONFIGS[kernel][2] + CONFIGS[kernel][4]}.values())


def pruner(kernel):
    def prune(configs, named_args, **kwargs):
        size = next(a.element_size() for a in named_args.values()
                    if hasattr(a, "dtype") and a.dtype.is_floating_point)
        wanted = configs_for(kernel, size)
        keep = [c for c in configs if any(c is w for w in wanted)]
        # The interpreter cannot time configs (no CUDA events): it runs the first one. Every
        # config is compiled for sm_80/sm_90 by the AOT check (sparsekern.triton.aot).
        return keep[:1] if knobs.runtime.interpret else keep

    return {"early_config_prune": prune}
