"""The two networks: sizes, output shapes, output stride, ImageNet initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models import resnet34

from gastrolens.errors import ModelError
from gastrolens.models.networks import (
    ASPP_RATES,
    build_classifier,
    build_segmenter,
    count_parameters,
    load_imagenet_backbone,
    output_stride_of,
    set_output_stride,
)


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return build_classifier().eval()


@pytest.fixture(scope="module")
def segmenter() -> torch.nn.Module:
    return build_segmenter().eval()


def test_classifier_is_resnet34_with_five_way_head(classifier: torch.nn.Module) -> None:
    assert count_parameters(classifier) == 21_287_237  # ResNet-34 (21.8 M) less ImageNet's 1000-way head
    assert classifier.fc.out_features == 5
    assert [len(getattr(classifier, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]


def test_segmenter_size(segmenter: torch.nn.Module) -> None:
    backbone = 21_284_672  # ResNet-34 without its fully connected layer
    head = count_parameters(segmenter.classifier)
    assert count_parameters(segmenter) == backbone + head
    assert segmenter.classifier[-1].out_channels == 1


@pytest.mark.parametrize("size", [64, 96, 129])
def test_classifier_output_shape(classifier: torch.nn.Module, size: int) -> None:
    with torch.inference_mode():
        assert classifier(torch.zeros(2, 3, size, size)).shape == (2, 5)


@pytest.mark.parametrize(("size", "stride"), [(65, 16), (65, 8), (97, 16), (128, 8)])
def test_segmenter_output_shape_and_stride(segmenter: torch.nn.Module, size: int, stride: int) -> None:
    set_output_stride(segmenter, stride)
    try:
        assert output_stride_of(segmenter) == stride
        with torch.inference_mode():
            x = torch.zeros(1, 3, size, size)
            features = segmenter.backbone(x)["out"]
            out = segmenter(x)["out"]
        assert features.shape[-1] == -(-size // stride)
        assert out.shape == (1, 1, size, size)
        rates = [branch[0].dilation[0] for branch in list(segmenter.classifier[0].convs)[1:4]]
        assert rates == list(ASPP_RATES[stride])
    finally:
        set_output_stride(segmenter, 16)


def test_output_stride_dilations(segmenter: torch.nn.Module) -> None:
    set_output_stride(segmenter, 8)
    layer3, layer4 = segmenter.backbone.layer3, segmenter.backbone.layer4
    assert layer3[0].conv1.stride == (1, 1) and layer3[0].conv1.dilation == (1, 1)
    assert layer3[1].conv1.dilation == (2, 2) and layer4[0].conv1.dilation == (2, 2)
    assert layer4[2].conv2.dilation == (4, 4) and layer4[2].conv2.padding == (4, 4)
    set_output_stride(segmenter, 16)
    assert layer3[0].conv1.stride == (2, 2) and layer3[0].downsample[0].stride == (2, 2)
    assert layer4[0].conv1.stride == (1, 1) and layer4[1].conv1.dilation == (2, 2)
    with pytest.raises(ModelError, match="output stride 4"):
        set_output_stride(segmenter, 4)


def test_imagenet_initialisation_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(7)
    reference = resnet34().state_dict()
    path = tmp_path / "resnet34-local.pth"
    torch.save(reference, path)
    classifier = build_classifier()
    segmenter = build_segmenter(8)
    load_imagenet_backbone(classifier, path)
    load_imagenet_backbone(segmenter, path)
    assert torch.equal(classifier.layer3[2].conv1.weight, reference["layer3.2.conv1.weight"])
    assert torch.equal(segmenter.backbone.layer4[0].conv2.weight, reference["layer4.0.conv2.weight"])
    assert classifier.fc.weight.shape == (5, 512)


def test_imagenet_initialisation_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_imagenet_backbone(build_classifier(), tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match="cannot read"):
        load_imagenet_backbone(build_classifier(), junk)
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    with pytest.raises(ModelError, match="not a torchvision resnet34"):
        load_imagenet_backbone(build_classifier(), other)
