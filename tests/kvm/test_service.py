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


def test_device_region_fits_the_low_slot() -> None:
    assert stream.STREAM_END <= 0x800000 and stream.STREAM_GPA >= 0x480000
    header = (stream.PORT_DOORBELL, stream.PORT_IDLE)
    assert not set(header) & {0x10, 0x11, 0x12, 0x13}


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

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]   # more clients than slots
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


# --- checkpoints ------------------------------------------------------------------------


@pytest.mark.kvm
def test_device_writes_are_in_the_harvest(service) -> None:
    machine, device = service.machine, service.device
    with socket.create_connection(("127.0.0.1", service.port)) as sock:
        sock.sendall(b"PING\r\n")
        assert recv_lines(sock, 1) == b"+PONG\r\n"
        me = "%s:%d" % sock.getsockname()
        slot = next(s for s in json.loads(device.device_state())["slots"] if s["peer"] == me)
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
                dirty = set(machine.harvest().slot(0).tolist())
                after = next(s for s in json.loads(device.device_state())["slots"] if s["slot"] == slot["slot"])
            finally:
                machine.resume()
    rx_gpa = stream.SLOTS_GPA + slot["slot"] * stream.SLOT_STRIDE + stream.CTRL_SIZE
    written = range(after["rx_head"] - len(payload), after["rx_head"])
    rx_pages = {(rx_gpa + index % stream.RX_SIZE) >> 12 for index in written}
    ctrl_page = (rx_gpa - stream.CTRL_SIZE) >> 12
    assert rx_pages | {ctrl_page} <= dirty, (sorted(rx_pages), ctrl_page, sorted(dirty))


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
        open_slots = [s["slot"] for s in json.loads(device_state)["slots"] if s["state"] == 1]
        assert open_slots, "the checkpoint should show the client's connection open"
        generations = {s["slot"]: s["generation"] for s in json.loads(device_state)["slots"]}
        r.close()
    tampered = json.loads(device_state)
    tampered["slots"][open_slots[0]]["rx_head"] += 1              # not the memory's checkpoint
    with pytest.raises(stream.StreamError, match=f"slot {open_slots[0]}: rx_head is .* not from the same"):
        start_service(0, restore=state, restore_device=json.dumps(tampered).encode())
    with start_service(0, restore=state, restore_device=device_state) as second:
        slots = json.loads(second.device.save())["slots"]
        for slot in open_slots:                                 # closed by the new device
            assert slots[slot]["state"] == 0 and slots[slot]["generation"] == generations[slot] + 1
        r = redis.Redis(port=second.port, socket_timeout=10)
        assert r.get("kept:0") == b"value 0" and r.get("kept:299") == b"value 299"
        assert r.get("after-capture") is None
        assert r.incr("counter") == 2
        assert r.dbsize() == 301
        r.set("new", "write")
        assert r.get("new") == b"write"
        r.close()
        second.service.check()
