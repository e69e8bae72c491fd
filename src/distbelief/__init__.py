"""distbelief: deep residual networks (He et al., 2015) trained DistBelief-style (Dean et al., 2012).

The Python API (imported on first use, so that `import distbelief` stays light):

    fit(model, train_data, test_data=None, mode="single", **settings) -> summary dict
    evaluate(model_or_run, data) -> {"error", "top5_error", "loss", "accuracy", "images"}
    load(run_dir_or_checkpoint, model=None) -> torch.nn.Module
    create_model(name, **options), list_models(family=None): the model zoo
    get_recipe(name, model=None) -> TrainConfig, TrainConfig: the paper's recipes and settings
    reproduce(experiment, out, budget="short", ...) -> results: the paper's tables and figures
    layer_responses(model, batches) -> per-layer response stds (Fig. 7)
    replay(run_dir, until=None, out=None) -> report: re-execute a --record-order Downpour run
"""

from distbelief.errors import (CheckpointError, ConfigError, DataError, DistbeliefError,
                               StorageError)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "DistbeliefError", "StorageError",
           "TrainConfig",
           "__version__", "create_model", "evaluate", "fit", "get_recipe", "layer_responses",
           "list_models", "load", "replay", "reproduce"]

_LAZY = {"fit": "distbelief.api", "evaluate": "distbelief.api", "load": "distbelief.api",
         "replay": "distbelief.api",
         "create_model": "distbelief.models", "list_models": "distbelief.models",
         "get_recipe": "distbelief.recipes", "TrainConfig": "distbelief.engine.config",
         "reproduce": "distbelief.paper", "layer_responses": "distbelief.paper"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distbelief' has no attribute {name!r}")
