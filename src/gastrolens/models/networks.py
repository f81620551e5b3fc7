"""The study's two networks, built from torchvision parts.

* Classifier: torchvision ResNet-34 with a five-way head; output ``i`` is
  ``CLASS_ORDER[i]`` (normal, pu, egc_hgin, agc, smt).
* Segmenter: DeepLabv3 (ASPP head) on a ResNet-34 backbone, one lesion logit per pixel.
  torchvision's ``BasicBlock`` refuses ``replace_stride_with_dilation``, so the backbone
  is built with the stock strides and :func:`set_output_stride` rewrites stride, dilation
  and padding of the layer3 / layer4 convolutions afterwards. Parameter shapes do not
  change, so ImageNet ResNet-34 weights still fit and a package trained at output stride
  16 can run at 8.

Dilation follows torchvision's convention for dilated ResNets: in a dilated stage the
first block's first convolution keeps the previous stage's dilation and every other
3x3 convolution uses the stage's dilation (output stride 16: layer4 at 2; output
stride 8: layer3 at 2, layer4 at 4). ASPP rates scale with the output stride:
(6, 12, 18) at 16 and (12, 24, 36) at 8, as in the DeepLabv3 paper.

ImageNet initialisation reads torchvision's own ``resnet34`` state dict from a local file
with ``torch.load(weights_only=True)``; nothing is ever downloaded and no pickle with
code is ever loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import ResNet, resnet34
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPPConv, DeepLabHead, DeepLabV3

from gastrolens.errors import ModelError
from gastrolens.findings import CLASS_ORDER

logger = logging.getLogger(__name__)

CLASSIFIER_ARCHITECTURE = "resnet34"
SEGMENTER_ARCHITECTURE = "deeplabv3_resnet34"
OUTPUT_STRIDES = (8, 16)
ASPP_RATES: dict[int, tuple[int, int, int]] = {16: (6, 12, 18), 8: (12, 24, 36)}
_BACKBONE_CHANNELS = 512
# (layer3 dilation, layer4 dilation) per output stride; 1 means the stock stride 2.
_DILATIONS: dict[int, tuple[int, int]] = {32: (1, 1), 16: (1, 2), 8: (2, 4)}


def build_classifier(num_classes: int = len(CLASS_ORDER)) -> ResNet:
    """ResNet-34 with a ``num_classes``-way fully connected head (about 21.3 M parameters)."""
    return resnet34(weights=None, num_classes=num_classes)


def build_segmenter(output_stride: int = 16, num_classes: int = 1) -> DeepLabV3:
    """DeepLabv3 on a ResNet-34 backbone; ``forward(x)["out"]`` holds per-pixel logits."""
    _check_output_stride(output_stride)
    backbone = IntermediateLayerGetter(resnet34(weights=None), return_layers={"layer4": "out"})
    head = DeepLabHead(_BACKBONE_CHANNELS, num_classes, ASPP_RATES[output_stride])
    model = DeepLabV3(backbone, head)
    set_output_stride(model, output_stride)
    return model


def set_output_stride(segmenter: DeepLabV3, output_stride: int) -> None:
    """Rewrite the backbone's layer3/layer4 convolutions and the ASPP rates in place."""
    _check_output_stride(output_stride)
    layer3_dilation, layer4_dilation = _DILATIONS[output_stride]
    backbone = segmenter.backbone
    _configure_layer(backbone.layer3, dilation=layer3_dilation, previous=1)
    _configure_layer(backbone.layer4, dilation=layer4_dilation, previous=layer3_dilation)
    aspp = segmenter.classifier[0]
    branches = [m for m in aspp.convs if isinstance(m, ASPPConv)]
    for branch, rate in zip(branches, ASPP_RATES[output_stride], strict=True):
        conv = branch[0]
        conv.dilation = (rate, rate)
        conv.padding = (rate, rate)


def output_stride_of(segmenter: DeepLabV3) -> int:
    """The output stride the segmenter is currently configured for."""
    layer3 = segmenter.backbone.layer3[0].conv1.stride[0]
    layer4 = segmenter.backbone.layer4[0].conv1.stride[0]
    return 8 * layer3 * layer4


def _configure_layer(layer: nn.Sequential, *, dilation: int, previous: int) -> None:
    """Set one ResNet stage to the stock stride 2 (``dilation == 1``) or to stride 1 dilated."""
    stride = 2 if dilation == 1 else 1
    block: Any  # a torchvision BasicBlock/Bottleneck; torchvision ships no types
    for index, block in enumerate(layer):
        first = dilation if index else (1 if dilation == 1 else previous)
        _set_conv(block.conv1, stride=stride if index == 0 else 1, dilation=first)
        _set_conv(block.conv2, stride=1, dilation=dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (stride, stride)
        block.stride = stride if index == 0 else 1


def _set_conv(conv: nn.Conv2d, *, stride: int, dilation: int) -> None:
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in OUTPUT_STRIDES:
        raise ModelError(f"output stride {output_stride} is not supported; use one of {OUTPUT_STRIDES}")


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())


def load_imagenet_backbone(model: nn.Module, path: str | Path) -> None:
    """Initialise a classifier's or segmenter's ResNet-34 from torchvision's ImageNet file.

    ``path`` is a local copy of torchvision's ``resnet34`` state dict (``resnet34-*.pth``).
    The fully connected ImageNet head is dropped: the classifier keeps its fresh
    five-way head and the segmenter has none.
    """
    state = _read_resnet34_state(Path(path))
    backbone_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if isinstance(model, DeepLabV3):
        target: nn.Module = model.backbone
    elif isinstance(model, ResNet):
        target = model
    else:
        raise ModelError(f"cannot load ImageNet weights into a {type(model).__name__}")
    own = target.state_dict()
    expected = {k for k in own if not k.startswith("fc.")}
    missing = sorted(expected - backbone_state.keys())
    unexpected = sorted(backbone_state.keys() - expected)
    if missing or unexpected:
        raise ModelError(
            f"{path} is not a torchvision resnet34 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    wrong = [k for k in expected if tuple(own[k].shape) != tuple(backbone_state[k].shape)]
    if wrong:
        raise ModelError(f"{path}: tensor shapes differ from resnet34 for {sorted(wrong)[:5]}")
    target.load_state_dict(backbone_state, strict=False)
    logger.info("initialised %s from ImageNet weights %s", type(model).__name__, path)


def _read_resnet34_state(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"ImageNet weights file {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad or unsafe file
        raise ModelError(f"{path}: cannot read as a torch state dict ({exc.__class__.__name__}: {exc})") from exc
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and key in loaded and isinstance(loaded[key], Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return loaded
