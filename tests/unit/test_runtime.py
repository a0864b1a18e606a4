"""The agent runtime both agents run on: dispatch, supervision, sessions, rolling figures."""

from __future__ import annotations

import asyncio
import logging

import pytest

from checkpointer import protocol as proto
from checkpointer.runtime import Rolling, Runtime

log = logging.getLogger("test.runtime")


class Role:
    def __init__(self) -> None:
        self.done: list = []

    def _do_SendHeartbeat(self, command) -> None:
        self.done.append(command)


def test_a_command_without_a_handler_fails_when_the_role_is_bound() -> None:
    with pytest.raises(TypeError, match="Role has no handler for SendAck, Failover"):
        Runtime(Role(), log, [proto.SendHeartbeat, proto.SendAck, proto.Failover])


def test_commands_run_in_order_and_log_commands_reach_the_log(caplog) -> None:
    role = Role()
    runtime = Runtime(role, log, [proto.SendHeartbeat, proto.Log])
    with caplog.at_level(logging.INFO, logger="test.runtime"):
        runtime.execute([proto.SendHeartbeat(), proto.Log(proto.LogLevel.WARNING, "careful"), proto.SendHeartbeat()])
    assert role.done == [proto.SendHeartbeat(), proto.SendHeartbeat()]
    assert [(r.levelname, r.message) for r in caplog.records] == [("WARNING", "careful")]


@pytest.mark.asyncio
async def test_a_failing_task_stops_the_agent_with_its_error_and_the_stop_still_runs() -> None:
    runtime = Runtime(Role(), log, [])
    stopped = []

    async def steady() -> None:
        await asyncio.Event().wait()

    async def broken() -> None:
        await asyncio.sleep(0)
        raise OSError("the disk is gone")

    async def on_stop() -> None:
        stopped.append(True)

    await asyncio.wait_for(runtime.run([steady, broken], on_stop), 10)
    assert stopped == [True] and runtime.last_error == "OSError('the disk is gone')"
    assert runtime.spawn(steady()) is None            # nothing runs once the group is gone


@pytest.mark.asyncio
async def test_cancelling_a_session_leaves_the_agent_running() -> None:
    runtime = Runtime(Role(), log, [])
    outcome = {}

    async def main_loop() -> None:
        session = runtime.spawn(asyncio.Event().wait(), session=True)
        other = runtime.spawn(asyncio.Event().wait())
        await asyncio.sleep(0)
        runtime.cancel_session()
        await asyncio.gather(session, return_exceptions=True)
        outcome.update(session=session.cancelled(), other=other.done(), sessions=runtime.session_tasks())
        runtime.stop()

    async def on_stop() -> None:
        pass

    await asyncio.wait_for(runtime.run([main_loop], on_stop), 10)
    assert outcome == {"session": True, "other": False, "sessions": []} and runtime.last_error is None


def test_rolling_figures_over_a_window_and_a_horizon() -> None:
    figures = Rolling(window=4)
    for t, value in [(0.0, 100.0), (1.0, 1.0), (8.0, 2.0), (9.0, 3.0), (10.0, 4.0)]:
        figures.add(value, now=t)
    assert len(figures) == 4                            # the oldest fell out of the window
    assert figures.percentile(50) == pytest.approx(2.5)
    count, total, span = figures.recent(5.0, now=10.0)
    assert (count, total, span) == (3, 9.0, 2.0)        # 8, 9 and 10 s; they span 2 s
    assert Rolling().rate() == 0.0 and Rolling().percentile(99) == 0.0


@pytest.mark.asyncio
async def test_the_stop_runs_once_and_whole_when_a_task_fails_during_it() -> None:
    runtime = Runtime(Role(), log, [])
    calls = []
    failing = asyncio.Event()

    async def fails_when_told() -> None:
        await failing.wait()
        raise ValueError("late failure")

    async def on_stop() -> None:
        calls.append("start")
        failing.set()                                   # a task fails while the stop is under way
        for _ in range(10):                             # (turns of the loop for the failure to land)
            await asyncio.sleep(0)
        calls.append("end")

    async def stop_soon() -> None:
        runtime.stop()

    await asyncio.wait_for(runtime.run([fails_when_told, stop_soon], on_stop), 10)
    assert calls == ["start", "end"] and runtime.last_error == "ValueError('late failure')"


@pytest.mark.asyncio
async def test_a_cancelled_agent_still_closes_what_it_opened() -> None:
    runtime = Runtime(Role(), log, [])
    calls = []

    async def idle() -> None:
        await asyncio.Event().wait()

    async def on_stop() -> None:
        calls.append("stopped")

    running = asyncio.ensure_future(runtime.run([idle], on_stop))
    for _ in range(3):                                  # let it start its group
        await asyncio.sleep(0)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert calls == ["stopped"]


# --- Channel: a ZeroMQ socket on the loop without zmq.asyncio ------------------------------------

def _pair(hwm: int = 0):
    import zmq
    import zmq.asyncio
    context = zmq.asyncio.Context()
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    server.setsockopt(zmq.RCVHWM, hwm)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client = context.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    client.setsockopt(zmq.SNDHWM, hwm)
    client.connect(f"tcp://127.0.0.1:{port}")
    return context, server, client


async def _until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.001)


@pytest.mark.asyncio
async def test_a_channel_hands_every_waiting_message_over_in_order_both_ways() -> None:
    from checkpointer.runtime import Channel
    context, server, client = _pair()
    got_server, got_client = [], []
    inbound = Channel(server, lambda parts: got_server.append([bytes(p) for p in parts]), copy=False)
    outbound = Channel(client, lambda parts: got_client.append(parts))
    try:
        for i in range(200):                          # more than a turn's BUDGET, sent back to back
            assert outbound.try_send([b"m%d" % i])
        await _until(lambda: len(got_server) == 200)
        assert [m[1] for m in got_server] == [b"m%d" % i for i in range(200)]
        identity = got_server[0][0]
        for i in range(5):                            # answers, as a replica's acks
            assert inbound.try_send([identity, b"a%d" % i])
        await _until(lambda: len(got_client) == 5)
        assert got_client == [[b"a%d" % i] for i in range(5)]
    finally:
        inbound.close()
        outbound.close()
        server.close()
        client.close()
        context.term()


@pytest.mark.asyncio
async def test_a_channel_keeps_the_order_of_sends_that_found_no_room() -> None:
    """Once one message waits in the channel's queue, every later one goes behind it, also one
    that ZeroMQ would have room for: a later number never leaves first."""
    import zmq
    from checkpointer.runtime import Channel
    context, server, client = _pair(hwm=1)
    received = []
    outbound = Channel(client, lambda parts: None)
    try:
        sent = 0
        while outbound.try_send([b"%d" % sent]):      # fill ZeroMQ's pipe (no reader yet)
            sent += 1
            assert sent < 100000
        queued = [outbound.enqueue([b"%d" % i]) for i in range(sent, sent + 20)]
        assert not outbound.try_send([b"late"])       # behind the queue, not past it
        later = asyncio.ensure_future(outbound.send([b"%d" % (sent + 20)]))
        inbound = Channel(server, lambda parts: received.append(bytes(parts[1])), copy=False)
        await asyncio.wait_for(asyncio.gather(*queued, later), 5)
        await _until(lambda: len(received) == sent + 21)
        assert received == [b"%d" % i for i in range(sent + 21)]
        inbound.close()
    finally:
        outbound.close()
        server.close()
        client.close()
        context.term()


@pytest.mark.asyncio
async def test_a_closing_channel_fails_the_sends_it_still_holds() -> None:
    import zmq
    from checkpointer.runtime import Channel
    context, server, client = _pair(hwm=1)
    outbound = Channel(client, lambda parts: None)
    try:
        while outbound.try_send([b"fill"]):
            pass
        waiting = outbound.enqueue([b"x"])
        outbound.close()
        with pytest.raises(zmq.ZMQError):
            await waiting
        with pytest.raises(zmq.ZMQError):
            await outbound.enqueue([b"y"])
    finally:
        outbound.close()
        server.close()
        client.close()
        context.term()
