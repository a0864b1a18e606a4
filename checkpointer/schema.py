"""Control messages declared once: each field's declaration drives both pack and unpack.

pyroute2 declares a netlink message as data (``fields``, ``nla_map``) and lets
one generic encoder and one generic decoder walk the declaration. Here a
control message is a frozen dataclass made by ``@message(kind)``; each field is
a ``wire_field(spec, ...)`` that says its type and limits (the ``Spec``),
whether it may be null, and which header field or flag it must agree with.
``pack`` and ``unpack`` below are the only code that writes or reads these
payloads, so a check exists in both directions or in neither, and a new
message is one declaration.

The JSON of version 1, which this keeps byte for byte: one object, compact
separators, keys sorted, ASCII only, every declared key present (``null`` for
a field that may be None), nothing else. From version 3 (``BINARY_VERSION``) the messages an epoch sends, declared
``binary=True`` (EPOCH_BEGIN, EPOCH_END, ACK), travel as one fixed little-endian
struct instead: only their fields that no header field or flag carries, in
declaration order, each in a fixed width (``Spec.code``); the fields bound to the
header are taken from it (they cannot disagree). Same checks, no parser: a
payload of any other length, an unknown choice code, a bool other than 0 or 1,
a value out of range are ``MalformedPayload``. Unpacking trusts nothing: the size is
bounded before parsing, and duplicate keys, NaN/Infinity, unknown or missing
keys, wrong types, out-of-range values and disagreement with the header are
all ``MalformedPayload`` errors that name the message and the field. Packing
runs the same checks, so nothing is sent that the peer would refuse.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, dataclass_transform

from .frames import U16, U32, U64, Flag, Frame, Kind, MalformedPayload, byte_view, frame_where

__all__ = ["BINARY_VERSION", "Spec", "Int", "Text", "Bool", "Choice", "HexBytes", "ListOf", "Nested", "WireField",
           "wire_field", "message", "record", "Declaration", "declaration", "declared_messages", "Packed", "pack",
           "unpack", "describe", "MAX_CONTROL_PAYLOAD", "MAX_TEXT"]

MAX_CONTROL_PAYLOAD = 1 << 20       # JSON control payloads are small
MAX_TEXT = 1024                     # any string field
BINARY_VERSION = 3                  # from this version the messages declared binary travel as structs


# --- what a field may hold -------------------------------------------------------------------


class Spec:
    """The type and limits of one field. ``dump`` and ``load`` both check; ``name`` names the field in errors."""

    def dump(self, value: Any, name: str) -> Any:
        """The JSON value of ``value``, or MalformedPayload."""
        raise NotImplementedError

    def load(self, raw: Any, name: str) -> Any:
        """The field value of the parsed JSON ``raw``, or MalformedPayload."""
        raise NotImplementedError

    def normalise(self, value: Any) -> Any:
        """The canonical form of a value given to a constructor (never raises; pack checks)."""
        return value

    def describe(self) -> str:
        raise NotImplementedError

    #: the struct code of the field in a binary payload ("" for a spec that has no fixed width)
    code = ""

    def to_binary(self, value: Any, name: str) -> Any:
        """The struct value of ``value`` (checked as ``dump`` checks it)."""
        return self.dump(value, name)

    def from_binary(self, raw: Any, name: str) -> Any:
        """The field value of the struct value ``raw``, or MalformedPayload."""
        return self.load(raw, name)

    def describe_binary(self) -> str:
        return _CODE_NAMES[self.code]


_CHOICE_CODES: dict[type, dict] = {}     # a Choice's enum -> {member: its code in a binary payload}
_CHOICE_MEMBERS: dict[type, tuple] = {}  # a Choice's enum -> its members, in code order (code 1 first)
_CODE_NAMES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64"}
_CODE_TOPS = {"B": 0xFF, "H": U16, "I": U32, "Q": U64}


@dataclass(frozen=True)
class Int(Spec):
    """An integer in [lo, hi] (never a bool), optionally a power of two."""

    lo: int = 0
    hi: int = U64
    power_of_two: bool = False

    def load(self, raw: Any, name: str) -> int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise MalformedPayload(f"{name} must be an integer, got {type(raw).__name__}")
        if not self.lo <= raw <= self.hi:
            raise MalformedPayload(f"{name} {raw} out of range [{self.lo}, {self.hi}]")
        if self.power_of_two and raw & (raw - 1):
            raise MalformedPayload(f"{name} {raw} is not a power of two")
        return raw

    dump = load

    @property
    def code(self) -> str:
        return next(c for c in "HIQ" if self.hi <= _CODE_TOPS[c])

    @property
    def exact(self) -> bool:
        """Every value of its struct code is valid (no check needed when reading one)."""
        return self.lo == 0 and self.hi == _CODE_TOPS[self.code] and not self.power_of_two

    def from_binary(self, raw: int, name: str) -> int:
        if raw < self.lo or raw > self.hi or (self.power_of_two and raw & (raw - 1)):
            return self.load(raw, name)           # (raises, with the message load gives)
        return raw

    def describe(self) -> str:
        names = {(0, U64): "u64", (0, U32): "u32", (0, U16): "u16"}
        tops = {U64: "2^64-1", U32: "2^32-1", U16: "2^16-1"}
        kind = names.get((self.lo, self.hi)) or f"int in [{self.lo}, {tops.get(self.hi, self.hi)}]"
        return kind + (", a power of two" if self.power_of_two else "")


@dataclass(frozen=True)
class Text(Spec):
    """A string of at most ``limit`` characters; with ``truncate``, longer ones are cut when packing."""

    limit: int = MAX_TEXT
    truncate: bool = False

    def dump(self, value: Any, name: str) -> str:
        if isinstance(value, str) and self.truncate:
            value = value[:self.limit]
        return self.load(value, name)

    def load(self, raw: Any, name: str) -> str:
        if not isinstance(raw, str) or len(raw) > self.limit:
            raise MalformedPayload(f"{name} must be a string of at most {self.limit} characters")
        return raw

    def describe(self) -> str:
        return f"string, at most {self.limit} characters" + (" (longer is cut when sent)" if self.truncate else "")


@dataclass(frozen=True)
class Bool(Spec):
    """true or false."""

    def load(self, raw: Any, name: str) -> bool:
        if not isinstance(raw, bool):
            raise MalformedPayload(f"{name} must be true or false, got {type(raw).__name__}")
        return raw

    dump = load
    code = "B"

    def to_binary(self, value: Any, name: str) -> int:
        return int(self.dump(value, name))

    def from_binary(self, raw: int, name: str) -> bool:
        if raw > 1:
            raise MalformedPayload(f"{name} must be 0 or 1, got {raw}")
        return bool(raw)

    def describe(self) -> str:
        return "bool"

    def describe_binary(self) -> str:
        return "u8 (0 or 1)"


@dataclass(frozen=True)
class Choice(Spec):
    """One value of a str-valued enum; read back as the enum member."""

    choices: type[enum.StrEnum]

    def _member(self, value: Any, name: str) -> enum.StrEnum:
        try:
            return self.choices(value)
        except ValueError:
            raise MalformedPayload(f"{name} {value!r} is not one of {[c.value for c in self.choices]}") from None

    def dump(self, value: Any, name: str) -> str:
        return self._member(value, name).value

    def load(self, raw: Any, name: str) -> enum.StrEnum:
        if not isinstance(raw, str) or len(raw) > MAX_TEXT:
            raise MalformedPayload(f"{name} must be a string, one of {[c.value for c in self.choices]}")
        return self._member(raw, name)

    def normalise(self, value: Any) -> Any:
        try:
            return self.choices(value)
        except ValueError:
            return value

    def describe(self) -> str:
        return f"{self.choices.__name__}: {' | '.join(c.value for c in self.choices)}"

    code = "B"

    def to_binary(self, value: Any, name: str) -> int:
        codes = _CHOICE_CODES.get(self.choices)
        if codes is None:
            codes = _CHOICE_CODES[self.choices] = {member: i for i, member in enumerate(self.choices, 1)}
        return codes[self._member(value, name)]

    def from_binary(self, raw: int, name: str) -> enum.StrEnum:
        members = _CHOICE_MEMBERS.get(self.choices)
        if members is None:
            members = _CHOICE_MEMBERS[self.choices] = tuple(self.choices)
        if not 1 <= raw <= len(members):
            raise MalformedPayload(f"{name} code {raw} is not one of 1 to {len(members)} "
                                   f"({self.choices.__name__})")
        return members[raw - 1]

    def describe_binary(self) -> str:
        return f"u8, {self.choices.__name__} by its place: " + ", ".join(
            f"{i} {c.value}" for i, c in enumerate(self.choices, 1))


@dataclass(frozen=True)
class HexBytes(Spec):
    """Exactly ``size`` bytes, sent as 2 * size lowercase hex digits."""

    size: int

    def dump(self, value: Any, name: str) -> str:
        try:
            data = bytes(memoryview(value))
        except TypeError:
            raise MalformedPayload(f"{name} must be {self.size} bytes, got a {type(value).__name__}") from None
        if len(data) != self.size:
            raise MalformedPayload(f"{name} must be {self.size} bytes, got {len(data)}")
        return data.hex()

    def load(self, raw: Any, name: str) -> bytes:
        if not isinstance(raw, str) or not re.fullmatch(f"[0-9a-f]{{{2 * self.size}}}", raw):
            shown = raw[:40] if isinstance(raw, str) else raw
            raise MalformedPayload(f"{name} must be {2 * self.size} lowercase hex digits, got {shown!r}")
        return bytes.fromhex(raw)

    def describe(self) -> str:
        return f"{self.size} bytes, as {2 * self.size} lowercase hex digits"

    @property
    def code(self) -> str:
        return f"{self.size}s"

    exact = True

    def to_binary(self, value: Any, name: str) -> bytes:
        data = value if type(value) is bytes else None
        if data is None or len(data) != self.size:
            return bytes.fromhex(self.dump(value, name))      # (its checks and messages)
        return data

    def from_binary(self, raw: bytes, name: str) -> bytes:
        return raw

    def describe_binary(self) -> str:
        return f"{self.size} bytes"


@dataclass(frozen=True)
class ListOf(Spec):
    """1 to ``limit`` items of ``item`` (with ``unique``, none twice); read back as a tuple."""

    item: Spec
    limit: int
    unique: bool = False

    def _items(self, value: Any, name: str, convert: Callable[[Any, str], Any]) -> Any:
        if not isinstance(value, (list, tuple)) or not 0 < len(value) <= self.limit:
            raise MalformedPayload(f"{name} must be a list of 1 to {self.limit} items")
        items = [convert(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if self.unique and len(set(items)) != len(items):
            raise MalformedPayload(f"{name} must not list an item twice, got {items}")
        return items

    def dump(self, value: Any, name: str) -> list:
        return self._items(value, name, self.item.dump)

    def load(self, raw: Any, name: str) -> tuple:
        if not isinstance(raw, list):
            raise MalformedPayload(f"{name} must be a list of 1 to {self.limit} items")
        return tuple(self._items(raw, name, self.item.load))

    def normalise(self, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    def describe(self) -> str:
        return f"1 to {self.limit}{' distinct' if self.unique else ''} x {self.item.describe()}"


@dataclass(frozen=True)
class Nested(Spec):
    """A JSON object declared with ``@record``."""

    cls: type

    def dump(self, value: Any, name: str) -> dict:
        if not isinstance(value, self.cls):
            raise MalformedPayload(f"{name} must be a {self.cls.__name__}, got a {type(value).__name__}")
        return _dump_fields(declaration(self.cls), value, name)

    def load(self, raw: Any, name: str) -> Any:
        if not isinstance(raw, dict):
            raise MalformedPayload(f"{name} must be a JSON object, got {type(raw).__name__}")
        return declaration(self.cls).cls(**_load_fields(declaration(self.cls), raw, name))

    def describe(self) -> str:
        inner = ", ".join(f"{f.name}: {f.spec.describe()}" for f in declaration(self.cls).fields)
        return f"{self.cls.__name__} {{{inner}}}"


# --- fields and declarations --------------------------------------------------------------------

_HEADER_FIELDS = ("epoch", "count", "session")


@dataclass(frozen=True)
class WireField:
    """How one dataclass field travels: its spec, and what in the header it must agree with."""

    name: str
    spec: Spec
    optional: bool = False        # may be None, sent as null (the key itself is always present)
    header: str | None = None     # the header field ("epoch", "count", "session") it must equal
    flag: Flag | None = None      # a bool also carried as this header flag; both must agree
    in_payload: bool = True       # False: carried by the header only (taken from it when unpacking)
    #: a field added after version 1: left out of the JSON while it has its default value (so the
    #: version-1 JSON stays byte for byte what it was), and taken as the default when absent
    omitted_at: Any = None
    added: bool = False

    def dump(self, value: Any, what: str) -> Any:
        if value is None and self.optional:
            return None
        return self.spec.dump(value, f"{what} {self.name}")

    def load(self, raw: Any, what: str) -> Any:
        if raw is None and self.optional:
            return None
        return self.spec.load(raw, f"{what} {self.name}")


def wire_field(spec: Spec, *, default: Any = dataclasses.MISSING, optional: bool = False,
               header: str | None = None, flag: Flag | None = None, in_payload: bool = True,
               added: bool = False) -> Any:
    """Declare a message field (a dataclasses.field carrying its WireField in the metadata)."""
    if header is not None and header not in _HEADER_FIELDS:
        raise ValueError(f"header must be one of {_HEADER_FIELDS}, got {header!r}")
    if not in_payload and header is None:
        raise ValueError("a field outside the payload must come from a header field")
    if flag is not None and not isinstance(spec, Bool):
        raise ValueError(f"a field carried as the {flag.name} flag must be a Bool, not {spec!r}")
    if added and default is dataclasses.MISSING:
        raise ValueError("a field added after version 1 needs a default (what its absence means)")
    meta = {"wire": dict(spec=spec, optional=optional, header=header, flag=flag, in_payload=in_payload,
                         omitted_at=default if added else None, added=added)}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Binary:
    """The struct layout of a message from BINARY_VERSION: the fields in it, and those from the header."""

    struct: struct.Struct
    payload: tuple[WireField, ...]          # in the struct, in order
    header: tuple[WireField, ...]           # taken from a header field or flag
    names: tuple[str, ...] = ()             # of the payload fields
    labels: tuple[str, ...] = ()            # how errors name the payload fields ("EPOCH_BEGIN reason")
    checked: tuple[WireField, ...] = ()     # payload fields whose struct value needs a check


@dataclass(frozen=True)
class Declaration:
    """A declared message or record: its class, its frame kind (None for a record) and its fields."""

    cls: type
    kind: Kind | None
    fields: tuple[WireField, ...]
    binary: Binary | None = None
    check: bool = False                 # the class defines check() (rules across fields)

    @property
    def what(self) -> str:
        return self.kind.name if self.kind is not None else self.cls.__name__


def _binary_layout(cls: type, kind: Kind | None, fields: list[WireField]) -> Binary:
    payload = tuple(f for f in fields if f.header is None and f.flag is None)
    for f in payload:
        if f.optional or f.added or not f.spec.code:
            raise TypeError(f"{cls.__name__}.{f.name} cannot travel in a binary payload "
                            f"(optional, added, or of no fixed width)")
    header = tuple(f for f in fields if f.header is not None or f.flag is not None)
    checked = tuple(f for f in payload if not (isinstance(f.spec, (Int, HexBytes)) and f.spec.exact))
    what = kind.name if kind is not None else cls.__name__
    return Binary(struct.Struct("<" + "".join(f.spec.code for f in payload)), payload, header,
                  names=tuple(f.name for f in payload), checked=checked,
                  labels=tuple(f"{what} {f.name}" for f in payload))


_DECLARATIONS: dict[type, Declaration] = {}
_BY_KIND: dict[Kind, Declaration] = {}


_NORMALISED: dict[type, tuple[WireField, ...]] = {}      # per class: the fields whose spec normalises


def _normalise(self: Any) -> None:
    for f in _NORMALISED[type(self)]:
        value = getattr(self, f.name)
        if value is not None:
            object.__setattr__(self, f.name, f.spec.normalise(value))


@dataclass_transform(frozen_default=True, field_specifiers=(wire_field,))
def message(kind: Kind | None = None, *, binary: bool = False) -> Callable[[type], type]:
    """Make ``cls`` a frozen dataclass whose every field is a ``wire_field``, and the payload of ``kind``.

    A class may define ``check(self)`` for rules across fields (raise
    MalformedPayload); it runs after the field checks, when packing and unpacking.
    With ``binary``, from BINARY_VERSION its payload is a fixed struct (see the module's docstring).
    """
    def wrap(cls: type) -> type:
        if "__post_init__" in cls.__dict__:
            raise TypeError(f"{cls.__name__}: a declared message may not define __post_init__")
        cls.__post_init__ = _normalise
        cls = dataclass(frozen=True)(cls)
        fields = []
        for f in dataclasses.fields(cls):
            if "wire" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with wire_field()")
            fields.append(WireField(f.name, **f.metadata["wire"]))
        if kind is None and any(f.header or f.flag or not f.in_payload for f in fields):
            raise TypeError(f"{cls.__name__}: only a message (with a kind) has header fields")
        decl = Declaration(cls, kind, tuple(fields), _binary_layout(cls, kind, fields) if binary else None,
                           check=callable(getattr(cls, "check", None)))
        _NORMALISED[cls] = tuple(f for f in fields if type(f.spec).normalise is not Spec.normalise)
        if kind is not None:
            if kind in _BY_KIND:
                raise TypeError(f"{kind.name} is declared twice: {_BY_KIND[kind].cls.__name__}, {cls.__name__}")
            cls.KIND = kind
            _BY_KIND[kind] = decl
        _DECLARATIONS[cls] = decl
        return cls
    return wrap


def record(cls: type) -> type:
    """A declared JSON object used inside messages (no kind, no header fields)."""
    return message(None)(cls)


def declaration(cls: type) -> Declaration:
    try:
        return _DECLARATIONS[cls]
    except KeyError:
        raise TypeError(f"not a control message: {cls.__name__}") from None


def declared_messages() -> dict[Kind, type]:
    """Every declared control message, by kind."""
    return {kind: decl.cls for kind, decl in _BY_KIND.items()}


def _check(obj: Any) -> None:
    """The declared class's rules across fields, if it has any."""
    check = getattr(obj, "check", None)
    if check is not None:
        check()


def _dump_fields(decl: Declaration, obj: Any, what: str) -> dict:
    body = {}
    for f in decl.fields:
        value = getattr(obj, f.name)
        raw = f.dump(value, what)
        if f.in_payload and not (f.added and value == f.omitted_at):
            body[f.name] = raw
    _check(obj)
    return body


def _load_fields(decl: Declaration, obj: dict, what: str, header: dict[str, int] | None = None) -> dict:
    keys = {f.name for f in decl.fields if f.in_payload}
    required = {f.name for f in decl.fields if f.in_payload and not f.added}
    missing, unknown = required - obj.keys(), obj.keys() - keys
    if missing:
        raise MalformedPayload(f"{what} lacks {sorted(missing)}")
    if unknown:
        raise MalformedPayload(f"{what} has unknown keys {sorted(unknown)}")
    return {f.name: (f.load(obj[f.name], what) if f.name in obj else f.omitted_at) if f.in_payload
            else header[f.header] for f in decl.fields}


# --- pack and unpack -----------------------------------------------------------------------------


class Packed(NamedTuple):
    """A packed control message: the header fields it sets, and its JSON payload."""

    kind: Kind
    epoch: int
    count: int
    flags: int
    payload: bytes


def _dump_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedPayload(f"duplicate key in {sorted(k for k, _ in pairs)}")
    return out


def _reject_constant(name: str) -> None:
    raise MalformedPayload(f"{name} is not valid JSON here")


def _load_json(data: Any, what: str) -> dict:
    view = byte_view(data, f"{what} payload")
    if view.nbytes > MAX_CONTROL_PAYLOAD:
        raise MalformedPayload(f"{what} payload is {view.nbytes} bytes, limit {MAX_CONTROL_PAYLOAD}")
    try:
        obj = json.loads(bytes(view).decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except MalformedPayload as err:
        raise MalformedPayload(f"{what} payload: {err}") from None
    except (ValueError, RecursionError) as err:
        raise MalformedPayload(f"{what} payload is not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise MalformedPayload(f"{what} payload must be a JSON object, got {type(obj).__name__}")
    return obj


def pack(msg: Any, session: int | None = None, version: int = 1) -> Packed:
    """Check ``msg`` and give its kind, the header fields it binds, and its payload at ``version``.

    With ``session`` (the sender's), a field bound to the header session must equal it.
    """
    decl = declaration(type(msg))
    binary = decl.binary if version >= BINARY_VERSION else None
    if binary is not None:
        return _pack_binary(decl, binary, msg)
    payload = _dump_json(_dump_fields(decl, msg, decl.what))
    header = {"epoch": 0, "count": 0, "session": session}
    flags = 0
    for f in decl.fields:
        value = getattr(msg, f.name)
        if f.header == "session" and session is not None and value != session:
            raise MalformedPayload(f"{decl.what} {f.name} {value:#x} differs from the sender's session {session:#x}")
        if f.header is not None:
            header[f.header] = value
        if f.flag is not None and value:
            flags |= int(f.flag)
    return Packed(decl.kind, header["epoch"], header["count"], flags, payload)


def _pack_binary(decl: Declaration, binary: Binary, msg: Any) -> Packed:
    """pack at BINARY_VERSION: the same checks, field by field (the messages every epoch sends)."""
    try:
        payload = binary.struct.pack(*[f.spec.to_binary(getattr(msg, f.name), label)
                                       for f, label in zip(binary.payload, binary.labels)])
    except struct.error as exc:                    # (a value the checks let through: never expected)
        raise MalformedPayload(f"{decl.what}: {exc}") from None
    header = {"epoch": 0, "count": 0}
    flags = 0
    for f in binary.header:
        value = f.dump(getattr(msg, f.name), decl.what)
        if f.flag is not None:
            if value:
                flags |= int(f.flag)
        else:
            header[f.header] = value
    if decl.check:
        msg.check()
    return Packed(decl.kind, header["epoch"], header["count"], flags, payload)


def _shown(name: str, value: Any) -> str:
    return f"{value:#x}" if name == "session" else str(value)


def unpack(frame: Frame) -> Any:
    """The control message a decoded frame carries, checked field by field and against its header."""
    decl = _BY_KIND.get(frame.kind)
    if decl is None:
        raise TypeError(f"{frame.kind!r} carries no control message")
    if decl.binary is not None and frame.version >= BINARY_VERSION:
        return _unpack_binary(decl, frame)
    what = decl.what
    header = {"epoch": frame.epoch, "count": frame.count, "session": frame.session}
    msg = decl.cls(**_load_fields(decl, _load_json(frame.payload, what), what, header))
    _check(msg)
    where = frame_where(frame.kind, frame.epoch, frame.seq)
    for f in decl.fields:
        value = getattr(msg, f.name)
        if f.header is not None and f.in_payload and value != header[f.header]:
            raise MalformedPayload(f"payload {f.name} {_shown(f.header, value)} differs from header {f.header} "
                                   f"{_shown(f.header, header[f.header])} on {where}")
        if f.flag is not None and value != bool(frame.flags & f.flag):
            raise MalformedPayload(f"payload {f.name} {value} differs from the header's {f.flag.name} flag "
                                   f"({'set' if frame.flags & f.flag else 'clear'}) on {where}")
    return msg


def _unpack_binary(decl: Declaration, frame: Frame) -> Any:
    binary, what = decl.binary, decl.what
    view = byte_view(frame.payload, f"{what} payload")
    if view.nbytes != binary.struct.size:
        raise MalformedPayload(f"{what} payload is {view.nbytes} bytes, version {frame.version} has "
                               f"{binary.struct.size} ({frame_where(frame.kind, frame.epoch, frame.seq)})")
    values = dict(zip(binary.names, binary.struct.unpack_from(view)))
    for f in binary.checked:
        values[f.name] = f.spec.from_binary(values[f.name], f"{what} {f.name}")
    for f in binary.header:
        if f.flag is not None:
            values[f.name] = bool(frame.flags & f.flag)
        else:
            values[f.name] = f.spec.from_binary(getattr(frame, f.header), f"{what} {f.name}")
    # Every value is checked and canonical: the instance is filled without __init__ (and its
    # normalising __post_init__), which cost as much as all the rest here.
    msg = object.__new__(decl.cls)
    msg.__dict__.update(values)
    _check(msg)
    return msg


def describe(cls: type) -> str:
    """A message's declaration as spec text, one line per field: the wire spec quotes it, a test compares."""
    decl = declaration(cls)
    lines = [f"{decl.what} ({cls.__name__})"]
    for f in decl.fields:
        notes = f.spec.describe()
        if f.optional:
            notes += ", or null"
        if f.header is not None:
            notes += f"; equals header {f.header}" if f.in_payload else f"; header {f.header} only, not in the JSON"
        if f.flag is not None:
            notes += f"; equals header flag {f.flag.name}"
        if f.added:
            notes += f"; version 2: left out while {json.dumps(f.spec.dump(f.omitted_at, f.name))}"
        lines.append(f"    {f.name:<16}{notes}")
    check = getattr(cls, "check", None)
    if check is not None and check.__doc__:
        lines.append(f"    and {check.__doc__.strip().splitlines()[0]}")
    if decl.binary is not None:
        layout = ", ".join(f"{f.name} {f.spec.describe_binary()}" for f in decl.binary.payload)
        lines.append(f"    from version {BINARY_VERSION}: {decl.binary.struct.size} bytes, {layout}"
                     + (f"; {', '.join(f.name for f in decl.binary.header)} only in the header"
                        if decl.binary.header else ""))
    return "\n".join(lines)
