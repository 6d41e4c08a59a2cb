"""VGG-16 with batch norm, CIFAR style (one linear classifier on the pooled 512 features).
Max-pools are skipped once the feature map is 1x1, so small inputs (8x8 digits) work too."""
from __future__ import annotations

from torch import nn

from lth.models import MODELS, scaled
from lth.models.lenet import _image_shape

VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        cin, h, w = _image_shape(input_shape)
        layers = []
        for v in cfg:
            if v == "M":
                if h >= 2 and w >= 2:
                    layers.append(nn.MaxPool2d(2))
                    h, w = h // 2, w // 2
                continue
            cout = scaled(v, mult)
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("vgg16", "VGG-16 with batch norm (CIFAR style)")
def vgg16(hp, input_shape, num_classes):
    return VGG(VGG16, input_shape, num_classes, hp.width_mult)
