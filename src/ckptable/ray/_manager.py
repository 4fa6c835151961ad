"""Actor managers: the groups of Ray actors that a checkpoint component may stand for.

A component of a checkpoint tree may be a *group of actors* that hold the same state
(RLlib's env runners, for example) instead of an object in the driver. ckptable reaches
such a group through the small ``ActorManager`` protocol, which RLlib's
``FaultTolerantActorManager`` satisfies as it is, and which ``RayActorManager`` (ckptable's
own manager over plain actor handles) implements.

The pieces, and how they fit together::

    ActorManager (Protocol)        healthy_actor_ids(), foreach_actor(func, ...)
    ├── RayActorManager            ckptable's: failures are never dropped, timeouts count
    └── FaultTolerantActorManager  RLlib's, accepted unchanged
    FaultAwareApply                mixin for actor classes: apply(func, ...), ping()
    CallResult                     one call's outcome: actor_id, ok, get()
    RemoteCallResults              the outcomes of one foreach_actor, in request order
    mark_unhealthy, call_error     duck-typed helpers that work with either manager

Differences from RLlib's manager, each on purpose:

- A call that times out is returned as a failed ``CallResult`` (a ``GetTimeoutError``) and
  its actor is marked unhealthy. RLlib silently leaves timed-out calls out of the results,
  so a caller that does not count them loses an actor's answer without noticing.
- ``CallResult.get()`` *raises* the error of a failed call, as ``ray.get`` and
  ``concurrent.futures.Future.result`` do. RLlib's ``CallResult.get()`` *returns* the
  error object, so ``[r.get() for r in results]`` mixes exceptions into the values. Use
  ``call_error(result)`` to read the error from either kind of result.
- ``remote_actor_ids=[]`` calls no actor; RLlib treats an empty list as "all actors".
  Unknown ids raise ``ValueError`` before any call is made.
- ``FaultAwareApply.apply`` lets an exception propagate; RLlib's exits the actor process.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import ray
from ray.actor import ActorHandle
from ray.exceptions import GetTimeoutError, RayError

__all__ = [
    "ActorManager",
    "CallResult",
    "CallResultLike",
    "FaultAwareApply",
    "RayActorManager",
    "RemoteCallResults",
    "call_error",
    "mark_unhealthy",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What ``foreach_actor`` runs on each actor: a function called as ``func(actor,
#: **kwargs)`` inside the actor (through its ``apply`` method), or the name of an actor
#: method called as ``actor.<name>(**kwargs)``.
ActorFunc = Callable[..., Any] | str


@runtime_checkable
class CallResultLike(Protocol):
    """One actor call's outcome, as both ckptable's and RLlib's managers return it.

    ``get()`` returns the value of a successful call. For a failed call (``ok`` is
    False) ckptable's ``CallResult.get()`` raises the error and RLlib's returns it;
    ``call_error(result)`` reads it from either.
    """

    @property
    def actor_id(self) -> int: ...

    @property
    def ok(self) -> bool: ...

    def get(self) -> Any: ...


@runtime_checkable
class ActorManager(Protocol):
    """What a checkpoint component held by a group of Ray actors must offer.

    ckptable saves such a component from one healthy actor and restores it into every
    healthy actor, so it needs only two methods:

    - ``healthy_actor_ids()``: the ids of the actors that are in service.
    - ``foreach_actor(func, *, remote_actor_ids=None, timeout_seconds=...)``: run ``func``
      (called as ``func(actor)`` inside each actor, or an actor method's name) on the
      given actors, and return one ``CallResultLike`` per answer, each naming its
      ``actor_id``. RLlib's manager leaves calls that timed out out of the results, so
      callers must check that every actor they asked answered; and it reads
      ``remote_actor_ids=[]`` as "all actors", so never pass it an empty list.

    Optional: ``set_actor_state(actor_id, healthy: bool)`` takes an actor out of service
    (or brings it back). ckptable calls it through ``mark_unhealthy`` when an actor
    fails during a save or restore. Both managers have it.

    Both ``RayActorManager`` and RLlib's ``FaultTolerantActorManager`` also accept
    ``kwargs=`` (one dict of keyword arguments for every call): Ray resolves
    ``ObjectRef`` values passed there before the call, so a large state can be put in the
    object store once and shared by all actors instead of being pickled into every call.
    """

    def healthy_actor_ids(self) -> list[int]: ...

    def foreach_actor(
        self,
        func: Any,
        *,
        remote_actor_ids: list[int] | None = ...,
        timeout_seconds: float | None = ...,
    ) -> Iterable[CallResultLike]: ...


def mark_unhealthy(manager: object, actor_id: int) -> bool:
    """Take ``actor_id`` out of service through ``manager.set_actor_state`` if the manager
    has one; return whether it could. An id unknown to the manager raises its error
    (``ValueError`` for both ckptable's and RLlib's managers)."""
    set_actor_state = getattr(manager, "set_actor_state", None)
    if not callable(set_actor_state):
        return False
    set_actor_state(actor_id, healthy=False)
    return True


def call_error(result: CallResultLike) -> BaseException | None:
    """The error of a failed call result from any manager, ``None`` for a successful one.

    Needed because the two managers disagree on ``get()`` for a failed call: ckptable's
    raises the error, RLlib's returns it.
    """
    if result.ok:
        return None
    if isinstance(result, CallResult):
        return result.error
    try:
        error = result.get()
    except Exception as raised:
        return raised
    if isinstance(error, BaseException):
        return error
    return RuntimeError(f"the call to actor {result.actor_id} failed: {error!r}")


class FaultAwareApply:
    """Mixin for actor classes managed by ``RayActorManager`` (or RLlib's manager).

    Gives an actor the two methods both managers call: ``apply(func, *args, **kwargs)``
    runs ``func(self, *args, **kwargs)`` inside the actor, and ``ping()`` answers
    ``"pong"`` to health probes. Actors written for RLlib (subclasses of RLlib's
    ``FaultAwareApply``) already have both and need no change.

    Unlike RLlib's ``apply``, an exception raised by ``func`` propagates to the caller
    instead of ending the actor process (RLlib exits so that Ray restarts the actor from
    scratch). The manager marks the actor unhealthy either way; the difference is that
    the actor keeps its state. Exiting would throw away exactly the state a checkpoint
    exists to save, and whether an exception left the actor unusable is for the
    application to decide. RLlib's version also reads ``self.config`` (an env runner's
    config), which a general actor does not have.
    """

    def ping(self) -> str:
        """Answer a health probe."""
        return "pong"

    def apply(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``func(self, *args, **kwargs)`` in this actor and return its result.

        The first parameter is named ``func`` (not positional-only) because RLlib's
        manager passes it as ``apply.remote(func=...)``.
        """
        return func(self, *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class CallResult:
    """The outcome of one call to one actor: its value, or the error it failed with.

    ``error`` is what ``ray.get`` raised: for an exception raised by the called function,
    a ``RayTaskError`` that is also an instance of the user's exception class (so
    ``except ValueError`` works, and ``error.cause`` is the original exception); for an
    actor that died, a ``RayActorError``; for a call that timed out, a
    ``GetTimeoutError`` (also a ``TimeoutError``).
    """

    actor_id: int
    value: Any = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        if self.error is not None and self.value is not None:
            raise ValueError("a CallResult holds a value or an error, not both")

    @property
    def ok(self) -> bool:
        """Whether the call returned (``get()`` gives its value) rather than failed."""
        return self.error is None

    def get(self) -> Any:
        """The call's return value; raises the call's error if it failed."""
        if self.error is not None:
            raise self.error
        return self.value


class RemoteCallResults:
    """The outcomes of one ``foreach_actor`` call, one per actor called, in the order the
    actor ids were requested. Iterating yields every result, failed ones included."""

    def __init__(self, results: Iterable[CallResult] = ()) -> None:
        self._results = tuple(results)

    def __iter__(self) -> Iterator[CallResult]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def __getitem__(self, index: int) -> CallResult:
        return self._results[index]

    def ignore_errors(self) -> Iterator[CallResult]:
        """The successful results only."""
        return (result for result in self._results if result.ok)

    def errors(self) -> Iterator[CallResult]:
        """The failed results only."""
        return (result for result in self._results if not result.ok)

    def __repr__(self) -> str:
        failed = [result.actor_id for result in self.errors()]
        return f"RemoteCallResults({len(self._results)} results, failed actor ids: {failed})"


class _Default(enum.Enum):
    """Sentinel: "use the manager's timeout" (``None`` already means "wait forever")."""

    TIMEOUT = "the manager's timeout_seconds"


def _check_timeout(timeout_seconds: float | None) -> float | None:
    if timeout_seconds is None:
        return None
    timeout = float(timeout_seconds)
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout_seconds must be None or >= 0, got {timeout_seconds!r}")
    return timeout


def _pong(actor: Any) -> str:
    return "pong"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class RayActorManager:
    """A fault-tolerant group of Ray actors, addressed by integer ids.

    ckptable's counterpart of RLlib's ``FaultTolerantActorManager`` for any actor class
    with an ``apply(func, ...)`` method (see ``FaultAwareApply``; RLlib's actors have one).
    Ids are given in the order actors are added, starting at 0, and never reused.

    A call that fails for any reason marks its actor unhealthy (out of service) and comes
    back as a failed ``CallResult``: the actor died (``RayActorError``), the function
    raised (``RayTaskError``, also an instance of the user's exception class), or no
    answer came within the timeout (``GetTimeoutError``; the pending call is cancelled).
    Unhealthy actors are skipped by default until ``probe_unhealthy_actors`` (or a call
    with ``healthy_only=False, mark_healthy=True``) finds them answering again, for
    example after Ray restarted them (``max_restarts``). A restarted actor starts from
    its constructor: restore its state before relying on it.

    The manager lives in the driver and is not thread-safe.

    Args:
        actors: Handles of the actors to manage (``SomeActor.remote()``).
        timeout_seconds: How long ``foreach_actor`` and ``probe_unhealthy_actors`` wait
            for answers unless told otherwise; ``None`` waits forever.
    """

    def __init__(
        self, actors: Iterable[ActorHandle[Any]] = (), *, timeout_seconds: float | None = None
    ) -> None:
        self._timeout_seconds = _check_timeout(timeout_seconds)
        self._actors: dict[int, ActorHandle[Any]] = {}
        self._healthy: dict[int, bool] = {}
        self._next_id = 0
        self.add_actors(actors)

    @property
    def timeout_seconds(self) -> float | None:
        """The default timeout of ``foreach_actor`` and ``probe_unhealthy_actors``."""
        return self._timeout_seconds

    @property
    def actors(self) -> dict[int, ActorHandle[Any]]:
        """Every managed actor's handle by id (a copy)."""
        return dict(self._actors)

    def actor_ids(self) -> list[int]:
        """The ids of every managed actor, healthy or not, ascending."""
        return sorted(self._actors)

    def healthy_actor_ids(self) -> list[int]:
        """The ids of the actors in service, ascending."""
        return [actor_id for actor_id in self.actor_ids() if self._healthy[actor_id]]

    def num_actors(self) -> int:
        return len(self._actors)

    def num_healthy_actors(self) -> int:
        return sum(self._healthy.values())

    def add_actors(self, actors: Iterable[ActorHandle[Any]]) -> list[int]:
        """Manage ``actors`` too (they start healthy); return their new ids.

        Raises ``TypeError`` for anything that is not an actor handle and ``ValueError``
        for an actor already managed (it would be saved and restored twice).
        """
        handles = list(actors)
        managed = {handle: actor_id for actor_id, handle in self._actors.items()}
        seen: dict[ActorHandle[Any], int] = {}
        for index, handle in enumerate(handles):
            if not isinstance(handle, ActorHandle):
                raise TypeError(
                    f"actors[{index}] is a {type(handle).__name__}, not a Ray actor handle "
                    "(the result of SomeActor.remote())"
                )
            if handle in managed:
                raise ValueError(f"actors[{index}] is already managed under id {managed[handle]}")
            if handle in seen:
                raise ValueError(f"actors[{index}] is the same actor as actors[{seen[handle]}]")
            seen[handle] = index
        new_ids = []
        for handle in handles:
            self._actors[self._next_id] = handle
            self._healthy[self._next_id] = True
            new_ids.append(self._next_id)
            self._next_id += 1
        return new_ids

    def remove_actor(self, actor_id: int) -> ActorHandle[Any]:
        """Stop managing ``actor_id`` and return its handle (the actor is not killed)."""
        self._check_known([actor_id])
        del self._healthy[actor_id]
        return self._actors.pop(actor_id)

    def is_actor_healthy(self, actor_id: int) -> bool:
        self._check_known([actor_id])
        return self._healthy[actor_id]

    def set_actor_state(self, actor_id: int, healthy: bool) -> None:
        """Put ``actor_id`` in service (``healthy=True``) or take it out."""
        self._check_known([actor_id])
        self._healthy[actor_id] = bool(healthy)

    def foreach_actor(
        self,
        func: ActorFunc,
        *,
        kwargs: Mapping[str, Any] | None = None,
        healthy_only: bool = True,
        remote_actor_ids: Iterable[int] | None = None,
        timeout_seconds: float | _Default | None = _Default.TIMEOUT,
        mark_healthy: bool = False,
    ) -> RemoteCallResults:
        """Call ``func`` on each of the given actors at once and wait for every answer.

        Args:
            func: A function run inside each actor as ``actor.apply(func, **kwargs)``,
                so called as ``func(actor, **kwargs)``; or the name of an actor method,
                called as ``actor.<func>(**kwargs)``.
            kwargs: Keyword arguments for every call. ``ObjectRef`` values are resolved
                by Ray before the call, which shares one stored copy between actors.
            healthy_only: Skip the requested actors that are unhealthy (as RLlib does).
            remote_actor_ids: The actors to call, in the order results are wanted;
                ``None`` for all. Unknown ids raise ``ValueError`` before any call.
            timeout_seconds: How long to wait for all answers; ``None`` waits forever.
                Defaults to the manager's ``timeout_seconds``.
            mark_healthy: Put the actors that answered back in service (useful with
                ``healthy_only=False``).

        Returns:
            One ``CallResult`` per actor called, in request order. Failed calls (the
            actor died, ``func`` raised, or the timeout passed) are included, and their
            actors are marked unhealthy.
        """
        if not (isinstance(func, str) or callable(func)):
            raise TypeError(
                f"func must be a callable or an actor method name, got {type(func).__name__}"
            )
        if remote_actor_ids is None:
            actor_ids = self.actor_ids()
        else:
            actor_ids = list(remote_actor_ids)
            self._check_known(actor_ids)
        if healthy_only:
            actor_ids = [actor_id for actor_id in actor_ids if self._healthy[actor_id]]
        timeout = self._resolve_timeout(timeout_seconds)
        call_kwargs = dict(kwargs or {})
        if isinstance(func, str):
            # Resolve every method first: a wrong name fails before any call is made.
            methods = [getattr(self._actors[actor_id], func) for actor_id in actor_ids]
            refs = [method.remote(**call_kwargs) for method in methods]
        else:
            refs = [
                self._actors[actor_id].apply.remote(func, **call_kwargs) for actor_id in actor_ids
            ]
        return self._collect(actor_ids, refs, timeout, mark_healthy=mark_healthy)

    def probe_unhealthy_actors(
        self,
        timeout_seconds: float | _Default | None = _Default.TIMEOUT,
        mark_healthy: bool = True,
    ) -> list[int]:
        """Ping every unhealthy actor; return the ids of those that answered.

        Those are put back in service unless ``mark_healthy`` is False. An actor answers
        ``ping()`` if it has one (``FaultAwareApply`` and RLlib's actors do), otherwise
        ``apply`` is called with a function that answers ``"pong"``. Dead actors, and
        actors that do not answer within the timeout (defaults to the manager's), stay
        unhealthy.
        """
        unhealthy = [actor_id for actor_id in self.actor_ids() if not self._healthy[actor_id]]
        timeout = self._resolve_timeout(timeout_seconds)
        refs = []
        for actor_id in unhealthy:
            handle = self._actors[actor_id]
            if hasattr(handle, "ping"):
                refs.append(handle.ping.remote())
            else:
                refs.append(handle.apply.remote(_pong))
        results = self._collect(unhealthy, refs, timeout, mark_healthy=mark_healthy)
        return [result.actor_id for result in results.ignore_errors()]

    def __repr__(self) -> str:
        unhealthy = [actor_id for actor_id in self.actor_ids() if not self._healthy[actor_id]]
        return (
            f"{type(self).__name__}({self.num_actors()} actors, "
            f"unhealthy ids: {unhealthy}, timeout_seconds={self._timeout_seconds})"
        )

    def _check_known(self, actor_ids: Iterable[int]) -> None:
        unknown = [actor_id for actor_id in actor_ids if actor_id not in self._actors]
        if unknown:
            raise ValueError(
                f"unknown actor id(s) {unknown}; this manager has ids {self.actor_ids()}"
            )

    def _resolve_timeout(self, timeout_seconds: float | _Default | None) -> float | None:
        if isinstance(timeout_seconds, _Default):
            return self._timeout_seconds
        return _check_timeout(timeout_seconds)

    def _collect(
        self,
        actor_ids: list[int],
        refs: list[Any],
        timeout: float | None,
        *,
        mark_healthy: bool,
    ) -> RemoteCallResults:
        """Wait for the calls ``refs`` (one per entry of ``actor_ids``) up to ``timeout``
        and turn each into a ``CallResult``, updating the actors' health."""
        if not refs:
            return RemoteCallResults()
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout, fetch_local=True)
        ready_refs = set(ready)
        results = []
        for actor_id, ref in zip(actor_ids, refs, strict=True):
            if ref not in ready_refs:
                self._cancel(actor_id, ref)
                error: RayError = GetTimeoutError(
                    f"actor {actor_id} did not answer within {timeout} s; its call was "
                    "cancelled and the actor marked unhealthy"
                )
                results.append(self._failed(actor_id, error))
                continue
            try:
                value = ray.get(ref)
            except RayError as raised:
                results.append(self._failed(actor_id, raised))
                continue
            if mark_healthy and not self._healthy[actor_id]:
                logger.info("actor %d answered again; back in service", actor_id)
                self._healthy[actor_id] = True
            results.append(CallResult(actor_id, value=value))
        return RemoteCallResults(results)

    def _failed(self, actor_id: int, error: BaseException) -> CallResult:
        if self._healthy[actor_id]:
            logger.warning(
                "actor %d taken out of service: %s: %s",
                actor_id,
                type(error).__name__,
                _first_line(error),
            )
        self._healthy[actor_id] = False
        return CallResult(actor_id, error=error)

    @staticmethod
    def _cancel(actor_id: int, ref: Any) -> None:
        """Cancel a call that timed out: a queued call never runs; a running one sees
        ``ray.get_runtime_context().is_canceled()`` (async actors get a CancelledError)."""
        try:
            ray.cancel(ref)
        except Exception as error:  # best effort: the call may have just finished
            logger.debug("could not cancel the call to actor %d: %s", actor_id, error)


if TYPE_CHECKING:

    def _is_an_actor_manager(manager: RayActorManager) -> ActorManager:
        return manager

    def _is_a_call_result(result: CallResult) -> CallResultLike:
        return result
