"""The error tree of ring/: every failure names what failed and why."""

from __future__ import annotations

import errno as _errno
import os


class RingError(Exception):
    """Base of every error raised by ring/."""


class KvmError(RingError):
    """An ioctl (or mmap) on a KVM fd failed; carries the operation's name and errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        message = f"{op} failed: {name} ({os.strerror(err)})"
        if detail:
            message += f": {detail}"
        super().__init__(message)


class KvmUnavailableError(RingError):
    """/dev/kvm is missing, not accessible, or lacks a capability this project needs."""


class ConfigError(RingError, ValueError):
    """A machine or workload setting is out of range (ring size, memory size, vCPU count)."""


class RingSizeError(ConfigError):
    """A dirty ring size is not a power of two between 256 and 65536 entries."""


class SlotOverlapError(ConfigError):
    """Two memory slots overlap in guest-physical space."""


class GuestBuildError(RingError):
    """A guest program could not be compiled (missing gcc, or a compile error)."""


class GuestFault(RingError):
    """The guest stopped in a way it cannot continue from (shutdown, internal error)."""


class HarvestError(RingError):
    """The ring and KVM disagree (reset count mismatch, entry outside its slot)."""


class PageKeyError(RingError, ValueError):
    """A page key, or the slot and offset for one, is outside the bounds of ring.pages."""


class StateError(RingError):
    """An operation was called in the wrong state (harvest while running, resume while closed)."""
