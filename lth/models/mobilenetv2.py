"""MobileNetV2 (Sandler et al. 2018). Inputs under 64 pixels keep full resolution in the stem
and the second stage (the usual CIFAR variant)."""
from __future__ import annotations

from torch import nn

from lth.models import MODELS, scaled
from lth.models.lenet import _image_shape

# expansion t, channels c, repeats n, stride s
CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn(cin, cout, k, stride, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        hidden = cin * expansion
        layers = [] if expansion == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   _conv_bn(hidden, cout, 1, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, input_shape, num_classes: int, mult: float = 1.0):
        super().__init__()
        c, h, w = _image_shape(input_shape)
        small = min(h, w) < 64
        cin = scaled(32, mult)
        layers = [_conv_bn(c, cin, 3, 1 if small else 2)]
        for stage, (t, ch, n, s) in enumerate(CONFIG):
            cout = scaled(ch, mult)
            for i in range(n):
                stride = s if i == 0 else 1
                if small and stage == 1:
                    stride = 1
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
        last = scaled(1280, max(1.0, mult))
        layers.append(_conv_bn(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@MODELS.register("mobilenetv2", "MobileNetV2 (CIFAR variant for inputs < 64 px)")
def mobilenetv2(hp, input_shape, num_classes):
    return MobileNetV2(input_shape, num_classes, hp.width_mult)
