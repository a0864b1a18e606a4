"""Real KVM: the kvstore guest behind the stream device, driven by stock Redis clients."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from ring import ConfigError
from ring import stream
from scenarios.service import Service, start_service


redis = pytest.importorskip("redis")

REQUEST_MAX = 16384


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(0.001)


def recv_lines(sock: socket.socket, lines: int, timeout: float = 10.0) -> bytes:
    """Read until `lines` CRLF-terminated lines arrived (replies here are small and known)."""
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\r\n") < lines:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture(scope="module")
def service():
    with start_service(0, request_max=REQUEST_MAX, table_entries=1024, report_every=100) as handle:
        yield handle
        handle.service.check()


@pytest.fixture()
def client(service):
    r = redis.Redis(port=service.port, socket_timeout=10)
    yield r
    r.close()


# --- configuration (no KVM needed) ---------------------------------------------


def test_service_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="at least 64 MiB"):
        Service(memory_mib=32)
    with pytest.raises(ConfigError, match="power of two"):
        Service(table_entries=1000)
    with pytest.raises(ConfigError, match="request_max"):
        Service(request_max=10)
    with pytest.raises(ConfigError, match="backend"):
        Service(backend="sim")


def test_device_header_fits_the_low_slot_and_its_region_the_data_region() -> None:
    assert stream.STREAM_GPA + 4096 <= 0x800000 and stream.STREAM_GPA >= 0x480000
    header = (stream.PORT_DOORBELL, stream.PORT_IDLE)
    assert not set(header) & {0x10, 0x11, 0x12, 0x13}
    data_gpa, data_bytes = 0x40000000, 64 << 20
    geometry = stream.Geometry.at_top(1024, data_gpa, data_bytes)
    assert geometry.region_gpa + geometry.region_size == data_gpa + data_bytes
    assert geometry.region_size == stream.Geometry.region_bytes(1024) >= 1024 * (stream.RX_SIZE + stream.TX_SIZE)
    assert not geometry._problem(data_gpa, data_bytes)
    with pytest.raises(ConfigError, match="10000 client slots need 157 MiB .* more than half of the 64 MiB"):
        stream.Geometry.at_top(10000, data_gpa, data_bytes)
    with pytest.raises(ConfigError, match="1 to 65536 client slots, not 0"):
        stream.StreamDevice(slots=0)
    with pytest.raises(ConfigError, match="cannot hold the stream device and the kvstore's buffers for 4000 "
                                          "clients .* lower max_clients"):
        Service(memory_mib=64, max_clients=4000)


# --- redis-py ---------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("protocol", [2, 3])
def test_every_command_through_redis_py(service, protocol) -> None:
    r = redis.Redis(port=service.port, protocol=protocol, socket_timeout=10)
    prefix = f"p{protocol}:"
    assert r.ping() is True
    raw = redis.Redis(port=service.port, protocol=protocol, socket_timeout=10)
    raw.set_response_callback("PING", lambda response, **options: response)   # redis-py maps PING to a bool
    assert raw.execute_command("PING", "hello") == b"hello"
    raw.close()
    assert r.echo("echo me") == b"echo me"
    assert r.set(prefix + "a", "1") is True
    assert r.get(prefix + "a") == b"1"
    assert r.get(prefix + "missing") is None
    assert r.incr(prefix + "a") == 2                          # redis-py sends INCRBY key 1
    assert r.execute_command("INCR", prefix + "a") == 3
    assert r.execute_command("incr", prefix + "fresh") == 1
    assert r.decr(prefix + "a") == 2
    r.set(prefix + "text", "abc")
    with pytest.raises(redis.ResponseError, match="value is not an integer or out of range"):
        r.execute_command("INCR", prefix + "text")
    r.set(prefix + "big", str(2**63 - 1))
    with pytest.raises(redis.ResponseError, match="overflow"):
        r.incr(prefix + "big")
    assert r.exists(prefix + "a", prefix + "text", prefix + "missing", prefix + "a") == 3
    before = r.dbsize()
    assert r.delete(prefix + "a", prefix + "missing", prefix + "text") == 2
    assert r.dbsize() == before - 2
    assert r.exists(prefix + "a") == 0
    assert r.set(prefix + "nx", "1", nx=True) is True
    assert r.set(prefix + "nx", "2", nx=True) is None
    assert r.set(prefix + "xx", "1", xx=True) is None
    with pytest.raises(redis.ResponseError, match="expiry is not supported"):
        r.set(prefix + "ttl", "1", ex=10)
    with pytest.raises(redis.ResponseError, match="unknown command 'FLUSHALL'"):
        r.execute_command("FLUSHALL")
    with pytest.raises(redis.ResponseError, match="wrong number of arguments for 'get'"):
        r.execute_command("GET")
    assert r.ping() is True                                   # errors leave the connection usable
    r.close()


@pytest.mark.kvm
def test_many_keys(client) -> None:
    for i in range(2000):
        assert client.set(f"many:{i}", f"value-{i}" * (1 + i % 7))
    pipe = client.pipeline(transaction=False)
    for i in range(2000):
        pipe.get(f"many:{i}")
    values = pipe.execute()
    assert values == [f"value-{i}".encode() * (1 + i % 7) for i in range(2000)]
    assert client.exists(*[f"many:{i}" for i in range(0, 2000, 10)]) == 200
    assert client.delete(*[f"many:{i}" for i in range(1000)]) == 1000
    assert client.get("many:10") is None and client.get("many:1999") == b"value-1999" * (1 + 1999 % 7)


@pytest.mark.kvm
def test_binary_values_and_sizes(client) -> None:
    binary = bytes(range(256)) * 4 + b"\r\n*3\r\n$1\r\n\r\n\x00"
    client.set(b"bin\r\nkey\x00", binary)
    assert client.get(b"bin\r\nkey\x00") == binary
    assert client.echo(b"\r\n") == b"\r\n"
    client.set("empty", b"")
    assert client.get("empty") == b""
    near_max = b"x" * (REQUEST_MAX - 100)
    client.set("near", near_max)
    assert client.get("near") == near_max                     # the reply is larger than a TX ring
    client.set("near", b"small")                              # shrinks: the block is reused
    assert client.get("near") == b"small"
    with pytest.raises(redis.ResponseError, match="request too large"):
        client.set("huge", b"y" * (REQUEST_MAX + 1))
    assert client.get("huge") is None
    assert client.ping() is True


@pytest.mark.kvm
def test_concurrent_clients(service) -> None:
    errors = []

    def worker(index: int) -> None:
        try:
            r = redis.Redis(port=service.port, socket_timeout=20)
            for i in range(100):
                r.incr("shared-counter")
                r.set(f"c{index}:{i}", i)
            assert r.get(f"c{index}:99") == b"99"
            r.close()
        except Exception as exc:                               # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    r = redis.Redis(port=service.port, socket_timeout=10)
    assert int(r.get("shared-counter")) == 40 * 100
    r.close()


# --- raw sockets: bad input ---------------------------------------------------------


MALFORMED = [
    (b"*abc\r\n", b"-ERR Protocol error: invalid multibulk length\r\n"),
    (b"*2\r\n$3\r\nGET\r\n$abc\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n$4\r\nPINGxx\r\n", b"-ERR Protocol error: expected CRLF after a bulk string\r\n"),
    (b"*2\r\n:5\r\n", b"-ERR Protocol error: expected '$', got ':'\r\n"),
    (b"*1\r\n$-5\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
    (b"*1\r\n" + b"$" + b"9" * 40 + b"\r\n", b"-ERR Protocol error: invalid bulk length\r\n"),
]


@pytest.mark.kvm
def test_malformed_resp_gets_an_error_and_the_connection_stays_usable(service) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        for bad, error in MALFORMED:
            sock.sendall(bad)
            assert recv_lines(sock, 1) == error, bad
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert recv_lines(sock, 1) == b"+PONG\r\n", bad
        sock.sendall(b"ECHO inline\r\nPING\r\n\r\n   \r\n*0\r\nping\n")    # inline, empty lines, *0
        assert recv_lines(sock, 4) == b"$6\r\ninline\r\n+PONG\r\n+PONG\r\n"


@pytest.mark.kvm
def test_oversized_requests_are_refused_and_skipped(service) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        value = b"v" * (REQUEST_MAX * 3)                    # spans many RX rings' worth
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nhuge\r\n$%d\r\n%s\r\n*1\r\n$4\r\nPING\r\n" % (len(value), value))
        assert recv_lines(sock, 2) == b"-ERR request too large\r\n+PONG\r\n"
        many = b"*%d\r\n" % (REQUEST_MAX // 2) + b"$1\r\na\r\n" * (REQUEST_MAX // 2)
        sock.sendall(many + b"PING\r\n")                      # too many arguments
        assert recv_lines(sock, 2) == b"-ERR request too large\r\n+PONG\r\n"
        sock.sendall(b"x" * (REQUEST_MAX + 500) + b"\r\nPING\r\n")   # an inline line without end
        assert recv_lines(sock, 2) == b"-ERR request too large\r\n+PONG\r\n"
        sock.sendall(b"GET huge\r\n")
        assert recv_lines(sock, 1) == b"$-1\r\n"


@pytest.mark.kvm
def test_half_closed_connection_gets_its_replies(service) -> None:
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"SET hc 1\r\nGET hc\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(1000):
            data += chunk
    assert data == b"+OK\r\n$1\r\n1\r\n"


@pytest.mark.kvm
def test_a_client_that_does_not_read_holds_up_no_one(service, client) -> None:
    value = bytes(range(256)) * ((REQUEST_MAX - 200) // 256)
    client.set("slow-reader", value)
    count = 1000                                                # 16 MB of replies: more than socket buffers hold
    pauses = service.device.stats["write_pauses"]
    with socket.create_connection(("127.0.0.1", service.port)) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        slow.sendall(b"*2\r\n$3\r\nGET\r\n$11\r\nslow-reader\r\n" * count)
        wait_until(lambda: service.device.stats["write_pauses"] > pauses, what="backpressure on the slow reader")
        for i in range(50):                                     # another client is served meanwhile
            assert client.ping() is True
            assert client.incr("meanwhile") == i + 1
        reply = b"$%d\r\n%s\r\n" % (len(value), value)
        slow.settimeout(30)
        received = bytearray()
        while len(received) < len(reply) * count:
            chunk = slow.recv(1 << 20)
            assert chunk, "the slow reader's connection closed"
            received += chunk
    assert bytes(received) == reply * count


# --- stock command-line clients -------------------------------------------------------


@pytest.mark.kvm
def test_redis_cli_and_benchmark(service) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        print("redis-cli not installed (Debian: apt-get install redis-tools): skipped")
        pytest.skip("redis-cli not installed (Debian: apt-get install redis-tools)")
    port = str(service.port)
    run = lambda *args: subprocess.run([cli, "-p", port, *args], capture_output=True, text=True, timeout=30)
    assert run("PING").stdout.strip() == "PONG"
    assert run("SET", "cli-key", "from redis-cli").stdout.strip() == "OK"
    assert run("GET", "cli-key").stdout.strip() == "from redis-cli"
    assert "unknown command 'NOPE'" in run("NOPE").stdout
    bench = shutil.which("redis-benchmark")
    if bench is None:
        return
    result = subprocess.run([bench, "-p", port, "-n", "2000", "-c", "4", "-P", "8", "-t", "ping,set,get", "-q"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for test in ("PING_INLINE", "PING_MBULK", "SET", "GET"):
        assert f"{test}: " in result.stdout, result.stdout
    # 50 connections (the 33rd hung when the device had 32 slots) and 1,000 more than that
    result = subprocess.run([bench, "-p", port, "-n", "5000", "-c", "50", "-t", "set,get,incr", "-q"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for test in ("SET", "GET", "INCR"):
        assert f"{test}: " in result.stdout, result.stdout


@pytest.mark.kvm
def test_clients_beyond_the_limit_get_redis_s_error_and_a_freed_slot_is_reused() -> None:
    with start_service(0, max_clients=8) as svc:
        held = [socket.create_connection(("127.0.0.1", svc.port)) for _ in range(8)]
        for n, sock in enumerate(held):                           # every one is served
            sock.sendall(b"INCR admitted\r\n")
            assert recv_lines(sock, 1) == b":%d\r\n" % (n + 1)
        with socket.create_connection(("127.0.0.1", svc.port)) as ninth:
            ninth.settimeout(10)
            answer = b""
            while chunk := ninth.recv(100):                       # the error, then the close
                answer += chunk
            assert answer == b"-ERR max number of clients reached\r\n"
        refused = redis.Redis(port=svc.port, socket_timeout=10)
        with pytest.raises(redis.ConnectionError, match="max number of clients reached"):
            refused.ping()
        refused.close()
        held.pop().close()                                        # a slot comes free once the guest saw the close
        r = redis.Redis(port=svc.port, socket_timeout=10)
        assert wait_until(lambda: _ping_or_none(r), what="a client admitted into the freed slot")
        assert r.incr("admitted") == 9
        for sock in held:                                         # the others were never disturbed
            sock.sendall(b"GET admitted\r\n")
            assert recv_lines(sock, 2) == b"$1\r\n9\r\n"
            sock.close()
        r.close()
        assert svc.device.stats["rejected"] >= 2
        svc.service.check()


def _ping_or_none(r) -> bool:
    try:
        return r.ping()
    except redis.ConnectionError as exc:                          # the slot was still closing
        assert "max number of clients reached" in str(exc)
        return False


@pytest.mark.kvm
def test_a_thousand_clients_at_once() -> None:
    """The default limit (1,024): a thousand connections served together, each its own state.
    (No dirty logging: their buffers alone are more pages than a dirty ring holds, and no
    checkpointer harvests here.)"""
    with start_service(0, track_dirty=False) as service:
        _a_thousand_clients(service)
        service.service.check()


def _a_thousand_clients(service) -> None:
    socks = [socket.create_connection(("127.0.0.1", service.port)) for _ in range(1000)]
    try:
        for n, sock in enumerate(socks):
            sock.sendall(b"SET many:%d %d\r\n" % (n, n * 7))
        for sock in socks:
            assert recv_lines(sock, 1) == b"+OK\r\n"
        for n, sock in enumerate(socks):
            sock.sendall(b"GET many:%d\r\n" % n)
        for n, sock in enumerate(socks):
            value = b"%d" % (n * 7)
            assert recv_lines(sock, 2) == b"$%d\r\n%s\r\n" % (len(value), value)
    finally:
        for sock in socks:
            sock.close()


# --- checkpoints ------------------------------------------------------------------------


@pytest.mark.kvm
def test_device_writes_are_in_the_harvest(service) -> None:
    machine, device = service.machine, service.device
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"PING\r\n")
        assert recv_lines(sock, 1) == b"+PONG\r\n"
        me = "%s:%d" % sock.getsockname()
        number = next(slot for slot, _, peer in service.call(device.connections) if peer == me)
        slot = next(s for s in json.loads(device.device_state())["slots"] if s["slot"] == number)
        with device.lock:
            machine.pause()
            machine.harvest()                                   # start from a clean slate
            machine.resume()
        payload = b"SET harvest " + b"h" * 9000 + b"\r\n"
        sock.sendall(payload)
        assert recv_lines(sock, 1) == b"+OK\r\n"
        with device.lock:
            machine.pause()
            try:
                harvest = machine.harvest()
                dirty_low, dirty_data = set(harvest.slot(0).tolist()), set(harvest.slot(1).tolist())
                after = next(s for s in json.loads(device.device_state())["slots"] if s["slot"] == slot["slot"])
            finally:
                machine.resume()
    geometry = device.geometry
    rx_gpa = geometry.rx_gpa(slot["slot"]) - 0x40000000           # offsets in the data slot (1)
    written = range(after["rx_head"] - len(payload), after["rx_head"])
    rx_pages = {(rx_gpa + index % geometry.rx_size) >> 12 for index in written}
    ctrl_page = (geometry.ctrl_of(slot["slot"]) - 0x40000000) >> 12
    queue_page = (geometry.queue_gpa - 0x40000000) >> 12             # the news entries the device wrote
    assert rx_pages | {ctrl_page, queue_page} <= dirty_data, (sorted(rx_pages), ctrl_page, sorted(dirty_data))
    assert stream.STREAM_GPA >> 12 in dirty_low                       # the queue's head, in the header


@pytest.mark.kvm
def test_pluggable_output_holds_replies_until_released() -> None:
    held = []
    with start_service(0, output=lambda slot, data, generation: held.append((slot, data, generation))) as svc:
        with socket.create_connection(("127.0.0.1", svc.port)) as sock:
            sock.sendall(b"SET held 1\r\n")
            wait_until(lambda: held, what="the guest's reply reaching the output hook")
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(100)                                  # held: the device wrote nothing
            slot, data, generation = held.pop()
            assert data == b"+OK\r\n"
            assert svc.call(svc.device.write_to_client, slot, data, generation) is True
            sock.setblocking(True)
            assert recv_lines(sock, 1) == b"+OK\r\n"
            assert svc.call(svc.device.write_to_client, slot, b"late", generation + 2) is False


@pytest.mark.kvm
def test_restored_service_serves_the_captured_data() -> None:
    with start_service(0, table_entries=4096) as first:
        r = redis.Redis(port=first.port, socket_timeout=10)
        for i in range(300):
            r.set(f"kept:{i}", f"value {i}")
        r.incr("counter")
        state, device_state = first.checkpoint()
        r.set("after-capture", "lost")                          # not in the checkpoint
        saved = json.loads(device_state)["slots"]
        open_slots = [s["slot"] for s in saved if s["state"] == 1]
        assert open_slots, "the checkpoint should show the client's connection open"
        generations = {s["slot"]: s["generation"] for s in saved}
        r.close()
    tampered = json.loads(device_state)
    index = next(i for i, s in enumerate(tampered["slots"]) if s["slot"] == open_slots[0])
    tampered["slots"][index]["rx_head"] += 1                      # not the memory's checkpoint
    with pytest.raises(stream.StreamError, match=f"slot {open_slots[0]}: rx_head is .* not from the same"):
        start_service(0, restore=state, restore_device=json.dumps(tampered).encode())
    del tampered["slots"][index]                                  # a slot in use left out
    with pytest.raises(stream.StreamError, match=f"slot {open_slots[0]} is in use in memory but not in the saved"):
        start_service(0, restore=state, restore_device=json.dumps(tampered).encode())
    with start_service(0, restore=state, restore_device=device_state) as second:
        for slot in open_slots:                                 # closed by the new device
            record = second.call(second.device.slot_record, slot)
            assert record["state"] == 0 and record["generation"] == generations[slot] + 1
        r = redis.Redis(port=second.port, socket_timeout=10)
        assert r.get("kept:0") == b"value 0" and r.get("kept:299") == b"value 299"
        assert r.get("after-capture") is None
        assert r.incr("counter") == 2
        assert r.dbsize() == 301
        r.set("new", "write")
        assert r.get("new") == b"write"
        r.close()
        second.service.check()
