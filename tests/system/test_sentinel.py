"""The pair's discovery endpoint, asked by real clients over real sockets.

redis-py's Sentinel (in both protocols it speaks) finds the address the lookup gives, reaches a
real redis-server through it, follows the lookup when it changes, and sees no master when the
lookup has none; redis-cli prints the address. Requests arrive pipelined, split into single
bytes, or malformed: they are answered in order, once complete, or refused with a protocol
error and a closed connection, and the endpoint goes on serving the next client.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest
import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from checkpointer.cluster import free_port
from pair.sentinel import MAX_ARGS, MAX_INLINE_BYTES, MAX_REQUEST_BYTES, SentinelServer

NAME = "colo-pair"
REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
needs_redis_server = pytest.mark.skipif(REDIS_SERVER is None,
                                        reason="redis-server is not installed (Debian: redis-server)")


class Endpoint:
    """A SentinelServer run as one task of a TaskGroup on its own loop, in a thread.

    redis-py's clients block, so the endpoint needs a loop of its own. `answer` is what the
    lookup returns; a test changes it to move the active node.
    """

    def __init__(self, lookup=None, **options) -> None:
        self.answer: tuple[str, int] | None = None
        self.server = SentinelServer("127.0.0.1", 0, NAME, lookup or self._lookup, **options)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sentinel-endpoint", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the endpoint did not start within 10 s"
        if self._failure is not None:
            raise self._failure
        self.host, self.port = self.server.address

    async def _lookup(self) -> tuple[str, int] | None:
        return self.answer

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:          # reported by the constructor or by stop()
            self._failure = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await self.server.start()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self.server.serve_forever())
            self._ready.set()
            await self._stop.wait()
            await self.server.close()           # serve_forever returns: the group can end

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        assert not self._thread.is_alive(), "the endpoint's TaskGroup did not end after close()"
        if self._failure is not None:
            raise self._failure

    def sentinel(self, protocol: int = 3) -> Sentinel:
        return Sentinel([(self.host, self.port)], sentinel_kwargs={"protocol": protocol, "socket_timeout": 5},
                        protocol=protocol, socket_timeout=5)

    def connect(self) -> socket.socket:
        raw = socket.create_connection((self.host, self.port), timeout=5)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return raw


def read_to_end(raw: socket.socket) -> bytes:
    """Everything the endpoint sends until it closes the connection."""
    received = b""
    while chunk := raw.recv(1 << 20):
        received += chunk
    return received


def read_exactly(raw: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = raw.recv(size - len(received))
        assert chunk, f"connection closed after {received!r}"
        received += chunk
    return received


def command(*args: bytes) -> bytes:
    """A request as clients send it (multibulk)."""
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args)


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    running = Endpoint()
    yield running
    running.stop()


@pytest.fixture
def redis_servers(tmp_path) -> Iterator[list[tuple[str, int]]]:
    """Two real redis-servers on free ports, each answering PING."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (Debian: redis-server)")
    processes, addresses = [], []
    try:
        for i in range(2):
            port = free_port()
            process = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            processes.append(process)
            log = b""
            while b"Ready to accept connections" not in log:      # redis-server says when it listens
                line = process.stdout.readline()
                assert line, f"redis-server exited before it was ready:\n{log.decode()}"
                log += line
            process.stdout.close()
            assert redis.Redis(port=port, socket_timeout=5).ping()
            addresses.append(("127.0.0.1", port))
        yield addresses
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


@needs_redis_server
@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_reaches_the_active_node_through_the_endpoint_and_follows_the_lookup(
        endpoint, redis_servers, protocol) -> None:
    first, second = redis_servers
    endpoint.answer = first
    with endpoint.sentinel(protocol) as sentinel:
        assert sentinel.discover_master(NAME) == first
        master = sentinel.master_for(NAME)
        assert master.set("where", "first") and master.get("where") == b"first"
        assert redis.Redis(*first).get("where") == b"first"              # it really went to `first`

        endpoint.answer = second                                          # the other node is active now
        assert sentinel.discover_master(NAME) == second
        moved = sentinel.master_for(NAME)
        assert moved.set("where", "second") and moved.get("where") == b"second"
        assert redis.Redis(*second).get("where") == b"second"
        assert redis.Redis(*first).get("where") == b"first"              # nothing of it reached `first`
        master.close()
        moved.close()

        endpoint.answer = None                                            # no node is active
        with pytest.raises(MasterNotFoundError):
            sentinel.discover_master(NAME)


@pytest.mark.parametrize("protocol", [2, 3])
def test_every_sentinel_question_redis_py_asks_has_the_answer_of_a_sentinel(endpoint, protocol) -> None:
    endpoint.answer = ("10.0.0.7", 6390)
    with endpoint.sentinel(protocol) as sentinel:
        client = sentinel.sentinels[0]
        assert client.ping()
        state = client.sentinel_masters()[NAME]
        assert (state["ip"], state["port"], state["is_master"], state["is_sdown"], state["is_odown"],
                state["num-other-sentinels"]) == ("10.0.0.7", 6390, True, False, False, 0)
        assert client.execute_command("SENTINEL MASTER", NAME)["port"] == 6390
        assert client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", NAME) == (b"10.0.0.7", 6390)
        assert sentinel.discover_slaves(NAME) == []                       # the standby is no Redis replica
        assert client.execute_command("SENTINEL SENTINELS", NAME) == []
        assert client.execute_command("SENTINEL", "REPLICAS", NAME) == []
        assert client.execute_command("CLIENT", "SETNAME", "app") and client.client_getname() in ("app", b"app")
        with pytest.raises(redis.ResponseError, match="No such master with that name"):
            client.execute_command("SENTINEL MASTER", "another")
        with pytest.raises(redis.ResponseError, match="unknown command 'GET', with args beginning with: 'k'"):
            client.get("k")

        endpoint.answer = None
        assert client.sentinel_masters() == {}
        assert client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", NAME) is None
        with pytest.raises(redis.ResponseError, match="No such master with that name"):
            client.execute_command("SENTINEL SLAVES", NAME)
        with pytest.raises(MasterNotFoundError):
            sentinel.discover_master(NAME)


def test_a_plain_lookup_a_failing_one_and_a_hanging_one() -> None:
    def failing() -> tuple[str, int]:
        raise OSError("etcd unreachable")

    async def hanging() -> tuple[str, int]:
        await asyncio.Event().wait()

    plain = Endpoint(lambda: ("10.0.0.8", 7000))
    broken = Endpoint(failing)
    slow = Endpoint(hanging, lookup_timeout_s=0.2)
    try:
        with plain.sentinel() as sentinel:
            assert sentinel.discover_master(NAME) == ("10.0.0.8", 7000)
        for running in (broken, slow):                                    # no master, and still serving
            with running.sentinel() as sentinel:
                with pytest.raises(MasterNotFoundError):
                    sentinel.discover_master(NAME)
                assert sentinel.sentinels[0].ping()
    finally:
        for running in (plain, broken, slow):
            running.stop()


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed (Debian: redis-tools)")
def test_redis_cli_prints_the_active_nodes_address(endpoint) -> None:
    def ask() -> str:
        return subprocess.run([REDIS_CLI, "-h", endpoint.host, "-p", str(endpoint.port),
                               "SENTINEL", "get-master-addr-by-name", NAME],
                              capture_output=True, text=True, timeout=10, check=True).stdout

    endpoint.answer = ("127.0.0.1", 6399)
    assert ask() == "127.0.0.1\n6399\n"
    endpoint.answer = None
    assert ask() == "\n"                                                  # (nil), as from a Sentinel


@pytest.mark.parametrize("request_bytes, error", [
    (b"*1\r\n$x\r\n", "invalid bulk length"),
    (b"*2\r\n$4\r\nPING\r\n$%d\r\n" % (MAX_REQUEST_BYTES + 1), "invalid bulk length"),
    (b"*3\r\n" + b"$%d\r\n%s\r\n" % (MAX_REQUEST_BYTES // 2, b"a" * (MAX_REQUEST_BYTES // 2)) * 2
     + b"$1\r\n", "invalid bulk length"),                                # the request's total is bounded too
    (b"*%d\r\n" % (MAX_ARGS + 1), "invalid multibulk length"),
    (b"*x\r\n", "invalid multibulk length"),
    (b"*1\r\nPING\r\n", "expected '$', got 'P'"),
    (b"*1\r\n$4\r\nPINGxx", "expected CRLF after bulk data"),
    (b'PING "unclosed\r\n', "unbalanced quotes in request"),
    (b"PING a\0b\r\n", "NUL byte in inline request"),
    (b"P" * (MAX_INLINE_BYTES + 2), "too big inline request"),
    (b"*" + b"1" * (MAX_INLINE_BYTES + 2), "too big mbulk count string"),
])
def test_a_malformed_request_is_refused_the_connection_closed_and_the_next_client_served(
        endpoint, request_bytes, error) -> None:
    with endpoint.connect() as raw:
        raw.sendall(command(b"PING") + request_bytes + command(b"PING"))
        assert read_to_end(raw) == b"+PONG\r\n-ERR Protocol error: %s\r\n" % error.encode()
    with endpoint.connect() as raw:
        raw.sendall(b"PING\r\n")
        assert read_exactly(raw, 7) == b"+PONG\r\n"


def test_a_request_at_the_limits_is_served(endpoint) -> None:
    with endpoint.connect() as raw:
        raw.sendall(command(b"PING", b"x" * (MAX_REQUEST_BYTES - 4)))       # 1 MiB in all
        reply = b"$%d\r\n%s\r\n" % (MAX_REQUEST_BYTES - 4, b"x" * (MAX_REQUEST_BYTES - 4))
        assert read_exactly(raw, len(reply)) == reply
        raw.sendall(b"*%d\r\n" % MAX_ARGS + b"$4\r\nPING\r\n" + b"$1\r\na\r\n" * (MAX_ARGS - 1))
        wrong_arity = b"-ERR wrong number of arguments for 'ping' command\r\n"
        assert read_exactly(raw, len(wrong_arity)) == wrong_arity


def test_pipelined_requests_are_answered_in_order_in_the_protocol_each_asked_for(endpoint) -> None:
    endpoint.answer = ("10.0.0.9", 6379)
    requests = (command(b"PING") + b"\r\n" + b"ping 'one two'\r\n"
                + command(b"SENTINEL", b"get-master-addr-by-name", NAME.encode())
                + command(b"SENTINEL", b"get-master-addr-by-name", b"unknown")
                + b"HELLO 3\r\n"
                + command(b"SENTINEL", b"get-master-addr-by-name", b"unknown")
                + b"*0\r\n" + b"sentinel replicas " + NAME.encode() + b"\r\n"
                + command(b"QUIT") + command(b"PING"))
    with endpoint.connect() as raw:
        raw.sendall(requests)                                             # one write
        replies = read_to_end(raw)
    hello = (b"%6\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nversion\r\n$5\r\n7.0.0\r\n$5\r\nproto\r\n:3\r\n"
             b"$2\r\nid\r\n")
    assert replies.startswith(b"+PONG\r\n$7\r\none two\r\n*2\r\n$8\r\n10.0.0.9\r\n$4\r\n6379\r\n*-1\r\n" + hello)
    assert replies.endswith(b"\r\n$4\r\nmode\r\n$8\r\nsentinel\r\n$7\r\nmodules\r\n*0\r\n"
                            b"_\r\n*0\r\n+OK\r\n")                        # RESP3 null; nothing after QUIT


def test_a_request_split_into_single_bytes_is_answered_once_complete(endpoint) -> None:
    endpoint.answer = ("10.0.0.10", 6379)
    with endpoint.connect() as raw:
        for byte in command(b"SENTINEL", b"get-master-addr-by-name", NAME.encode()) + b"PING\r\n":
            raw.sendall(bytes([byte]))
        expected = b"*2\r\n$9\r\n10.0.0.10\r\n$4\r\n6379\r\n+PONG\r\n"
        assert read_exactly(raw, len(expected)) == expected


def test_beyond_the_client_limit_a_client_is_told_and_closed_until_a_place_is_free() -> None:
    running = Endpoint(max_clients=2)
    try:
        first, second = running.connect(), running.connect()
        for raw in (first, second):                                       # both are being served
            raw.sendall(b"PING\r\n")
            assert read_exactly(raw, 7) == b"+PONG\r\n"
        with running.connect() as third:
            assert read_to_end(third) == b"-ERR max number of clients reached\r\n"
        first.sendall(b"QUIT\r\n")
        assert read_to_end(first) == b"+OK\r\n"                          # its place is free once it closed
        first.close()
        with running.connect() as fourth:
            fourth.sendall(b"PING\r\n")
            assert read_exactly(fourth, 7) == b"+PONG\r\n"
        second.close()
    finally:
        running.stop()


def test_close_ends_serve_forever_closes_open_connections_and_stops_listening() -> None:
    running = Endpoint()
    idle = running.connect()
    idle.sendall(b"PING\r\n")
    assert read_exactly(idle, 7) == b"+PONG\r\n"
    running.stop()                                                        # the TaskGroup ended
    assert read_to_end(idle) == b""
    idle.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((running.host, running.port), timeout=5)
