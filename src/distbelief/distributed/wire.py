"""How vectors travel between replicas and parameter-server shards. Plain Python: no Ray here.

Ray moves numpy arrays through its shared-memory object store without pickling their bytes; what
arrives is a read-only view of shared memory, which `tensor_view` wraps without copying.

--ps-transfer-dtype bfloat16 or float16 halves the bytes of every push and pull; the shards keep
and update float32 (a gradient's low-precision value is used as its exact float32 value, and a
pull rounds the shard's float32 values once). numpy has no bfloat16: its values travel as the
int16 array of their bits. float16 keeps 3 more mantissa bits than bfloat16 but overflows past
65504 (a push holding such a value arrives as Inf and is refused, as any non-finite push is);
bfloat16 has float32's range.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}  # engine.config.TRANSFER_DTYPES


def wire_dtype(config) -> torch.dtype:
    """The dtype --ps-transfer-dtype names."""
    return WIRE_DTYPES[config.downpour.ps_transfer_dtype]


def tensor_view(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array` without a copy. Arrays from the object store are read-only, which
    torch warns about; the callers only read them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def encode(t: torch.Tensor) -> np.ndarray:
    """`t` (a CPU tensor) as the numpy array that travels: a view, no copy."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def decode(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The tensor of `dtype` an `encode`d array holds: a view, no copy."""
    t = tensor_view(array)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def join_slices(arrays: list[np.ndarray], dtype: torch.dtype = torch.float32,
                out: np.ndarray | None = None) -> torch.Tensor:
    """A whole vector from the shards' `encode`d slices. With one shard it is the (read-only)
    array in the object store itself; callers copy out of it and never write to it. With
    several, they are copied into `out` when given (reused: a fresh 100 MB array costs more
    in page faults than the copy), else into a new array."""
    if len(arrays) == 1:
        return decode(arrays[0], dtype)
    total = sum(len(a) for a in arrays)
    if out is None or len(out) != total or out.dtype != arrays[0].dtype:
        out = np.empty(total, dtype=arrays[0].dtype)
    np.concatenate(arrays, out=out)
    return decode(out, dtype)
