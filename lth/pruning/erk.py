"""Layerwise density distributions of a sparse network at a global density, and random masks
drawn with them (the starting masks of dynamic sparse training, Evci et al. 2020 "Rigging the
Lottery", Sec. 3 and its reproducibility study).

- uniform: every prunable layer at the global density;
- er (Erdos-Renyi): a layer's density proportional to (n_in + n_out) / (n_in * n_out), over
  channels for a conv;
- erk (Erdos-Renyi-Kernel): proportional to (c_in + c_out + kh + kw) / (c_in * c_out * kh * kw)
  for a conv, (in + out) / (in * out) for a linear layer.

ER and ERK scale those raw values by one epsilon so that the kept weights over all layers are
the global density; a layer whose density would exceed 1 is made dense and epsilon re-solved for
the others (the reference implementation's loop), so no density ever exceeds 1.
"""
from __future__ import annotations

import math

import torch

from lth.pruning import _block_shape, _from_units, _grid

DISTRIBUTIONS = ("uniform", "er", "erk")


def raw_density(shape, distribution: str) -> float:
    """The unscaled density of a weight of `shape` ([out, in] or [C_out, C_in, kh, kw])."""
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    if distribution == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_in + n_out) / (n_in * n_out)
    raise ValueError(f"--density-distribution: unknown {distribution!r}; known: "
                     f"{', '.join(DISTRIBUTIONS)}")


def layer_densities(shapes: dict[str, tuple], density: float,
                    distribution: str = "erk") -> dict[str, float]:
    """{weight name: density in (0, 1]} whose weighted mean over the layers' sizes is `density`.
    shapes: {weight name: weight shape} of the prunable layers."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"layer_densities: density must be in (0, 1], got {density}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"--density-distribution: unknown {distribution!r}; known: "
                         f"{', '.join(DISTRIBUTIONS)}")
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    if distribution == "uniform":
        return {n: density for n in shapes}
    raw = {n: raw_density(s, distribution) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        epsilon = budget / sum(raw[n] * sizes[n] for n in sparse)
        largest = max(raw[n] for n in sparse)
        if largest * epsilon <= 1.0 + 1e-12:  # rounding must not make a last layer "dense"
            out = {n: min(1.0, raw[n] * epsilon) for n in sparse}
            out.update({n: 1.0 for n in dense})
            return {n: out[n] for n in shapes}
        # the layers that would pass density 1 become dense; the rest share what remains
        dense.update(n for n in sparse if raw[n] == largest)


def random_masks(shapes: dict[str, tuple], densities: dict[str, float],
                 granularity: str = "unstructured", block=(32, 32),
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Masks keeping round(density * units) units of each layer (at least one) at random, a unit
    being one weight (unstructured) or one block (block: BN output x BK input features, a conv
    block spanning the whole kh x kw window, as in `lth.pruning.prune`)."""
    if granularity not in ("unstructured", "block"):
        raise ValueError(f"--granularity {granularity}: random layerwise masks are drawn per "
                         f"weight (unstructured) or per block")
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        units = math.prod(_grid(_block_shape(shape), block)) if granularity == "block" \
            else math.prod(shape)
        keep = min(units, max(1, int(math.floor(densities[name] * units + 0.5))))
        kept = torch.zeros(units, dtype=torch.bool)
        kept[torch.randperm(units, generator=generator)[:keep]] = True
        out[name] = _from_units({name: kept}, {name: torch.empty(shape, dtype=torch.bool)},
                                granularity, block)[name]
    return out
