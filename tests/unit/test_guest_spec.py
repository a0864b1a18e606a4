"""Guest specs: the agents learn about a guest from its spec, found by name (built-in or registered)."""

from __future__ import annotations

import pytest

from ring.errors import ConfigError
from ring.guest.spec import GuestParam, GuestSpec, find_guest, guest_names
from ring.workloads import WORKLOAD_IDS


def test_builtin_workloads_and_the_registered_service_are_found() -> None:
    names = guest_names()
    assert names[:len(WORKLOAD_IDS)] == tuple(WORKLOAD_IDS)
    kvstore = find_guest("kvstore")            # registered by scenarios/ through its entry point
    assert kvstore.is_service and kvstore.param_names == ("table_entries", "request_max")
    assert not find_guest("uniform").is_service and find_guest("uniform").program is None


def test_unknown_guest_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown guest 'nope': choose one of uniform, .*kvstore"):
        find_guest("nope")


@pytest.mark.parametrize("memory_mib, params, backend, words", [
    (32, {}, "kvm", "needs at least 64 MiB"),
    (64, {"table_entries": 3}, "kvm", "table_entries must be a power of two"),
    (64, {"colour": 1}, "kvm", "takes table_entries, request_max, not colour"),
    (64, {}, "sim", "kvm backend only"),
    (64, {"table_entries": 1 << 24}, "kvm", "cannot hold"),
])
def test_the_kvstore_spec_refuses_what_it_cannot_run_with(memory_mib, params, backend, words) -> None:
    with pytest.raises(ConfigError, match=words):
        find_guest("kvstore").check(memory_mib, params, backend)


def test_parameters_resolve_over_their_defaults() -> None:
    spec = GuestSpec("toy", params=(GuestParam("a", 0, 5), GuestParam("b", 1, 7)))
    assert spec.resolve({"b": 9}) == {"a": 5, "b": 9}
    with pytest.raises(ConfigError, match="outside the parameter block"):
        GuestParam("far", 10_000, 0)
    with pytest.raises(ConfigError, match="unknown device"):
        GuestSpec("toy", devices=("floppy",))
