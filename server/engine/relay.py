"""Hands the engine's outputs to their readers from a thread of its own, a step's worth at once.

The engine thread and the HTTP event loop share the GIL. When the engine woke the event loop
itself (`call_soon_threadsafe` writes a byte to the loop's self-pipe), the loop, woken on the
other core, often took the GIL while the engine's send was still returning, and the engine
then waited for the loop to format and write the token before it could prepare its next graph
call: py-spy put 6% of the engine thread's time, one stream over HTTP on the reference shape,
in that write (bench/RESULTS.md, "Outputs handed over off the engine thread"). Now the engine
collects a step's outputs and hands them here in one batch just before its next graph call
(or before it idles); this thread wakes each event loop once per batch, and the loop formats
the tokens while the graph runs with the GIL released. With many streams a step's 32 tokens
cost one wake-up instead of 32.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from parcae_serve.server.engine.sequence import StepOutput

__all__ = ["LoopSink", "OutputRelay", "deliver"]

log = logging.getLogger(__name__)

Emit = Callable[[StepOutput], None]


@dataclass(frozen=True)
class LoopSink:
    """An emit that puts outputs on an asyncio queue owned by `loop` (callable from any thread;
    the relay batches the outputs of every sink of one loop into one wake-up)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def __call__(self, out: StepOutput) -> None:
        _call_in(self.loop, _put_all, [(self.queue, out)])


class OutputRelay:
    """A thread that delivers batches of (emit, output) in order."""

    def __init__(self) -> None:
        self._batches: queue.SimpleQueue[list[tuple[Emit, StepOutput]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="parcae-relay", daemon=True)
        self._thread.start()

    def send(self, batch: list[tuple[Emit, StepOutput]]) -> None:
        """Queue a batch for delivery; returns at once (wakes the relay thread, not a loop)."""
        self._batches.put(batch)

    def stop(self, timeout: float = 5) -> None:
        """Deliver what was sent, then end the thread."""
        self._batches.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, items = self._batches.get(), []
            while True:  # with whatever else arrived meanwhile, in order
                if batch is None:
                    stopping = True
                else:
                    items += batch
                try:
                    batch = self._batches.get_nowait()
                except queue.Empty:
                    break
            deliver(items)


def deliver(batch: list[tuple[Emit, StepOutput]]) -> None:
    """Call each emit with its output, in order; a loop's sinks get one wake-up together."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput]]] = {}
    for emit, out in batch:
        if isinstance(emit, LoopSink):
            by_loop.setdefault(emit.loop, []).append((emit.queue, out))
            continue
        try:
            emit(out)
        except Exception:  # a reader's bug must not stop every other reader's outputs
            log.exception("an output's reader failed")
    for loop, items in by_loop.items():
        _call_in(loop, _put_all, items)


def _call_in(loop: asyncio.AbstractEventLoop, fn: Callable, *args: object) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to read
        loop.call_soon_threadsafe(fn, *args)


def _put_all(items: list[tuple[asyncio.Queue, StepOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)
