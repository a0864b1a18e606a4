"""Bad input gets a clear error naming the problem."""

from __future__ import annotations

import pytest

from ring import (ConfigError, GuestBuildError, KvmError, KvmMachine, KvmUnavailableError, MachineConfig,
                  RingSizeError, SlotOverlapError, Workload, validate_ring_entries)
from ring.backend import choose_backend, kvm_status
from ring.guest import build
from ring.kvm import Kvm
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
