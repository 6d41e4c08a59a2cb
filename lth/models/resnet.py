"""ResNet-18. Inputs of 64 pixels or more get the ImageNet stem (7x7/2 conv + max-pool);
smaller ones the CIFAR stem (3x3/1 conv), as is usual for CIFAR ResNet-18."""
from __future__ import annotations

from torch import nn

from lth.models import MODELS, scaled
from lth.models.cifar_resnet import BasicBlock
from lth.models.lenet import _image_shape


class ResNet18(nn.Module):
    def __init__(self, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        widths = [scaled(x, mult) for x in (64, 128, 256, 512)]
        if min(h, w) >= 64:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(c, widths[0], 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for i in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("resnet18", "ResNet-18 (ImageNet stem for inputs >= 64 px, else CIFAR stem)")
def resnet18(hp, input_shape, num_classes):
    return ResNet18(input_shape, num_classes, hp.width_mult)
