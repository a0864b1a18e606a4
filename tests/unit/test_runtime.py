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
