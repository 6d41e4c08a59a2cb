"""Dataset registry. A builder takes DatasetHparams and returns a `Data`: train and test sets,
the input shape and the number of classes. The default, `digits`, is embedded in scikit-learn:
no download, no data dir."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from lth.registry import Registry

DATASETS = Registry("dataset")


class DataError(RuntimeError):
    """The data is not where it should be; the message says what to put where."""


class TensorData(Dataset):
    """An in-memory dataset: batches are gathered by indexing, without a DataLoader."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"TensorData: {len(x)} inputs but {len(y)} labels")
        self.x, self.y = x.contiguous(), y.long().contiguous()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def batch(self, indices: torch.Tensor):
        return self.x[indices], self.y[indices]


@dataclass
class Data:
    name: str
    train: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int


def load_dataset(hp) -> Data:
    return DATASETS.get(hp.name)(hp)


# importing the modules registers them
from lth.datasets import digits, synthetic, vision  # noqa: E402,F401
