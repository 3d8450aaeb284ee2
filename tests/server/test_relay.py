"""Outputs leave the engine through the relay thread: in order, one wake-up per event loop and
batch, none lost when the engine idles or stops, and a failing reader harms no other."""

from __future__ import annotations

import asyncio
import threading

from parcae_serve.server.engine.engine import Engine
from parcae_serve.server.engine.relay import LoopSink, OutputRelay, deliver
from parcae_serve.server.engine.sequence import StepOutput
from tests.helpers import random_model
from tests.server.test_engine import ZERO_INIT, greedy, make_engine


class CountingLoop:
    """Stands in for an event loop: records each cross-thread call instead of running it."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def call_soon_threadsafe(self, fn, *args) -> None:
        self.calls.append((fn, args))

    def run_calls(self) -> None:
        for fn, args in self.calls:
            fn(*args)


def test_one_wake_up_per_loop_and_batch_in_order() -> None:
    loop_a, loop_b = CountingLoop(), CountingLoop()
    q1, q2, q3 = asyncio.Queue(), asyncio.Queue(), asyncio.Queue()
    outs = [StepOutput(token=i) for i in range(5)]
    sinks = [LoopSink(loop_a, q1), LoopSink(loop_a, q2), LoopSink(loop_b, q3),
             LoopSink(loop_a, q1), LoopSink(loop_b, q3)]  # fmt: skip
    deliver(list(zip(sinks, outs, strict=True)))
    assert len(loop_a.calls) == 1 and len(loop_b.calls) == 1
    loop_a.run_calls()
    loop_b.run_calls()
    drained = [[q.get_nowait().token for _ in range(q.qsize())] for q in (q1, q2, q3)]
    assert drained == [[0, 3], [1], [2, 4]]


def test_a_closed_loop_or_a_failing_reader_stops_no_other_reader() -> None:
    closed = asyncio.new_event_loop()
    closed.close()
    seen: list[int] = []

    def broken(out: StepOutput) -> None:
        raise ValueError("reader bug")

    batch = [(LoopSink(closed, asyncio.Queue()), StepOutput(token=1)), (broken, StepOutput(token=2)),
             (lambda out: seen.append(out.token), StepOutput(token=3))]  # fmt: skip
    deliver(batch)
    assert seen == [3]


def test_the_relay_delivers_everything_sent_before_it_stops_in_order() -> None:
    seen: list[tuple[str, int]] = []
    relay = OutputRelay()

    def emit(out: StepOutput) -> None:
        seen.append((threading.current_thread().name, out.token))

    for start in range(0, 300, 3):
        relay.send([(emit, StepOutput(token=t)) for t in range(start, start + 3)])
    relay.stop()
    assert [t for _, t in seen] == list(range(300))
    assert {name for name, _ in seen} == {"parcae-relay"}


def test_the_engine_thread_hands_its_outputs_to_the_relay() -> None:
    """Every output, the finishing one too (sent as the engine goes idle), reaches the reader
    from the relay thread, never from the engine's own."""
    engine = make_engine()
    try:
        seen: list[tuple[str, StepOutput]] = []
        done = threading.Event()

        def emit(out: StepOutput) -> None:
            seen.append((threading.current_thread().name, out))
            if out.finish_reason is not None:
                done.set()

        engine.submit(greedy(3, max_tokens=6), emit)
        assert done.wait(30)
        assert {name for name, _ in seen} == {"parcae-relay"}
        assert [o.finish_reason for _, o in seen] == [None] * 5 + ["length"]
        assert len([o for _, o in seen if o.token is not None]) == 6
        assert engine.pending == 0
    finally:
        engine.stop()


def test_an_engine_stepped_by_hand_delivers_each_output_in_the_step_that_made_it() -> None:
    """Never started, or stopped: no relay and no idle hand-over, so a caller stepping until
    its last output arrives must see it (an output left queued there would loop forever)."""
    stopped = make_engine()
    stopped.stop()  # from here on, stepped by hand
    never_started = Engine(random_model(ZERO_INIT), stopped.config)
    for engine in (never_started, stopped):
        seen: list[tuple[str, StepOutput]] = []

        def emit(out: StepOutput, into: list = seen) -> None:
            into.append((threading.current_thread().name, out))

        engine.submit(greedy(3, max_tokens=4), emit)
        for _ in range(50):  # 4 tokens take a handful of steps
            engine.step()
            if seen and seen[-1][1].finish_reason is not None:
                break
        assert [o.finish_reason for _, o in seen] == [None] * 3 + ["length"]
        assert {name for name, _ in seen} == {threading.current_thread().name}
