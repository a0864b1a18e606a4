"""The primary's control interface: [triggers] change at run time, bad values change nothing."""

from __future__ import annotations

import asyncio
import json

import pytest
import zmq
import zmq.asyncio

from checkpointer.agent import PrimaryAgent
from checkpointer.cluster import free_port
from checkpointer.config import load_config

pytestmark = pytest.mark.kvm


@pytest.mark.asyncio
async def test_triggers_change_at_run_time_and_bad_values_are_refused() -> None:
    config = load_config("primary", None, {
        "primary.replica": f"tcp://127.0.0.1:{free_port()}", "primary.control": "tcp://127.0.0.1:0",
        "security.insecure": True, "guest.vcpus": 1, "guest.memory_mib": 16, "guest.report_every": 0})
    agent = PrimaryAgent(config)
    task = asyncio.ensure_future(agent.run())
    context = zmq.asyncio.Context()
    client = context.socket(zmq.REQ)
    client.setsockopt(zmq.LINGER, 0)
    try:
        for _ in range(500):
            if agent.control_endpoint:
                break
            await asyncio.sleep(0.01)
        client.connect(agent.control_endpoint)

        async def ask(request: dict) -> dict:
            await client.send(json.dumps(request).encode())
            return json.loads(await asyncio.wait_for(client.recv(), 10))

        reply = await ask({"set": {"dirty_pages": 300, "max_interval_ms": 20.0}})
        assert reply["ok"] and reply["triggers"]["dirty_pages"] == 300
        assert agent.config.triggers.dirty_pages == 300 and agent.protocol.config.max_interval == 0.02
        reply = await ask({"set": {"dirty_pages": -1}})
        assert not reply["ok"] and "triggers.dirty_pages" in reply["error"]
        reply = await ask({"set": {"dirty_pagez": 5}})
        assert not reply["ok"] and "dirty_pagez" in reply["error"]
        assert agent.config.triggers.dirty_pages == 300                # nothing changed
        reply = await ask({"get": "status"})
        assert reply["ok"] and reply["status"]["role"] == "primary"
        reply = await ask({"frobnicate": 1})
        assert not reply["ok"] and "expected" in reply["error"]
    finally:
        client.close()
        context.term()
        agent.stop()
        await asyncio.wait_for(task, 30)
