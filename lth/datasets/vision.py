"""Image datasets read with torchvision (imported only here, only when one is used):
cifar10 / cifar100 from --data-dir (downloaded only with --download) and imagefolder
(ImageNet or Tiny-ImageNet layout)."""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from lth.datasets import DATASETS, Data, DataError

CIFAR = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": ("CIFAR100", "cifar-100-python", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _torchvision(what: str):
    try:
        import torchvision
    except ImportError:
        raise DataError(f"{what} needs torchvision: pip install torchvision==0.29.1 (the "
                        f"version built for torch 2.14.1)") from None
    return torchvision


def _cifar(name: str, hp) -> Data:
    cls_name, folder, classes, url, (mean, std) = CIFAR[name]
    root = os.path.abspath(hp.data_dir)
    if not os.path.isdir(os.path.join(root, folder)) and not hp.download:
        raise DataError(
            f"{name}: no data at {os.path.join(root, folder)}. Put the python version of the "
            f"dataset there (unpack {url} inside --data-dir {hp.data_dir}, which creates "
            f"{folder}/), or pass --download to let torchvision fetch it.")
    tv = _torchvision(name)
    t = tv.transforms
    normalize = [t.ToTensor(), t.Normalize(mean, std)]
    augment = [t.RandomCrop(32, padding=4), t.RandomHorizontalFlip()] if hp.augment else []
    cls = getattr(tv.datasets, cls_name)
    try:
        train = cls(root, train=True, download=hp.download,
                    transform=t.Compose(augment + normalize))
        test = cls(root, train=False, download=hp.download, transform=t.Compose(normalize))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{name}: could not read {os.path.join(root, folder)}: {e}") from None
    return Data(name, train, test, (3, 32, 32), classes)


@DATASETS.register("cifar10", "CIFAR-10 from --data-dir (torchvision; --download to fetch)")
def cifar10(hp) -> Data:
    return _cifar("cifar10", hp)


@DATASETS.register("cifar100", "CIFAR-100 from --data-dir (torchvision; --download to fetch)")
def cifar100(hp) -> Data:
    return _cifar("cifar100", hp)


class _Listed(Dataset):
    """(path, label) pairs read with torchvision's image loader (Tiny-ImageNet's val split)."""

    def __init__(self, samples, transform, loader):
        self.samples, self.transform, self.loader = samples, transform, loader

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(self.loader(path)), label


@DATASETS.register("imagefolder", "--data-dir/{train,val}/<class>/<image> (ImageNet layout) or "
                   "Tiny-ImageNet's val/images + val/val_annotations.txt")
def imagefolder(hp) -> Data:
    root = os.path.abspath(hp.data_dir)
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    layout = ("imagefolder: expected --data-dir to hold train/<class>/<images> and "
              "val/<class>/<images> (ImageNet layout), or Tiny-ImageNet's val/images/ with "
              "val/val_annotations.txt")
    for d in (train_dir, val_dir):
        if not os.path.isdir(d):
            raise DataError(f"{layout}; missing {d}")
    tv = _torchvision("imagefolder")
    t = tv.transforms
    size = hp.image_size
    normalize = [t.ToTensor(), t.Normalize(*IMAGENET_STATS)]
    if hp.augment:
        train_tf = [t.RandomResizedCrop(size), t.RandomHorizontalFlip()]
    else:
        train_tf = [t.Resize(size), t.CenterCrop(size)]
    test_tf = t.Compose([t.Resize(int(round(size * 256 / 224))), t.CenterCrop(size)] + normalize)
    train = tv.datasets.ImageFolder(train_dir, transform=t.Compose(train_tf + normalize))
    annotations = os.path.join(val_dir, "val_annotations.txt")
    if os.path.isfile(annotations):
        samples = []
        with open(annotations) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1].strip() in train.class_to_idx:
                    samples.append((os.path.join(val_dir, "images", parts[0]),
                                    train.class_to_idx[parts[1].strip()]))
        test = _Listed(samples, test_tf, tv.datasets.folder.default_loader)
    else:
        test = tv.datasets.ImageFolder(val_dir, transform=test_tf)
        if test.classes != train.classes:
            raise DataError(f"imagefolder: val classes {test.classes[:5]}... differ from train "
                            f"classes {train.classes[:5]}...")
    if len(test) == 0:
        raise DataError(f"{layout}; no validation images found under {val_dir}")
    return Data("imagefolder", train, test, (3, size, size), len(train.classes))
