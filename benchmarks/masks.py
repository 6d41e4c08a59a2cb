"""Random masks with an exact kept count, so a row labelled 90% is 90% and not 89.7%."""
from __future__ import annotations

import math

import torch


def exact_random_mask(shape: tuple[int, int], sparsity: float,
                      gen: torch.Generator) -> torch.Tensor:
    """Bool mask keeping exactly round((1 - sparsity) * numel) positions, chosen uniformly."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    total = shape[0] * shape[1]
    kept = round((1.0 - sparsity) * total)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[torch.randperm(total, generator=gen)[:kept]] = True
    return mask.view(shape)


def block_mask(out_features: int, in_features: int, block: int, sparsity: float,
               gen: torch.Generator) -> torch.Tensor:
    """Block-aligned mask: exactly round((1 - sparsity) * n_blocks) whole block x block tiles
    kept at random positions (ragged edge tiles are cropped to the weight's shape)."""
    grid = (math.ceil(out_features / block), math.ceil(in_features / block))
    tiles = exact_random_mask(grid, sparsity, gen)
    full = tiles.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[:out_features, :in_features].contiguous()


def make_mask(block: int | None, out_features: int, in_features: int, sparsity: float,
              gen: torch.Generator) -> torch.Tensor:
    """block=None: unstructured (CSR rows); else block-aligned (BSR rows)."""
    if block is None:
        return exact_random_mask((out_features, in_features), sparsity, gen)
    return block_mask(out_features, in_features, block, sparsity, gen)
