"""Calls to actors and what their failures mean: Ray's errors turned into ours, the pending-call
protocol over object references, and a scheme's calls to its replicas, each death of a replica
counted as one failure.

Vectors cross process boundaries as numpy arrays, which Ray moves through its shared-memory
object store without pickling their bytes (a torch tensor would be pickled); what arrives is a
read-only view of shared memory, which `wire.tensor_view` wraps without copying.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from distbelief.errors import DistbeliefError


class ActorsLost(DistbeliefError):
    """Calls failed because actors died: `dead`, their indices (`get_unless_dead`)."""

    def __init__(self, message: str, dead: list[int]):
        super().__init__(message)
        self.dead = dead


class ShardLost(DistbeliefError):
    """A parameter-server shard did not answer: it died, and Ray is restarting it
    (`restarting`) or it is gone for good. Its message is one line for the user."""

    def __init__(self, message: str, restarting: bool = False):
        super().__init__(message)
        self.restarting = restarting


def get(refs, lost: str | None = None):
    """ray.get; with `lost`, an actor that is gone becomes `ShardLost(lost)` (one line), and so
    does a call that failed because an actor it called is gone."""
    try:
        return ray.get(refs)
    except RayTaskError as e:
        raise remote_error(e, lost) from None
    except RayActorError as e:
        if lost is None:
            raise
        raise ShardLost(lost, restarting=isinstance(e, ActorUnavailableError)) from None


def when_answering(actors: list, timeout_s: float) -> list:
    """The actors' `info()` once every one answers, waiting up to `timeout_s` while Ray
    restarts one (an actor dead for good raises at once, as Ray reports it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get([actor.info.remote() for actor in actors])
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_briefly(refs, timeout_s: float) -> None:
    """Wait up to `timeout_s` for `refs` to finish, whatever their outcome (best-effort
    clean-up calls: a dead or restarting actor is not waited for longer)."""
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)


def get_unless_dead(refs, actors: list, message):
    """ray.get(refs); when a call failed because an actor died (its own, or the one whose
    result it took as argument), `ActorsLost(message(dead), dead)`, `dead` being the indices
    of the `actors` that no longer answer."""
    try:
        return ray.get(refs)
    except RayTaskError as e:
        if not isinstance(e.cause, RayActorError):
            raise remote_error(e, None) from None
    except RayActorError:
        pass
    dead = dead_actors(actors)
    raise ActorsLost(message(dead), dead)


def dead_actors(actors: list, timeout_s: float = 60.0) -> list[int]:
    """Indices of the actors that are dead or restarting: each is pinged once, all at the same
    time; one that has not answered within `timeout_s` (busy) counts as alive."""
    pings = [actor.info.remote() for actor in actors]
    answered, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
    answered = set(answered)
    dead = []
    for i, ping in enumerate(pings):
        if ping not in answered:
            continue
        try:
            ray.get(ping)  # answered: returns at once, or raises how the actor failed
        except RayActorError:
            dead.append(i)
    return dead


def remote_error(error: RayTaskError, lost: str | None) -> BaseException:
    """The error to raise for a call that raised inside an actor: our own errors as they are
    (one line for the user), an actor it called being gone as `ShardLost(lost)`, anything else
    (a bug) as Ray reports it."""
    if isinstance(error.cause, DistbeliefError):
        return error.cause
    if lost is not None and isinstance(error.cause, RayActorError):
        return ShardLost(lost)
    return error


class RayPending:
    """Ray calls in flight whose results are combined by `combine` once all have arrived (the
    pending-call protocol of `distributed.pending`)."""

    def __init__(self, refs: list, combine):
        self.refs, self.combine, self._done = refs, combine, False
        self._result, self._have_result = None, False

    def done(self) -> bool:
        if not self._done:
            ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
            self._done = len(ready) == len(self.refs)
        return self._done

    def result(self):
        if not self._have_result:  # kept: a push that also pulled is read twice
            self._result, self._have_result = self.combine(ray.get(self.refs)), True
        return self._result


def _raise(r: int, tag, error: BaseException) -> None:
    raise error


class ReplicaCalls:
    """Calls to replica actors in flight, each death of a replica turned into one failure.

    `submit(r, method, *args, tag=...)` calls replica r; `wait(timeout)` returns
    [(r, tag, result)] for calls completed by then (at most one per wait). When a call fails
    because its replica died, `book` (an `engine.lifecycle.FailureBook`) counts one failure and
    decides whether Ray restarts it; the replica's other calls in flight fail with it and are
    dropped; `on_failure(r, tags, restarted)` tells the scheme which work was lost (the failed
    call's tag first). A restarting replica gets no calls (`ready(r)` is False) until it answers
    a ping, then `on_recovered(r)`: calls handed to an actor Ray is restarting fail at once,
    and would otherwise count one death many times.

    A call that raised inside its replica goes to `on_error(r, tag, error)` (`remote_error`;
    `lost` is the message for a shard that is gone), which raises it unless told otherwise;
    an error with a true `replica_failure` attribute (a partition of the replica died) counts
    as the replica's death.
    """

    def __init__(self, actors: list, book, *, lost: str, position, on_failure,
                 on_recovered=lambda r: None, on_error=None):
        self.actors, self.book, self.lost, self.position = actors, book, lost, position
        self.on_failure, self.on_recovered = on_failure, on_recovered
        self.on_error = on_error or _raise
        self.inflight: dict = {}  # ObjectRef -> (replica, tag)
        self.recovering: dict = {}  # ObjectRef of a ping -> replica Ray is restarting

    def submit(self, r: int, method: str, *args, tag=None) -> None:
        self.inflight[getattr(self.actors[r], method).remote(*args)] = (r, tag)

    def ready(self, r: int) -> bool:
        """Whether replica r may get calls: not given up, not restarting."""
        return r in self.book.alive and r not in self.recovering.values()

    def busy(self) -> set[int]:
        return {r for r, _ in self.inflight.values()}

    @property
    def empty(self) -> bool:
        return not self.inflight and not self.recovering

    def wait(self, timeout: float) -> list[tuple]:
        waiting = list(self.inflight) + list(self.recovering)
        if not waiting:
            return []
        ready, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        done = []
        for ref in ready:
            if ref in self.recovering:
                self._pinged(ref)
            elif ref in self.inflight:
                r, tag = self.inflight.pop(ref)
                try:
                    done.append((r, tag, ray.get(ref)))
                except RayTaskError as e:
                    error = remote_error(e, self.lost)
                    if getattr(error, "replica_failure", False):
                        self._died(r, tag, error)  # a part of the replica died: the same
                    else:
                        self.on_error(r, tag, error)
                except RayActorError as e:
                    self._died(r, tag, e)
        return done

    def _died(self, r: int, tag, error: BaseException) -> None:
        dropped = [ref for ref, (who, _) in self.inflight.items() if who == r]
        tags = [tag] + [self.inflight.pop(ref)[1] for ref in dropped]
        restarted = self.book.replica_failed(r, error, self.position())
        self.on_failure(r, tags, restarted)
        if restarted:
            self.recovering[self.actors[r].info.remote()] = r

    def _pinged(self, ref) -> None:
        r = self.recovering.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:  # still restarting: ask again shortly
            time.sleep(0.05)
            self.recovering[self.actors[r].info.remote()] = r
        except RayActorError as e:  # it died again while restarting: a new failure
            self._died(r, None, e)
        except RayTaskError as e:  # a part of it is gone for good (partitioned replicas)
            self._died(r, None, e)
        else:
            self.on_recovered(r)
