"""Bad input gets a clear error naming the problem; a signal is not an error."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from ring import (ConfigError, GuestBuildError, KvmError, KvmMachine, KvmUnavailableError, MachineConfig,
                  RingSizeError, SlotOverlapError, Workload, validate_ring_entries)
from ring.backend import choose_backend, kvm_status, open_machine
from ring.guest import build
from ring import abi, kvm as binding
from ring.kvm import Kvm, SignalsBlocked
from ring.memory import GuestMemory, SlotSpec, check_no_overlap


@pytest.mark.parametrize("entries, words", [
    (100, "out of range"), (128, "out of range"), (131072, "out of range"),
    (300, "not a power of two"), (4095, "not a power of two"), ("4096", "integer"), (True, "integer"),
])
def test_invalid_ring_size(entries, words) -> None:
    with pytest.raises(RingSizeError, match=words):
        MachineConfig(ring_entries=entries)


@pytest.mark.parametrize("entries", [256, 512, 4096, 65536])
def test_valid_ring_sizes(entries: int) -> None:
    assert validate_ring_entries(entries) == entries


def test_ring_size_beyond_the_hosts_limit() -> None:
    with pytest.raises(RingSizeError, match="exceeds this host's KVM limit of 65536 bytes"):
        validate_ring_entries(8192, max_bytes=65536)


def test_missing_dev_kvm_is_named(tmp_path) -> None:
    missing = tmp_path / "kvm"
    with pytest.raises(KvmUnavailableError, match=f"{missing} does not exist"):
        Kvm(str(missing))
    usable, reason = kvm_status(str(missing))
    assert not usable and "does not exist" in reason


def test_dev_kvm_that_is_not_kvm(tmp_path) -> None:
    fake = tmp_path / "kvm"
    fake.write_text("")
    with pytest.raises(KvmUnavailableError, match="is not a KVM device .KVM_GET_API_VERSION failed: ENOTTY"):
        Kvm(str(fake))


def test_machine_on_missing_kvm_fails_cleanly(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist"):
        KvmMachine(MachineConfig(), kvm_path=str(tmp_path / "nope"))


def test_unknown_backend_and_env(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="backend 'xen'"):
        choose_backend("xen")
    monkeypatch.setenv("COLO_RING_BACKEND", "qemu")
    with pytest.raises(ConfigError, match="COLO_RING_BACKEND='qemu'"):
        choose_backend("auto")
    monkeypatch.setenv("COLO_RING_BACKEND", "sim")
    assert choose_backend("auto")[0] == "sim"


def test_overlapping_slots_are_refused() -> None:
    specs = [SlotSpec(0, 0, 4 << 20, "low"), SlotSpec(1, 2 << 20, 4 << 20, "data")]
    with pytest.raises(SlotOverlapError, match=r"slot 1 \(data\) at 0x200000 overlaps slot 0"):
        GuestMemory(specs)
    with pytest.raises(SlotOverlapError, match="not unique"):
        check_no_overlap([SlotSpec(0, 0, 4096), SlotSpec(0, 8192, 4096)])


def test_misaligned_slot() -> None:
    with pytest.raises(ConfigError, match="multiples of 4096"):
        GuestMemory([SlotSpec(0, 100, 4096)])


def test_guest_program_that_does_not_build(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLO_RING_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.c"
    source.write_text('#include "runtime.h"\nvoid guest_main(u64 v, struct params *p) { this is not C }\n')
    with pytest.raises(GuestBuildError, match="broken.c does not build"):
        build.build_program(source)
    with pytest.raises(GuestBuildError, match="does not exist"):
        build.build_program(tmp_path / "absent.c")


def test_missing_gcc_is_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLO_RING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GuestBuildError, match="gcc was not found on PATH"):
        build.build_program("workloads.c")


def test_build_cache_is_keyed_by_content(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COLO_RING_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tiny.c"
    source.write_text('#include "runtime.h"\nvoid guest_main(u64 v, struct params *p) { done(7); }\n')
    first = build.build_program(source)
    assert len(list((tmp_path / "cache" / "guests").glob("tiny-*.bin"))) == 1
    source.write_text('#include "runtime.h"\nvoid guest_main(u64 v, struct params *p) { done(8); }\n')
    second = build.build_program(source)
    assert first != second
    assert len(list((tmp_path / "cache" / "guests").glob("tiny-*.bin"))) == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"vcpus": 0}, "vcpus must be between"), ({"vcpus": 9}, "vcpus must be between"),
    ({"data_bytes": 3 << 20}, "multiple of 2 MiB"), ({"data_bytes": 1 << 50}, "exceeds"),
    ({"dirty_log": "pml"}, "dirty_log must be"),
])
def test_bad_machine_config(kwargs, words) -> None:
    with pytest.raises(ConfigError, match=words):
        MachineConfig(**kwargs)


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "random"}, "unknown workload 'random'"), ({"hot_percent": 101}, "hot_percent"),
    ({"stride": 0}, "stride"), ({"seed": -1}, "seed"),
])
def test_bad_workload(kwargs, words) -> None:
    with pytest.raises(ConfigError, match=words):
        Workload(**kwargs)


def test_working_set_larger_than_memory() -> None:
    with pytest.raises(ConfigError, match="does not fit the data region"):
        Workload(working_set_pages=10_000).resolved(data_pages=512, vcpus=1)


# --- signals: EINTR is retried, the reset runs with signals blocked ------------------------------

class _FakeIoctl:
    """Stands in for libc's ioctl: fails with the given errnos in turn, then returns 7."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)
        self.calls = 0

    def __call__(self, fd, request, pointer) -> int:
        self.calls += 1
        if self.errnos:
            ctypes.set_errno(self.errnos.pop(0))
            return -1
        return 7


def test_an_ioctl_interrupted_by_a_signal_is_repeated(monkeypatch) -> None:
    fake = _FakeIoctl(errno.EINTR, errno.EINTR)
    monkeypatch.setattr(binding, "_libc_ioctl", fake)
    assert binding.ioctl(3, abi.KVM_GET_REGS, 0) == 7
    assert fake.calls == 3


def test_an_ioctl_error_after_an_interruption_names_the_ioctl(monkeypatch) -> None:
    monkeypatch.setattr(binding, "_libc_ioctl", _FakeIoctl(errno.EINTR, errno.EBADF))
    with pytest.raises(KvmError, match="KVM_GET_SREGS failed: EBADF") as info:
        binding.ioctl(3, abi.KVM_GET_SREGS, 0)
    assert info.value.errno == errno.EBADF


def test_kvm_run_returns_its_eintr_as_the_kick(monkeypatch) -> None:
    fake = _FakeIoctl(errno.EINTR)
    monkeypatch.setattr(binding, "_libc_ioctl", fake)
    assert binding.run_ioctl(3) == -errno.EINTR and fake.calls == 1


def test_a_wrapper_on_a_bad_fd_names_its_ioctl() -> None:
    with pytest.raises(KvmError, match="KVM_RESET_DIRTY_RINGS failed: EBADF"):
        binding.Vm(None, -1).reset_dirty_rings()
    with pytest.raises(KvmError, match="KVM_RESET_DIRTY_RINGS failed: EBADF"):
        binding.Vm(None, -1).reset_dirty_rings(block_signals=False)


@pytest.fixture
def usr2_handler():
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_signals_are_held_for_the_block_and_delivered_after(usr2_handler) -> None:
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    guard = SignalsBlocked()
    with guard:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR2)
        assert signal.SIGUSR2 in signal.sigpending()
        assert {signal.SIGALRM, signal.SIGPROF, signal.SIGINT} <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert usr2_handler == [signal.SIGUSR2]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert not guard.stopped                          # a blockable signal cannot cut the block short


def test_a_stop_during_the_block_is_noticed() -> None:
    """SIGSTOP cannot be blocked, and it can cut a reset short: the stop itself is the trace."""
    pid = os.getpid()
    waker = subprocess.Popen([sys.executable, "-c", f"import os, signal, time\nwhile True:\n"
                              f"    os.kill({pid}, signal.SIGCONT)\n    time.sleep(0.01)"])
    try:
        guard = SignalsBlocked()
        with guard:
            os.kill(pid, signal.SIGSTOP)              # stopped here until the waker's next SIGCONT
        assert guard.stopped
    finally:
        waker.kill()
        waker.wait()
    with guard:
        pass
    assert not guard.stopped


def test_sleeping_in_the_block_counts_as_a_stop() -> None:
    """A ptrace or job-control stop is a voluntary context switch; so is any sleep (a safe false alarm)."""
    guard = SignalsBlocked()
    with guard:
        time.sleep(0.001)
    assert guard.stopped


# --- machines from ring.backend -------------------------------------------------------------------

def test_the_simulator_refuses_a_program_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="guest program kvstore.c needs the KVM backend"):
        open_machine(MachineConfig(), backend="sim", program="kvstore.c")


def test_memory_holding_a_capture_must_match_its_layout() -> None:
    specs = [SlotSpec(0, 0, 1 << 20, "low")]
    with pytest.raises(ConfigError, match="slot 3, which the layout does not have"):
        GuestMemory.holding(specs, {3: np.zeros(1 << 20, dtype=np.uint8)})
    memory = GuestMemory.holding(specs, {0: np.full(1 << 20, 7, dtype=np.uint8)})
    try:
        assert int(memory.slots[0].bytes[12345]) == 7
    finally:
        memory.close()
