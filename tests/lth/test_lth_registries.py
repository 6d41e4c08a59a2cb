"""Model and dataset registries: every model builds and runs forward/backward on the inputs it is
meant for, the digits split is fixed, and missing data gives a clear error."""
import os
import pickle

import numpy as np
import pytest
import torch

from lth import pruning
from lth.datasets import DATASETS, DataError, load_dataset
from lth.hparams import DatasetHparams, ModelHparams
from lth.models import MODELS, build_model

CASES = {  # model: (input shape, width multiplier) small enough for a CPU test
    "mlp": ((1, 8, 8), 1.0), "lenet300": ((1, 8, 8), 1.0), "lenet5": ((1, 8, 8), 1.0),
    "resnet20": ((3, 32, 32), 0.5), "resnet32": ((3, 16, 16), 0.25),
    "resnet56": ((3, 8, 8), 0.25), "resnet110": ((3, 8, 8), 0.25),
    "vgg16": ((3, 32, 32), 0.125), "resnet18": ((3, 64, 64), 0.125),
    "resnet34": ((3, 32, 32), 0.125), "resnet50": ((3, 32, 32), 0.125),
    "mobilenetv2": ((3, 32, 32), 0.25),
}


def test_all_models_are_registered_and_tested():
    assert set(MODELS.names()) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_builds_runs_and_has_prunable_layers(name):
    shape, mult = CASES[name]
    hp = ModelHparams(name=name, widths=(32, 16), width_mult=mult)
    model = build_model(hp, shape, 7, seed=3)
    again = build_model(hp, shape, 7, seed=3)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n  # same seed, same initialisation
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    names = pruning.layer_weights(model)
    prunable = pruning.prunable_names(model)
    assert prunable and "classifier.weight" in names and "classifier.weight" not in prunable
    first_conv = [n for n in names if dict(model.named_parameters())[n].dim() == 4][:1]
    assert not set(first_conv) & set(prunable)


def test_lenet300_is_lenet_300_100():
    model = build_model(ModelHparams(name="lenet300"), (1, 28, 28), 10, 0)
    assert [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")] == \
        [(300, 784), (100, 300), (10, 100)]


def test_digits_is_embedded_and_split_is_fixed():
    a, b = load_dataset(DatasetHparams()), load_dataset(DatasetHparams())
    assert (len(a.train), len(a.test), a.num_classes, a.input_shape) == (1437, 360, 10, (1, 8, 8))
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.train.y, b.train.y)
    assert abs(float(a.train.x.mean())) < 1e-4
    assert sorted(torch.bincount(a.test.y).tolist())[0] >= 35  # stratified


def test_synthetic_is_deterministic():
    hp = DatasetHparams(name="synthetic", synthetic_shape=(2, 4, 4), synthetic_train=50,
                        synthetic_test=20, synthetic_classes=3)
    a, b = load_dataset(hp), load_dataset(hp)
    assert a.input_shape == (2, 4, 4) and a.num_classes == 3 and len(a.train) == 50
    assert torch.equal(a.train.x, b.train.x)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python")])
def test_missing_cifar_says_what_to_put_where(tmp_path, name, folder):
    with pytest.raises(DataError) as exc:
        load_dataset(DatasetHparams(name=name, data_dir=str(tmp_path)))
    msg = str(exc.value)
    assert os.path.join(str(tmp_path), folder) in msg and "--download" in msg
    assert "https://www.cs.toronto.edu" in msg
    assert os.listdir(tmp_path) == []  # nothing downloaded


def test_missing_imagefolder_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"train/<class>/<images>.*missing .*train"):
        load_dataset(DatasetHparams(name="imagefolder", data_dir=str(tmp_path)))


def test_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                "labels": rng.integers(0, 10, n).tolist()}
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(4), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(3), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tvc
    # our fake batches have other md5s than the real ones
    monkeypatch.setattr(tvc.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvc, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    data = load_dataset(DatasetHparams(name="cifar10", data_dir=str(tmp_path)))
    assert (len(data.train), len(data.test), data.num_classes) == (20, 3, 10)
    x, y = data.train[0]
    assert x.shape == (3, 32, 32)


def test_imagefolder_reads_imagenet_and_tiny_imagenet_layouts(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    def image(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 24, 3), 100, dtype=np.uint8)).save(path)
    for cls in ("n01", "n02"):
        for i in range(2):
            image(tmp_path / "imagenet" / "train" / cls / f"{i}.png")
            image(tmp_path / "imagenet" / "val" / cls / f"{i}.png")
            image(tmp_path / "tiny" / "train" / cls / "images" / f"{cls}_{i}.png")
    image(tmp_path / "tiny" / "val" / "images" / "val_0.png")
    (tmp_path / "tiny" / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t1\t1\n")
    a = load_dataset(DatasetHparams(name="imagefolder", data_dir=str(tmp_path / "imagenet"),
                                    image_size=16))
    assert (len(a.train), len(a.test), a.num_classes, a.input_shape) == (4, 4, 2, (3, 16, 16))
    assert a.train[0][0].shape == (3, 16, 16)
    t = load_dataset(DatasetHparams(name="imagefolder", data_dir=str(tmp_path / "tiny"),
                                    image_size=16))
    assert len(t.train) == 4 and len(t.test) == 1 and t.test[0][1] == 1


def test_registry_errors_list_known_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: digits"):
        DATASETS.get("mnist")
