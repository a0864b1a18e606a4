"""Shared test settings: the tier of each test (its folder), and whether the KVM tests run here.

The folders are the tiers of ../shared/DESIGN.md: unit (pure code, any machine, seconds),
contract (the same assertions on the simulated and the real backend), kvm (real KVM guests),
system (agents as separate processes over real sockets). Each test gets its folder's marker,
so `pytest -m unit` and `pytest tests/unit` select the same tests. A test marked `kvm` (every
test under tests/kvm, and the system tests that run a KVM guest) is skipped, with the reason,
where /dev/kvm is not usable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ring.backend import kvm_status

KVM_USABLE, KVM_REASON = kvm_status()
TIERS = ("unit", "contract", "kvm", "system")
_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items) -> None:
    skip_kvm = pytest.mark.skip(reason=f"KVM tests skipped: {KVM_REASON}")
    for item in items:
        relative = Path(str(item.fspath)).resolve().relative_to(_HERE)
        tier = relative.parts[0] if len(relative.parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{relative}: every test lives in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(getattr(pytest.mark, tier))
        if tier == "kvm":
            item.add_marker(pytest.mark.kvm)
        if not KVM_USABLE and item.get_closest_marker("kvm") is not None:
            item.add_marker(skip_kvm)


def pytest_report_header(config) -> str:
    if KVM_USABLE:
        return f"KVM tests: RUN ({KVM_REASON})"
    return f"KVM tests: SKIPPED ({KVM_REASON})"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state = "ran" if KVM_USABLE else "were SKIPPED"
    terminalreporter.write_line(f"KVM tests {state}: {KVM_REASON}")
