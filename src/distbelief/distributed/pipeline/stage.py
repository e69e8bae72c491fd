"""One partition of a model replica, computing its layers for micro-batches. No Ray here.

A stage holds its part's module and nothing of the others'. Forward: it receives the previous
stage's output (the input images for the first stage), computes its own, keeps what backward
needs under the micro-batch's number and hands on a detached copy. Backward: it receives the
gradient of its output, runs autograd through its layers, accumulates its parameters' gradients
and hands on the gradient of its input. The last stage computes the loss instead of an output.

Gradient accumulation is exact: micro-batch m of b_m images out of B has its mean loss weighted
by b_m / B, so the gradients summed over micro-batches are those of the whole batch's mean loss
(with BatchNorm, each micro-batch is normalised on its own, as in GPipe; with one micro-batch
the stage chain computes exactly what one process would).

`update(lr)` applies the stage's own optimizer (the same rule the single-process trainer
builds, over this part's parameters only). `optimizer_slice` and `optimizer_join` translate
between the whole model's optimizer-state numbering and a part's (shifted by the part's
offset), so a partitioned run's checkpoints are ordinary single-process checkpoints.
"""

from __future__ import annotations

import time

import torch
from torch import nn


class Stage:
    """Stage `index` of `count` over `module` on `device`.

    Args:
        loss: the run's loss (`engine.losses`), used by the last stage.
        optimizer: built over `module`'s parameters (None: `update` does nothing; a part
            without parameters has none).
        channels_last, bf16: the run's memory format and autocast.
    """

    def __init__(self, index: int, count: int, module: nn.Module, loss, optimizer=None, *,
                 device: torch.device = torch.device("cpu"), channels_last: bool = False,
                 bf16: bool = False):
        self.index, self.count, self.loss, self.optimizer = index, count, loss, optimizer
        self.device, self.channels_last, self.bf16 = device, channels_last, bf16
        self.module = module.to(device)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.saved: dict[int, tuple] = {}  # micro-batch -> (input leaf, output or loss)
        self.compute_s = 0.0  # seconds spent computing since the last `take_times`
        self.bytes_out = 0  # activation and gradient bytes handed on

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the leaf whose gradient backward hands on, the tensor the layers read)."""
        x = x.to(self.device)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.index == 0:
            return x, x
        leaf = x.detach().requires_grad_(True)
        # A clone: a layer working in place on its input must not write into the leaf.
        return leaf, leaf.clone()

    def forward(self, micro: int, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        """This stage's output for micro-batch `micro` (detached); with `train` it keeps what
        backward needs."""
        start = time.perf_counter()
        self.module.train(train)
        leaf, inp = self._input(x)
        with torch.set_grad_enabled(train), \
                torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(inp)
        if train:
            self.saved[micro] = (leaf, out)
        result = out.detach()
        self.bytes_out += result.numel() * result.element_size()
        self.compute_s += time.perf_counter() - start
        return result

    def forward_loss(self, micro: int, x: torch.Tensor, y: torch.Tensor,
                     weight: float) -> tuple[float, int]:
        """The last stage's forward: (mean loss x weight, misclassified images) of micro-batch
        `micro`, keeping the weighted loss for backward."""
        start = time.perf_counter()
        self.module.train(True)
        leaf, inp = self._input(x)
        y = y.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.module(inp)
            loss = self.loss(logits, y) * weight
        self.saved[micro] = (leaf, loss)
        wrong = int(self.loss.wrong(logits, y)) if self.loss.classifies else 0
        self.compute_s += time.perf_counter() - start
        return float(loss.detach()), wrong

    def backward(self, micro: int, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward of micro-batch `micro` given its output's gradient (None for the last
        stage, whose output is the loss); the gradient of this stage's input, or None for the
        first stage. Parameter gradients accumulate until `zero_grad`."""
        start = time.perf_counter()
        leaf, out = self.saved.pop(micro)
        if not out.requires_grad:
            pass  # a first stage without parameters: nothing to differentiate
        elif grad is None:
            out.backward()
        else:
            out.backward(grad.to(self.device, out.dtype))
        result = None if self.index == 0 else leaf.grad
        if result is not None:
            self.bytes_out += result.numel() * result.element_size()
        self.compute_s += time.perf_counter() - start
        return result

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.saved.clear()  # a step cut short (a failure elsewhere) leaves activations behind

    def update(self, lr: float) -> None:
        """One optimizer step at learning rate `lr` with the accumulated gradients."""
        if self.optimizer is None:  # a part without parameters (a flatten, an activation)
            return
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.compute_s += time.perf_counter() - start

    def take_times(self) -> dict:
        """Compute seconds and bytes handed on since the last call (then reset)."""
        out = {"compute_s": self.compute_s, "bytes_out": self.bytes_out}
        self.compute_s, self.bytes_out = 0.0, 0
        return out

    # --- state in the whole model's terms ------------------------------------------------

    def state(self) -> dict:
        """The module's state_dict and the optimizer's state, as CPU tensors (the driver may
        have no GPU, or another one)."""
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "optimizer": None if self.optimizer is None else _to_cpu(
                    self.optimizer.state_dict())}


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def optimizer_slice(full: dict, offset: int, count: int) -> dict:
    """The part of a whole model's optimizer `state_dict` for the parameters offset ..
    offset+count-1, numbered from 0 (one parameter group, as `build_optimizer` makes)."""
    (group,) = full["param_groups"]
    state = {i - offset: v for i, v in full["state"].items() if offset <= int(i) < offset + count}
    return {"state": state, "param_groups": [{**group, "params": list(range(count))}]}


def optimizer_join(parts: list[dict], offsets: list[int], template: dict) -> dict:
    """The whole model's optimizer `state_dict` from its parts' (`optimizer_slice` reversed;
    None for a part without parameters); `template` is the whole optimizer's own state_dict,
    for its parameter numbering."""
    state, parts_offsets = {}, [(p, o) for p, o in zip(parts, offsets) if p is not None]
    for part, offset in parts_offsets:
        state.update({offset + int(i): v for i, v in part["state"].items()})
    (group,) = template["param_groups"]
    hyper = {k: v for k, v in parts_offsets[0][0]["param_groups"][0].items() if k != "params"}
    return {"state": state, "param_groups": [{**hyper, "params": group["params"]}]}
