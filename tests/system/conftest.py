"""The system tests' fixture: the agents of one test, in its own folder, stopped after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Agents


@pytest.fixture
def agents(tmp_path) -> Iterator[Agents]:
    running = Agents(tmp_path)
    yield running
    running.stop()
