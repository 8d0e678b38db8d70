"""ResNet, ResNeXt and Wide ResNet for MegEngine, shaped so that MegEngine's published weights load.

The published ``.pkl`` files fix the parameter names and shapes: ``conv1``, ``bn1``,
``layer{1-4}.{i}.conv{1-3}`` / ``bn{1-3}``, ``layer{1-4}.{i}.downsample.0`` (1x1 conv) and
``.1`` (BN) where a block changes shape, and ``fc``. They also fix two layout details: the
stride of a bottleneck sits on its 3x3 conv ("ResNet v1.5"), and a grouped conv's weight is
5-D ``(groups, out/groups, in/groups, kh, kw)``, which is how MegEngine stores grouped convs.
``tests/data/official_resnet_keys.json`` records the official key table for every architecture.

Where this model differs from the official one:

* the final pool is global for any input size (``adaptive_avg_pool2d``): at 224 px it equals
  the official fixed ``avg_pool2d(x, 7)``; at other sizes the official model fails or pools
  only part of the map;
* ``pretrained=True`` fetches through :mod:`engine.models.hub` (one download per node, atomic,
  sha256-checked) and loads through :mod:`engine.models.weights` (unpickled with an
  allow-list, every key and shape checked first).

Weights are initialised with the distributions of the official training recipe, so a run from
scratch starts where the official one does.
"""
import math
from typing import Any, Dict, Optional, Sequence, Type, Union

import megengine.functional as F
import megengine.module as M

from engine.models import hub, weights
from engine.models.specs import ARCHS, SPECS

# The constructors are named here for ``import *``, megengine.hub and static checkers; their
# names are specs.ARCHS (tests/test_models.py holds the two lists equal).
__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "get_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

Norm = Type[M.Module]


def _shortcut(in_channels: int, out_channels: int, stride: int, norm: Norm) -> M.Module:
    """The identity when the block keeps the shape, else a strided 1x1 conv and a BN.

    Identity (rather than None) keeps ``forward`` uniform; it has no parameters, so no keys.
    """
    if in_channels == out_channels and stride == 1:
        return M.Identity()
    return M.Sequential(M.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm(out_channels))


class BasicBlock(M.Module):
    """Two 3x3 convs and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: Norm = M.BatchNorm2d,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                "BasicBlock has groups=1 and base_width=64 (got groups=%d, base_width=%d); "
                "ResNeXt and wide variants use Bottleneck" % (groups, base_width)
            )
        if dilation != 1:
            raise ValueError("BasicBlock has no dilated form (got dilation=%d); use Bottleneck" % dilation)
        self.conv1 = M.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = M.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.downsample = _shortcut(in_channels, channels, stride, norm)

    @property
    def last_norm(self) -> M.Module:
        """The BN that closes the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn2

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x))


class Bottleneck(M.Module):
    """1x1 reduce, 3x3 (carrying the stride and the groups), 1x1 expand by 4, and a shortcut
    (ResNet-50 and deeper, ResNeXt, Wide ResNet)."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: Norm = M.BatchNorm2d,
    ):
        super().__init__()
        # ResNeXt's "32x4d": 32 groups of 4 channels at the first stage, scaled with `channels`.
        width = int(channels * (base_width / 64.0)) * groups
        out_channels = channels * self.expansion
        self.conv1 = M.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = M.Conv2d(
            width, width, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False
        )
        self.bn2 = norm(width)
        self.conv3 = M.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride, norm)

    @property
    def last_norm(self) -> M.Module:
        """The BN that closes the residual branch (zeroed by ``zero_init_residual``)."""
        return self.bn3

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x))


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class ResNet(M.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), four stages of residual blocks at 64, 128,
    256 and 512 channels (times the block's expansion), global average pool, ``fc``.

    ``groups`` and ``width_per_group`` make ResNeXt (32, 4) and Wide ResNet (1, 128);
    ``replace_stride_with_dilation`` (three booleans, stages 2-4) keeps the resolution of a
    stage and dilates its convs instead, for dense prediction; ``zero_init_residual`` starts
    every block as the identity (+0.2-0.3% top-1 in https://arxiv.org/abs/1706.02677).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[Sequence[bool]] = None,
        norm: Norm = M.BatchNorm2d,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError("layers must list 4 block counts (layer1..layer4), got %r" % (layers,))
        dilate = list(replace_stride_with_dilation or (False, False, False))
        if len(dilate) != 3:
            raise ValueError(
                "replace_stride_with_dilation must be None or 3 booleans (stages 2-4), got %r"
                % (replace_stride_with_dilation,)
            )
        self.conv1 = M.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.maxpool = M.MaxPool2d(3, 2, 1)

        stages = []
        in_channels, dilation = 64, 1
        for channels, count, stride, dilated in zip((64, 128, 256, 512), layers, (1, 2, 2, 2), [False] + dilate):
            first_dilation = dilation
            if dilated:
                dilation, stride = dilation * stride, 1
            blocks = [block(in_channels, channels, stride, groups, width_per_group, first_dilation, norm)]
            in_channels = channels * block.expansion
            blocks += [
                block(in_channels, channels, 1, groups, width_per_group, dilation, norm) for _ in range(count - 1)
            ]
            stages.append(M.Sequential(*blocks))  # Sequential: the "layerX.N." keys
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = M.Linear(512 * block.expansion, num_classes)
        _initialise(self, zero_init_residual)

    def extract_features(self, x) -> Dict[str, Any]:
        """The feature maps after the stem and each stage: ``stem``, ``res2`` ... ``res5``."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        features = {"stem": x}
        for name, stage in (("res2", self.layer1), ("res3", self.layer2), ("res4", self.layer3), ("res5", self.layer4)):
            x = stage(x)
            features[name] = x
        return features

    def forward(self, x):
        x = self.extract_features(x)["res5"]
        # Global at every input size; traces too (no Python ints taken from x.shape).
        x = F.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def _uniform_fan_in_(tensor: Any, fan_in_of: Any) -> None:
    bound = 1 / math.sqrt(M.init.calculate_fan_in_and_fan_out(fan_in_of)[0])
    M.init.uniform_(tensor, -bound, bound)


def _initialise(model: ResNet, zero_init_residual: bool) -> None:
    """The official recipe's initial distributions: He-normal convs (fan_out, ReLU gain), BN
    scale 1 and shift 0, and for ``fc`` MegEngine's Linear default, U(+-1/sqrt(fan_in)).

    MegEngine computes a grouped conv's fan_out as O/G*K*K (PyTorch: O*K*K), so ResNeXt convs
    start wider than torchvision's; the published ResNeXt weights were trained from this.
    """
    for m in model.modules():
        if isinstance(m, M.Conv2d):
            M.init.msra_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                _uniform_fan_in_(m.bias, m.weight)
        elif isinstance(m, M.BatchNorm2d):
            M.init.ones_(m.weight)
            M.init.zeros_(m.bias)
        elif isinstance(m, M.Linear):
            M.init.msra_uniform_(m.weight, a=math.sqrt(5))  # = U(+-1/sqrt(fan_in))
            if m.bias is not None:
                _uniform_fan_in_(m.bias, m.weight)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                M.init.zeros_(m.last_norm.weight)


# --------------------------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------------------------


_BLOCKS: Dict[str, Block] = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}


def _check_arch(name: str) -> None:
    if name not in SPECS:
        raise ValueError("unknown architecture %r; valid names: %s" % (name, ", ".join(ARCHS)))


def get_model(name: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Build an architecture from a config/CLI string, with an error that lists valid names."""
    if not isinstance(name, str):
        raise ValueError("architecture name must be a string, got %r" % (name,))
    key = name.strip().lower().replace("-", "_")
    _check_arch(key if key in SPECS else name)
    return _build(key, pretrained, **kwargs)


def _build(name: str, pretrained: bool, **kwargs: Any) -> ResNet:
    spec = SPECS[name]
    for fixed in ("groups", "width_per_group"):
        if fixed in kwargs and kwargs[fixed] != getattr(spec, fixed):
            raise ValueError(
                "%s has %s=%r by definition; got %r (build ResNet(...) directly for a custom net)"
                % (name, fixed, getattr(spec, fixed), kwargs[fixed])
            )
        kwargs.pop(fixed, None)
    if pretrained:
        hub.pretrained_url(name)  # no published weights: fail before the slow construction
    model = ResNet(_BLOCKS[spec.block], spec.layers, groups=spec.groups, width_per_group=spec.width_per_group, **kwargs)
    if pretrained:
        weights.load_pretrained(model, name)
    return model


def resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", arXiv:1512.03385).

    ``pretrained=True``: MegEngine's published weights, 70.312 top-1.
    """
    return _build("resnet18", pretrained, **kwargs)


def resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 (arXiv:1512.03385). ``pretrained=True``: published weights, 73.960 top-1."""
    return _build("resnet34", pretrained, **kwargs)


def resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 (arXiv:1512.03385). ``pretrained=True``: published weights, 76.254 top-1."""
    return _build("resnet50", pretrained, **kwargs)


def resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101 (arXiv:1512.03385). ``pretrained=True``: published weights, 77.944 top-1."""
    return _build("resnet101", pretrained, **kwargs)


def resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-152 (arXiv:1512.03385). ``pretrained=True``: published weights, 78.582 top-1."""
    return _build("resnet152", pretrained, **kwargs)


def resnext50_32x4d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d (Xie et al., "Aggregated Residual Transformations for Deep Neural
    Networks", arXiv:1611.05431). ``pretrained=True``: published weights, 77.592 top-1."""
    return _build("resnext50_32x4d", pretrained, **kwargs)


def resnext101_32x8d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d (arXiv:1611.05431). ``pretrained=True``: published weights, 79.520 top-1."""
    return _build("resnext101_32x8d", pretrained, **kwargs)


def wide_resnet50_2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Wide ResNet-50-2 (Zagoruyko and Komodakis, "Wide Residual Networks", arXiv:1605.07146),
    as torchvision defines it (bottlenecks twice as wide). MegEngine published no weights for
    it: ``pretrained=True`` raises ValueError."""
    return _build("wide_resnet50_2", pretrained, **kwargs)


def wide_resnet101_2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Wide ResNet-101-2 (arXiv:1605.07146), as torchvision defines it. No published weights:
    ``pretrained=True`` raises ValueError."""
    return _build("wide_resnet101_2", pretrained, **kwargs)
