"""The primary's control interface: JSON requests over a ZeroMQ REP socket (colo-tune uses it).

    {"get": "triggers"}            -> {"ok": true, "triggers": {...}}
    {"get": "status"}              -> {"ok": true, "status": {...}}
    {"set": {"dirty_pages": 512}}  -> {"ok": true, "triggers": {...}}   checked like the config file
    {"reset": "stats"}             -> {"ok": true}                      measure a new setting afresh

A bad request changes nothing and gets {"ok": false, "error": "..."} naming the problem.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

import zmq
import zmq.asyncio

from ring.errors import ConfigError

log = logging.getLogger("colo.primary")


class ControlServer:
    """Answers control requests with the agent's callbacks, one request at a time."""

    def __init__(self, context: zmq.asyncio.Context, endpoint: str, *, config, get_triggers: Callable[[], dict],
                 set_triggers: Callable[[dict], dict], status: Callable[[], dict],
                 reset_stats: Callable[[], None]) -> None:
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(endpoint[:-2] + ":*" if endpoint.endswith(":0") else endpoint)
        except zmq.ZMQError as exc:
            self.socket.close(linger=0)
            raise config.error("primary.control", f"cannot listen on {endpoint}: {exc.strerror}") from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._get_triggers, self._set_triggers = get_triggers, set_triggers
        self._status, self._reset_stats = status, reset_stats

    def answer(self, raw: bytes) -> dict:
        """The reply to one request (never raises for a bad request)."""
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ConfigError("a request is a JSON object")
            if "set" in request:
                if not isinstance(request["set"], dict):
                    raise ConfigError('"set" takes an object of [triggers] settings')
                return {"ok": True, "triggers": self._set_triggers(request["set"])}
            if request.get("get") == "triggers":
                return {"ok": True, "triggers": self._get_triggers()}
            if request.get("get") == "status":
                return {"ok": True, "status": self._status()}
            if request.get("reset") == "stats":
                self._reset_stats()
                return {"ok": True}
            raise ConfigError('expected {"get": "triggers" | "status"}, {"reset": "stats"} or {"set": {...}}')
        except (ValueError, TypeError) as exc:          # ConfigError is a ValueError
            return {"ok": False, "error": str(exc)}

    async def serve(self) -> None:
        log.info("control interface on %s", self.endpoint)
        try:
            while True:
                reply = self.answer(await self.socket.recv())
                await self.socket.send(json.dumps(reply).encode())
        finally:
            self.socket.close(linger=0)
