"""The compiled training step (`--compile`): the GPU fast path of the small CIFAR nets.

ResNet-20 at batch 128 is launch-bound on a modern GPU: ~10 ms per eager step of which the
arithmetic is a fraction (2 ms as one CUDA graph; the issue's figures from an H200, not yet
measured with this code: the CUDA-graph mode has only run on CPUs here). `--compile` runs the
model's forward and backward through `torch.compile` (on CUDA with mode "reduce-overhead", i.e.
CUDA graphs; on the CPU the default inductor mode, so the same code path runs and is tested
without a GPU) and the optimizer's update through a compiled `step` whose learning rate is a
0-d tensor, so that the schedule changing the rate never recompiles. With bf16 autocast,
channels-last and the data already on the device (augmentation included) the step never waits
for the host.
"""

from __future__ import annotations

import torch


def compile_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA; inductor's default elsewhere (CUDA graphs need CUDA)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


class CompiledStep:
    """`forward` (the compiled model; the eager module keeps the parameters, state_dict keys
    and evaluation) and `update(lr)` (the optimizer's compiled step at rate `lr`).

    The optimizer's param groups must hold their rate as a 0-d tensor (`tensor_lr`)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 device: torch.device):
        mode = compile_mode(device)
        self.forward = torch.compile(model, mode=mode)
        self.optimizer = optimizer
        self._step = torch.compile(optimizer.step, mode=mode)

    def update(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)  # in place: the compiled step reads the tensor
        self._step()


def tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold each group's rate as a 0-d tensor on `device` (what `CompiledStep` needs), also
    after `load_state_dict` brought back a float."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
