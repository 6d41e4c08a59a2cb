"""Deterministic batching. The order of every epoch is a function of (seed, epoch) only, so a
resumed run sees exactly the batches an uninterrupted run would; under DDP each rank takes an
equal-sized, disjoint slice of that order."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from lth.datasets import TensorData


def epoch_order(n: int, seed: int, shuffle: bool = True, rank: int = 0, world: int = 1,
                equal_shards: bool = True) -> torch.Tensor:
    """Indices this rank visits in one epoch. equal_shards drops the last n % world examples so
    every rank runs the same number of steps (DDP needs that); eval keeps them all."""
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle
             else torch.arange(n))
    if world > 1:
        if equal_shards:
            order = order[: n - n % world]
        order = order[rank::world]
    return order


def num_batches(n_indices: int, batch_size: int) -> int:
    return -(-n_indices // batch_size)


def iterate(dataset: Dataset, order: torch.Tensor, batch_size: int, num_workers: int = 0,
            skip: int = 0):
    """Yields (x, y) batches over `order`, skipping the first `skip` batches."""
    chunks = list(order.split(batch_size))[skip:]
    if isinstance(dataset, TensorData):
        for idx in chunks:
            yield dataset.batch(idx)
        return
    if not chunks:
        return
    loader = DataLoader(dataset, batch_sampler=[c.tolist() for c in chunks],
                        num_workers=num_workers, persistent_workers=False)
    yield from loader
