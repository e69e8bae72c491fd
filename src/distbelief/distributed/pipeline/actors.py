"""The partition actor: a thin Ray wrapper around `Stage`, where the logic lives and is tested
without Ray. Activations and gradients cross between actors as numpy arrays, which Ray moves
through its shared-memory object store without pickling their bytes; an argument that is
another actor's result (an object reference) is fetched by Ray itself from the node that holds
it (results under 100 KiB travel inline, through the caller).

Under direct hand-offs (`relay`) a stage sends its outputs to its neighbour itself, as a call
of the neighbour's `deliver`, which runs on a thread of its own (the "relay" concurrency
group) while the neighbour's step waits for it; every other method runs on the actor's one
main thread, in the order it was called. Under collective hand-offs the stages `join` a Ray
collective group and hand on through it (`link.Link`) instead."""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, \
    RayActorError, RayTaskError

from distbelief.distributed.pipeline.link import Link
from distbelief.distributed.pipeline.relay import PREVIOUS, Mailbox, relay_step
from distbelief.distributed.pipeline.stage import Stage
from distbelief.distributed.runtime.cluster import memory, node_id
from distbelief.distributed.wire import decode, encode, tensor_view
from distbelief.engine.losses import get_loss
from distbelief.engine.pieces import from_pieces, read_piece, sees, write_part
from distbelief.engine.setup import set_determinism
from distbelief.errors import DistbeliefError
from distbelief.models.init import materialize

RESTART_WAIT_S = 120.0  # how long a restarting partition has to answer again


class PartitionGone(DistbeliefError):
    """A partition, or a snapshot of it, that is not coming back."""


RETURNS = {"forward_loss_backward": 2}  # methods whose results are several objects
RELAY = {"relay": 1}  # the concurrency group of hand-offs (`StageHost.deliver`)
ABORT_WAIT_S = 30.0  # how long the other stages of a failed step have to stop


def _wire(value):
    """A call's argument as it travels: tensors (in a list too) as numpy arrays."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [t.numpy() for t in value]
    return value


def caller(actors: list):
    """`call(p, method, *args)` for the pipeline schedule: submit to actor p, tensors sent as
    numpy arrays (object references pass as they are); a method of several results (RETURNS)
    returns a reference to each; a `relay` is given actor p's neighbours."""
    def call(p: int, method: str, *args):
        args = [_wire(a) for a in args]
        remote = getattr(actors[p], method)
        if method in RETURNS:
            remote = remote.options(num_returns=RETURNS[method])
        if method == "relay":
            args.append((actors[p - 1] if p > 0 else None,
                         actors[p + 1] if p + 1 < len(actors) else None))
        return remote.remote(*args)
    return call


def watcher(actors: list):
    """`watch(refs, step)` for a direct-hand-off `Pipeline`: waits for the step's `relay`
    calls one by one; when one failed (its actor died, or raised), every actor is told to
    abandon the step (the others would wait for ever for what it will not send), the others
    are waited for, and one failed call is returned alone, for the caller's `ray.get` to raise
    its error: an actor's death where there is one (under collective hand-offs a neighbour's
    wait on the dead stage may fail first), else the first failure; else all of them."""
    def watch(refs: list, step: int) -> list:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            if _error(done[0]) is None:
                continue
            aborts = [a.abort.remote(step) for a in actors]
            ray.wait(aborts + pending, num_returns=len(aborts) + len(pending),
                     timeout=ABORT_WAIT_S)
            for ref in aborts:  # retrieved: Ray does not log them as unhandled
                _error(ref)
            deaths = [ref for ref in refs if _died(_error(ref))]
            return deaths[:1] or done
        return refs
    return watch


def _error(ref) -> BaseException | None:
    """The error a finished call raised; None if it returned, or is not finished."""
    try:
        ray.get(ref, timeout=0)
    except GetTimeoutError:
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return e
    return None


def _died(error: BaseException | None) -> bool:
    return isinstance(error, RayActorError) or (
        isinstance(error, RayTaskError) and isinstance(error.cause, RayActorError))


class Bits16:
    """A bfloat16 tensor on its way between stages: the int16 array of its bits (numpy has no
    bfloat16, and widening to float32 would double the bytes; Ray moves the array out of band,
    without pickling its bytes)."""

    __slots__ = ("bits",)

    def __init__(self, bits: np.ndarray):
        self.bits = bits


def received(value):
    """What a stage (or the driver) receives: a tensor over the array Ray delivered (no
    copy)."""
    if isinstance(value, Bits16):
        return decode(value.bits, torch.bfloat16)
    return tensor_view(value) if isinstance(value, np.ndarray) else value


def handed_on(value):
    """What a stage hands on: its output or input gradient in its own dtype."""
    if value is None:
        return None
    value = value.detach().cpu()
    return Bits16(encode(value)) if value.dtype == torch.bfloat16 else value.numpy()


class StageHost:
    """Partition `index` of `count` in its own process (`StageActor`): its module (only its
    own part of the model; built on the meta device, it is allocated here and its values come
    with `load_state`, or with `init`: (its units' names, the model's seed and rule), drawn
    here by name as the whole model draws them, `models.init.materialize`), its optimizer
    (`optimizer` builds one over the module's parameters; its state comes with `load_state`
    too), `threads` CPU threads on `device`.
    A plain class, so that Downpour's partitions (`downpour.actors`) extend it."""

    def __init__(self, index: int, count: int, module, config, threads: int, device: str,
                 optimizer=None, init: tuple | None = None):
        self.incarnation = os.urandom(8).hex()  # a restart by Ray gets a new one
        device = self.settle(config, threads, device)
        if init is not None:
            module = materialize(module, *init, device=device)
        elif any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
            module = module.to_empty(device=device)
        module = module.to(device)
        has_params = any(True for _ in module.parameters())
        opt = optimizer(config, module) if optimizer is not None and has_params else None
        self.stage = Stage(index, count, module, get_loss(config.loss), opt, device=device,
                           channels_last=config.channels_last, bf16=config.bf16,
                           recompute=config.cluster.recompute)
        self.open_mailbox()

    def open_mailbox(self) -> None:
        """Where its neighbours' hand-offs arrive: its mailbox, until it `join`s a collective
        group (then its `Link`)."""
        self.box = Mailbox()
        self.group: str | None = None
        self.link: Link | None = None

    def relay(self, step: int, order, fused: bool, inputs, labels, weights, zero: bool,
              lr, neighbours: tuple):
        """This stage's passes of step `step` (`relay.relay_step`), handing its outputs to
        `neighbours` (the actors before and after it) as calls of their `deliver`, or, once
        `join`ed, through the collective group (`link.Link`)."""
        def send(where: int, key: tuple, value: torch.Tensor) -> None:
            neighbours[0 if where == PREVIOUS else 1].deliver.remote(key, handed_on(value))

        box = self.box if self.link is None else self.link
        try:
            return relay_step(self.stage, box, send if self.link is None else box.send, step,
                              order, fused=fused,
                              inputs=None if inputs is None else [received(x) for x in inputs],
                              labels=None if labels is None else [received(y) for y in labels],
                              weights=weights, zero=zero, lr=lr)
        except BaseException:
            self.leave()  # the neighbours' waits on this stage raise instead of hanging
            raise

    def join(self, world: int, group: str) -> None:
        """Hand on through collective group `group` of `world` stages, one rank per stage
        (`--pipeline-handoff collective`); returns once every stage has joined."""
        import ray.util.collective as collective

        self.leave()
        collective.init_collective_group(world, self.stage.index, backend="gloo",
                                         group_name=group)
        self.group, self.link = group, Link(self.stage.index)

    def leave(self) -> None:
        """Leave the collective group, if any: the neighbours' waits on this stage end."""
        if self.group is not None:
            import ray.util.collective as collective
            import torch.distributed as dist

            group, self.group, self.link = self.group, None, None
            collective.destroy_collective_group(group)
            # Ray's gloo groups share the process's default group, made by the first one and
            # kept by `destroy_collective_group`: the next group must make its own (its
            # members may be new processes), so this one goes too.
            if dist.is_initialized():
                dist.destroy_process_group()

    @ray.method(concurrency_group="relay")
    def deliver(self, key: tuple, value) -> None:
        """A neighbour's output for this stage's step (on the relay thread)."""
        self.box.put(key, received(value))

    @ray.method(concurrency_group="relay")
    def abort(self, step: int) -> None:
        """Abandon step `step` (a stage of it failed): a `relay` waiting in it raises."""
        self.box.abort(step)

    @staticmethod
    def settle(config, threads: int, device: str) -> torch.device:
        """This process as a partition runs: `threads` CPU threads, the run's determinism on
        `device`; returns the device."""
        torch.set_num_threads(threads)
        where = torch.device(device)
        set_determinism(config.deterministic, where)
        return where

    def zero_grad(self) -> None:
        self.stage.zero_grad()

    def forward(self, micro: int, x, train: bool = True):
        return handed_on(self.stage.forward(micro, received(x), train))

    def forward_loss(self, micro: int, x, y, weight: float):
        return self.stage.forward_loss(micro, received(x), received(y), weight)

    def backward(self, micro: int, grad=None):
        return handed_on(self.stage.backward(micro, None if grad is None else received(grad)))

    def forward_loss_backward(self, micro: int, x, y, weight: float):
        loss, grad = self.stage.forward_loss_backward(micro, received(x), received(y), weight)
        return loss, handed_on(grad)

    def update(self, lr: float, after=None) -> None:
        self.stage.update(lr)

    def load_state(self, state: dict) -> None:
        self.stage.load_state(state)

    def take_times(self) -> dict:
        return self.stage.take_times()

    def state(self) -> dict:
        return self.stage.state()

    def finite(self) -> bool:
        """Whether the part's parameters are all finite."""
        return all(bool(torch.isfinite(t).all()) for t in self.stage.module.parameters())

    def write_part(self, names: list[str], path: str, marker: str, seen) -> dict | None:
        """This part's piece of a checkpoint generation written at `path` by this process
        (`pieces.write_part`), where it sees the generation's `marker` as the driver saw it
        (`seen`); None where it does not (the driver then writes it from `state`)."""
        if not sees(marker, seen):
            return None
        return write_part(self.stage.state(), self.stage.module, names, path)

    def read_part(self, names: list[str], files: list[tuple[str, tuple]]) -> bool:
        """This part's values and optimizer state read by name from a checkpoint's pieces
        (`files`: (path, the driver's `fingerprint` of it)), memory-mapped; False, reading
        nothing, where this process does not see them all."""
        if not all(sees(path, seen) for path, seen in files):
            return False
        pieces = [read_piece(path) for path, _ in files]
        self.stage.load_state(from_pieces(pieces, self.stage.module, names))
        return True

    def info(self) -> dict:
        params = sum(p.numel() for p in self.stage.module.parameters())
        return {"partition": self.stage.index, "node": node_id(), "pid": os.getpid(),
                "params": params, "incarnation": self.incarnation,
                "device": str(self.stage.device), "threads": torch.get_num_threads(),
                "memory": memory()}


StageActor = ray.remote(concurrency_groups=RELAY)(StageHost)


# --- the driver's side of restarts: snapshots and pings, Ray's errors turned into ours ---

def send_states(actors: list, states: list[dict]) -> None:
    """Each actor's `load_state` of its state (`Stage.state`'s form), through the object store.

    Raises:
        PartitionGone: an actor died on the way."""
    try:
        ray.get([a.load_state.remote(ray.put(s)) for a, s in zip(actors, states)])
    except (RayActorError, ObjectLostError) as e:
        raise PartitionGone(str(e).splitlines()[0]) from None


def take_snapshot(actors: list) -> list:
    """Each actor's `state()` as a result left where it runs; returns once all exist (or
    failed), without fetching them."""
    refs = [a.state.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), fetch_local=False)
    return refs


def load_snapshot(actors: list, refs: list) -> bool:
    """Each actor loaded with its `take_snapshot` result; False when one of them is an error
    (taken as its actor died).

    Raises:
        PartitionGone: an actor died while loading, or a snapshot was lost with its node."""
    try:
        ray.get([a.load_state.remote(r) for a, r in zip(actors, refs)])
        return True
    except RayTaskError:
        return False
    except (RayActorError, ObjectLostError) as e:
        raise PartitionGone(str(e).splitlines()[0]) from None


def answer(actor, wait: bool = False) -> dict | None:
    """`actor.info()`; None while Ray restarts it (with `wait`: until its restart answers).

    Raises:
        PartitionGone: it is gone for good, or did not answer in RESTART_WAIT_S."""
    deadline = time.monotonic() + RESTART_WAIT_S
    while True:
        try:
            return ray.get(actor.info.remote(), timeout=RESTART_WAIT_S)
        except ActorUnavailableError:  # restarting
            if not wait:
                return None
            if time.monotonic() > deadline:
                raise PartitionGone("a partition did not come back") from None
            time.sleep(0.2)
        except (RayActorError, GetTimeoutError) as e:
            raise PartitionGone(str(e).splitlines()[0]) from None
