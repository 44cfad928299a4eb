"""How a job ends when the cluster fails under it: in bounded time, with one line.

On a cluster of spot nodes a lost node is normal. Ray Data restarts a lost actor and retries its
tasks without limit, Ray Train restarts a lost worker group from its latest checkpoint, and both
then wait for the cluster to have room for them again: an autoscaler (or KubeRay replacing the
pod) gives it within minutes, a cluster that stays smaller never does, and a store that accepts
connections but never answers holds one request for minutes too. So every job watches its own
progress, and when nothing has moved for `--stall-timeout` seconds it stops with
`error: stalled: ...` and exit status 2, for the orchestrator (KubeRay, `ray job submit`, a
person) to run it again; the rerun finishes the work exactly once (committed units are kept,
training resumes from its latest checkpoint, the pools are sized from the cluster as it is then).

- `watched(batches)`: a stream that reaches the driver (infer, eval, the clip cache fill) is
  iterated in a thread of its own, because Ray's iterator blocks inside Ray where the driver
  cannot interrupt it; the driver waits for each batch at most the stall timeout.
- `Pulse` and `watched_call`: training batches reach the workers, never the driver, so every
  Ray Train worker beats a small actor on the driver's node while batches reach it, and the
  driver runs `fit()` in a thread and watches the beats. The same actor carries a worker's
  reason to stop the run (`Pulse.stop`): no clip could be read.
- `exit_in_bounded_time()`: after a stall, threads still blocked in Ray must not keep the process
  alive; if the normal exit does not end it within a grace period, `os._exit` does.
- `one_line(exc)`: the one-line GroupEmotionError behind an error that Ray wrapped (a task's
  RayTaskError, Ray Train's WorkerGroupError or ControllerError): a StorageError or other
  GroupEmotionError raised inside, a failure of the store `storage.classify` recognises, or a lost
  node that Ray could not recover from.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TypeVar

from groupemotion_core.errors import GroupEmotionError

T = TypeVar("T")

DEFAULT_STALL_TIMEOUT_S = 600.0
EXIT_GRACE_S = 60.0  # after a stall, the longest an orderly exit may take before os._exit



class Stalled(GroupEmotionError):
    """No progress for the stall timeout: the job gives up, and a rerun finishes its work."""

    def __init__(self, reason: str = "stalled", detail: str = ""):
        super().__init__(reason, detail)


def watched(batches: Iterable[T], timeout_s: float, what: str) -> Iterator[T]:
    """The items of `batches`, iterated in a thread of its own.

    Raises Stalled when the next item has not come `timeout_s` seconds after the caller asked for
    it, and the iteration's own failure as `one_line` reads it. Time the caller spends on an item
    does not count. Leaving early (an error, a stall) tells the thread to stop and close the
    iterator, which stops Ray Data's execution, unless the thread is stuck inside Ray: it is a
    daemon and ends with the process.
    """
    items: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(batches)
        try:
            for item in iterator:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the caller's thread, which raises it
            put(("error", e))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()

    thread = threading.Thread(target=produce, name=f"watched: {what}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = items.get(timeout=timeout_s)
            except queue.Empty:
                raise Stalled("stalled", f"no progress for {timeout_s:g} s ({what}); " + _RERUN) from None
            if kind == "end":
                return
            if kind == "error":
                raise one_line(value) or value
            yield value
    finally:
        stop.set()


_RERUN = ("a lost node the cluster has not replaced, or an object store that stopped answering; "
          "run the same command again to finish the work")


class Pulse:
    """Beats from Ray Train workers, counted by a small actor on the driver's node (which outlives
    any worker node), and the reason a worker gives for stopping the run."""

    def __init__(self):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = ray.get_runtime_context().get_node_id()
        self._actor = ray.remote(_Beats).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()

    def sender(self, every_s: float) -> "PulseSender":
        return PulseSender(self._actor, every_s)

    def beats(self) -> int:
        import ray

        return ray.get(self._actor.beats.remote())

    def stopped(self) -> GroupEmotionError | None:
        """The reason a worker stopped the run for, or None."""
        import ray

        stop = ray.get(self._actor.stopped.remote())
        return None if stop is None else GroupEmotionError(*stop)

    def close(self) -> None:
        import ray

        ray.kill(self._actor)


class _Beats:
    def __init__(self):
        self._beats = 0
        self._stop: tuple[str, str] | None = None

    def beat(self) -> None:
        self._beats += 1

    def beats(self) -> int:
        return self._beats

    def stop(self, reason: str, detail: str) -> None:
        if self._stop is None:
            self._stop = (reason, detail)

    def stopped(self) -> tuple[str, str] | None:
        return self._stop


class PulseSender:
    """The worker's end of a Pulse (picklable, goes in the train loop config): `beat()` at every
    batch sends at most one beat every `every_s` seconds, and does not wait for it."""

    def __init__(self, actor, every_s: float):
        self._actor = actor
        self._every_s = every_s
        self._last = 0.0

    def beat(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self._last = now
            self._actor.beat.remote()

    def stop(self, reason: str, detail: str) -> None:
        import ray

        ray.get(self._actor.stop.remote(reason, detail))


def watched_call(fn: Callable[[], T], pulse: Pulse, timeout_s: float, what: str, *, uri: str | None = None,
                 poll_s: float | None = None) -> T:
    """`fn()` run in a thread of its own, as long as `pulse` beats at least every `timeout_s`
    seconds (from the call on); raises Stalled otherwise, and fn's failure as `one_line` reads it
    (`uri`: what fn writes to)."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=call, name=f"watched: {what}", daemon=True)
    thread.start()
    poll_s = poll_s if poll_s is not None else min(5.0, timeout_s / 10)
    seen, moved = -1, time.monotonic()
    while thread.is_alive():
        thread.join(poll_s)
        beats = pulse.beats()
        now = time.monotonic()
        if beats != seen:
            seen, moved = beats, now
        elif now - moved > timeout_s and thread.is_alive():
            raise Stalled("stalled", f"no progress for {timeout_s:g} s ({what}); " + _RERUN)
    if "error" in outcome:
        error = outcome["error"]
        raise one_line(error, uri) or error
    return outcome["value"]


@contextlib.contextmanager
def exit_in_bounded_time(grace_s: float = EXIT_GRACE_S, status: int = 2) -> Iterator[None]:
    """Around a command's work: when a Stalled leaves the block, the process is ended with
    `status` after `grace_s` seconds, should the orderly exit (the CLI's error line, Python's
    joining of threads, Ray's shutdown at exit) not have ended it by then. For commands only:
    a library caller's process is not its to end."""
    try:
        yield
    except Stalled:
        def end() -> None:
            time.sleep(grace_s)
            sys.stderr.flush()
            os._exit(status)

        threading.Thread(target=end, name="bounded exit", daemon=True).start()
        raise


def one_line(exc: BaseException, uri: str | None = None, action: str = "writing") -> GroupEmotionError | None:
    """The GroupEmotionError behind `exc`, an error Ray may have wrapped, or None for a bug (which
    keeps its traceback). In order: a GroupEmotionError raised inside (a worker's StorageError
    keeps its reason); with `uri`, a store failure `storage.classify` recognises while `action`
    it (Ray Train's checkpoint uploads to --output); a node or worker Ray lost and could not
    recover from."""
    import ray.exceptions as rx

    causes = list(_causes(exc))
    for cause in causes:
        # Not Ray's copy of a task's error that is an instance of both (its `cause` comes next).
        if isinstance(cause, GroupEmotionError) and not isinstance(cause, rx.RayError):
            return cause
    if uri is not None:
        from ray_jobs.inputs import storage

        for cause in causes:
            error = storage.classify(cause, uri, action)
            if error is not None:
                return error
    lost = next((c for c in causes if _is_lost(c)), None)
    if lost is not None:
        first = (str(lost).strip().splitlines() or [""])[0][:300]
        return GroupEmotionError("worker_lost", f"Ray lost a worker or node and could not recover the work "
                                 f"({type(lost).__name__}: {first}); run the same command again to finish it")
    return None


def _is_lost(exc: BaseException) -> bool:
    import ray.exceptions as rx

    return isinstance(exc, (rx.RayActorError, rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
                            rx.LocalRayletDiedError))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps, outermost first: Python's causes and contexts, a RayTaskError's
    `cause`, Ray Train's worker failures, controller failure and user exception."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, BaseException):
            yield e
        inner = [getattr(e, name, None) for name in ("cause", "_base_exc", "controller_failure")]
        inner += list((getattr(e, "worker_failures", None) or {}).values())
        inner += [e.__cause__, e.__context__]
        todo.extend(i for i in inner if isinstance(i, BaseException))
