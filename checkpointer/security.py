"""The replication channel's security: ZeroMQ CURVE keys, the replica's allow-list, --insecure.

Why CURVE. The channel carries a whole guest's memory and the commands that
decide what the standby becomes; whoever can inject frames can rewrite the
replica's guest, and whoever can read them reads the guest. ZeroMQ's CURVE
mechanism (CurveZMQ: Curve25519 key exchange, then every frame encrypted and
authenticated with short-term keys) gives both secrecy and peer
authentication inside libzmq, with no extra process or certificate authority,
and it keeps ZeroMQ's reconnect behaviour. It is on by default; ``--insecure``
(``[security] insecure = true``) turns it off for local experiments, and says
so loudly in the log: once per process and side, and again only when what it
says changes (the primary sets up a new socket on every reconnect attempt,
twice a second while it waits for a replica; the same warning each time would
bury everything else in the log).

Which side is which. In CURVE the *server* is the side that holds a key pair
the other side must already know; here that is the replica, because it binds
(``--listen``) and the primary connects to it. So:

- the replica (server) has its own pair, ``KEYS/replica.key`` (public) and
  ``KEYS/replica.key_secret``, and a list of the primary public keys it accepts
  (``--authorized-keys``: one ``.key`` file or a directory of them);
- the primary (client) has its own pair, ``KEYS/primary.key`` and
  ``KEYS/primary.key_secret``, and the replica's public key
  (``--peer-public-key KEYS/replica.key``), which it checks the server against.

``colo-keys DIR`` makes the pairs (the secret file is created mode 0600). Only
public ``.key`` files are ever copied between hosts.

How a peer is refused. libzmq asks a ZAP handler (ZeroMQ's authentication
protocol, on ``inproc://zeromq.zap.01`` in the socket's context) whether the
client's long-term public key is acceptable. The handler here is pyzmq's
``ThreadAuthenticator`` with a callback that accepts exactly the authorized
keys. A refused client never completes its handshake, so nothing it sends
reaches the replica's socket (libzmq keeps retrying it; each refusal is logged
as a warning on "colo.security").

Why a thread and not ``AsyncioAuthenticator``. Both run in the same process
and context as the agent's ``zmq.asyncio`` sockets (the ZAP socket only has to
share the libzmq context, and pyzmq opens it as a plain socket whatever the
context's socket class). The thread version answers handshakes whatever the
agent's event loop is doing (a long checkpoint, a blocked callback), needs no
running loop to start, and stops synchronously (``stop()`` joins the thread),
so it can be stopped from ``finally`` blocks and tests without awaiting a
cancelled task. The callback reads a frozen set, so the thread shares no
mutable state with the loop.

Two rules the caller keeps: set up security *before* bind/connect (the
options apply to connections made afterwards; with ``curve_server`` set and no
ZAP handler running, libzmq would accept any client key), and run one
authenticator per zmq context (ZAP binds a fixed inproc address).
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import stat
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ring.errors import ConfigError

from .config import SecuritySection

__all__ = [
    "ZAP_DOMAIN", "generate_keys", "keys_main", "load_public_key", "load_key_pair",
    "load_authorized_keys", "ServerSecurity", "ClientSecurity", "secure_server", "secure_client",
    "forget_setup_messages",
]

log = logging.getLogger("colo.security")

ZAP_DOMAIN = "colo-ring"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"

INSECURE_WARNING = ("INSECURE: the replication channel is neither authenticated nor encrypted "
                    "(--insecure). Anyone who can reach {endpoint} can read the guest's memory "
                    "and {what}. Use this for local experiments only.")


class _SaidOnce:
    """Per side ("server", "client"): the last setup message logged, so a repeat is not logged again.

    Shared by every socket of the process (the primary makes a socket per reconnect).
    Thread-safe: agents and tests set sockets up from several threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._said: dict[str, str] = {}

    def say(self, side: str, level: int, message: str) -> None:
        with self._lock:
            repeat = self._said.get(side) == message
            self._said[side] = message
        log.log(logging.DEBUG if repeat else level, message)

    def forget(self) -> None:
        """Log every message again once (for tests, and for a process that starts over)."""
        with self._lock:
            self._said.clear()


_said = _SaidOnce()
forget_setup_messages = _said.forget


# -- key files -----------------------------------------------------------------

def _check_name(name: str) -> None:
    if not name or name != name.strip() or "/" in name or name in (".", ".."):
        raise ConfigError(f"key name {name!r} must be a plain name (files NAME.key, NAME.key_secret)")


def generate_keys(directory: str, name: str, *, force: bool = False) -> tuple[str, str]:
    """Make a CURVE key pair DIRECTORY/NAME.key (public) and NAME.key_secret (mode 0600).

    Refuses (ConfigError) to replace an existing file unless force=True. Returns
    (public_path, secret_path).
    """
    _check_name(name)
    public = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret = os.path.join(directory, name + SECRET_SUFFIX)
    if not force:
        existing = [p for p in (public, secret) if os.path.lexists(p)]
        if existing:
            raise ConfigError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                              f"not replacing a key pair (use --force to replace it)")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        old_umask = os.umask(0o077)      # the secret file is never readable by others, not even briefly
        try:
            public_made, secret_made = zmq.auth.create_certificates(directory, name)
        finally:
            os.umask(old_umask)
        os.chmod(secret_made, 0o600)
        os.chmod(public_made, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write a key pair in {directory}: {exc.strerror or exc}") from None
    return str(public_made), str(secret_made)


def _hint(path: str) -> str:
    base = os.path.basename(path)
    for suffix in (SECRET_SUFFIX, PUBLIC_SUFFIX):
        if base.endswith(suffix):
            name = base[: -len(suffix)]
            return f"make it with `colo-keys {os.path.dirname(path) or '.'} --name {name}`"
    return "make key pairs with `colo-keys DIR`"


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist: {_hint(path)}")
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a directory, not a key file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{what} {path} holds no CURVE public key: it is not a key file made by "
                          f"colo-keys ({_hint(path)})") from None
    _check_key(public, path, "public")
    if secret is not None:
        _check_key(secret, path, "secret")
    return public, secret


def _check_key(key: bytes, path: str, kind: str) -> None:
    try:
        ok = len(key) == 40 and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(f"the {kind} key in {path} is not a CURVE key (40 Z85 characters): "
                          f"the file is damaged; {_hint(path)}")


def load_public_key(path: str, what: str = "public key file") -> bytes:
    """The Z85 public key in a key file (a .key or a .key_secret file)."""
    return _load(path, what)[0]


def load_key_pair(keys_dir: str, name: str) -> tuple[bytes, bytes]:
    """(public, secret) from KEYS_DIR/NAME.key_secret, which holds both (Z85)."""
    _check_name(name)
    path = os.path.join(keys_dir, name + SECRET_SUFFIX)
    public, secret = _load(path, "secret key file")
    if secret is None:
        raise ConfigError(f"secret key file {path} holds only a public key: {_hint(path)}")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("secret key file %s can be read by other users (mode %o): run chmod 600 %s",
                    path, stat.S_IMODE(mode), path)
    return public, secret


def load_authorized_keys(path: str) -> frozenset[bytes]:
    """The public keys in one key file, or in every *.key file of a directory."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(glob.escape(path), "*" + PUBLIC_SUFFIX)))
        if not files:
            raise ConfigError(f"authorized keys directory {path} holds no public key files (*.key): "
                              f"copy the primary's public key there (colo-keys DIR --name primary "
                              f"makes DIR/primary.key)")
    else:
        files = [path]
    return frozenset(load_public_key(f, "authorized key file") for f in files)


def _require(value: str, key: str, flag: str, advice: str) -> str:
    if not value:
        raise ConfigError(f"security.{key} is not set: {advice} (pass {flag}, or set {key} in "
                          f"[security]); or pass --insecure for a local experiment")
    return value


# -- the two sides -------------------------------------------------------------

class _AllowList:
    """ZAP credentials callback: accept exactly these public keys (runs in the ZAP thread)."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys
        self.lock = threading.Lock()
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            log.debug("accepted a peer with CURVE key %s", key.decode("ascii", "replace"))
            return True
        with self.lock:
            self.refused += 1
        log.warning("refused a peer: its CURVE public key %s is not among the authorized keys",
                    key.decode("ascii", "replace"))
        return False


@dataclass
class ServerSecurity:
    """What secure_server set up on the binding (replica) side; stop() ends the authenticator."""

    insecure: bool
    public_key: bytes | None = None
    authorized: frozenset[bytes] = frozenset()
    _authenticator: ThreadAuthenticator | None = field(default=None, repr=False)
    _allow: _AllowList | None = field(default=None, repr=False)

    @property
    def refused(self) -> int:
        """How many handshakes were refused for an unknown key."""
        return self._allow.refused if self._allow else 0

    @property
    def running(self) -> bool:
        return self._authenticator is not None and self._authenticator.is_alive()

    def stop(self) -> None:
        """Stop the authenticator (idempotent). Stop it after closing the sockets it guards."""
        auth, self._authenticator = self._authenticator, None
        if auth is not None:
            auth.stop()

    def __enter__(self) -> ServerSecurity:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class ClientSecurity:
    """What secure_client set on the connecting (primary) side; stop() is for symmetry."""

    insecure: bool
    public_key: bytes | None = None
    server_key: bytes | None = None

    def stop(self) -> None:
        pass


def secure_server(socket: zmq.Socket, ctx: zmq.Context | None,
                  security: SecuritySection, endpoint: str | None = None) -> ServerSecurity:
    """Make `socket` (the replica's, before bind) a CURVE server accepting only the authorized keys.

    Starts a ThreadAuthenticator on `ctx` (default: the socket's context; one per
    context). With security.insecure, sets nothing and logs a loud warning (once,
    and again when it changes: `endpoint`, if given, is named in it).
    Raises ConfigError for missing, unreadable or damaged key files.
    """
    if security.insecure:
        _said.say("server", logging.WARNING, INSECURE_WARNING.format(
            endpoint=endpoint or "the replica's endpoint",
            what="send it frames that rewrite the standby guest"))
        return ServerSecurity(insecure=True)
    name = security.key_name or "replica"
    keys_dir = _require(security.keys_dir, "keys_dir", "--keys-dir DIR",
                        f"the replica needs its key pair (make it with `colo-keys DIR --name {name}`)")
    authorized_path = _require(security.authorized_keys, "authorized_keys", "--authorized-keys PATH",
                               "the replica needs the primary public keys it accepts "
                               "(DIR/primary.key from `colo-keys DIR --name primary`)")
    public, secret = load_key_pair(keys_dir, name)
    authorized = load_authorized_keys(authorized_path)
    allow = _AllowList(authorized)
    auth = ThreadAuthenticator(ctx if ctx is not None else socket.context,
                               log=logging.getLogger("colo.security.zap"))
    auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=allow)
    try:
        auth.start()
    except zmq.ZMQError as exc:
        auth.stop()
        raise RuntimeError(f"cannot start the CURVE authenticator: {exc} (only one authenticator can "
                           f"run per zmq context)") from exc
    try:
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_secretkey = secret
        socket.curve_publickey = public
        socket.curve_server = True
    except BaseException:
        auth.stop()
        raise
    _said.say("server", logging.INFO, f"replication channel: CURVE server with key {public.decode()}, "
                                      f"{len(authorized)} authorized primary key(s)")
    return ServerSecurity(insecure=False, public_key=public, authorized=authorized,
                          _authenticator=auth, _allow=allow)


def client_keys(security: SecuritySection) -> tuple[bytes, bytes, bytes]:
    """The primary's (public, secret) key pair and the replica's public key, checked.

    Raises ConfigError naming what is missing or damaged: the primary calls this
    before it starts its guest, so a bad key never costs a running VM.
    """
    name = security.key_name or "primary"
    keys_dir = _require(security.keys_dir, "keys_dir", "--keys-dir DIR",
                        f"the primary needs its key pair (make it with `colo-keys DIR --name {name}`)")
    server_path = _require(security.peer_public_key, "peer_public_key", "--peer-public-key FILE",
                           "the primary needs the replica's public key (DIR/replica.key from "
                           "`colo-keys DIR --name replica`)")
    public, secret = load_key_pair(keys_dir, name)
    return public, secret, load_public_key(server_path, "replica public key file")


def secure_client(socket: zmq.Socket, security: SecuritySection,
                  endpoint: str | None = None) -> ClientSecurity:
    """Make `socket` (the primary's, before connect) a CURVE client of the replica's key.

    With security.insecure, sets nothing and logs a loud warning: once per process,
    and again only when it changes (`endpoint`, the replica's, is named in it if
    given), however often the primary reconnects. Raises ConfigError for missing,
    unreadable or damaged key files.
    """
    if security.insecure:
        _said.say("client", logging.WARNING, INSECURE_WARNING.format(
            endpoint=f"the network between the agents ({endpoint})" if endpoint
            else "the network between the agents", what="impersonate the replica"))
        return ClientSecurity(insecure=True)
    public, secret, server_key = client_keys(security)
    socket.curve_secretkey = secret
    socket.curve_publickey = public
    socket.curve_serverkey = server_key
    _said.say("client", logging.INFO, f"replication channel: CURVE client with key {public.decode()}, "
                                      f"replica key {server_key.decode()}")
    return ClientSecurity(insecure=False, public_key=public, server_key=server_key)


# -- colo-keys -----------------------------------------------------------------

def _advice(directory: str, name: str) -> list[str]:
    public = os.path.join(directory, name + PUBLIC_SUFFIX)
    if name == "primary":
        return [f"  primary: --keys-dir {directory}",
                f"  replica: --authorized-keys {public}   (copy {public} to the replica's host)"]
    if name == "replica":
        return [f"  replica: --keys-dir {directory}",
                f"  primary: --peer-public-key {public}   (copy {public} to the primary's host)"]
    return [f"  the agent that owns it: --keys-dir {directory} --key-name {name}",
            f"  if it is a primary's, give the replica --authorized-keys {public}",
            f"  if it is a replica's, give the primary --peer-public-key {public}"]


def keys_main(argv: Sequence[str] | None = None) -> int:
    """colo-keys DIR [--name NAME ...] [--force]: make CURVE key pairs and say who gets which file."""
    parser = argparse.ArgumentParser(
        prog="colo-keys",
        description="Make CURVE key pairs for the colo-ring replication channel: DIR/NAME.key "
                    "(public, give it to the peer) and DIR/NAME.key_secret (keep it on this host).")
    parser.add_argument("directory", metavar="DIR", help="where the key files go (created if missing)")
    parser.add_argument("--name", action="append", default=None, metavar="NAME",
                        help="key pair name: primary, replica, or another; may be repeated "
                             "(default: both primary and replica)")
    parser.add_argument("--force", action="store_true", help="replace existing key files")
    args = parser.parse_args(argv)
    names = args.name or ["primary", "replica"]
    for name in names:
        try:
            public, secret = generate_keys(args.directory, name, force=args.force)
        except ConfigError as exc:
            print(f"colo-keys: {exc}", file=sys.stderr)
            return 1
        print(f"{name}: public key {public}")
        print(f"{' ' * len(name)}  secret key {secret} (keep it on this host, mode 0600)")
        print("\n".join(_advice(args.directory, name)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(keys_main())
