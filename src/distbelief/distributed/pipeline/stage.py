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

Recomputation (`recompute=True`, `--recompute`): the forward pass keeps only the stage's
input; backward runs the forward again with autograd on, then differentiates it (Chen et al.,
2016; GPipe's re-materialisation). The recomputed pass sees the same random numbers (the
generator's state is saved with the input) and leaves BatchNorm's running statistics as the
first pass left them, so it computes exactly what was computed the first time.

Activation memory is counted as it is held: the bytes autograd saves for backward (parameters
left out: they are the stage's anyway) and the kept inputs, per micro-batch, with the peak
since the last `take_times` reported as `peak_activation_bytes`.

`update(lr)` applies the stage's own optimizer (the same rule the single-process trainer
builds, over this part's parameters only). `optimizer_slice` and `optimizer_join` translate
between the whole model's optimizer-state numbering and a part's (shifted by the part's
offset), so a partitioned run's checkpoints are ordinary single-process checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
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
        recompute: keep only the input of each micro-batch in flight (module doc).
        dtype: the module's weights, activations and gradients in this dtype (bfloat16 for
            --partition-dtype; None: as the module is); its input is cast to it, and the loss
            is taken in float32.
    """

    def __init__(self, index: int, count: int, module: nn.Module, loss, optimizer=None, *,
                 device: torch.device = torch.device("cpu"), channels_last: bool = False,
                 bf16: bool = False, recompute: bool = False, dtype: torch.dtype | None = None):
        self.index, self.count, self.loss, self.optimizer = index, count, loss, optimizer
        self.device, self.channels_last, self.bf16 = device, channels_last, bf16
        self.recompute, self.dtype = recompute, dtype
        self.module = module.to(device) if dtype is None else module.to(device, dtype)
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        # micro-batch -> (input leaf, output or loss), or under recompute (input leaf, what
        # the pass needs again: labels and weight for the last stage, the generator's state)
        self.saved: dict[int, tuple] = {}
        self.held = ActivationCount(self.module)
        self.compute_s = 0.0  # seconds spent computing since the last `take_times`
        self.bytes_out = 0  # activation and gradient bytes handed on

    def _input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the leaf whose gradient backward hands on, the tensor the layers read)."""
        x = x.to(self.device)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.index == 0:
            return x, x
        leaf = x.detach().requires_grad_(True)
        # A clone: a layer working in place on its input must not write into the leaf.
        return leaf, leaf.clone()

    def _layers(self, inp: torch.Tensor, target: tuple | None = None):
        """The layers on `inp` (and with `target`, (labels, weight), the weighted mean loss):
        (output, logits)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module(inp)
            if target is None:
                return out, out
            y, weight = target
            return self.loss(out if self.dtype is None else out.float(), y) * weight, out

    def _first_pass(self, micro: int, x: torch.Tensor, target: tuple | None, train: bool):
        """Forward of micro-batch `micro`, keeping for backward what the mode asks (module
        doc): (output or weighted loss, logits)."""
        self.module.train(train)
        leaf, inp = self._input(x)
        if not train:
            with torch.no_grad():
                return self._layers(inp, target)
        if self.recompute:
            rng = _rng_state(self.device)
            with torch.no_grad():
                out, logits = self._layers(inp, target)
            self.saved[micro] = (leaf, (rng, target))
            self.held.add(micro, _bytes(leaf))
            return out, logits
        with self.held.counting(micro, leaf):
            out, logits = self._layers(inp, target)
        self.saved[micro] = (leaf, out)
        return out, logits

    def _again(self, micro: int, leaf: torch.Tensor, rng, target: tuple | None):
        """The first pass of `micro` run again with autograd on, from its kept input, with
        the same random numbers; BatchNorm's running statistics are put back as they were."""
        buffers = [b.clone() for b in self.module.buffers()]
        self.held.release(micro)  # its input is counted again, with the pass's activations
        self.module.train(True)
        inp = leaf if self.index == 0 else leaf.clone()
        with _rng_restored(rng, self.device), torch.enable_grad(), \
                self.held.counting(micro, leaf):
            out, _ = self._layers(inp, target)
        with torch.no_grad():
            for b, kept in zip(self.module.buffers(), buffers):
                b.copy_(kept)
        return out

    def forward(self, micro: int, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        """This stage's output for micro-batch `micro` (detached); with `train` it keeps what
        backward needs."""
        start = time.perf_counter()
        out, _ = self._first_pass(micro, x, None, train)
        result = out.detach()
        if train:  # the metrics are the training steps'
            self.bytes_out += result.numel() * result.element_size()
            self.compute_s += time.perf_counter() - start
        return result

    def forward_loss(self, micro: int, x: torch.Tensor, y: torch.Tensor,
                     weight: float) -> tuple[float, int]:
        """The last stage's forward: (mean loss x weight, misclassified images) of micro-batch
        `micro`, keeping the weighted loss for backward."""
        start = time.perf_counter()
        y = y.to(self.device)
        loss, logits = self._first_pass(micro, x, (y, weight), True)
        wrong = int(self.loss.wrong(logits, y)) if self.loss.classifies else 0
        self.compute_s += time.perf_counter() - start
        return float(loss.detach()), wrong

    def forward_loss_backward(self, micro: int, x: torch.Tensor, y: torch.Tensor,
                              weight: float) -> tuple[tuple[float, int], torch.Tensor | None]:
        """The last stage's forward (`forward_loss`) and backward of micro-batch `micro` in
        one call, as 1F1B runs them back to back: (its loss and misclassified images, the
        gradient of its input)."""
        return self.forward_loss(micro, x, y, weight), self.backward(micro)

    def backward(self, micro: int, grad: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward of micro-batch `micro` given its output's gradient (None for the last
        stage, whose output is the loss); the gradient of this stage's input, or None for the
        first stage. Parameter gradients accumulate until `zero_grad`."""
        start = time.perf_counter()
        leaf, out = self.saved.pop(micro)
        if self.recompute:
            out = self._again(micro, leaf, *out)
        if not out.requires_grad:
            pass  # a first stage without parameters: nothing to differentiate
        elif grad is None:
            out.backward()
        else:
            out.backward(grad.to(self.device, out.dtype))
        del out  # the graph's saved tensors go with it
        self.held.release(micro)
        result = None if self.index == 0 else leaf.grad
        if result is not None:
            self.bytes_out += result.numel() * result.element_size()
        self.compute_s += time.perf_counter() - start
        return result

    def zero_grad(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.saved.clear()  # a step cut short (a failure elsewhere) leaves activations behind
        self.held.clear()

    def update(self, lr: float, after=None) -> None:
        """One optimizer step at learning rate `lr` with the accumulated gradients, which are
        then zeroed (the next step accumulates afresh without a call of its own). `after`,
        the step's last pass's result, is not read: on actors it makes the update wait for
        that pass, and fail without running when any pass of the step failed."""
        if self.optimizer is None:  # a part without parameters (a flatten, an activation)
            return
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.module.zero_grad(set_to_none=True)
        self.compute_s += time.perf_counter() - start

    def take_times(self) -> dict:
        """Compute seconds, bytes handed on and the peak activation bytes held since the last
        call (then reset)."""
        out = {"compute_s": self.compute_s, "bytes_out": self.bytes_out,
               "peak_activation_bytes": self.held.take_peak()}
        self.compute_s, self.bytes_out = 0.0, 0
        return out

    # --- state in the whole model's terms ------------------------------------------------

    def load_state(self, state: dict) -> None:
        """`state()`'s values back into the module and the optimizer (a restarted partition
        from its snapshot)."""
        self.module.load_state_dict(state["module"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.zero_grad()

    def state(self) -> dict:
        """The module's state_dict and the optimizer's state, as CPU tensors (the driver may
        have no GPU, or another one)."""
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "optimizer": None if self.optimizer is None else _to_cpu(
                    self.optimizer.state_dict())}


class ActivationCount:
    """The bytes a stage holds for backward, per micro-batch in flight, and their peak.

    `counting(micro, leaf)` counts what autograd saves inside it (each storage once, for the
    most of it a saved tensor spans; the module's parameters left out) plus the input leaf;
    `add` counts bytes directly (a kept input under recompute); `release(micro)` when its
    backward is done."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.by_micro: dict[int, int] = {}
        self.peak = 0

    @contextlib.contextmanager
    def counting(self, micro: int, leaf: torch.Tensor):
        params = {_where(p) for p in self.module.parameters()}
        seen = {_where(leaf): _bytes(leaf)}  # storage -> the most of it a saved tensor spans

        def pack(t: torch.Tensor) -> torch.Tensor:
            where = _where(t)
            if where not in params:
                seen[where] = max(seen.get(where, 0), _bytes(t))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.add(micro, sum(seen.values()))

    def add(self, micro: int, nbytes: int) -> None:
        self.by_micro[micro] = self.by_micro.get(micro, 0) + nbytes
        self.peak = max(self.peak, sum(self.by_micro.values()))

    def release(self, micro: int) -> None:
        self.by_micro.pop(micro, None)

    def clear(self) -> None:
        self.by_micro.clear()

    def take_peak(self) -> int:
        """The peak since the last call; the next peak starts from what is held now."""
        peak, self.peak = self.peak, sum(self.by_micro.values())
        return peak


def _where(t: torch.Tensor) -> int:
    """Where a tensor's storage starts: views of one storage are counted once (a micro-batch
    is a view of its batch, and is counted for its own rows)."""
    return t.untyped_storage().data_ptr()


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _rng_state(device: torch.device) -> tuple:
    """The random generators' state a pass on `device` draws from (CPU, and the GPU's)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_restored(state: tuple, device: torch.device):
    """Inside: the generators as `state` left them; after: as they were before."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield


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


def empty_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device (same dtypes and layouts), made without copying
    its values."""
    memo = {id(b): torch.empty_like(b, device="meta") for b in module.buffers()}
    memo.update({id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                 for p in module.parameters()})
    return copy.deepcopy(module, memo=memo)
