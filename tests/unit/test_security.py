"""checkpointer.security: key files, colo-keys, and real CURVE connections over loopback TCP.

Waiting: a message that should arrive is awaited with a bounded poll; one that must
not arrive is polled for a bounded 500 ms. Refusals are observed through the
client's socket monitor (EVENT_HANDSHAKE_FAILED_*), not through timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from checkpointer.config import ConfigError, SecuritySection
from checkpointer.security import (ZAP_DOMAIN, forget_setup_messages, generate_keys, keys_main,
                                   load_authorized_keys, load_key_pair, load_public_key, secure_client,
                                   secure_server)

ARRIVE_MS = 5000        # an upper bound for a message that should arrive
NEVER_MS = 500          # how long we watch for a message that must not arrive


@pytest.fixture(autouse=True)
def fresh_setup_messages():
    """Each test sees the setup messages as a new process would (they are logged once per process)."""
    forget_setup_messages()
    yield
    forget_setup_messages()


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    for name in ("primary", "replica", "intruder"):
        generate_keys(str(d), name)
    return d


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def server_section(keys, authorized=None) -> SecuritySection:
    return SecuritySection(keys_dir=str(keys), key_name="replica",
                           authorized_keys=str(authorized or keys / "primary.key"))


def client_section(keys, name="primary", server_key=None) -> SecuritySection:
    return SecuritySection(keys_dir=str(keys), key_name=name,
                           peer_public_key=str(server_key or keys / "replica.key"))


def bind_random(sock) -> str:
    sock.bind("tcp://127.0.0.1:*")
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def handshake_outcome(monitor, timeout_ms=ARRIVE_MS) -> int:
    """The first handshake event on a monitor socket (succeeded or failed), within a bound."""
    wanted = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    poller = zmq.Poller()
    poller.register(monitor, zmq.POLLIN)
    while True:
        if not poller.poll(timeout_ms):
            raise AssertionError(f"no handshake event within {timeout_ms} ms")
        event = recv_monitor_message(monitor)["event"]
        if event & wanted:
            return event


# -- key files and colo-keys ----------------------------------------------------------

def test_generate_keys_makes_a_pair(tmp_path):
    public, secret = generate_keys(str(tmp_path / "k"), "primary")
    assert public == str(tmp_path / "k" / "primary.key")
    assert secret == str(tmp_path / "k" / "primary.key_secret")
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    pub, sec = load_key_pair(str(tmp_path / "k"), "primary")
    assert load_public_key(public) == pub
    assert len(pub) == 40 and len(sec) == 40 and pub != sec


def test_generate_keys_refuses_to_overwrite(tmp_path):
    _, secret_path = generate_keys(str(tmp_path), "replica")
    secret = Path(secret_path)
    before = secret.read_text()
    with pytest.raises(ConfigError, match="already exist.*--force"):
        generate_keys(str(tmp_path), "replica")
    assert secret.read_text() == before
    generate_keys(str(tmp_path), "replica", force=True)
    assert secret.read_text() != before
    with pytest.raises(ConfigError, match="plain name"):
        generate_keys(str(tmp_path), "../escape")


def test_keys_main_makes_both_pairs_and_says_who_gets_what(tmp_path, capsys):
    d = str(tmp_path / "keys")
    assert keys_main([d]) == 0
    out = capsys.readouterr().out
    for name in ("primary", "replica"):
        assert os.path.exists(os.path.join(d, f"{name}.key"))
        assert os.path.exists(os.path.join(d, f"{name}.key_secret"))
    assert f"--authorized-keys {d}/primary.key" in out
    assert f"--peer-public-key {d}/replica.key" in out
    assert f"--keys-dir {d}" in out


def test_keys_main_one_name_and_refusal(tmp_path, capsys):
    d = str(tmp_path)
    assert keys_main([d, "--name", "replica"]) == 0
    assert not os.path.exists(os.path.join(d, "primary.key"))
    secret_file = Path(d) / "replica.key_secret"
    secret = secret_file.read_text()
    capsys.readouterr()
    assert keys_main([d, "--name", "replica"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("colo-keys: ") and "replica.key" in err and "--force" in err
    assert secret_file.read_text() == secret
    assert keys_main([d, "--name", "replica", "--force"]) == 0
    assert secret_file.read_text() != secret


def test_missing_key_files_are_named(tmp_path, ctx):
    empty = tmp_path / "empty"
    empty.mkdir()
    sock = ctx.socket(zmq.DEALER)
    missing = str(empty / "primary.key_secret")
    with pytest.raises(ConfigError, match="colo-keys") as info:
        secure_client(sock, SecuritySection(keys_dir=str(empty), peer_public_key=str(empty / "r.key")))
    assert missing in str(info.value)
    server = ctx.socket(zmq.ROUTER)
    with pytest.raises(ConfigError) as info:
        secure_server(server, ctx, SecuritySection(keys_dir=str(empty), authorized_keys=str(empty)))
    assert str(empty / "replica.key_secret") in str(info.value)
    assert server.curve_server == 0                   # nothing was set on the socket


def test_unset_key_settings_are_named(ctx):
    sock = ctx.socket(zmq.DEALER)
    with pytest.raises(ConfigError, match=r"security\.keys_dir is not set.*--keys-dir.*--insecure"):
        secure_client(sock, SecuritySection())
    with pytest.raises(ConfigError, match=r"security\.peer_public_key is not set.*--peer-public-key"):
        secure_client(sock, SecuritySection(keys_dir="/k"))
    with pytest.raises(ConfigError, match=r"security\.authorized_keys is not set.*--authorized-keys"):
        secure_server(ctx.socket(zmq.ROUTER), ctx, SecuritySection(keys_dir="/k"))


def test_damaged_key_files_are_refused(keys, ctx):
    garbage = keys / "garbage.key"
    garbage.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError, match="holds no CURVE public key") as info:
        load_public_key(str(garbage))
    assert str(garbage) in str(info.value)
    short = keys / "short.key"
    short.write_text('curve\n    public-key = "abcde"\n')
    with pytest.raises(ConfigError, match="not a CURVE key") as info:
        load_authorized_keys(str(short))
    assert str(short) in str(info.value)
    # a public key file where the secret file belongs
    os.replace(keys / "primary.key_secret", keys / "primary.bak")
    (keys / "primary.key_secret").write_text((keys / "primary.key").read_text())
    with pytest.raises(ConfigError, match="holds only a public key"):
        secure_client(ctx.socket(zmq.DEALER), client_section(keys))


def test_authorized_keys_from_a_directory(keys, tmp_path):
    d = tmp_path / "authorized"
    d.mkdir()
    with pytest.raises(ConfigError, match="holds no public key files"):
        load_authorized_keys(str(d))
    for name in ("primary", "intruder"):
        (d / f"{name}.key").write_text((keys / f"{name}.key").read_text())
    (d / "README").write_text("not a key, not *.key: ignored\n")
    found = load_authorized_keys(str(d))
    assert found == {load_public_key(str(keys / "primary.key")),
                     load_public_key(str(keys / "intruder.key"))}


def test_group_readable_secret_is_warned_about(keys, caplog):
    os.chmod(keys / "primary.key_secret", 0o640)
    with caplog.at_level(logging.WARNING, logger="colo.security"):
        load_key_pair(str(keys), "primary")
    assert "chmod 600" in caplog.text


# -- real CURVE connections -------------------------------------------------------------

def test_authorized_primary_gets_through_and_is_encrypted(keys, ctx):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    with secure_server(server, ctx, server_section(keys)) as security:
        assert security.running and not security.insecure
        assert server.curve_server == 1
        assert server.getsockopt_string(zmq.ZAP_DOMAIN) == ZAP_DOMAIN
        endpoint = bind_random(server)
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        info = secure_client(client, client_section(keys))
        assert info.server_key == load_public_key(str(keys / "replica.key"))
        monitor = client.get_monitor_socket()
        client.connect(endpoint)
        assert handshake_outcome(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        client.send(b"epoch 1")
        assert server.poll(ARRIVE_MS) == zmq.POLLIN
        identity, payload = server.recv_multipart()
        assert payload == b"epoch 1"
        server.send_multipart([identity, b"ack 1"])      # and back
        assert client.poll(ARRIVE_MS) == zmq.POLLIN
        assert client.recv() == b"ack 1"
        assert security.refused == 0
        client.disable_monitor()
        monitor.close()
        client.close()
        server.close()
    assert not security.running
    security.stop()                                       # stopping twice is fine


def test_unauthorized_primary_is_refused(keys, ctx, caplog):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    security = secure_server(server, ctx, server_section(keys))
    try:
        endpoint = bind_random(server)
        intruder = ctx.socket(zmq.DEALER)
        intruder.linger = 0
        # a valid key pair, and it knows the replica's public key, but it is not authorized
        secure_client(intruder, client_section(keys, name="intruder"))
        monitor = intruder.get_monitor_socket()
        with caplog.at_level(logging.WARNING, logger="colo.security"):
            intruder.connect(endpoint)
            intruder.send(b"forged epoch")
            assert handshake_outcome(monitor) == zmq.EVENT_HANDSHAKE_FAILED_AUTH
            assert server.poll(NEVER_MS) == 0            # the message never arrives
        assert security.refused >= 1
        intruder_key = load_public_key(str(keys / "intruder.key")).decode()
        assert f"refused a peer: its CURVE public key {intruder_key}" in caplog.text
        intruder.disable_monitor()
        monitor.close()
    finally:
        security.stop()


def test_client_with_the_wrong_server_key_never_connects(keys, ctx):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    with secure_server(server, ctx, server_section(keys)):
        endpoint = bind_random(server)
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        # the primary was given the wrong public key for the replica (a man in the middle's)
        secure_client(client, client_section(keys, server_key=keys / "intruder.key"))
        client.connect(endpoint)
        client.send(b"epoch 1")
        assert server.poll(NEVER_MS) == 0


def test_plaintext_client_is_refused_by_a_curve_server(keys, ctx):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    with secure_server(server, ctx, server_section(keys)):
        endpoint = bind_random(server)
        client = ctx.socket(zmq.DEALER)
        client.linger = 0
        secure_client(client, SecuritySection(insecure=True))
        client.connect(endpoint)
        client.send(b"epoch 1")
        assert server.poll(NEVER_MS) == 0


def test_one_authenticator_per_context(keys, ctx):
    with (secure_server(ctx.socket(zmq.ROUTER), ctx, server_section(keys)),
          pytest.raises(RuntimeError, match="one authenticator")):
        secure_server(ctx.socket(zmq.ROUTER), ctx, server_section(keys))


def test_insecure_mode_sets_nothing_and_says_so(ctx, caplog):
    server = ctx.socket(zmq.ROUTER)
    server.linger = 0
    client = ctx.socket(zmq.DEALER)
    client.linger = 0
    with caplog.at_level(logging.WARNING, logger="colo.security"):
        srv = secure_server(server, ctx, SecuritySection(insecure=True))
        cli = secure_client(client, SecuritySection(insecure=True))
    assert srv.insecure and cli.insecure and not srv.running
    assert server.curve_server == 0 and server.mechanism == zmq.NULL
    assert client.mechanism == zmq.NULL
    warnings = [r for r in caplog.records if r.name == "colo.security" and r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("INSECURE" in r.getMessage() for r in warnings)
    client.connect(bind_random(server))
    client.send(b"plain")
    assert server.poll(ARRIVE_MS) == zmq.POLLIN
    assert server.recv_multipart()[1] == b"plain"
    srv.stop()
    cli.stop()


def _security_records(caplog, level):
    return [r.getMessage() for r in caplog.records if r.name == "colo.security" and r.levelno == level]


def test_insecure_warning_once_while_the_primary_reconnects_and_again_when_it_changes(ctx, caplog):
    insecure = SecuritySection(insecure=True)

    def reconnect(endpoint=None):                 # what the primary does per connection attempt
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        secure_client(sock, insecure, endpoint)
        sock.close()

    with caplog.at_level(logging.DEBUG, logger="colo.security"):
        for _ in range(20):
            reconnect()
        assert len(_security_records(caplog, logging.WARNING)) == 1
        assert len(_security_records(caplog, logging.DEBUG)) == 19      # the repeats, out of sight
        reconnect("tcp://10.0.0.2:7800")          # something changed: the replica's address
        reconnect("tcp://10.0.0.2:7800")
        warnings = _security_records(caplog, logging.WARNING)
        assert len(warnings) == 2 and "tcp://10.0.0.2:7800" in warnings[1]
        server = ctx.socket(zmq.ROUTER)           # the other side has its own warning
        server.linger = 0
        secure_server(server, ctx, insecure).stop()
        assert len(_security_records(caplog, logging.WARNING)) == 3
        secure_server(server, ctx, insecure).stop()
        assert len(_security_records(caplog, logging.WARNING)) == 3


def test_insecure_warning_comes_back_after_a_secure_setup(keys, ctx, caplog):
    with caplog.at_level(logging.INFO, logger="colo.security"):
        for security in (SecuritySection(insecure=True), client_section(keys), client_section(keys),
                         SecuritySection(insecure=True)):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            secure_client(sock, security)
            sock.close()
    assert len(_security_records(caplog, logging.WARNING)) == 2
    assert len([m for m in _security_records(caplog, logging.INFO) if "CURVE client" in m]) == 1


# -- with the agents' asyncio sockets ------------------------------------------------------

@pytest.mark.asyncio
async def test_thread_authenticator_guards_asyncio_sockets(keys):
    actx = zmq.asyncio.Context()
    server = actx.socket(zmq.ROUTER)
    server.linger = 0
    security = secure_server(server, actx, server_section(keys))
    sockets = [server]
    try:
        endpoint = bind_random(server)
        good = actx.socket(zmq.DEALER)
        bad = actx.socket(zmq.DEALER)
        sockets += [good, bad]
        for sock, name in ((good, "primary"), (bad, "intruder")):
            sock.linger = 0
            secure_client(sock, client_section(keys, name=name))
            sock.connect(endpoint)
        await bad.send(b"forged")
        await good.send(b"epoch 1")
        _, payload = await asyncio.wait_for(server.recv_multipart(), ARRIVE_MS / 1000)
        assert payload == b"epoch 1"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(server.recv_multipart(), NEVER_MS / 1000)
    finally:
        for sock in sockets:
            sock.close()
        security.stop()
        actx.term()
