"""One registry of models by name: it feeds `create_model`, the CLI and the tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from distbelief.errors import ConfigError

# Native input side in pixels per family: CIFAR images are 32x32, ImageNet crops 224x224. Dense
# models (no convolutions, no BatchNorm) are built for the data's image size; 32 in tables.
NATIVE_INPUT_SIZE = {"cifar": 32, "imagenet": 224, "dense": 32}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows of a model without building it."""

    name: str
    family: str  # "cifar", "imagenet" or "dense"
    depth: int  # weighted layers, as in the model's name
    builder: Callable[..., nn.Module]

    @property
    def input_size(self) -> int:
        return NATIVE_INPUT_SIZE[self.family]

    @property
    def residual(self) -> bool:
        # Plain twins are registered as plainN; ResNets have shortcuts, dense models none.
        return self.family != "dense" and not self.name.startswith("plain")

    @property
    def sized(self) -> bool:
        """Whether the builder takes `input_size` (dense models flatten the image)."""
        return self.family == "dense"

    @property
    def description(self) -> str:
        """The first line of the builder's docstring."""
        return (self.builder.__doc__ or "").strip().split("\n")[0]


_MODELS: dict[str, ModelInfo] = {}


def register_model(family: str, depth: int) -> Callable:
    """Decorator: register a builder under its function name."""
    if family not in NATIVE_INPUT_SIZE:
        raise ValueError(f"unknown model family {family!r}")

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if builder.__name__ in _MODELS:
            raise ValueError(f"model {builder.__name__!r} is registered twice")
        _MODELS[builder.__name__] = ModelInfo(builder.__name__, family, depth, builder)
        return builder

    return register


def list_models(family: str | None = None) -> list[str]:
    """Registered model names in registration order, optionally of one family."""
    return [name for name, info in _MODELS.items() if family in (None, info.family)]


def model_info(name: str) -> ModelInfo:
    """The registry entry of `name`.

    Raises:
        ConfigError: `name` is not registered; the message lists the registered names.
    """
    try:
        return _MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(_MODELS)}") from None


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the model registered as `name`, passing `kwargs` to its builder.

    Common kwargs: `num_classes`, `in_chans`, `shortcut` ("A"|"B"|"C"), `variant`
    ("paper"|"v1.5"), `zero_init_residual`.

    Raises:
        ConfigError: unknown name, option or keyword; the message lists the valid choices.
    """
    builder = model_info(name).builder
    try:
        return builder(**kwargs)
    except TypeError as e:
        # An unexpected keyword is the caller's input, not a bug: report it the same way.
        if "unexpected keyword argument" not in str(e):
            raise
        raise ConfigError(f"model {name!r}: {e}") from None
