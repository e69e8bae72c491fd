"""The driver's copy of the model, loaded with the parameter server's vector to evaluate it and
to write it as an ordinary checkpoint. No Ray here.

The driver evaluates on the CPU unless Ray gave its process a GPU
(`runtime.cluster.granted_device`): a GPU the driver took outside Ray's accounting could be one
a replica needs.
"""

from __future__ import annotations

import numpy as np
import torch

from distbelief.data import DataBundle, build_data
from distbelief.distributed.flat import FlatModel
from distbelief.engine.evaluate import recalibrate_for
from distbelief.engine.lifecycle import Diverged
from distbelief.engine.setup import build_model


class ServerModel:
    """`config.model` for `data` (or `model`, built for them), on `device`, to be loaded with
    server vectors laid out by `flat_of(model)` (default `FlatModel`)."""

    def __init__(self, config, data: DataBundle, device: torch.device,
                 model: torch.nn.Module | None = None, flat_of=FlatModel):
        self.config, self.data, self.device = config, data, device
        self.flat_of = flat_of  # the server vector's layout over a model (BlockFlat: parts)
        self._model = None if model is None else model.to(device)
        self._flat = None

    @property
    def model(self) -> torch.nn.Module:
        """Built on first use: a run that is never evaluated nor checkpointed (a benchmark of a
        model as large as the server) never holds a whole copy on the driver."""
        if self._model is None:
            self._model = build_model(self.config, self.data, self.device)
        return self._model

    @property
    def flat(self):
        if self._flat is None:
            self._flat = self.flat_of(self.model)
        return self._flat

    def move_to(self, device: torch.device) -> None:
        """Evaluate on `device` from now on (its own copy of the evaluation data)."""
        if device != self.device:
            self.data = build_data(self.config, device, stats=self.data.stats)
            self._model = None if self._model is None else self._model.to(device)
            self._flat, self.device = None, device

    def load(self, vector: torch.Tensor) -> torch.nn.Module:
        """The model at `vector` ([parameters; buffers])."""
        self.flat.load(vector)
        return self.model

    @staticmethod
    def check_finite(vector: torch.Tensor, position: int) -> torch.Tensor:
        """`vector`, if finite.

        Raises:
            Diverged: some value is NaN or infinite (the caller's last checkpoint is kept)."""
        if not bool(torch.isfinite(vector).all()):
            raise Diverged(f"the server's parameters are not finite at iteration {position}; "
                           f"lower --lr (the last checkpoint is kept)")
        return vector

    def checkpoint(self, vector: torch.Tensor, position: int, wall_s: float, mode: str) -> dict:
        """The model at `vector` as an ordinary checkpoint for `distbelief eval` (with `mode`,
        which --resume checks); its tensors are copies. With --bn-recalibrate its BatchNorm
        statistics are re-estimated first, as an evaluation's are (the shards keep theirs)."""
        recalibrate_for(self.load(vector), self.config, self.data, position)
        return {"config": self.config.to_dict(), "iteration": position,
                "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "data_stats": self.data.stats, "num_classes": self.data.num_classes,
                "in_chans": self.data.in_chans, "wall_s": wall_s, "mode": mode}


def as_tensors(snapshot: dict) -> dict:
    """A snapshot with its numpy arrays as tensors (over the same memory where the array is
    writable, else over a copy): checkpoints are read with torch's weights-only loader, which
    builds tensors, not arrays."""
    return {k: as_tensors(v) if isinstance(v, dict) else
            torch.from_numpy(v if v.flags.writeable else v.copy())
            if isinstance(v, np.ndarray) else v
            for k, v in snapshot.items()}
