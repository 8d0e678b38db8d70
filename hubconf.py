"""Entry points for ``megengine.hub.load("<owner>/<this repo>", "resnet50", pretrained=True)``.

megengine.hub imports this file with the repository root on ``sys.path`` only for the duration
of the import, so everything needed later must be imported here, eagerly.
"""
dependencies = ["megengine", "numpy"]

from engine.models import (  # noqa: E402,F401
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    wide_resnet50_2,
    wide_resnet101_2,
)
