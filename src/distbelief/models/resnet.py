"""Residual networks and their plain twins (He et al., 2015, "Deep Residual Learning").

Two families share one `ResNet` class:

- CIFAR (Sec. 4.2): a 3x3 stem of 16 filters, then three stages of n basic blocks with 16, 32 and
  64 filters at 32, 16 and 8 px: 6n+2 weighted layers. Shortcut option A by default, so a
  residual net and its plain twin have the same parameters.
- ImageNet (Table 1): a 7x7/2 stem of 64 filters and a 3x3/2 max-pool, then four stages at
  56, 28, 14 and 7 px; basic blocks for 18 and 34 layers, bottlenecks for 50, 101 and 152.
  Shortcut option B by default.

Module names follow torchvision (`conv1, bn1, layer1..layer4, fc`; blocks `conv1/bn1/conv2/bn2
[/conv3/bn3]` and `downsample.0/1`), so a torchvision state_dict loads with `strict=True` into
the matching variant and gives identical outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.errors import ConfigError, check_choice
from distbelief.models.init import default_device, default_rule, draw_seed, set_seed
from distbelief.models.registry import register_model

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("paper", "v1.5")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by BN, whose shift makes a bias redundant.
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Shortcut option A where dimensions grow: subsample by `stride`, append zero channels.

    It has no parameters (Sec. 3.3, option A), which is what lets the CIFAR residual nets keep
    exactly the parameter count of their plain twins.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra_planes = out_planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's last pair pads dim 1 (channels) of an NCHW tensor: zeros after the old ones.
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_planes))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_planes={self.extra_planes}"


def make_shortcut(option: str, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut branch of one residual block; None means the plain identity.

    A: identity everywhere, `PadShortcut` where dimensions grow (no parameters).
    B: a projection (1x1 conv + BN) where dimensions grow, identity elsewhere.
    C: a projection on every shortcut.
    """
    grows = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and grows):
        return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
    if grows:
        return PadShortcut(in_planes, out_planes, stride)
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 2 left). With `residual=False` it is the plain net's block: no shortcut.

    `variant` only matters to bottlenecks; it is accepted here so that all blocks build alike.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "A",
                 residual: bool = True, variant: str = "paper"):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.residual = residual
        self.downsample = make_shortcut(shortcut, in_planes, planes, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            # In place, as torchvision: one activation-sized allocation less per block. So a
            # forward hook on the last BN that keeps its output (layer responses, Fig. 7) must
            # clone it or reduce it at once: the sum is written into that very tensor.
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5 right).

    `variant="paper"` strides the first 1x1 conv, as the paper does (3.8 GMACs for ResNet-50);
    `variant="v1.5"` strides the 3x3 conv instead, as torchvision does (4.1 GMACs, and the
    placement its pretrained weights expect). Parameter counts are the same.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "B",
                 residual: bool = True, variant: str = "paper"):
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if variant == "paper" else (1, stride)
        out_planes = planes * self.expansion
        self.conv1 = conv1x1(in_planes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.downsample = make_shortcut(shortcut, in_planes, out_planes, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class HeInit:
    """How a ResNet starts, module by module (`init.initialize`): convolutions by He et al.
    (2015, "Delving deep"; fan_out, as torchvision), BatchNorm at weight 1, bias 0 and fresh
    statistics, anything else as torch does; with `zero_init_residual`, each block's last BN
    weight at 0."""

    def __init__(self, zero_init_residual: bool = False):
        self.zero_init_residual = zero_init_residual

    def __call__(self, unit: nn.Module, name: str, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            if module.bias is not None:  # torch's own bias (the paper's convs have none)
                default_rule(unit, name, module)
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            return
        default_rule(unit, name, module)  # BN: weight 1, bias 0, fresh statistics
        if isinstance(module, nn.BatchNorm2d) and self.zero_init_residual and \
                module is getattr(unit, "bn3" if isinstance(unit, Bottleneck) else "bn2", None) \
                and isinstance(unit, (BasicBlock, Bottleneck)):
            nn.init.zeros_(module.weight)


class ResNet(nn.Module):
    """A stem, stages of blocks (the first at stride 1, each later one halving the resolution),
    global average pooling and a linear classifier.

    Args:
        block: `BasicBlock` or `Bottleneck`.
        layers: blocks per stage, e.g. (3, 3, 3) for ResNet-20 or (3, 4, 6, 3) for ResNet-50.
        widths: filters per stage before expansion, e.g. (16, 32, 64) or (64, 128, 256, 512).
            The stem has `widths[0]` filters.
        stem: "cifar" (3x3 conv) or "imagenet" (7x7/2 conv and 3x3/2 max-pool).
        shortcut: "A", "B" or "C" (see `make_shortcut`).
        residual: False builds the plain twin: the same layers without any shortcut.
        variant: where a bottleneck strides, "paper" or "v1.5" (see `Bottleneck`).
        zero_init_residual: start each block's last BN at zero, so every residual block begins
            as the identity (Goyal et al., 2017). Only meaningful with shortcuts.

    Raises:
        ConfigError: an invalid option or size; the message lists the valid choices.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int],
                 widths: Sequence[int], *, stem: str, num_classes: int, in_chans: int = 3,
                 shortcut: str = "B", residual: bool = True, variant: str = "paper",
                 zero_init_residual: bool = False):
        super().__init__()
        check_choice("shortcut option", shortcut, SHORTCUTS)
        check_choice("bottleneck variant", variant, VARIANTS)
        check_choice("stem", stem, ("cifar", "imagenet"))
        for what, value in (("num_classes", num_classes), ("in_chans", in_chans)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what} must be a positive integer, got {value!r}")
        if zero_init_residual and not residual:
            raise ConfigError("zero_init_residual needs shortcuts: it would silence a plain net")

        # As `init.seeded`: one number drawn, the layers built on the meta device (drawing
        # and allocating nothing), then given their values by name where the caller builds.
        seed, where = draw_seed(), default_device()
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            self._build(block, layers, widths, stem, num_classes, in_chans,
                        shortcut=shortcut, residual=residual, variant=variant)
        set_seed(self, seed, HeInit(zero_init_residual), where)

    def _build(self, block: type[BasicBlock | Bottleneck], layers: Sequence[int],
               widths: Sequence[int], stem: str, num_classes: int, in_chans: int,
               **options) -> None:
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_chans, widths[0])
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        in_planes = widths[0]
        self.stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        for i, (name, blocks, planes) in enumerate(zip(self.stage_names, layers, widths)):
            stage = []
            for j in range(blocks):
                # Downsample with a stride-2 first block in every stage but the first (Sec. 3.3).
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(in_planes, planes, stride, **options))
                in_planes = planes * block.expansion
            setattr(self, name, nn.Sequential(*stage))

        self.num_features = in_planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The model as named, consecutive pieces: ("stem", ...), ("layer1", ...), ..., ("head", ...).

        The pieces share their modules with the model (nothing is copied), and running them in
        order computes `forward`. This is the unit a model-parallel replica places on devices.
        """
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        head = nn.Sequential(self.avgpool, nn.Flatten(1), self.fc)
        layers = [(name, getattr(self, name)) for name in self.stage_names]
        return [("stem", stem), *layers, ("head", head)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: (N, in_chans, H, W) -> (N, num_features, H/s, W/s), before pooling."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool and classifier: (N, num_features, h, w) -> (N, num_classes).

        With `pre_logits=True`, stops before the classifier: (N, num_features).
        """
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# CIFAR-10 family (Sec. 4.2, Table 6): 6n+2 layers.

def _cifar(n: int, residual: bool, **kwargs) -> ResNet:
    kwargs.setdefault("num_classes", 10)
    kwargs.setdefault("shortcut", "A")
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), stem="cifar", residual=residual, **kwargs)


@register_model("cifar", depth=20)
def resnet20(**kwargs) -> ResNet:
    """ResNet-20 (n=3): 0.27M parameters, 8.75% CIFAR-10 test error in Table 6."""
    return _cifar(3, True, **kwargs)


@register_model("cifar", depth=32)
def resnet32(**kwargs) -> ResNet:
    """ResNet-32 (n=5): 0.46M parameters, 7.51%."""
    return _cifar(5, True, **kwargs)


@register_model("cifar", depth=44)
def resnet44(**kwargs) -> ResNet:
    """ResNet-44 (n=7): 0.66M parameters, 7.17%."""
    return _cifar(7, True, **kwargs)


@register_model("cifar", depth=56)
def resnet56(**kwargs) -> ResNet:
    """ResNet-56 (n=9): 0.85M parameters, 6.97%."""
    return _cifar(9, True, **kwargs)


@register_model("cifar", depth=110)
def resnet110(**kwargs) -> ResNet:
    """ResNet-110 (n=18): 1.7M parameters, 6.43% (warm up at lr 0.01 first)."""
    return _cifar(18, True, **kwargs)


@register_model("cifar", depth=1202)
def resnet1202(**kwargs) -> ResNet:
    """ResNet-1202 (n=200): 19.4M parameters, 7.93% (overfits)."""
    return _cifar(200, True, **kwargs)


@register_model("cifar", depth=20)
def plain20(**kwargs) -> ResNet:
    """Plain twin of ResNet-20: the same layers, no shortcuts (Fig. 6 left)."""
    return _cifar(3, False, **kwargs)


@register_model("cifar", depth=32)
def plain32(**kwargs) -> ResNet:
    """Plain twin of ResNet-32."""
    return _cifar(5, False, **kwargs)


@register_model("cifar", depth=44)
def plain44(**kwargs) -> ResNet:
    """Plain twin of ResNet-44."""
    return _cifar(7, False, **kwargs)


@register_model("cifar", depth=56)
def plain56(**kwargs) -> ResNet:
    """Plain twin of ResNet-56: higher training error than plain-20 (the degradation problem)."""
    return _cifar(9, False, **kwargs)


@register_model("cifar", depth=110)
def plain110(**kwargs) -> ResNet:
    """Plain twin of ResNet-110: above 60% error in Fig. 6."""
    return _cifar(18, False, **kwargs)


# ImageNet family (Table 1).

def _imagenet(block: type[BasicBlock | Bottleneck], layers: Sequence[int], residual: bool,
              **kwargs) -> ResNet:
    kwargs.setdefault("num_classes", 1000)
    kwargs.setdefault("shortcut", "B")
    return ResNet(block, layers, (64, 128, 256, 512), stem="imagenet", residual=residual, **kwargs)


@register_model("imagenet", depth=18)
def resnet18(**kwargs) -> ResNet:
    """ResNet-18: 1.8 GMACs, 27.88% top-1 (10-crop, Table 2)."""
    return _imagenet(BasicBlock, (2, 2, 2, 2), True, **kwargs)


@register_model("imagenet", depth=34)
def resnet34(**kwargs) -> ResNet:
    """ResNet-34: 3.6 GMACs, 24.52% top-1 with option B (Table 3)."""
    return _imagenet(BasicBlock, (3, 4, 6, 3), True, **kwargs)


@register_model("imagenet", depth=50)
def resnet50(**kwargs) -> ResNet:
    """ResNet-50: 3.8 GMACs, 22.85% top-1 (Table 3)."""
    return _imagenet(Bottleneck, (3, 4, 6, 3), True, **kwargs)


@register_model("imagenet", depth=101)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101: 7.6 GMACs, 21.75% top-1."""
    return _imagenet(Bottleneck, (3, 4, 23, 3), True, **kwargs)


@register_model("imagenet", depth=152)
def resnet152(**kwargs) -> ResNet:
    """ResNet-152: 11.3 GMACs, 21.43% top-1 (19.38% with the best testing, Table 4)."""
    return _imagenet(Bottleneck, (3, 8, 36, 3), True, **kwargs)


@register_model("imagenet", depth=18)
def plain18(**kwargs) -> ResNet:
    """Plain-18: ResNet-18 without shortcuts, 27.94% top-1 (Table 2)."""
    return _imagenet(BasicBlock, (2, 2, 2, 2), False, **kwargs)


@register_model("imagenet", depth=34)
def plain34(**kwargs) -> ResNet:
    """Plain-34: worse than plain-18, 28.54% top-1 (Table 2, the degradation problem)."""
    return _imagenet(BasicBlock, (3, 4, 6, 3), False, **kwargs)
