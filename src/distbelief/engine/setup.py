"""Model and device setup, shared by the single-process trainer and the distributed cores:
which device, how deterministic, which model for which data, in which memory format."""

from __future__ import annotations

import os

import torch

from distbelief.errors import ConfigError
from distbelief.models import create_model, model_info


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when this process sees a GPU, else the CPU.

    Raises:
        ConfigError: `cuda` without a CUDA device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    return torch.device(name)


def set_determinism(deterministic: bool, device: torch.device) -> None:
    """Deterministic kernels when asked (repeatable on CPU; on CUDA as far as cuDNN allows),
    otherwise cuDNN autotuning."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def build_model(config, data, device: torch.device | None = None) -> torch.nn.Module:
    """`config.model` for `data`'s classes and channels (a `DataBundle`); with `device`, moved
    there and in the configured memory format (`place_model`). A config carrying a model given
    to `distbelief.fit` (`config.user`) builds that one."""
    if config.user is not None:
        model = config.user.model()
        return model if device is None else place_model(model, config, device)
    options = {"shortcut": config.shortcut} if config.shortcut else {}
    if config.hidden is not None:
        options["hidden"] = config.hidden
    if config.variant is not None:
        if model_info(config.model).family != "imagenet":
            raise ConfigError(f"--variant applies to the ImageNet ResNets, not {config.model}")
        options["variant"] = config.variant
    if model_info(config.model).sized:  # dense models flatten images of the data's size
        options["input_size"] = tuple(data.stats["mean"].shape[1:])
    model = create_model(config.model, num_classes=data.num_classes, in_chans=data.in_chans,
                         **options)
    if device is None:
        return model
    return place_model(model, config, device)


def place_model(model: torch.nn.Module, config, device: torch.device) -> torch.nn.Module:
    """`model` on `device`, channels-last if `config.channels_last`."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def has_batchnorm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
