"""The compiled training step (`--compile`): the GPU fast path of the small CIFAR nets.

ResNet-20 at batch 128 is launch-bound on a modern GPU: ~10 ms per eager step of which the
arithmetic is a fraction (2 ms as one CUDA graph; the issue's figures from an H200, not yet
measured with this code: the CUDA-graph mode has only run on CPUs here). `--compile` runs the
channels-last copy, the model's forward, the loss and the error count as one compiled function
(on CUDA with mode "reduce-overhead", i.e. CUDA graphs; on the CPU the default inductor mode,
so the same code path runs and is tested without a GPU), its backward as the compiled
backward, and the optimizer's update through a compiled `step` whose learning rate is a 0-d
tensor, so that the schedule changing the rate never recompiles.

What CUDA graphs demand, and how this step meets it:
- State made inside a captured call lives in the graphs' memory pool. SGD creates its
  momentum buffers lazily in its first `step`, so `prepare_state` creates them (zeros: with
  dampening 0 the first step's buffer is the gradient either way) before anything compiles.
- A graph's outputs are overwritten by its next replay. The step's loss and error count are
  copied out (`taken`) before the update runs and before the next forward.
- Recompiles and re-recordings cost seconds each and are silent. `CompileEvents` counts both;
  the trainer reports them, and those after the warm-up steps are a bug (tests and
  benchmarks/gpu_check.sh fail on them).
"""

from __future__ import annotations

import torch

WARMUP_STEPS = 3  # compile forward, backward (lazily) and the update; CUDA graphs record on call 2


def compile_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA; inductor's default elsewhere (CUDA graphs need CUDA)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def prepare_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer state a first `step` would create lazily (SGD's momentum buffers),
    so that no state is born inside a compiled call. State already there (a resume's) stays."""
    if not isinstance(optimizer, torch.optim.SGD):
        return  # Adagrad creates its state in its constructor
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("prepare_state needs dampening 0 (a zero buffer then equals "
                             "torch's first-step buffer, the gradient)")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format)


class CompileEvents:
    """Counts torch.compile's compilations (Dynamo frames and lazily compiled backwards) and
    CUDA-graph recordings in this process while open, and those after `mark_warm()`.

    Counted through Dynamo's compile-start callbacks, which fire once per outermost event."""

    def __init__(self):
        from torch._dynamo.callback import CallbackTrigger, callback_handler

        self._recording, self._handler = CallbackTrigger.CUDAGRAPH_RECORDING, callback_handler
        self.compiles = self.recordings = 0
        self._warm_at: tuple[int, int] | None = None
        callback_handler.register_start_callback(self._seen)

    def _seen(self, args) -> None:
        if args.callback_trigger == self._recording:
            self.recordings += 1
        else:
            self.compiles += 1

    def mark_warm(self) -> None:
        self._warm_at = (self.compiles, self.recordings)

    def after_warmup(self) -> dict:
        """{"compiles", "recordings"} since `mark_warm` (all of them before it)."""
        c0, r0 = self._warm_at or (self.compiles, self.recordings)
        return {"compiles": self.compiles - c0, "recordings": self.recordings - r0}

    def report(self) -> dict:
        return {"compiles": self.compiles, "recordings": self.recordings,
                "after_warmup": self.after_warmup()}

    def close(self) -> None:
        if self._seen in self._handler.start_callbacks:
            self._handler.remove_start_callback(self._seen)


class CompiledStep:
    """`forward_loss(x, y)` -> (loss, wrong): the compiled channels-last copy, forward (under
    bf16 autocast if asked), loss and error count; `update(lr)`: the optimizer's compiled step
    at rate `lr`. The eager module keeps the parameters, state_dict keys and evaluation.

    The optimizer's param groups must hold their rate as a 0-d tensor (`tensor_lr`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss,
                 device: torch.device, *, bf16: bool = False, channels_last: bool = False):
        mode = compile_mode(device)
        prepare_state(optimizer)
        self.events = CompileEvents()

        def forward_loss(x: torch.Tensor, y: torch.Tensor):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                scores = model(x)
                value = loss(scores, y)
            return value, loss.wrong(scores, y)

        self.forward_loss = torch.compile(forward_loss, mode=mode)
        self.optimizer = optimizer
        self._step = torch.compile(optimizer.step, mode=mode)
        self.steps = 0

    def update(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # in place: the compiled step reads the tensor
        self._step()
        self.steps += 1
        if self.steps == WARMUP_STEPS:
            self.events.mark_warm()

    def close(self) -> None:
        self.events.close()


def taken(*outputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Copies of a compiled call's outputs, detached: what may still be read after the next
    graph replay (which overwrites the outputs themselves)."""
    return tuple(t.detach().clone() for t in outputs)


def tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each group's rate as a 0-d tensor on `device` (what `CompiledStep` needs), also
    after `load_state_dict` brought back a float."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
