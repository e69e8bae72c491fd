"""The paper's networks, registered by name: `create_model("resnet20")`, `list_models()`."""

# Importing the model files registers their builders (ResNets first: the listing order).
from distbelief.models import resnet  # noqa: F401, I001
from distbelief.models import dense  # noqa: F401
from distbelief.models.complexity import count_macs, count_params, summarize
from distbelief.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from distbelief.models.resnet import SHORTCUTS, VARIANTS, BasicBlock, Bottleneck, ResNet

__all__ = [
    "SHORTCUTS", "VARIANTS", "BasicBlock", "Bottleneck", "ModelInfo", "ResNet",
    "count_macs", "count_params", "create_model", "list_models", "model_info",
    "register_model", "summarize",
]
