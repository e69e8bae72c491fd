"""A discrete-event clock with processes, for the virtual cluster (`virtual`). No Ray, no torch.

`EventLoop` keeps simulated time and a heap of events (time, then the order they were
scheduled in). A *process* is ordinary blocking code (a `DownpourReplica`'s loop) run as a
greenlet: a coroutine with a stack of its own, on the caller's OS thread. Only one runs at a
time, until it blocks (`sleep`, `wait`) or ends, so the code a real replica runs is run
unchanged, and a simulation is a pure function of its inputs: the same events in the same order
every time.

Greenlets rather than threads because everything then runs on one OS thread: a hand-over costs
a stack switch (about a microsecond) instead of two thread wake-ups, and torch keeps one
OpenMP team, one allocator arena and warm caches, where 64 replica threads had 64 teams whose
idle workers spun against the running one (benchmarks/bench_virtual.py speed). The price: a
process must not block inside a thread-local torch context (`no_grad`, `autocast`), which the
next process would inherit; a replica blocks only between its steps' pieces.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable

import greenlet

from distbelief.errors import DistbeliefError


class SimulationError(DistbeliefError):
    """A simulation that cannot go on: every process is blocked on something that no event
    will bring."""


class _Cancelled(BaseException):
    """Raised in a process that the loop closes before it ended (not an error of its own)."""


class Signal:
    """Something processes can wait for (`EventLoop.wait`): done once `set()`, or once
    `parts` values have each been given (`give`); `result()` is then `join` of them.
    `then(fn)` calls fn() when it is done (at once if it is)."""

    def __init__(self, loop: "EventLoop", parts: int = 0, join: Callable | None = None):
        self.loop, self.left, self.join = loop, parts, join
        self.values: list = [None] * parts
        self.waiters: list = []
        self.callbacks: list = []
        self.is_set = False

    def then(self, fn: Callable[[], None]) -> None:
        if self.is_set:
            fn()
        else:
            self.callbacks.append(fn)

    def give(self, i: int, value) -> None:
        self.values[i] = value
        self.left -= 1
        if not self.left:
            self.set()

    def set(self) -> None:
        self.is_set = True
        for process, token in self.waiters:
            self.loop.at(self.loop.now, self.loop.wake, process, token)
        self.waiters = []
        for fn in self.callbacks:
            fn()
        self.callbacks = []

    def done(self) -> bool:
        return self.is_set

    def result(self):
        """The joined values, blocking the calling process until they are all there."""
        if not self.is_set:
            self.loop.wait(self)
        return self.join(self.values)


class Process:
    """Code that runs in simulated time (`EventLoop.spawn`), as a greenlet that runs only
    while it holds the loop's baton. The main process (`target` None) is the caller's own."""

    def __init__(self, loop: "EventLoop", target: Callable[[], None] | None, name: str):
        self.loop, self.target, self.name = loop, target, name
        self.finished, self.cancelled = False, False
        self.token = 0  # the wait it is in; a wake-up for an older one is stale
        # A process's greenlet ends into the main one's (`close`).
        self.glet = greenlet.getcurrent() if target is None else \
            greenlet.greenlet(self._main, parent=loop.main.glet)

    def _main(self) -> None:
        try:
            if not self.cancelled:
                self.loop.current = self
                self.target()
        except _Cancelled:
            pass
        except BaseException as e:  # the loop's caller raises it
            self.loop.error = self.loop.error or e
        finally:
            self.finished = True
            if not self.cancelled:  # a cancelled one returns to `close`, its parent
                self.loop.drive(self)


class EventLoop:
    """Simulated time (`now`, seconds), events and processes (module doc).

    From the caller's side: `at(when, fn, *args)`, `after(delay, ...)`, `spawn(target,
    name)`, `run()` (until no event is left), `close()`. From a process: `sleep(seconds)`,
    `wait(signal, limit=None)`.

    The process that holds the baton runs the events itself: a process that blocks goes on
    popping events until one resumes another process (then it hands the baton over and
    waits for it) or itself (then it just returns). So a process whose own wake-up comes
    next never switches, and the run switches stacks only where control really passes from
    one replica to another.
    """

    def __init__(self):
        self.now = 0.0
        self.heap: list = []
        self.count = itertools.count()
        self.main = Process(self, None, "main")
        self.current: Process = self.main
        self.processes: list[Process] = []
        self.next: Process | None = None  # the process an event just resumed
        self.error: BaseException | None = None

    def at(self, when: float, fn: Callable, *args) -> None:
        heapq.heappush(self.heap, (max(when, self.now), next(self.count), fn, args))

    def after(self, delay: float, fn: Callable, *args) -> None:
        self.at(self.now + delay, fn, *args)

    def spawn(self, target: Callable[[], None], name: str) -> Process:
        process = Process(self, target, name)
        self.processes.append(process)
        self.at(self.now, self.wake, process, process.token)
        return process

    def run(self) -> None:
        """Run events in time order until none is left.

        Raises:
            the first error a process raised; SimulationError: processes left blocked."""
        self.drive(self.main)
        self.current = self.main
        if self.error is not None:
            error, self.error = self.error, None
            raise error
        blocked = [p.name for p in self.processes if not p.finished]
        if blocked:
            raise SimulationError(f"the virtual cluster is stuck: {', '.join(blocked)} wait "
                                  f"for what nothing will bring")

    def close(self) -> None:
        """End every process that has not ended (each unwinds from where it blocked), and
        free the stacks of those that ended by handing the baton on."""
        for process in self.processes:
            if process.glet.dead:
                continue
            if process.finished:
                process.glet.throw()  # GreenletExit, from its last hand-over
            else:
                process.cancelled = True
                process.glet.switch()

    def wake(self, process: Process, token: int) -> None:
        """An event: resume `process` if it is still in the wait `token` names."""
        if process.token == token and not process.finished:
            process.token += 1
            self.next = process

    def drive(self, me: Process) -> None:
        """Run events in `me` (it holds the baton) until one resumes `me` (return), or
        another process (hand it the baton; then wait for it unless `me` has ended), or none
        is left or a process failed (the baton goes to the main process)."""
        while True:
            if self.error is not None or not self.heap:
                target = self.main
            else:
                when, _, fn, args = heapq.heappop(self.heap)
                self.now = when
                fn(*args)
                if self.next is None:
                    continue
                target, self.next = self.next, None
            if target is me:
                self.current = me
                return
            target.glet.switch()  # a finished `me` never comes back here
            if me.cancelled:
                raise _Cancelled()
            self.current = me
            return

    # --- called by the running process ---------------------------------------------------

    def sleep(self, seconds: float) -> None:
        process = self.current
        self.after(seconds, self.wake, process, process.token)
        self.drive(process)

    def wait(self, signal: Signal, limit: float | None = None) -> bool:
        """Block the running process until `signal` is done or `limit` seconds have passed;
        whether it is done."""
        if signal.done():
            return True
        process = self.current
        signal.waiters.append((process, process.token))
        if limit is not None:
            self.after(limit, self.wake, process, process.token)
        self.drive(process)
        return signal.done()
