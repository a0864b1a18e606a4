"""The pair's discovery endpoint: a Redis Sentinel that knows one master, the active node.

Clients of the protected service must find the active node without being told which one it
is. Redis clients already know how to ask a Sentinel for that, so the pair answers the few
Sentinel commands they send, with the address that `lookup` (the etcd lease, elsewhere) gives
now. Nothing here monitors or elects: the lease decides, this only reports.

Some facts about the clients that the answers rest on (checked against `redis-server
--sentinel` 7.0 and redis-py 8.1):

- redis-py 8 speaks RESP3 unless told `protocol=2`: every connection opens with `HELLO 3`
  and fails unless the answer is a map whose `proto` is 3. It then may send `CLIENT
  MAINT_NOTIFICATIONS ...` and `CLIENT SETINFO LIB-NAME|LIB-VER ...`, and tolerates an error
  for each (a 7.0 Sentinel answers "unknown subcommand" to both; this one accepts SETINFO).
  With `protocol=2` there is no HELLO. redis-cli sends nothing before the command.
- `Sentinel.discover_master(name)` sends `SENTINEL MASTERS` and takes the entry whose `name`
  is `name` only if its `flags` contain `master` and neither `s_down` nor `o_down`, and its
  `num-other-sentinels` is at least `min_other_sentinels` (0 by default); it then returns
  that entry's `ip` and `port`. A name absent from the list raises MasterNotFoundError.
- So with no active node the master is simply absent, which is how a Sentinel answers for a
  name it does not monitor: MASTERS omits it, GET-MASTER-ADDR-BY-NAME answers a null array,
  MASTER, REPLICAS and SENTINELS answer "No such master with that name".
- Every value of a master entry is a bulk string, in both protocols; RESP3 sends each entry
  as a map, RESP2 as a flat array of name/value pairs.
- A request the parser cannot accept gets `-ERR Protocol error: ...` and the connection is
  closed after the reply, as Redis does: after a framing error nothing that follows on the
  stream can be trusted to start a command.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import secrets
import socket
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from itertools import count
from typing import Self

__all__ = ["MASTER_NAME", "SentinelServer", "RequestParser", "ProtocolError", "split_inline", "Status", "Error", "Null", "encode",
           "MAX_ARGS", "MAX_REQUEST_BYTES", "MAX_INLINE_BYTES", "MAX_CLIENTS"]

log = logging.getLogger("colo.sentinel")

Address = tuple[str, int]
Lookup = Callable[[], Awaitable[Address | None] | Address | None]

MASTER_NAME = "colo"            # the name a protected pair's clients ask for (pair.node serves it)
MAX_ARGS = 1024                 # arguments in one request (a Sentinel request has at most 3)
MAX_REQUEST_BYTES = 1 << 20     # one argument, and all of one request's arguments together
MAX_INLINE_BYTES = 64 << 10     # an inline request line, and a `*`/`$` header line (Redis: 64 KiB)
MAX_CLIENTS = 1024              # connections served at once; the next one is told and closed
LOOKUP_TIMEOUT_S = 2.0          # an awaitable lookup slower than this counts as "no active node"
READ_SIZE = 64 << 10
VERSION = "7.0.0"               # the Sentinel whose answers these are (clients pick features by it)


# -- requests ---------------------------------------------------------------------------------

class ProtocolError(Exception):
    """The client's bytes are not a request we accept; the message follows "Protocol error: "."""


_INTEGER = re.compile(rb"-?(0|[1-9][0-9]{0,18})")     # Redis's string2ll: no sign '+', no leading 0


def _integer(text: bytes) -> int | None:
    return int(text) if _INTEGER.fullmatch(text) else None


def _shown(byte: int) -> str:
    return chr(byte) if 0x20 < byte < 0x7f else f"\\x{byte:02x}"


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"
_SPACE = b" \t\n\r\v\f"                 # isspace(), where arguments may be separated


def split_inline(line: bytes) -> list[bytes]:
    """An inline request's arguments, split as Redis's sdssplitargs does (quotes, escapes).

    Redis accepts commands typed on a terminal (`PING`, `SENTINEL masters`); a quoted argument
    may hold spaces and, in double quotes, `\\n`-style and `\\xHH` escapes; a closing quote
    must end its argument.
    """
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i == n:
            return args
        current = bytearray()
        quote = 0                                   # 0, or the quote character we are inside
        while True:
            if quote and i == n:
                raise ProtocolError("unbalanced quotes in request")
            c = line[i] if i < n else 0
            if not quote:
                if i == n or c in b" \n\r\t":
                    break
                if c in b"\"'":
                    quote = c
                else:
                    current.append(c)
            elif c == quote:                        # the closing quote ends the argument
                if i + 1 < n and line[i + 1] not in _SPACE:
                    raise ProtocolError("unbalanced quotes in request")
                i += 1
                break
            elif quote == ord('"') and c == ord("\\") and i + 1 < n:
                if line[i + 1] == ord("x") and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    current.append(int(line[i + 2:i + 4], 16))
                    i += 2
                else:
                    current += _ESCAPES.get(line[i + 1], line[i + 1:i + 2])
                i += 1
            elif quote == ord("'") and c == ord("\\") and i + 1 < n and line[i + 1] == ord("'"):
                current.append(ord("'"))
                i += 1
            else:
                current.append(c)
            i += 1
        args.append(bytes(current))


class RequestParser:
    """Requests out of a byte stream that arrives in pieces (sans-I/O: `feed`, then `next_request`).

    Both Redis request forms: multibulk (`*N` then N `$len` arguments, what clients send) and
    inline (a line, what a terminal sends). Empty lines and `*0` are skipped, as Redis does.
    The parser is incremental: what is parsed stays parsed and a line is searched only past
    where the last search ended, so a request that trickles in a byte at a time costs no more
    than one that comes at once. The limits are checked on the headers, so a request declared
    too big fails before its bytes arrive, and the buffer holds one request plus one read.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0                     # the first byte not yet parsed
        self._scanned = 0                   # no line ends before this (the current line's search)
        self._args: list[bytes] | None = None   # the multibulk request being read, if any
        self._expected = 0                  # its argument count
        self._total = 0                     # its bytes declared so far
        self._bulk: int | None = None       # the declared length of the argument being read

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buffer[:self._start]
            self._scanned = max(0, self._scanned - self._start)
            self._start = 0
        self._buffer += data

    def next_request(self) -> list[bytes] | None:
        """The next complete request's arguments, or None until more bytes are fed."""
        buffer = self._buffer
        while True:
            if self._args is None:
                if self._start >= len(buffer):
                    return None
                if buffer[self._start] != ord("*"):
                    args = self._inline()
                    if args is None:
                        return None
                    if args:
                        return args
                    continue
                count_text = self._line(1, "mbulk count string")
                if count_text is None:
                    return None
                n = _integer(count_text)
                if n is None or n > MAX_ARGS:
                    raise ProtocolError("invalid multibulk length")
                if n > 0:
                    self._args, self._expected, self._total = [], n, 0
                continue
            if self._bulk is None:
                if self._start >= len(buffer):
                    return None
                if buffer[self._start] != ord("$"):
                    raise ProtocolError(f"expected '$', got '{_shown(buffer[self._start])}'")
                length_text = self._line(1, "bulk count string")
                if length_text is None:
                    return None
                length = _integer(length_text)
                if length is None or length < 0 or self._total + length > MAX_REQUEST_BYTES:
                    raise ProtocolError("invalid bulk length")
                self._bulk = length
                self._total += length
            end = self._start + self._bulk
            if len(buffer) < end + 2:
                return None
            if buffer[end:end + 2] != b"\r\n":
                raise ProtocolError("expected CRLF after bulk data")
            self._args.append(bytes(buffer[self._start:end]))
            self._start, self._bulk = end + 2, None
            if len(self._args) == self._expected:
                args, self._args = self._args, None
                return args

    def _find_line_end(self, separator: bytes, too_big: str) -> int | None:
        """Where the line at _start ends (its separator's index), or None until it is complete."""
        start = self._start
        end = self._buffer.find(separator, max(start, self._scanned), start + MAX_INLINE_BYTES + len(separator))
        if end < 0:
            if len(self._buffer) - start > MAX_INLINE_BYTES + len(separator) - 1:
                raise ProtocolError(too_big)
            self._scanned = max(start, len(self._buffer) - len(separator) + 1)   # a CR may await its LF
            return None
        return end

    def _line(self, skip: int, what: str) -> bytes | None:
        """A `*`/`$` header's text after its first `skip` bytes; _start moves past its CRLF."""
        end = self._find_line_end(b"\r\n", f"too big {what}")
        if end is None:
            return None
        text = bytes(self._buffer[self._start + skip:end])
        self._start = end + 2
        return text

    def _inline(self) -> list[bytes] | None:
        end = self._find_line_end(b"\n", "too big inline request")
        if end is None:
            return None
        line = bytes(self._buffer[self._start:end]).removesuffix(b"\r")
        self._start = end + 1
        if b"\0" in line:              # binary needs the multibulk form (Redis stalls on a NUL here)
            raise ProtocolError("NUL byte in inline request")
        args = split_inline(line)
        if len(args) > MAX_ARGS:
            raise ProtocolError("too many arguments in inline request")
        return args


# -- replies ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """A simple string reply (`+OK`)."""

    text: str


@dataclass(frozen=True)
class Error:
    """An error reply; `text` starts with its code (`ERR ...`, `NOPROTO ...`)."""

    text: str


class Null(Enum):
    """RESP2 has two nulls (a missing string, a missing array); RESP3 has one."""

    BULK = "$-1"
    ARRAY = "*-1"


Reply = Status | Error | Null | int | str | bytes | list["Reply"] | dict[str, "Reply"]


def encode(reply: Reply, protocol: int) -> bytes:
    """`reply` in RESP`protocol`: a dict is a map in RESP3 and a flat pair list in RESP2."""
    out: list[bytes] = []
    _encode(reply, protocol, out)
    return b"".join(out)


def _encode(reply: Reply, protocol: int, out: list[bytes]) -> None:
    if isinstance(reply, str):
        reply = reply.encode()
    if isinstance(reply, bytes):
        out += (b"$%d\r\n" % len(reply), reply, b"\r\n")
    elif isinstance(reply, Status):
        out.append(b"+%s\r\n" % _one_line(reply.text))
    elif isinstance(reply, Error):
        out.append(b"-%s\r\n" % _one_line(reply.text))
    elif isinstance(reply, Null):
        out.append(b"_\r\n" if protocol == 3 else reply.value.encode() + b"\r\n")
    elif isinstance(reply, int) and not isinstance(reply, bool):
        out.append(b":%d\r\n" % reply)
    elif isinstance(reply, list):
        out.append(b"*%d\r\n" % len(reply))
        for item in reply:
            _encode(item, protocol, out)
    elif isinstance(reply, dict):
        out.append(b"%%%d\r\n" % len(reply) if protocol == 3 else b"*%d\r\n" % (2 * len(reply)))
        for key, value in reply.items():
            _encode(key, protocol, out)
            _encode(value, protocol, out)
    else:
        raise TypeError(f"no RESP encoding for {reply!r}")


def _one_line(text: str) -> bytes:
    """A status or error is one line: a client's CR or LF echoed in it would end it early."""
    return text.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace")


def _text(arg: bytes) -> str:
    """A client's argument inside our messages, byte for byte (latin-1 round-trips any byte)."""
    return arg.decode("latin-1")


def _wrong_arity(command: str) -> Error:
    return Error(f"ERR wrong number of arguments for '{command}' command")


def _unknown_subcommand(container: str, sub: bytes) -> Error:
    return Error(f"ERR unknown subcommand '{_text(sub)[:128]}'. Try {container} HELP.")


def _unknown_command(args: list[bytes]) -> Error:
    """Redis's wording, with at most about 128 characters of the arguments."""
    shown = ""
    for arg in args[1:]:
        if len(shown) >= 128:
            break
        shown += f"'{_text(arg)[:128 - len(shown)]}' "
    return Error(f"ERR unknown command '{_text(args[0])[:128]}', with args beginning with: {shown}")


NO_SUCH_MASTER = Error("ERR No such master with that name")


def _valid_name(name: bytes) -> bool:
    """What Redis allows in a client name or library field: printable ASCII, no spaces."""
    return all(0x21 <= byte <= 0x7e for byte in name)


# -- the server -------------------------------------------------------------------------------

@dataclass
class _Session:
    """One connection's state: its id, the protocol its replies use, its client name."""

    id: int
    protocol: int = 2
    name: bytes | None = None


class SentinelServer:
    """A Sentinel endpoint on `host:port` for one master, `master_name`, at `lookup()`'s address.

    `lookup` is called on every question (a plain function must answer at once, e.g. from a
    cached value; an async one is given LOOKUP_TIMEOUT_S); None, a failure or a timeout all
    mean "no active node", and clients then see no master rather than a stale one.
    Use: `await start()` (port 0 picks a free port; the bound address is returned), then
    `serve_forever()` as one task of a TaskGroup; `close()`, or cancelling that task, stops
    listening and closes every client connection.
    """

    def __init__(self, host: str, port: int, master_name: str, lookup: Lookup, *,
                 max_clients: int = MAX_CLIENTS, lookup_timeout_s: float = LOOKUP_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.master_name = master_name
        self.lookup = lookup
        self.max_clients = max_clients
        self.lookup_timeout_s = lookup_timeout_s
        self.run_id = secrets.token_hex(20)         # SENTINEL MYID: 40 hex digits, like a Sentinel's
        self.address: Address | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task] = set()
        self._ids = count(1)
        self._closing = False
        self._closed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> Address:
        """Bind and listen; the bound address (the real port when `port` was 0)."""
        if self._server is not None:
            raise RuntimeError("the sentinel endpoint is already started")
        self._server = await asyncio.start_server(self._serve_client, self.host, self.port)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)
        log.info("sentinel endpoint for %r on %s:%d", self.master_name, host, port)
        return self.address

    async def serve_forever(self) -> None:
        """Serve until `close()`; starts first if needed. Cancelling it closes the endpoint."""
        if self._server is None:
            await self.start()
        try:
            await self._closed.wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop listening, close every client connection, and wait until their handlers ended."""
        self._closing = True            # a connection accepted meanwhile is closed at once
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._closed.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- connections -----------------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection, to its end; nothing a client does may stop the endpoint."""
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            if self._closing:
                return
            _keep_alive(writer)
            if len(self._clients) > self.max_clients:
                writer.write(b"-ERR max number of clients reached\r\n")
                await writer.drain()
                return
            await self._converse(reader, writer, _Session(next(self._ids)))
        except asyncio.CancelledError:
            pass            # close() ends us; asyncio would log a cancelled connection callback
        except (ConnectionError, TimeoutError):
            pass            # the client went away
        except Exception:
            log.exception("sentinel endpoint: a client connection failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        session: _Session) -> None:
        """Answer requests in the order they came, until the client leaves or must be dropped."""
        parser = RequestParser()
        while True:
            try:
                args = parser.next_request()
            except ProtocolError as error:
                writer.write(encode(Error(f"ERR Protocol error: {error}"), session.protocol))
                await writer.drain()
                return
            if args is None:
                data = await reader.read(READ_SIZE)
                if not data:
                    return
                parser.feed(data)
                continue
            reply = await self._execute(args, session)
            writer.write(encode(reply, session.protocol))
            await writer.drain()
            if args[0].lower() == b"quit":
                return

    # -- commands --------------------------------------------------------------------------
    async def _execute(self, args: list[bytes], session: _Session) -> Reply:
        name = args[0].lower()
        if name == b"ping":
            return _ping(args)
        if name == b"sentinel":
            return await self._sentinel(args)
        if name == b"hello":
            return self._hello(args, session)
        if name == b"client":
            return _client(args, session)
        if name == b"auth":
            return _auth(args)
        if name == b"quit":
            return Status("OK")
        return _unknown_command(args)

    async def active(self) -> Address | None:
        """The active node's service address now, or None (see the class docstring)."""
        try:
            found = self.lookup()
            if inspect.isawaitable(found):
                found = await asyncio.wait_for(found, self.lookup_timeout_s)
        except TimeoutError:
            log.warning("sentinel endpoint: lookup took over %.1f s: no master reported", self.lookup_timeout_s)
            return None
        except Exception:
            log.exception("sentinel endpoint: lookup failed: no master reported")
            return None
        if found is None:
            return None
        try:
            host, port = found
            return str(host), int(port)
        except (TypeError, ValueError):
            log.error("sentinel endpoint: lookup gave %r, not (host, port): no master reported", found)
            return None

    async def _master(self, name: bytes) -> Address | None:
        """The master's address if `name` is ours and a node is active."""
        if name != self.master_name.encode():
            return None
        return await self.active()

    def _entry(self, address: Address) -> dict[str, Reply]:
        """A master's state as SENTINEL MASTER(S) gives it, field for field.

        The timers are zero: this endpoint reports the lease's choice and monitors nothing.
        """
        ip, port = address
        return {
            "name": self.master_name, "ip": ip, "port": str(port), "runid": "", "flags": "master",
            "link-pending-commands": "0", "link-refcount": "1", "last-ping-sent": "0",
            "last-ok-ping-reply": "0", "last-ping-reply": "0", "down-after-milliseconds": "0",
            "info-refresh": "0", "role-reported": "master", "role-reported-time": "0",
            "config-epoch": "0", "num-slaves": "0", "num-other-sentinels": "0", "quorum": "1",
            "failover-timeout": "0", "parallel-syncs": "1",
        }

    async def _sentinel(self, args: list[bytes]) -> Reply:
        if len(args) < 2:
            return _wrong_arity("sentinel")
        sub = args[1].lower()
        arity = _SENTINEL_ARITY.get(sub)
        if arity is None:
            return _unknown_subcommand("SENTINEL", args[1])
        if len(args) != arity:
            return _wrong_arity(f"sentinel|{sub.decode()}")
        if sub == b"masters":
            address = await self.active()
            return [self._entry(address)] if address is not None else []
        if sub == b"myid":
            return self.run_id
        if sub == b"help":
            return [Status(line) for line in _SENTINEL_HELP]
        address = await self._master(args[2])
        if sub == b"get-master-addr-by-name":
            return [address[0], str(address[1])] if address is not None else Null.ARRAY
        if address is None:
            return NO_SUCH_MASTER
        if sub == b"master":
            return self._entry(address)
        return []           # replicas, slaves, sentinels: the standby is not a Redis replica

    def _hello(self, args: list[bytes], session: _Session) -> Reply:
        """HELLO [protover [AUTH user pass] [SETNAME name]]: the protocol switch redis-py 8 sends."""
        protocol = session.protocol
        name = session.name
        if len(args) >= 2:
            version = _integer(args[1])
            if version is None:
                return Error("ERR Protocol version is not an integer or out of range")
            if version not in (2, 3):
                return Error("NOPROTO unsupported protocol version")
            protocol = version
            i = 2
            while i < len(args):
                option = args[i].lower()
                if option == b"auth" and i + 2 < len(args):
                    refused = _refused(args[i + 1])
                    if refused is not None:
                        return refused
                    i += 3
                elif option == b"setname" and i + 1 < len(args):
                    if not _valid_name(args[i + 1]):
                        return _BAD_NAME
                    name = args[i + 1] or None
                    i += 2
                else:
                    return Error(f"ERR Syntax error in HELLO option '{_text(args[i])}'")
        session.protocol, session.name = protocol, name
        # "redis", as a Sentinel says: clients may check it; VERSION says which Sentinel this imitates
        return {"server": "redis", "version": VERSION, "proto": protocol, "id": session.id,
                "mode": "sentinel", "modules": []}


_SENTINEL_ARITY = {b"masters": 2, b"myid": 2, b"help": 2, b"master": 3, b"get-master-addr-by-name": 3,
                   b"replicas": 3, b"slaves": 3, b"sentinels": 3}
_SENTINEL_HELP = (
    "SENTINEL <subcommand> [<arg> [value] [opt] ...]. Subcommands are:",
    "GET-MASTER-ADDR-BY-NAME <master-name>",
    "    Return the ip and port number of the active node of the pair.",
    "MASTER <master-name>", "    Show the state of the master.",
    "MASTERS", "    Show the master, if a node of the pair is active.",
    "MYID", "    Return the ID of this endpoint.",
    "REPLICAS <master-name>", "    An empty list: the standby is not a Redis replica.",
    "SENTINELS <master-name>", "    An empty list: this endpoint is the only one.",
    "HELP", "    Print this help.",
)
_BAD_NAME = Error("ERR Client names cannot contain spaces, newlines or special characters.")


def _keep_alive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive after 300 s idle, as Redis sets it: a client that vanished without a FIN
    (its host died, the network split) would otherwise hold one of the MAX_CLIENTS places forever."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with suppress(OSError):         # not every platform has every option; serving matters more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (("TCP_KEEPIDLE", 300), ("TCP_KEEPINTVL", 100), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _ping(args: list[bytes]) -> Reply:
    if len(args) > 2:
        return _wrong_arity("ping")
    return args[1] if len(args) == 2 else Status("PONG")


def _refused(user: bytes) -> Error | None:
    """No password is configured: the default user gets in with any password, nobody else."""
    if user == b"default":
        return None
    return Error("WRONGPASS invalid username-password pair or user is disabled.")


def _auth(args: list[bytes]) -> Reply:
    if len(args) == 2:
        return Error("ERR AUTH <password> called without any password configured for the default user. "
                     "Are you sure your configuration is correct?")
    if len(args) == 3:
        return _refused(args[1]) or Status("OK")
    return _wrong_arity("auth")


def _client(args: list[bytes], session: _Session) -> Reply:
    """The CLIENT subcommands clients send on connect: SETNAME, SETINFO, plus GETNAME and ID."""
    if len(args) < 2:
        return _wrong_arity("client")
    sub = args[1].lower()
    arity = {b"setname": 3, b"getname": 2, b"setinfo": 4, b"id": 2}.get(sub)
    if arity is None:
        return _unknown_subcommand("CLIENT", args[1])
    if len(args) != arity:
        return _wrong_arity(f"client|{sub.decode()}")
    if sub == b"setname":
        if not _valid_name(args[2]):
            return _BAD_NAME
        session.name = args[2] or None
        return Status("OK")
    if sub == b"getname":
        return session.name if session.name is not None else Null.BULK
    if sub == b"id":
        return session.id
    attribute = args[2].lower()
    if attribute not in (b"lib-name", b"lib-ver"):
        return Error(f"ERR Unrecognized option '{_text(args[2])}'")
    if not _valid_name(args[3]):
        return Error(f"ERR {_text(args[2]).upper()} cannot contain spaces, newlines or special characters.")
    return Status("OK")
