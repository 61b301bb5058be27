"""Whole models written after torchvision's architectures (torchvision's CPU build does not install
here), with the BN layer as a parameter so the same network can be built with torch's layers or
the library's: for the whole-model benchmarks (bench_models.py) and, at small widths, the tests.

    resnet18(bn)         torchvision.models.resnet18: 4 stages of 2 BasicBlocks, 20 BN layers, 11,689,512 parameters
    resnet50(bn)         torchvision.models.resnet50: Bottlenecks 3-4-6-3, 53 BN layers, 25,557,032 parameters
    mobilenet_v2(bn)     torchvision.models.mobilenet_v2: InvertedResiduals with ReLU6, 52 BN layers, 3,504,872 parameters
    efficientnet_b0(bn)  torchvision.models.efficientnet_b0: MBConvs with squeeze-excitation and SiLU, 49 BN layers,
                         5,288,548 parameters

`bn(channels)` returns a BN module (nn.BatchNorm2d, batchnorm.BatchNorm2d, a functools.partial of
either). At full width the parameter counts, the module tree and the state_dict keys are
torchvision's (a torchvision checkpoint loads), and so are the weight initialisations. The
activations are separate modules after the BN, as torchvision writes them (nn.ReLU, nn.ReLU6,
nn.SiLU; the residual add `out += identity` then the ReLU in the ResNet blocks), so that a
graph pass (torch.fx) sees the BN + activation and BN + add patterns a real model has.

`width` (ResNets: the first stage's channels, torchvision's 64) and `width_mult` (MobileNetV2,
EfficientNet-B0: torchvision's multiplier, channels rounded to multiples of 8) build narrower
networks with the same layers, for fast tests.
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

__all__ = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0",
           "BasicBlock", "Bottleneck", "InvertedResidual", "MBConv", "Conv2dNormActivation",
           "SqueezeExcitation", "StochasticDepth", "stochastic_depth"]


# ----------------------------------------------------------------------------------- ResNet


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride, bias=False)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, bn, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = bn(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = bn(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride is on the 3x3 convolution."""

    expansion = 4

    def __init__(self, bn, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(c_in, planes)
        self.bn1 = bn(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = bn(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = bn(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc)."""

    def __init__(self, bn, block, layers, num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        if not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width must be a positive int (torchvision's: 64), got {width!r}")
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = bn(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = width
        for stage, repeats in enumerate(layers):
            planes, stride = width * 2 ** stage, 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or c_in != planes * block.expansion:
                downsample = nn.Sequential(_conv1x1(c_in, planes * block.expansion, stride), bn(planes * block.expansion))
            blocks = [block(bn, c_in, planes, stride, downsample)]
            c_in = planes * block.expansion
            blocks += [block(bn, c_in, planes) for _ in range(1, repeats)]
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(bn, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """`width` is the first stage's channel count (torchvision's: 64); the tests use narrower nets."""
    return ResNet(bn, BasicBlock, (2, 2, 2, 2), num_classes, width)


def resnet50(bn, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """`width` is the first stage's bottleneck width (torchvision's: 64; the block outputs 4x that)."""
    return ResNet(bn, Bottleneck, (3, 4, 6, 3), num_classes, width)


# ------------------------------------------------------------- MobileNetV2 and EfficientNet


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: to the nearest multiple of `divisor`, never down by over 10%."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


def _check_width_mult(width_mult) -> None:
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ValueError(f"width_mult must be a positive number (torchvision's: 1.0), got {width_mult!r}")


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv (no bias), BN, then the activation module if any."""

    def __init__(self, bn, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1, activation=nn.ReLU) -> None:
        layers = [nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), bn(c_out)]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, project 1x1, `x + ...`."""

    def __init__(self, bn, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand))
        layers = [] if expand == 1 else [Conv2dNormActivation(bn, c_in, hidden, 1, activation=nn.ReLU6)]
        layers += [Conv2dNormActivation(bn, hidden, hidden, 3, stride, groups=hidden, activation=nn.ReLU6),
                   nn.Conv2d(hidden, c_out, 1, bias=False), bn(c_out)]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride): torchvision's inverted_residual_setting
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, bn, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        _check_width_mult(width_mult)
        c = _make_divisible(32 * width_mult)
        last = _make_divisible(1280 * max(1.0, width_mult))
        features = [Conv2dNormActivation(bn, 3, c, 3, 2, activation=nn.ReLU6)]
        for expand, channels, repeats, stride in self.SETTING:
            c_out = _make_divisible(channels * width_mult)
            for i in range(repeats):
                features.append(InvertedResidual(bn, c, c_out, stride if i == 0 else 1, expand))
                c = c_out
        features.append(Conv2dNormActivation(bn, c, last, 1, activation=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(bn, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    return MobileNetV2(bn, num_classes, width_mult, dropout)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation as EfficientNet uses it: pool, 1x1, SiLU, 1x1, Sigmoid, scale."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth(x, p, "row", training): in training, zeroes each sample's
    residual branch with probability p and scales the kept ones by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    if survival > 0.0:
        noise.div_(survival)
    return x * noise


torch.fx.wrap("stochastic_depth")  # one call in a traced graph, as torchvision's


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth(p, "row"). With p == 0 it adds nothing to a torch.fx graph
    (torchvision's adds an identity call), so a graph pass sees the BN + add under it as it is."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"stochastic depth probability must be in [0, 1], got {p!r}")
        self.p = p

    def forward(self, x):
        return x if self.p == 0.0 else stochastic_depth(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode=row"


class MBConv(nn.Module):
    """torchvision's EfficientNet block: expand 1x1 + SiLU (when expand > 1), depthwise k x k + SiLU,
    squeeze-excitation, project 1x1 + BN; with a residual (after stochastic depth) when the shape stays."""

    def __init__(self, bn, c_in: int, c_out: int, kernel: int, stride: int, expand: int, stochastic_depth_prob: float) -> None:
        super().__init__()
        hidden = _make_divisible(c_in * expand)
        layers = [] if hidden == c_in else [Conv2dNormActivation(bn, c_in, hidden, 1, activation=nn.SiLU)]
        layers += [
            Conv2dNormActivation(bn, hidden, hidden, kernel, stride, groups=hidden, activation=nn.SiLU),
            SqueezeExcitation(hidden, max(1, c_in // 4)),
            Conv2dNormActivation(bn, hidden, c_out, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNet(nn.Module):
    # (expand ratio, kernel, stride, in channels, out channels, repeats): torchvision's B0 MBConvConfig list
    B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
          (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))

    def __init__(self, bn, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.2) -> None:
        super().__init__()
        _check_width_mult(width_mult)
        setting = [(e, k, s, _make_divisible(i * width_mult), _make_divisible(o * width_mult), n) for e, k, s, i, o, n in self.B0]
        features = [Conv2dNormActivation(bn, 3, setting[0][3], 3, 2, activation=nn.SiLU)]
        total, index = sum(n for *_, n in setting), 0
        for expand, kernel, stride, c_in, c_out, repeats in setting:
            stage = []
            for i in range(repeats):
                # torchvision's linear decay: block k of the network drops with p * k / (number of blocks)
                stage.append(MBConv(bn, c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand,
                                    stochastic_depth_prob * index / total))
                index += 1
            features.append(nn.Sequential(*stage))
        last_in = setting[-1][4]
        features.append(Conv2dNormActivation(bn, last_in, 4 * last_in, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(4 * last_in, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(bn, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2,
                    stochastic_depth_prob: float = 0.2) -> nn.Module:
    """torchvision's defaults (dropout 0.2, stochastic depth 0.2, rising linearly to 0.2 * 15/16 in
    the last block). The benchmark passes stochastic_depth_prob=0.0: random skips would make the
    work of a timed step random."""
    return EfficientNet(bn, num_classes, width_mult, dropout, stochastic_depth_prob)
