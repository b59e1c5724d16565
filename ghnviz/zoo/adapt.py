"""Adapting ImageNet-style torchvision classifiers to 32x32 inputs (CIFAR-10).

The early downsampling is removed so that small images keep a useful resolution, per family:

| family | change |
|---|---|
| ResNet, ResNeXt, Wide ResNet | ``conv1`` cut to its centre 3x3, stride 1, padding 1; ``maxpool`` removed |
| DenseNet | ``features[0]`` cut the same way; the max-pool ``features[3]`` removed |
| MobileNetV2, MobileNetV3 | every convolution in ``features[:5]`` gets stride 1 |
| VGG | max-pools among ``features[:10]`` removed |
| AlexNet | ``features[0]`` stride 1; the max-pool ``features[2]`` removed |
| MNASNet | ``layers[0]`` stride 1 |
| ShuffleNetV2 | ``maxpool`` removed (the stride-2 ``conv1`` is kept) |
| GoogLeNet | ``maxpool1`` removed (the stride-2 ``conv1`` is kept) |
| ConvNeXt | the 4x4 patchify convolution gets stride 1 |

Other models are returned unchanged, with a warning. ShuffleNetV2 and GoogLeNet keep their first
stride because the adaptation these GHNs were evaluated with sets ``stride`` on the container module
rather than on its convolution, which has no effect; keeping that behaviour keeps results comparable.
The model's ``expected_input_sz`` attribute (read by graph builders) is set to 32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn
from torchvision import models

logger = logging.getLogger(__name__)

SMALL_KERNEL = 3  # kernel size of the cut first convolution


def _shrink_first_conv(conv: nn.Conv2d) -> None:
    """Keep the centre 3x3 of the kernel; stride 1, 'same' padding."""
    if conv.in_channels != 3:
        raise ValueError(f'expected the RGB input convolution, got {conv}')
    kh, kw = conv.weight.shape[2:]
    top, left = max(kh - SMALL_KERNEL, 0) // 2, max(kw - SMALL_KERNEL, 0) // 2
    rows, cols = slice(top, top + SMALL_KERNEL), slice(left, left + SMALL_KERNEL)
    with torch.no_grad():
        centre = conv.weight[:, :, rows, cols].clone()  # (out, 3, 3, 3)
    conv.weight = nn.Parameter(centre, requires_grad=conv.weight.requires_grad)
    conv.kernel_size = tuple(centre.shape[2:])
    conv.padding = (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
    conv.stride = (1, 1)


def _unit_stride(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        module.stride = (1, 1)


def _resnet(net: models.ResNet) -> None:
    _shrink_first_conv(net.conv1)
    net.maxpool = nn.Identity()


def _densenet(net: models.DenseNet) -> None:
    _shrink_first_conv(net.features[0])
    if not isinstance(net.features[3], nn.MaxPool2d):
        raise ValueError(f'unexpected DenseNet stem: {net.features[3]}')
    net.features[3] = nn.Identity()


def _mobilenet(net: nn.Module) -> None:
    for block in net.features[:5]:
        block.apply(_unit_stride)


def _vgg(net: models.VGG) -> None:
    for i, layer in enumerate(net.features[:10]):
        if isinstance(layer, nn.MaxPool2d):
            net.features[i] = nn.Identity()


def _alexnet(net: models.AlexNet) -> None:
    net.features[0].stride = (1, 1)
    net.features[2] = nn.Identity()


def _mnasnet(net: models.MNASNet) -> None:
    net.layers[0].stride = (1, 1)


def _shufflenet(net: models.ShuffleNetV2) -> None:
    net.maxpool = nn.Identity()


def _googlenet(net: models.GoogLeNet) -> None:
    net.maxpool1 = nn.Identity()


def _convnext(net: models.ConvNeXt) -> None:
    next(iter(net.features[0].children())).stride = (1, 1)


# model class -> in-place adaptation; the first matching entry wins
ADAPTERS: list[tuple[type | tuple[type, ...], Callable[[nn.Module], None]]] = [
    (models.ResNet, _resnet),
    (models.DenseNet, _densenet),
    ((models.MobileNetV2, models.MobileNetV3), _mobilenet),
    (models.VGG, _vgg),
    (models.AlexNet, _alexnet),
    (models.MNASNet, _mnasnet),
    (models.ShuffleNetV2, _shufflenet),
    (models.GoogLeNet, _googlenet),
    (models.ConvNeXt, _convnext),
]


def adapt_to_small_images(model: nn.Module) -> nn.Module:
    """Adapt a torchvision classifier to 32x32 inputs in place (see the module docstring); returns it."""
    for types, adapt in ADAPTERS:
        if isinstance(model, types):
            adapt(model)
            break
    else:
        logger.warning('%s is not adapted to 32x32 inputs; it keeps its ImageNet stem', type(model).__name__)
    model.expected_input_sz = 32
    return model
