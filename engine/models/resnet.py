# BSD 3-Clause License
#
# Copyright (c) Soumith Chintala 2016,
# All rights reserved.
#
# Redistribution and use in source and binary forms, with or without
# modification, are permitted provided that the following conditions are met:
#
# * Redistributions of source code must retain the above copyright notice, this
#   list of conditions and the following disclaimer.
#
# * Redistributions in binary form must reproduce the above copyright notice,
#   this list of conditions and the following disclaimer in the documentation
#   and/or other materials provided with the distribution.
#
# * Neither the name of the copyright holder nor the names of its
#   contributors may be used to endorse or promote products derived from
#   this software without specific prior written permission.
#
# THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
# AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
# IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
# DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
# FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
# DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
# SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
# CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
# OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
# OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
#
# ------------------------------------------------------------------------------
# The module structure follows MegEngine/Models official/vision/classification/resnet/model.py
# (Apache License 2.0, Copyright (c) 2014-2020 Megvii Inc.), itself adapted from torchvision.
# ------------------------------------------------------------------------------
"""ResNet / ResNeXt / Wide-ResNet with the exact parameter layout of MegEngine's official model.

Why this module exists instead of importing the official ``model.py``:

* the official forward pools with a fixed ``avg_pool2d(x, 7)``, so anything but 224 px input
  either fails or silently stops being a global pool; here the pool is adaptive;
* the official ``pretrained=True`` path downloads through megfile with every rank writing the
  final cache file and no check of what arrived; here :mod:`engine.models.weights` downloads
  once per node, atomically, checks the sha256 prefix in the file name, and a failure names the
  exact file path to pre-place;
* ``load_state_dict`` of MegEngine mutates the model before it notices a bad key or shape and
  its messages do not say what went wrong; :func:`load_weights` validates first and explains.

The module and attribute names (``conv1``, ``bn1``, ``layerX.N.convK``, ``downsample.0/1``,
``fc``) must stay exactly as they are: they are the keys of the published ``.pkl`` weights.
"""
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Type, Union

import numpy as np

import megengine as mge
import megengine.functional as F
import megengine.module as M

from engine.models import weights
from engine.models.weights import (
    PRETRAINED_FILES,
    WEIGHTS_URL_BASE,
    pretrained_cache_path,
    pretrained_url,
)

__all__ = [
    "ARCHS",
    "PRETRAINED_FILES",
    "WEIGHTS_URL_BASE",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "LoadResult",
    "get_model",
    "load_weights",
    "pretrained_url",
    "pretrained_cache_path",
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


# --------------------------------------------------------------------------------------------
# Building blocks (names and structure identical to the official model.py)
# --------------------------------------------------------------------------------------------


class BasicBlock(M.Module):
    """Two 3x3 convs; used by ResNet-18/34."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: Type[M.Module] = M.BatchNorm2d,
    ):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(
                "BasicBlock only supports groups=1 and base_width=64 (got groups=%d, base_width=%d); "
                "use Bottleneck for ResNeXt / wide variants" % (groups, base_width)
            )
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = M.Conv2d(in_channels, channels, 3, stride, padding=dilation, bias=False)
        self.bn1 = norm(channels)
        self.conv2 = M.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = norm(channels)
        # M.Identity (not None) keeps the official structure: it owns no parameters, so no keys.
        self.downsample = (
            M.Identity()
            if in_channels == channels and stride == 1
            else M.Sequential(
                M.Conv2d(in_channels, channels, 1, stride, bias=False),
                norm(channels),
            )
        )

    def forward(self, x):
        identity = x
        x = self.conv1(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = self.bn2(x)
        identity = self.downsample(identity)
        x += identity
        x = F.relu(x)
        return x


class Bottleneck(M.Module):
    """1x1 -> 3x3 (stride and groups here, "ResNet v1.5") -> 1x1; used by ResNet-50+ and ResNeXt."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int = 1,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm: Type[M.Module] = M.BatchNorm2d,
    ):
        super().__init__()
        width = int(channels * (base_width / 64.0)) * groups
        self.conv1 = M.Conv2d(in_channels, width, 1, 1, bias=False)
        self.bn1 = norm(width)
        # With groups > 1 MegEngine stores this weight 5-D: (groups, out/groups, in/groups, 3, 3),
        # which is exactly the layout of the published ResNeXt weights.
        self.conv2 = M.Conv2d(
            width,
            width,
            3,
            stride,
            padding=dilation,
            groups=groups,
            dilation=dilation,
            bias=False,
        )
        self.bn2 = norm(width)
        self.conv3 = M.Conv2d(width, channels * self.expansion, 1, 1, bias=False)
        self.bn3 = norm(channels * self.expansion)
        self.downsample = (
            M.Identity()
            if in_channels == channels * self.expansion and stride == 1
            else M.Sequential(
                M.Conv2d(in_channels, channels * self.expansion, 1, stride, bias=False),
                norm(channels * self.expansion),
            )
        )

    def forward(self, x):
        identity = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = F.relu(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = F.relu(x)

        x = self.conv3(x)
        x = self.bn3(x)

        identity = self.downsample(identity)

        x += identity
        x = F.relu(x)

        return x


class ResNet(M.Module):
    """The official MegEngine ResNet, except that the final pool adapts to the input size.

    For a 224 px input the adaptive pool is the official ``avg_pool2d(x, 7)``; for other sizes
    (e.g. 32..192 px in tests or low-resolution training phases) it is still a global average
    where the official model would fail or pool only a corner.
    """

    def __init__(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[Sequence[bool]] = None,
        norm: Type[M.Module] = M.BatchNorm2d,
    ):
        super().__init__()
        if len(layers) != 4:
            raise ValueError("layers must list 4 block counts (layer1..layer4), got %r" % (layers,))
        self.in_channels = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # each element in the tuple indicates if we should replace
            # the 2x2 stride with a dilated convolution instead
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                "or a 3-element tuple, got {}".format(replace_stride_with_dilation)
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = M.Conv2d(3, self.in_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(self.in_channels)
        self.maxpool = M.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], norm=norm)
        self.layer2 = self._make_layer(
            block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0], norm=norm
        )
        self.layer3 = self._make_layer(
            block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1], norm=norm
        )
        self.layer4 = self._make_layer(
            block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2], norm=norm
        )
        self.fc = M.Linear(512 * block.expansion, num_classes)

        # Same initialisation as the official model (so from-scratch training matches its recipe).
        # Note MegEngine's fan_out for a grouped conv is O/G*K*K (PyTorch uses O*K*K), so the
        # ResNeXt init std differs from torchvision's; we keep MegEngine's behaviour.
        for m in self.modules():
            if isinstance(m, M.Conv2d):
                M.init.msra_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    fan_in, _ = M.init.calculate_fan_in_and_fan_out(m.weight)
                    bound = 1 / math.sqrt(fan_in)
                    M.init.uniform_(m.bias, -bound, bound)
            elif isinstance(m, M.BatchNorm2d):
                M.init.ones_(m.weight)
                M.init.zeros_(m.bias)
            elif isinstance(m, M.Linear):
                M.init.msra_uniform_(m.weight, a=math.sqrt(5))
                if m.bias is not None:
                    fan_in, _ = M.init.calculate_fan_in_and_fan_out(m.weight)
                    bound = 1 / math.sqrt(fan_in)
                    M.init.uniform_(m.bias, -bound, bound)

        # Zero-initialise the last BN of each residual branch so every block starts as an
        # identity; +0.2~0.3% top-1 according to https://arxiv.org/abs/1706.02677.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    M.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    M.init.zeros_(m.bn2.weight)

    def _make_layer(
        self,
        block: Type[Union[BasicBlock, Bottleneck]],
        channels: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
        norm: Type[M.Module] = M.BatchNorm2d,
    ) -> M.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1

        layers = [
            block(
                self.in_channels,
                channels,
                stride,
                groups=self.groups,
                base_width=self.base_width,
                dilation=previous_dilation,
                norm=norm,
            )
        ]
        self.in_channels = channels * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(
                    self.in_channels,
                    channels,
                    groups=self.groups,
                    base_width=self.base_width,
                    dilation=self.dilation,
                    norm=norm,
                )
            )
        # M.Sequential gives the "layerX.N." key prefixes of the published weights.
        return M.Sequential(*layers)

    def extract_features(self, x) -> Dict[str, Any]:
        """Multi-scale features under the official names, for detection-style reuse."""
        outputs = {}
        x = self.conv1(x)
        x = self.bn1(x)
        x = F.relu(x)
        x = self.maxpool(x)
        outputs["stem"] = x

        x = self.layer1(x)
        outputs["res2"] = x
        x = self.layer2(x)
        outputs["res3"] = x
        x = self.layer3(x)
        outputs["res4"] = x
        x = self.layer4(x)
        outputs["res5"] = x
        return outputs

    def forward(self, x):
        x = self.extract_features(x)["res5"]
        # Adaptive (global) pool: equals the official avg_pool2d(x, 7) at 224 px and stays a
        # true global average at any other size; it also traces (no Python ints from x.shape).
        x = F.adaptive_avg_pool2d(x, 1)
        x = F.flatten(x, 1)
        x = self.fc(x)
        return x


# --------------------------------------------------------------------------------------------
# Architecture table and published weights
# --------------------------------------------------------------------------------------------


class _Spec(NamedTuple):
    block: type
    layers: Tuple[int, int, int, int]
    groups: int
    width_per_group: int


_SPECS: Dict[str, _Spec] = {
    "resnet18": _Spec(BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": _Spec(BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": _Spec(Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": _Spec(Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": _Spec(Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": _Spec(Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": _Spec(Bottleneck, (3, 4, 23, 3), 32, 8),
    # torchvision's definition: the bottleneck is twice as wide, the block outputs are not.
    "wide_resnet50_2": _Spec(Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": _Spec(Bottleneck, (3, 4, 23, 3), 1, 128),
}

#: Every architecture name accepted by :func:`get_model`, in a stable order.
ARCHS: Tuple[str, ...] = tuple(_SPECS)

def _pretrained_file(name: str) -> str:
    _check_arch(name)
    return weights._published_file(name)


def _load_pretrained(model: "ResNet", name: str) -> None:
    # fetch() downloads once per node under a lock, atomically, and checks the sha256 prefix in
    # the file name, so what is loaded here is complete; a failure is a WeightsError
    # (RuntimeError) naming the cache path to pre-place the file at.
    path = weights.fetch(name)
    try:
        state = mge.load(path)
    except Exception as exc:  # noqa: BLE001
        raise weights.WeightsError(
            "the cached weight file %s could not be read (%s: %s); it is probably not a "
            "MegEngine pickle: delete it and retry" % (path, type(exc).__name__, exc)
        ) from exc
    load_weights(model, state, source=path)


def _check_arch(name: str) -> None:
    if name not in _SPECS:
        raise ValueError("unknown architecture %r; valid names: %s" % (name, ", ".join(ARCHS)))


def get_model(name: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Build an architecture from a config/CLI string, with an error that lists valid names."""
    if not isinstance(name, str):
        raise ValueError("architecture name must be a string, got %r" % (name,))
    key = name.strip().lower().replace("-", "_")
    _check_arch(key if key in _SPECS else name)
    return _build(key, pretrained, **kwargs)


def _build(name: str, pretrained: bool, **kwargs: Any) -> ResNet:
    spec = _SPECS[name]
    for fixed in ("groups", "width_per_group"):
        if fixed in kwargs and kwargs[fixed] != getattr(spec, fixed):
            raise ValueError(
                "%s has %s=%r by definition; got %r (build ResNet(...) directly for a custom net)"
                % (name, fixed, getattr(spec, fixed), kwargs[fixed])
            )
        kwargs.pop(fixed, None)
    if pretrained:
        _pretrained_file(name)  # fail before the (slow) construction when there are no weights
    model = ResNet(
        spec.block, list(spec.layers), groups=spec.groups, width_per_group=spec.width_per_group, **kwargs
    )
    if pretrained:
        _load_pretrained(model, name)
    return model


def resnet18(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNet-18 from `"Deep Residual Learning for Image Recognition" <https://arxiv.org/abs/1512.03385>`_.

    ``pretrained=True`` loads MegEngine's published weights (70.312 top-1).
    """
    return _build("resnet18", pretrained, **kwargs)


def resnet34(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNet-34 from `"Deep Residual Learning for Image Recognition" <https://arxiv.org/abs/1512.03385>`_.

    ``pretrained=True`` loads MegEngine's published weights (73.960 top-1).
    """
    return _build("resnet34", pretrained, **kwargs)


def resnet50(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNet-50 from `"Deep Residual Learning for Image Recognition" <https://arxiv.org/abs/1512.03385>`_.

    ``pretrained=True`` loads MegEngine's published weights (76.254 top-1).
    """
    return _build("resnet50", pretrained, **kwargs)


def resnet101(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNet-101 from `"Deep Residual Learning for Image Recognition" <https://arxiv.org/abs/1512.03385>`_.

    ``pretrained=True`` loads MegEngine's published weights (77.944 top-1).
    """
    return _build("resnet101", pretrained, **kwargs)


def resnet152(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNet-152 from `"Deep Residual Learning for Image Recognition" <https://arxiv.org/abs/1512.03385>`_.

    ``pretrained=True`` loads MegEngine's published weights (78.582 top-1).
    """
    return _build("resnet152", pretrained, **kwargs)


def resnext50_32x4d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNeXt-50 32x4d from `"Aggregated Residual Transformations for Deep Neural Networks"
    <https://arxiv.org/abs/1611.05431>`_.

    ``pretrained=True`` loads MegEngine's published weights (77.592 top-1).
    """
    return _build("resnext50_32x4d", pretrained, **kwargs)


def resnext101_32x8d(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""ResNeXt-101 32x8d from `"Aggregated Residual Transformations for Deep Neural Networks"
    <https://arxiv.org/abs/1611.05431>`_.

    ``pretrained=True`` loads MegEngine's published weights (79.520 top-1).
    """
    return _build("resnext101_32x8d", pretrained, **kwargs)


def wide_resnet50_2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""Wide ResNet-50-2 from `"Wide Residual Networks" <https://arxiv.org/abs/1605.07146>`_.

    Defined as in torchvision (bottleneck width x2). MegEngine published no weights for it, so
    ``pretrained=True`` raises ValueError.
    """
    return _build("wide_resnet50_2", pretrained, **kwargs)


def wide_resnet101_2(pretrained: bool = False, **kwargs: Any) -> ResNet:
    r"""Wide ResNet-101-2 from `"Wide Residual Networks" <https://arxiv.org/abs/1605.07146>`_.

    Defined as in torchvision (bottleneck width x2). MegEngine published no weights for it, so
    ``pretrained=True`` raises ValueError.
    """
    return _build("wide_resnet101_2", pretrained, **kwargs)


# --------------------------------------------------------------------------------------------
# Weight loading with explanations
# --------------------------------------------------------------------------------------------


class LoadResult(NamedTuple):
    """What :func:`load_weights` skipped (all empty after a strict load)."""

    missing: List[str]
    unexpected: List[str]
    mismatched: List[str]


def _unwrap_state(state: Any) -> Mapping[str, Any]:
    # Official weight files are bare dicts; official train.py checkpoints and ours wrap them.
    if not isinstance(state, Mapping):
        raise TypeError(
            "expected a state dict (name -> array) or a checkpoint dict with a 'state_dict' or "
            "'model' entry, got %s" % type(state).__name__
        )
    for key in ("state_dict", "model"):
        inner = state.get(key)
        if isinstance(inner, Mapping):
            return inner
    return state


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, mge.Tensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _describe(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[Optional[str], str]:
    """Guess the architecture behind a key->shape table, to tell the user what a checkpoint is."""
    counts = []
    for i in range(1, 5):
        prefix = "layer%d." % i
        blocks = {k[len(prefix):].split(".", 1)[0] for k in shapes if k.startswith(prefix)}
        counts.append(len(blocks))
    if "layer1.0.conv3.weight" in shapes:
        block = "Bottleneck"
    elif "layer1.0.conv1.weight" in shapes:
        block = "BasicBlock"
    else:
        return None, "not a ResNet state dict (no layer1.0.conv1.weight)"
    conv2 = tuple(shapes.get("layer1.0.conv2.weight", ()))
    groups, width = 1, 64
    if len(conv2) == 5:  # grouped: (G, O/G, I/G, kh, kw); layer1 width = base_width * groups
        groups, width = conv2[0], conv2[1]
    elif len(conv2) == 4 and block == "Bottleneck":
        width = conv2[0]
    fc = tuple(shapes.get("fc.weight", ()))
    classes = fc[0] if fc else None
    name = None
    for arch, spec in _SPECS.items():
        if (
            spec.block.__name__ == block
            and list(spec.layers) == counts
            and spec.groups == groups
            and spec.width_per_group == width
        ):
            name = arch
            break
    text = "%s (%s, layers %s, groups %d, width_per_group %d, %s classes)" % (
        name or "an unknown variant",
        block,
        counts,
        groups,
        width,
        classes,
    )
    return name, text


def load_weights(
    model: M.Module,
    state: Any,
    strict: bool = True,
    source: Optional[str] = None,
) -> LoadResult:
    """Load official ``.pkl`` weights or a checkpoint into ``model`` and explain any mismatch.

    Accepts a bare state dict (the published files), or a dict holding it under ``"state_dict"``
    (official train.py checkpoints) or ``"model"``. Everything is validated before anything is
    copied, so a failed load leaves the model untouched (MegEngine's own ``load_state_dict``
    stops half-way). Values are cast to the model's dtypes, because MegEngine would otherwise
    silently adopt the file's dtype (e.g. float16) for the parameter. BN tensors stored as
    ``(1, C, 1, 1)`` by old MegEngine versions are accepted.

    With ``strict=False`` missing, unexpected and shape-mismatched entries are skipped (e.g. to
    fine-tune with a new ``fc``) and returned; with ``strict=True`` they raise ``ValueError``
    naming them and the likely cause (another architecture or class count).
    """
    state = _unwrap_state(state)
    given = {k: _to_numpy(v) for k, v in state.items()}
    expected = {k: v for k, v in model.state_dict(keep_var=True).items()}
    exp_shapes = {k: tuple(int(d) for d in v.shape) for k, v in expected.items()}
    got_shapes = {k: tuple(v.shape) for k, v in given.items()}

    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = []
    to_load: Dict[str, np.ndarray] = {}
    for k, var in expected.items():
        if k not in given:
            continue
        arr, want = given[k], exp_shapes[k]
        if arr.shape != want:
            # Old MegEngine kept BN tensors as (1, C, 1, 1); any 1-D entry of equal size is fine.
            if len(want) == 1 and arr.size == want[0]:
                arr = arr.reshape(want)
            else:
                mismatched.append(k)
                continue
        to_load[k] = arr.astype(np.dtype(var.dtype), copy=False)

    if strict and (missing or unexpected or mismatched):
        raise ValueError(_explain(source, exp_shapes, got_shapes, missing, unexpected, mismatched))

    model.load_state_dict(to_load, strict=not (missing or mismatched))
    return LoadResult(missing, unexpected, mismatched)


def _explain(
    source: Optional[str],
    exp_shapes: Mapping[str, Tuple[int, ...]],
    got_shapes: Mapping[str, Tuple[int, ...]],
    missing: List[str],
    unexpected: List[str],
    mismatched: List[str],
) -> str:
    def listing(keys: List[str], limit: int = 8) -> str:
        shown = ", ".join(keys[:limit])
        return shown + (" ... (%d more)" % (len(keys) - limit) if len(keys) > limit else "")

    lines = ["the weights%s do not fit the model:" % (" in " + source if source else "")]
    if missing:
        lines.append("  missing in the weights (%d): %s" % (len(missing), listing(missing)))
    if unexpected:
        lines.append("  unexpected in the weights (%d): %s" % (len(unexpected), listing(unexpected)))
    if mismatched:
        lines.append(
            "  shape mismatch (%d): %s"
            % (
                len(mismatched),
                listing(["%s model %s vs weights %s" % (k, exp_shapes[k], got_shapes[k]) for k in mismatched], 4),
            )
        )

    model_arch, model_text = _describe(exp_shapes)
    ckpt_arch, ckpt_text = _describe(got_shapes)
    fc_only = bool(mismatched) and all(k.startswith("fc.") for k in mismatched) and not missing and not unexpected
    if fc_only and "fc.weight" in got_shapes:
        n_ckpt, n_model = got_shapes["fc.weight"][0], exp_shapes["fc.weight"][0]
        lines.append(
            "likely cause: different class count: the weights were trained for %d classes but the "
            "model has num_classes=%d. Build the model with num_classes=%d, or load with "
            "strict=False to keep a fresh fc for fine-tuning." % (n_ckpt, n_model, n_ckpt)
        )
    elif missing or unexpected or mismatched:
        prefixes = {k.split(".", 1)[0] for k in got_shapes}
        if len(prefixes) == 1 and not any(k in exp_shapes for k in got_shapes):
            lines.append(
                "likely cause: every key in the weights starts with %r; strip that prefix first"
                % (next(iter(prefixes)) + ".")
            )
        else:
            lines.append(
                "likely cause: another architecture: the model is %s, the weights look like %s. "
                "Build the matching architecture (see engine.models.ARCHS)." % (model_text, ckpt_text)
            )
    return "\n".join(lines)
