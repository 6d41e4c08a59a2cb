"""scikit-learn's bundled handwritten digits: 1797 8x8 grey images, 10 classes. Fixed split:
360 test images (stratified, random_state=0), 1437 training images; standardised per pixel with
the training statistics; shaped 1x8x8 (an mlp flattens it to 64 features)."""
from __future__ import annotations

import torch

from lth.datasets import DATASETS, Data, TensorData

TEST_SIZE = 360


@DATASETS.register("digits", "scikit-learn's bundled 8x8 digits (1437 train / 360 test), no "
                   "download")
def digits(hp) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=TEST_SIZE, stratify=bunch.target, random_state=0)
    x_train = torch.tensor(x_train, dtype=torch.float32) / 16.0
    x_test = torch.tensor(x_test, dtype=torch.float32) / 16.0
    mean, std = x_train.mean(0), x_train.std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    shape = (1, 8, 8)
    return Data("digits", TensorData(x_train.reshape(-1, *shape), torch.tensor(y_train)),
                TensorData(x_test.reshape(-1, *shape), torch.tensor(y_test)), shape, 10)
