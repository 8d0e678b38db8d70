"""Entry points for ``megengine.hub.load("<owner>/<this repo>", "resnet50", pretrained=True)``:
the networks and one constructor per architecture of ``engine.models.ARCHS``.

megengine.hub imports this file with the repository root on ``sys.path`` only for the duration
of the import, so everything needed later must be imported here, eagerly.
"""
dependencies = ["megengine", "numpy"]

from engine import models as _models  # noqa: E402
from engine.models import BasicBlock, Bottleneck, ResNet  # noqa: E402,F401

# megengine.hub finds an entry point by name, as a module attribute.
globals().update({name: getattr(_models, name) for name in _models.ARCHS})
