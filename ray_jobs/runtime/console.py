"""What a job shows the person who started it: one progress line, and the lines worth keeping.

On a terminal the progress is one line redrawn in place (counts, rate, errors, ETA); anywhere
else (a log file, `ray job logs`, CI) a redrawn line is noise, so the same line is printed as a
plain status line every `interval_s` seconds. Lines that matter later (a committed unit, a
summary) are printed with `note`, above the progress line on a terminal.

Everything goes to stderr, so stdout stays free for a command's machine-readable result.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_S = 0.2  # on a terminal, at most five redraws a second


class Progress:
    """Progress of a job over `total` items of `unit` (None: the total is not known)."""

    def __init__(self, title: str, total: int | None, unit: str, *, stream: TextIO | None = None,
                 interval_s: float = 30.0):
        self.title, self.total, self.unit = title, total, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.done = 0
        self.counts: dict[str, int] = {}
        self.started = time.monotonic()
        self._shown_at = self.started if not self.tty else 0.0
        self._drawn = False

    def advance(self, n: int = 0, **counts: int) -> None:
        """Add `n` finished items and to the named counters (windows=12, errors=1, ...)."""
        self.done += n
        for name, value in counts.items():
            self.counts[name] = self.counts.get(name, 0) + value
        self._maybe_show()

    def note(self, line: str) -> None:
        """Print a line that stays (above the progress line on a terminal)."""
        self._clear()
        print(line, file=self.stream, flush=True)
        if self.tty:
            self._draw()

    def close(self) -> None:
        """Show the final state once, and end the progress line."""
        if self.tty:
            self._draw()
            print(file=self.stream, flush=True)
            self._drawn = False
        else:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.title}: {self.done}{of} {self.unit}"]
        parts += [f"{value} {name}" for name, value in self.counts.items()]
        parts.append(f"{rate:.2f} {self.unit}/s")
        if self.total is not None and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        parts.append(f"elapsed {_clock(elapsed)}")
        return ", ".join(parts)

    def _maybe_show(self) -> None:
        now = time.monotonic()
        if self.tty and now - self._shown_at >= _REDRAW_S:
            self._draw()
        elif not self.tty and now - self._shown_at >= self.interval_s:
            print(self.line(), file=self.stream, flush=True)
            self._shown_at = now

    def _draw(self) -> None:
        self._shown_at = time.monotonic()
        self.stream.write("\r\x1b[2K" + self.line())
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[2K")
            self._drawn = False


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Relay:
    """Lines that Ray workers write for the person at the console, printed once by the driver.

    A worker's own stdout reaches the console only through Ray's log forwarding, which is off
    unless --verbose (`runtime.ensure_ray`); and with it on, Ray Train's patched `print` shows
    every line twice (once as stdout, once through Train's logger on stderr). So workers hand
    their lines to `sender` (picklable, goes in the train loop config), a queue actor that holds
    no CPU, and a thread of the driver prints them to `stream` (None: stdout at that moment) as
    they come. Use as a context manager around the work; leaving it prints what is left.
    """

    def __init__(self, stream: TextIO | None = None, *, poll_s: float = 0.5):
        import threading

        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a queue on a worker node would die with that node.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._stream = stream
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="console-relay", daemon=True)
        self._thread.start()

    @property
    def sender(self) -> "RelaySender":
        return RelaySender(self._queue)

    def __enter__(self) -> "Relay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        from ray.util.queue import Empty

        self._stop.set()
        self._thread.join()
        while True:
            try:
                self._print(self._queue.get_nowait())
            except Empty:
                break
        self._queue.shutdown()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self._print(self._queue.get(timeout=self._poll_s))
            except Empty:
                continue

    def _print(self, line: str) -> None:
        print(line, file=self._stream or sys.stdout, flush=True)


class RelaySender:
    """The worker's end of a Relay: `sender(line)`. Without its driver (gone, or closed), the line
    goes to this worker's own log: a console line is never worth failing the work for."""

    def __init__(self, queue):
        self._queue = queue

    def __call__(self, line: str) -> None:
        from ray.exceptions import RayActorError

        try:
            self._queue.put_nowait(line)
        except RayActorError:
            print(line, flush=True)
