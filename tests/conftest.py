"""Shared test settings: whether the KVM tests run here, and why not."""

from __future__ import annotations

import pytest

from ring.backend import kvm_status

KVM_USABLE, KVM_REASON = kvm_status()

requires_kvm = pytest.mark.skipif(not KVM_USABLE, reason=f"KVM tests skipped: {KVM_REASON}")


def pytest_report_header(config) -> str:
    if KVM_USABLE:
        return f"KVM tests: RUN ({KVM_REASON})"
    return f"KVM tests: SKIPPED ({KVM_REASON})"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state = "ran" if KVM_USABLE else "were SKIPPED"
    terminalreporter.write_line(f"KVM tests {state}: {KVM_REASON}")
